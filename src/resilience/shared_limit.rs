//! The rate limit shared by every instance (`routes.rate_limit.shared`):
//! the same token bucket as `rate_limit`, kept in Redis and updated by one
//! Lua script so that concurrent instances cannot both take the last token.
//! The script reads Redis's own clock, so instances need not agree on time.
//!
//! Redis being down or slow must not take the proxy down with it, nor lift
//! the limit: a call that fails or takes longer than `redis.timeout` leaves
//! the request to the instance's own bucket (the pipeline's fallback,
//! counted in `backstop_rate_limit_local_fallback_total`), and Redis is
//! then skipped for a second instead of making every request wait for the
//! timeout. The Redis URL (which may hold a password) is never logged.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::rate_limit::Decision;
use crate::config::{RateLimitConfig, RedisConfig};

/// How long Redis is skipped after a failure.
const SKIP_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// Refills the bucket by the time passed, takes a token if there is one,
/// and returns {taken, tokens left}. Tokens travel as strings: Lua numbers
/// returned to Redis would be truncated to integers. They are written with
/// 17 digits: `tostring`'s 14 would turn 0.99999999999999989 into a whole
/// token.
const SCRIPT: &str = r#"
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local v = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(v[1])
local ts = tonumber(v[2])
if tokens == nil or ts == nil then
  tokens = burst
  ts = now
end
tokens = math.min(burst, tokens + math.max(0, now - ts) / 1000 * rate)
local taken = 0
if tokens >= 1 then
  tokens = tokens - 1
  taken = 1
end
local left = string.format('%.17g', tokens)
redis.call('HSET', KEYS[1], 'tokens', left, 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {taken, left}
"#;

/// The connection to the configured Redis, made on first use.
pub struct SharedLimiter {
    /// The URL and timeout it was made for (a reload may change `[redis]`).
    conn: Mutex<Option<(String, Duration, ConnectionManager)>>,
    skip_until_ms: AtomicU64,
    epoch: Instant,
}

impl Default for SharedLimiter {
    fn default() -> Self {
        SharedLimiter {
            conn: Mutex::new(None),
            skip_until_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

impl SharedLimiter {
    /// Takes a token from the shared bucket of (`route`, `key`); `None`
    /// when Redis could not answer in time (the caller judges the request
    /// by its own bucket).
    pub async fn check(
        &self,
        redis: &RedisConfig,
        route: &str,
        key: &str,
        limit: &RateLimitConfig,
    ) -> Option<Decision> {
        let now_ms = self.epoch.elapsed().as_millis() as u64;
        if now_ms < self.skip_until_ms.load(Ordering::Relaxed) {
            return None;
        }
        let result = match self.connection(redis) {
            Ok(mut conn) => {
                let redis_key = format!("{}ratelimit:{route}:{key}", redis.key_prefix);
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(SCRIPT)
                    .arg(1)
                    .arg(redis_key)
                    .arg(limit.requests_per_second)
                    .arg(limit.burst);
                let call = cmd.query_async::<(i64, String)>(&mut conn);
                match tokio::time::timeout(redis.timeout, call).await {
                    Ok(Ok(answer)) => Ok(answer),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no answer within {:?}", redis.timeout)),
                }
            }
            Err(e) => Err(e),
        };
        match result {
            Ok((taken, left)) => {
                let left: f64 = left.parse().unwrap_or(0.0);
                // The script's `taken` decides, whatever the digits say.
                let before = if taken == 1 {
                    (left + 1.0).max(1.0)
                } else {
                    left.min(1.0 - f64::EPSILON)
                };
                Some(Decision::from_tokens(limit, before))
            }
            Err(error) => {
                // From the failure, not the call's start: a call that took
                // a `redis.timeout` of a second or more would otherwise set
                // a skip already over.
                let failed_ms = self.epoch.elapsed().as_millis() as u64;
                let until = failed_ms + SKIP_AFTER_FAILURE.as_millis() as u64;
                let before = self.skip_until_ms.fetch_max(until, Ordering::Relaxed);
                // Logged once per skip period, by the call that started it
                // (the calls in flight when Redis failed all fail), so a
                // Redis outage does not flood the log.
                if before <= failed_ms {
                    tracing::warn!(route, %error, "shared rate limit unavailable: each instance limits on its own");
                }
                None
            }
        }
    }

    fn connection(&self, redis: &RedisConfig) -> Result<ConnectionManager, String> {
        let mut slot = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((url, timeout, conn)) = slot.as_ref() {
            if *url == redis.url && *timeout == redis.timeout {
                return Ok(conn.clone());
            }
        }
        let client =
            redis::Client::open(redis.url.as_str()).map_err(|_| "invalid Redis URL".to_string())?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(redis.timeout.max(Duration::from_millis(100))))
            .set_response_timeout(Some(redis.timeout))
            .set_number_of_retries(1);
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| format!("cannot set up the Redis connection: {:?}", e.kind()))?;
        *slot = Some((redis.url.clone(), redis.timeout, conn.clone()));
        Ok(conn)
    }
}
