//! The shared store: entries in Redis, seen by every Backstop instance.
//!
//! Redis trouble never breaks traffic. Every command is bounded by
//! `[redis].timeout` (tens of milliseconds); a failed or slow command is a
//! miss (or an unstored answer), counted in `backstop_redis_errors_total`
//! and logged at most once per [`LOG_EVERY`]. After [`TRIP_AFTER`]
//! consecutive failures a small breaker skips Redis altogether for
//! [`COOL_DOWN`]; then one request probes it, and a success closes the
//! breaker. The connection is made lazily and re-made in the background by
//! redis' `ConnectionManager`, so startup never waits for Redis.
//!
//! Keys are `<key_prefix>cache:<route>:<sha256 hex>`; values are the
//! compact binary form of `entry`; the Redis TTL is how long the entry is
//! fresh from storing (`ttl`, or what was left of the backend's `max-age`
//! if shorter) plus `stale_if_error`. A write to its URI unlinks it sooner.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::cache_key::CacheKey;
use super::entry::Entry;
use crate::config::{redact_url, RedisConfig};

/// Consecutive failures that open the breaker.
const TRIP_AFTER: u32 = 3;
/// How long Redis is skipped once the breaker is open.
const COOL_DOWN: Duration = Duration::from_secs(1);
/// At most one Redis error line per this interval (the rest are counted).
const LOG_EVERY: Duration = Duration::from_secs(10);
/// Admin purges scan many keys: each command may take this long at least.
const PURGE_COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

pub struct RedisStore {
    /// The settings this store was built from (a reload with other settings
    /// builds a new store).
    pub config: RedisConfig,
    conn: ConnectionManager,
    breaker: Breaker,
    errors: Counter,
    log: RateLimitedLog,
    /// What goes missing when Redis fails, for the log line.
    used_for: &'static str,
}

impl RedisStore {
    /// Builds the store without connecting. Fails only for a URL the client
    /// cannot use at all.
    pub fn new(config: &RedisConfig, errors: Counter) -> Result<RedisStore, String> {
        let client = redis::Client::open(config.url.as_str())
            .map_err(|e| format!("redis URL {}: {e}", redact_url(&config.url)))?;
        let settings = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(1)
            .set_max_delay(COOL_DOWN);
        let conn = ConnectionManager::new_lazy_with_config(client, settings)
            .map_err(|e| format!("redis {}: {e}", redact_url(&config.url)))?;
        Ok(RedisStore {
            config: config.clone(),
            conn,
            breaker: Breaker::default(),
            errors,
            log: RateLimitedLog::default(),
            used_for: "the shared cache",
        })
    }

    /// Names what Redis is used for in the "unavailable" log line (another
    /// user than the cache, e.g. cluster statistics).
    pub fn used_for(mut self, what: &'static str) -> RedisStore {
        self.used_for = what;
        self
    }

    /// The configured key prefix.
    pub fn prefix(&self) -> &str {
        &self.config.key_prefix
    }

    fn key(&self, route: &str, key: &CacheKey) -> String {
        format!("{}cache:{route}:{}", self.config.key_prefix, key.hex())
    }

    /// The stored entry; `None` on a miss and whenever Redis is unavailable.
    pub async fn get(&self, route: &str, key: &CacheKey) -> Option<Entry> {
        let cmd = redis::cmd("GET").arg(self.key(route, key)).to_owned();
        let value = self.run::<Option<Vec<u8>>>("GET", &cmd).await.flatten()?;
        Entry::decode(Bytes::from(value))
    }

    /// Stores an entry for `keep_for`; a failure only means it is not stored.
    pub async fn put(&self, route: &str, key: &CacheKey, entry: &Entry, keep_for: Duration) {
        let millis = keep_for.as_millis().max(1) as u64;
        let cmd = redis::cmd("SET")
            .arg(self.key(route, key))
            .arg(entry.encode())
            .arg("PX")
            .arg(millis)
            .to_owned();
        let _: Option<()> = self.run("SET", &cmd).await;
    }

    /// Deletes entries (a write made them stale). A failure is counted and
    /// logged like any other; the entries then live out their TTL.
    pub async fn remove(&self, route: &str, keys: &[CacheKey]) {
        let mut cmd = redis::cmd("UNLINK");
        for key in keys {
            cmd.arg(self.key(route, key));
        }
        let _: Option<u64> = self.run("UNLINK", &cmd).await;
    }

    /// Deletes every entry of a route (SCAN + UNLINK, in batches). Ignores
    /// the breaker: an operator asked for it and is told if it failed.
    pub async fn purge(&self, route: &str) -> Result<u64, String> {
        let pattern = format!("{}cache:{route}:*", glob_escape(&self.config.key_prefix));
        let timeout = self.config.timeout.max(PURGE_COMMAND_TIMEOUT);
        let mut conn = self.conn.clone();
        let mut cursor: u64 = 0;
        let mut deleted = 0u64;
        loop {
            let scan = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .to_owned();
            let (next, keys): (u64, Vec<String>) =
                tokio::time::timeout(timeout, scan.query_async(&mut conn))
                    .await
                    .map_err(|_| "redis timed out".to_string())?
                    .map_err(|e| format!("redis: {e}"))?;
            if !keys.is_empty() {
                let unlink = redis::cmd("UNLINK").arg(&keys).to_owned();
                let n: u64 = tokio::time::timeout(timeout, unlink.query_async(&mut conn))
                    .await
                    .map_err(|_| "redis timed out".to_string())?
                    .map_err(|e| format!("redis: {e}"))?;
                deleted += n;
            }
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    }

    /// Runs one command under the timeout and the breaker; `None` when it was
    /// skipped or failed.
    async fn run<T: redis::FromRedisValue>(&self, op: &str, cmd: &redis::Cmd) -> Option<T> {
        self.guarded(op, |mut conn| async move {
            cmd.query_async::<T>(&mut conn).await
        })
        .await
    }

    /// Runs one Redis call (a command, a pipeline) made by `call` on a
    /// connection, under the timeout and the breaker; `None` when it was
    /// skipped or failed (counted and logged, rate-limited).
    pub async fn guarded<T, F, Fut>(&self, op: &str, call: F) -> Option<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        if !self.breaker.allow() {
            return None;
        }
        let outcome = tokio::time::timeout(self.config.timeout, call(self.conn.clone()));
        match outcome.await {
            Ok(Ok(value)) => {
                self.breaker.success();
                Some(value)
            }
            Ok(Err(e)) => {
                self.failed(op, &e.to_string());
                None
            }
            Err(_) => {
                self.failed(op, "timed out");
                None
            }
        }
    }

    fn failed(&self, op: &str, error: &str) {
        self.errors.inc();
        let opened = self.breaker.failure();
        if let Some(suppressed) = self.log.allow() {
            tracing::warn!(
                op,
                error,
                suppressed,
                breaker_open = opened,
                url = %redact_url(&self.config.url),
                "redis unavailable: serving without {}",
                self.used_for
            );
        }
    }
}

/// The breaker around Redis: closed → (TRIP_AFTER failures) → open for
/// COOL_DOWN → one probe → closed on success, open again on failure.
#[derive(Default)]
struct Breaker {
    failures: AtomicU32,
    /// Milliseconds since `epoch` until which Redis is skipped; 0 = closed.
    open_until: AtomicU64,
    epoch: EpochClock,
}

impl Breaker {
    fn allow(&self) -> bool {
        let until = self.open_until.load(Ordering::Relaxed);
        if until == 0 {
            return true;
        }
        let now = self.epoch.now_ms();
        if now < until {
            return false;
        }
        // Cool-down over: exactly one caller wins the probe; the others keep
        // skipping until it reports.
        let next = now + COOL_DOWN.as_millis() as u64;
        self.open_until
            .compare_exchange(until, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }

    fn success(&self) {
        // Read first: on the hot path nothing changes, and a load does not
        // bounce the cache line between cores as a store would.
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if self.open_until.load(Ordering::Relaxed) != 0 {
            self.open_until.store(0, Ordering::Relaxed);
        }
    }

    /// Records a failure; true when the breaker is (now) open.
    fn failure(&self) -> bool {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= TRIP_AFTER {
            let until = self.epoch.now_ms() + COOL_DOWN.as_millis() as u64;
            self.open_until.store(until.max(1), Ordering::Relaxed);
            return true;
        }
        false
    }
}

/// Milliseconds since the store was built, from a monotonic clock.
struct EpochClock(Instant);

impl Default for EpochClock {
    fn default() -> Self {
        EpochClock(Instant::now())
    }
}

impl EpochClock {
    fn now_ms(&self) -> u64 {
        // +1 so that "now" is never 0, which means "closed".
        self.0.elapsed().as_millis() as u64 + 1
    }
}

/// Lets one line through per LOG_EVERY and counts the ones it held back.
#[derive(Default)]
struct RateLimitedLog {
    last: AtomicU64,
    suppressed: AtomicU64,
    epoch: EpochClock,
}

impl RateLimitedLog {
    /// `Some(lines suppressed since the last one)` when a line may be written.
    fn allow(&self) -> Option<u64> {
        let now = self.epoch.now_ms();
        let last = self.last.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= LOG_EVERY.as_millis() as u64;
        if due
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// Escapes Redis glob characters so a key prefix matches only itself.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\' | '^' | '-') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A shared handle, as the registry hands it out.
pub type SharedRedis = Arc<RedisStore>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_opens_after_consecutive_failures_and_probes_once() {
        let b = Breaker::default();
        assert!(b.allow());
        assert!(!b.failure());
        b.success();
        assert!(!b.failure());
        assert!(!b.failure());
        assert!(b.failure(), "third consecutive failure opens");
        assert!(!b.allow(), "open: skipped");
        // Pretend the cool-down is over.
        b.open_until.store(1, Ordering::Relaxed);
        assert!(b.allow(), "one probe");
        assert!(!b.allow(), "only one");
        b.success();
        assert!(b.allow(), "closed again");
    }

    #[test]
    fn glob_characters_in_prefixes_are_escaped() {
        assert_eq!(glob_escape("app:*[x]"), "app:\\*\\[x\\]");
        assert_eq!(glob_escape("backstop:"), "backstop:");
    }
}
