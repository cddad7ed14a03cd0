//! Cluster statistics through Redis: every instance pushes a snapshot of
//! its per-route statistics, and `/api-stats?scope=cluster` merges every
//! instance's snapshot with this instance's live statistics.
//!
//! Keys (under `[redis] key_prefix`):
//! - `stats:instances` — a sorted set of instance ids, scored by their last
//!   push (epoch ms); members silent for an hour are removed on push, and
//!   the set expires an hour after the last push.
//! - `stats:{instance}:{route}` — one route's [`Snapshot`] as JSON, with a
//!   TTL of three push intervals (at least a second), so a dead instance
//!   drops out of the cluster view by itself.
//! - `stats:history:{node}:{route}:{hourly|daily}:{start_ms}` — the
//!   summary of one finished hour or day, written once, living until it
//!   leaves the history (7 days after the hour's start, 30 after the
//!   day's). `node` names the instance across restarts (a random id kept
//!   in `data_dir/node-id`, see [`node_id`]); each route's history is read
//!   back at start, so `/api-stats` history survives a restart.
//!
//! A snapshot holds each period (`all`, `daily`, `hourly`) with its start,
//! the route's and paths' counters, the latency HDR histograms in
//! HdrHistogram's V2 format (base64), so merged percentiles are those of the
//! merged histograms, not averages of percentiles; and the charts' history
//! and the recent errors.
//!
//! Redis never holds a request or an admin answer up: every call goes
//! through the cache's `RedisStore` (bounded by `[redis].timeout`, a small
//! breaker, rate-limited logging). A failed read makes the caller answer
//! with this instance's statistics and say the cluster view is unavailable;
//! a failed push is simply retried at the next interval. This module never
//! touches the request path.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::recorder::{
    now_ms, view_json, ErrorEntry, RouteQuery, RouteStats, RouteView, Stats, RECENT_ERRORS,
};
use super::window::{self, Aggregate, Counts, Summary};
use super::Period;
use crate::cache::redis_store::RedisStore;
use crate::config::RedisConfig;
use crate::pipeline::Proxy;

/// Snapshot format version; snapshots of another version are skipped.
const VERSION: u32 = 1;
/// Instances that have not pushed for this long leave the instance set.
const FORGET_INSTANCE_MS: i64 = 3_600_000;
const PERIODS: [Period; 3] = [Period::All, Period::Daily, Period::Hourly];
const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 86_400_000;
/// The persisted history: (name, period length, periods kept) — as long
/// as the in-memory history (`RouteStats`).
const HISTORY: [(&str, i64, i64); 2] = [("hourly", HOUR_MS, 7 * 24), ("daily", DAY_MS, 30)];

/// This instance in the cluster: its id and its Redis connection.
pub struct Cluster {
    /// A UUIDv7 made at start: unique without coordination, and a restarted
    /// process is a new instance (its old keys expire).
    pub instance_id: String,
    /// This instance's name across restarts (set when pushing starts).
    node: OnceLock<String>,
    store: Mutex<Option<Slot>>,
    errors: Counter,
}

/// The store for one `[redis]` configuration (`None`: unusable URL).
struct Slot {
    config: RedisConfig,
    store: Option<Arc<RedisStore>>,
}

impl Cluster {
    /// `errors` counts failed Redis calls (`backstop_redis_errors_total`).
    pub fn new(errors: Counter) -> Cluster {
        Cluster {
            instance_id: uuid::Uuid::now_v7().to_string(),
            node: OnceLock::new(),
            store: Mutex::new(None),
            errors,
        }
    }

    fn node(&self) -> &str {
        self.node.get().map_or("", String::as_str)
    }

    /// The store for these settings; a reload that changes `[redis]` gets a
    /// new one.
    fn store(&self, config: &RedisConfig) -> Option<Arc<RedisStore>> {
        let mut slot = self.store.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = slot.as_ref() {
            if s.config.url == config.url
                && s.config.key_prefix == config.key_prefix
                && s.config.timeout == config.timeout
            {
                return s.store.clone();
            }
        }
        let store = match RedisStore::new(config, self.errors.clone()) {
            Ok(store) => Some(Arc::new(store.used_for("cluster statistics"))),
            Err(e) => {
                // Once per configuration, not once per push.
                tracing::error!(error = %e, "redis unusable: no cluster statistics");
                None
            }
        };
        *slot = Some(Slot {
            config: config.clone(),
            store: store.clone(),
        });
        store
    }

    /// Pushes a snapshot of every route with statistics, and the summaries
    /// of periods finished since the last successful push.
    pub async fn push(
        &self,
        stats: &Stats,
        redis: &RedisConfig,
        interval: Duration,
        history: &mut History,
    ) {
        let Some(store) = self.store(redis) else {
            return;
        };
        stats.flush().await;
        let now = now_ms();
        let snapshots = {
            let mut state = stats.state();
            let mut taken = Vec::with_capacity(state.routes.len());
            for (name, route) in state.routes.iter_mut() {
                route.roll(now);
                taken.push((name.clone(), Taken::of(route)));
            }
            taken
        };
        // Encoding (histogram serialization, JSON) happens outside the lock
        // the aggregator needs.
        let mut ser = V2Serializer::new();
        let prefix = store.prefix().to_string();
        let ttl_ms = ttl(interval).as_millis() as u64;
        let mut pipe = redis::pipe();
        let mut written = Vec::new();
        for (route, taken) in snapshots {
            for (kind, past) in &taken.past {
                let done = history.written.get(&(route.clone(), *kind)).copied();
                let (due, newest) = unwritten(past, done, kind, now);
                for (summary, left_ms) in due {
                    let Ok(body) = serde_json::to_string(summary) else {
                        continue;
                    };
                    let key = history_key(&prefix, self.node(), &route, kind, summary.start_ms);
                    pipe.cmd("SET")
                        .arg(key)
                        .arg(body)
                        .arg("PX")
                        .arg(left_ms)
                        .ignore();
                }
                if let Some(newest) = newest {
                    written.push(((route.clone(), *kind), newest));
                }
            }
            let snapshot = taken.encode(&self.instance_id, self.node(), now, &mut ser);
            let Ok(body) = serde_json::to_string(&snapshot) else {
                continue;
            };
            pipe.cmd("SET")
                .arg(route_key(&prefix, &self.instance_id, &route))
                .arg(body)
                .arg("PX")
                .arg(ttl_ms)
                .ignore();
        }
        let members = instances_key(&prefix);
        pipe.cmd("ZADD")
            .arg(&members)
            .arg(now)
            .arg(&self.instance_id)
            .ignore();
        pipe.cmd("ZREMRANGEBYSCORE")
            .arg(&members)
            .arg("-inf")
            .arg(now - FORGET_INSTANCE_MS)
            .ignore();
        // The set itself goes an hour after the last push of any instance.
        pipe.cmd("PEXPIRE")
            .arg(&members)
            .arg(FORGET_INSTANCE_MS)
            .ignore();
        let pipe = &pipe;
        let pushed: Option<()> = store
            .guarded("stats push", |mut conn| async move {
                pipe.query_async(&mut conn).await
            })
            .await;
        // Summaries not written go again with the next push.
        if pushed.is_some() {
            history.written.extend(written);
        }
    }

    /// Reads back the persisted history of the routes not read yet (at
    /// start, and for routes added by a reload); a route whose read failed
    /// is tried again at the next push.
    pub async fn load_history(
        &self,
        stats: &Stats,
        redis: &RedisConfig,
        routes: &[String],
        history: &mut History,
    ) {
        if routes.iter().all(|r| history.loaded.contains(r)) {
            return;
        }
        let Some(store) = self.store(redis) else {
            return;
        };
        let prefix = store.prefix().to_string();
        let now = now_ms();
        for route in routes {
            if history.loaded.contains(route) {
                continue;
            }
            let mut wanted = Vec::new();
            for (kind, len_ms, keep) in HISTORY {
                let current = now - now.rem_euclid(len_ms);
                for k in 1..=keep {
                    let start = current - k * len_ms;
                    wanted.push((kind, history_key(&prefix, self.node(), route, kind, start)));
                }
            }
            let keys: Vec<&String> = wanted.iter().map(|(_, k)| k).collect();
            let keys = &keys;
            let Some(bodies) = store
                .guarded("stats history", |mut conn| async move {
                    redis::cmd("MGET")
                        .arg(keys)
                        .query_async::<Vec<Option<String>>>(&mut conn)
                        .await
                })
                .await
            else {
                return;
            };
            let mut found: HashMap<&'static str, Vec<Summary>> = HashMap::new();
            for ((kind, _), body) in wanted.iter().zip(bodies) {
                if let Some(summary) = body.and_then(|b| serde_json::from_str::<Summary>(&b).ok()) {
                    found.entry(*kind).or_default().push(summary);
                }
            }
            let restored: usize = found.values().map(Vec::len).sum();
            {
                let mut state = stats.state();
                let rs = state
                    .routes
                    .entry(route.clone())
                    .or_insert_with(|| RouteStats::new(now));
                rs.roll(now);
                for (kind, past) in found {
                    if let Some(newest) = past.iter().map(|s| s.start_ms).max() {
                        let mark = history
                            .written
                            .entry((route.clone(), kind))
                            .or_insert(newest);
                        *mark = (*mark).max(newest);
                    }
                    match kind {
                        "hourly" => rs.hours.restore(past),
                        _ => rs.days.restore(past),
                    }
                }
            }
            if restored > 0 {
                tracing::info!(route = %route, periods = restored, "statistics history restored from redis");
            }
            history.loaded.insert(route.clone());
        }
    }

    /// Every other instance's snapshot of `route`; `Err` (with a reason
    /// for the answer) when Redis did not answer in time. Bounded by two
    /// `[redis].timeout`s.
    pub async fn fetch(&self, redis: &RedisConfig, route: &str) -> Result<Vec<Snapshot>, String> {
        let unavailable = || {
            format!(
                "Redis did not answer within {:?} (see the log); these are this instance's statistics",
                redis.timeout
            )
        };
        let store = self.store(redis).ok_or_else(unavailable)?;
        let prefix = store.prefix().to_string();
        let members = instances_key(&prefix);
        let ids: Vec<String> = store
            .guarded("stats instances", |mut conn| async move {
                redis::cmd("ZRANGE")
                    .arg(&members)
                    .arg(0)
                    .arg(-1)
                    .query_async(&mut conn)
                    .await
            })
            .await
            .ok_or_else(unavailable)?;
        let keys: Vec<String> = ids
            .iter()
            .filter(|id| **id != self.instance_id)
            .map(|id| route_key(&prefix, id, route))
            .collect();
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let keys = &keys;
        let bodies: Vec<Option<String>> = store
            .guarded("stats fetch", |mut conn| async move {
                redis::cmd("MGET").arg(keys).query_async(&mut conn).await
            })
            .await
            .ok_or_else(unavailable)?;
        // A snapshot of this node by another instance id is this process's
        // previous run (killed, its keys not yet expired): left out, or its
        // restored history would count twice. Of one node, the newest wins.
        let mut by_node: HashMap<String, Snapshot> = HashMap::new();
        let mine = self.node();
        let snapshots = bodies
            .into_iter()
            .flatten()
            .filter_map(|body| serde_json::from_str::<Snapshot>(&body).ok())
            .filter(|s| s.v == VERSION && s.instance != self.instance_id);
        for s in snapshots {
            if !mine.is_empty() && s.node == mine {
                continue;
            }
            let node = if s.node.is_empty() {
                s.instance.clone()
            } else {
                s.node.clone()
            };
            match by_node.get(&node) {
                Some(seen) if seen.at_ms >= s.at_ms => {}
                _ => {
                    by_node.insert(node, s);
                }
            }
        }
        Ok(by_node.into_values().collect())
    }
}

/// Checks a serialized histogram's header (hdrhistogram's V2 layout: cookie,
/// payload length, offset, digits, lowest, highest, ratio; 40 bytes, big
/// endian) before hdrhistogram reads it: it sizes its buffers from these
/// fields, so a value written to Redis by anything else could make it ask
/// for gigabytes. Only histograms of this version's digits and lowest value
/// pass, with a highest value no larger than the one that covers
/// [`window::LATENCY_MAX_US`] (every version sends that bound itself; a
/// later one may send histograms sized to their longest latency). The
/// cookie must be V2's, uncompressed: hdrhistogram also reads compressed
/// values, whose header fields lie inside the zlib stream, unchecked here.
fn check_histogram_header(bytes: &[u8]) -> Result<(), String> {
    let field = |at: usize, len: usize| {
        bytes
            .get(at..at + len)
            .map(|b| b.iter().fold(0u64, |n, &byte| n << 8 | u64::from(byte)))
    };
    let (Some(cookie), Some(payload), Some(digits), Some(low), Some(high)) = (
        field(0, 4),
        field(4, 4),
        field(12, 4),
        field(16, 8),
        field(24, 8),
    ) else {
        return Err("latency histogram: too short".into());
    };
    if cookie != V2_COOKIE {
        return Err("latency histogram: not an uncompressed V2 histogram".into());
    }
    let highest = window::LATENCY_MAX_US.next_power_of_two();
    let own = (digits, low) == (u64::from(window::SIGNIFICANT_DIGITS), 1);
    if !own || !(2..highest).contains(&high) {
        return Err("latency histogram: not this version's bounds".into());
    }
    if payload > (bytes.len() as u64).saturating_sub(40) {
        return Err("latency histogram: payload longer than the value".into());
    }
    Ok(())
}

/// The first four bytes of hdrhistogram's uncompressed V2 serialization
/// (`V2Serializer`, the one this version writes).
const V2_COOKIE: u64 = 0x1c84_9313;

/// What the push task remembers of the persisted history.
#[derive(Default)]
pub struct History {
    /// The newest summary start written (or read back), by route and kind.
    written: HashMap<(String, &'static str), i64>,
    /// Routes whose history was read back.
    loaded: HashSet<String>,
}

/// Reads back the history at start, then pushes this instance's statistics
/// every `[stats] push_interval` while `[redis]` is configured and
/// statistics are on (both reloadable).
pub async fn run(proxy: Arc<Proxy>, shutdown: CancellationToken) {
    let node = node_id(&proxy.active.load().config.server.data_dir);
    let _ = proxy.stats.cluster.node.set(node);
    let mut history = History::default();
    loop {
        let config = proxy.active.load().config.clone();
        if let (Some(redis), true) = (&config.redis, config.stats.enabled) {
            let routes: Vec<String> = config.routes.iter().map(|r| r.name.clone()).collect();
            let cluster = &proxy.stats.cluster;
            cluster
                .load_history(&proxy.stats, redis, &routes, &mut history)
                .await;
        }
        let interval = config.stats.push_interval;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let config = proxy.active.load().config.clone();
        if let (Some(redis), true) = (&config.redis, config.stats.enabled) {
            let cluster = &proxy.stats.cluster;
            cluster
                .push(&proxy.stats, redis, interval, &mut history)
                .await;
        }
    }
}

/// The file in the data directory that names this instance across restarts.
pub const NODE_ID_FILE: &str = "node-id";

/// A stable name for this instance across restarts: a random id made the
/// first time and kept in `data_dir/node-id`. Random rather than derived
/// from the host and path: two instances with the same relative
/// `data_dir` in different working directories, or containers that share
/// a hostname, would get one name, and each would take the other's
/// snapshots for its own earlier run and leave them out. When the file can
/// be neither read nor written, a new random id for this run: the history
/// then starts afresh at each restart, but the instance is never mistaken
/// for another.
pub fn node_id(data_dir: &Path) -> String {
    match stored_node_id(data_dir) {
        Ok(id) => id,
        Err(e) => {
            tracing::warn!(
                error = %e,
                path = %data_dir.join(NODE_ID_FILE).display(),
                "cannot keep this instance's node id: its statistics history will not survive a restart"
            );
            new_node_id()
        }
    }
}

/// The id in `data_dir/node-id`, created (written whole, then renamed into
/// place, so a crash never leaves half an id) when absent or unusable.
fn stored_node_id(data_dir: &Path) -> std::io::Result<String> {
    let path = data_dir.join(NODE_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) if valid_node_id(text.trim()) => return Ok(text.trim().to_string()),
        // Damaged (or edited into something unusable): replaced.
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::create_dir_all(data_dir)?;
    let id = new_node_id();
    let temp = data_dir.join(format!(".{NODE_ID_FILE}.{}", std::process::id()));
    let written = write_synced(&temp, &id).and_then(|()| std::fs::rename(&temp, &path));
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written.map(|()| id)
}

fn write_synced(path: &Path, id: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::File::create(path)?;
    writeln!(file, "{id}")?;
    file.sync_all()
}

/// 64 random bits in hex.
fn new_node_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// An id that is safe in a Redis key: 1 to 64 of letters, digits, `-`, `_`
/// and `.` (an operator may name a node by writing the file).
fn valid_node_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn history_key(prefix: &str, node: &str, route: &str, kind: &str, start_ms: i64) -> String {
    format!("{prefix}stats:history:{node}:{route}:{kind}:{start_ms}")
}

/// The summaries of `past` not written yet (newer than `done`) that are
/// still inside the history, with how long they have left there (ms); and
/// the newest start seen, the next `done`.
fn unwritten<'a>(
    past: &'a [Summary],
    done: Option<i64>,
    kind: &str,
    now: i64,
) -> (Vec<(&'a Summary, i64)>, Option<i64>) {
    let (len_ms, keep) = history_len(kind);
    let mut newest = done;
    let mut due = Vec::new();
    for s in past.iter().filter(|s| done.is_none_or(|d| s.start_ms > d)) {
        let left_ms = s.start_ms + len_ms * keep - now;
        if left_ms > 0 {
            due.push((s, left_ms));
        }
        newest = newest.max(Some(s.start_ms));
    }
    (due, newest)
}

/// (period length, periods kept) of a history kind.
fn history_len(kind: &str) -> (i64, i64) {
    HISTORY
        .iter()
        .find(|(k, _, _)| *k == kind)
        .map_or((HOUR_MS, 0), |(_, len, keep)| (*len, *keep))
}

/// How long a pushed snapshot lives: a few push intervals, so one late push
/// does not drop an instance from the view, but a dead one goes soon.
fn ttl(interval: Duration) -> Duration {
    (interval * 3).max(Duration::from_secs(1))
}

fn route_key(prefix: &str, instance: &str, route: &str) -> String {
    format!("{prefix}stats:{instance}:{route}")
}

fn instances_key(prefix: &str) -> String {
    format!("{prefix}stats:instances")
}

/// A route's statistics as copied under the lock, encoded after.
struct Taken {
    /// Finished hours and days, for the persisted history.
    past: Vec<(&'static str, Vec<Summary>)>,
    path_count: usize,
    periods: Vec<(Period, Aggregate, i64, Vec<Summary>)>,
    errors: Vec<ErrorEntry>,
}

impl Taken {
    fn of(route: &RouteStats) -> Taken {
        Taken {
            past: vec![
                ("hourly", route.hours.history.iter().cloned().collect()),
                ("daily", route.days.history.iter().cloned().collect()),
            ],
            path_count: route.path_count(),
            periods: PERIODS
                .iter()
                .map(|&p| {
                    let (agg, start) = route.period(p);
                    (p, agg, start, route.history_series(p).1)
                })
                .collect(),
            errors: route.errors.iter().cloned().collect(),
        }
    }

    fn encode(self, instance: &str, node: &str, now: i64, ser: &mut V2Serializer) -> Snapshot {
        Snapshot {
            v: VERSION,
            instance: instance.to_string(),
            node: node.to_string(),
            at_ms: now,
            path_count: self.path_count,
            periods: self
                .periods
                .into_iter()
                .map(|(period, agg, start_ms, history)| WirePeriod {
                    period: period.as_str().to_string(),
                    start_ms,
                    route: WireCounts::encode(&agg.route, ser),
                    paths: agg
                        .paths
                        .iter()
                        .map(|(p, c)| (p.clone(), WireCounts::encode(c, ser)))
                        .collect(),
                    history,
                })
                .collect(),
            errors: self.errors.into_iter().map(|e| (e.at_ms, e)).collect(),
        }
    }
}

/// One instance's statistics of one route, as stored in Redis.
#[derive(Debug, Serialize, Deserialize)]
pub struct Snapshot {
    pub v: u32,
    pub instance: String,
    /// The instance across restarts (see [`node_id`]).
    #[serde(default)]
    pub node: String,
    pub at_ms: i64,
    pub path_count: usize,
    pub periods: Vec<WirePeriod>,
    /// Oldest first, with their time in epoch ms.
    pub errors: Vec<(i64, ErrorEntry)>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct WirePeriod {
    pub period: String,
    pub start_ms: i64,
    pub route: WireCounts,
    #[serde(default)]
    pub paths: BTreeMap<String, WireCounts>,
    #[serde(default)]
    pub history: Vec<Summary>,
}

/// [`Counts`] as stored: the counters, and the latency histogram in
/// HdrHistogram's V2 format, base64 (readable by other HdrHistogram tools).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireCounts {
    pub total: u64,
    pub success: u64,
    pub failure: u64,
    #[serde(default)]
    pub status_codes: BTreeMap<u16, u64>,
    pub retries: u64,
    #[serde(default)]
    pub cache: BTreeMap<String, u64>,
    pub captures: u64,
    pub latency: String,
}

impl WireCounts {
    fn encode(c: &Counts, ser: &mut V2Serializer) -> WireCounts {
        // Sent with the bounds every version reads (an earlier one refuses
        // any other): a histogram here grows to its longest latency, so its
        // own bounds vary. The format leaves out the empty buckets above
        // the longest latency, so the wire size is the same.
        let mut wire = window::wire_histogram();
        let mut bytes = Vec::new();
        // Adding into the widest bounds and serializing into a Vec do not
        // fail; if either ever did, the counts still go, without latencies.
        let serialized =
            wire.add(c.latency_histogram()).is_ok() && ser.serialize(&wire, &mut bytes).is_ok();
        let latency = if serialized {
            BASE64.encode(&bytes)
        } else {
            String::new()
        };
        WireCounts {
            total: c.total,
            success: c.success,
            failure: c.failure,
            status_codes: c.status_codes.clone(),
            retries: c.retries,
            cache: c.cache.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            captures: c.captures,
            latency,
        }
    }

    /// Adds these counts to `into`; a histogram that does not decode is an
    /// error (the snapshot is then left out, not half-counted).
    fn add_to(&self, into: &mut Counts, de: &mut Deserializer) -> Result<(), String> {
        let mut c = Counts::default();
        if !self.latency.is_empty() {
            let bytes = BASE64
                .decode(&self.latency)
                .map_err(|e| format!("latency: {e}"))?;
            check_histogram_header(&bytes)?;
            let h: Histogram<u32> = de
                .deserialize(&mut bytes.as_slice())
                .map_err(|e| format!("latency histogram: {e:?}"))?;
            c.add_latency_histogram(&h);
        }
        c.total = self.total;
        c.success = self.success;
        c.failure = self.failure;
        c.status_codes = self.status_codes.clone();
        c.retries = self.retries;
        // Cache results are a closed set; a name this version does not know
        // (a newer instance) is left out rather than invented.
        for (name, n) in &self.cache {
            if let Some(known) = cache_result(name) {
                c.cache.insert(known, *n);
            }
        }
        c.captures = self.captures;
        into.merge(&c);
        Ok(())
    }
}

fn cache_result(name: &str) -> Option<&'static str> {
    ["hit", "miss", "bypass", "stale"]
        .into_iter()
        .find(|known| *known == name)
}

/// The cluster's answer for one route and period: this instance's live
/// statistics merged with every other instance's latest snapshot. For
/// `hourly` and `daily`, a snapshot of an earlier hour or day (pushed
/// before the period changed) is left out. `instances` in the answer says
/// how many instances were merged.
pub fn merged_json(
    local: &RouteStats,
    name: &str,
    q: &RouteQuery<'_>,
    remote: &[Snapshot],
) -> Option<Value> {
    let (mut agg, mut start_ms) = local.period(q.period);
    let (interval_s, mut history) = local.history_series(q.period);
    let mut errors: Vec<ErrorEntry> = local.errors.iter().cloned().collect();
    let mut path_count = local.path_count();
    let with_paths = q.paths || q.path.is_some();
    let mut de = Deserializer::new();
    let mut instances = 1;
    for snapshot in remote {
        let Some(p) = snapshot
            .periods
            .iter()
            .find(|p| p.period == q.period.as_str())
        else {
            continue;
        };
        if q.period != Period::All && p.start_ms != start_ms {
            continue;
        }
        match merge_period(&mut agg, p, with_paths, &mut de) {
            Ok(()) => instances += 1,
            Err(e) => {
                tracing::debug!(instance = %snapshot.instance, error = %e, "unreadable statistics snapshot left out");
                continue;
            }
        }
        start_ms = start_ms.min(p.start_ms);
        history = merge_history(history, &p.history);
        path_count = path_count.max(snapshot.path_count);
        errors.extend(snapshot.errors.iter().map(|(at_ms, e)| ErrorEntry {
            at_ms: *at_ms,
            ..e.clone()
        }));
    }
    errors.sort_by_key(|e| e.at_ms);
    let skip = errors.len().saturating_sub(RECENT_ERRORS);
    let view = RouteView {
        agg: &agg,
        start_ms,
        errors: errors.iter().skip(skip).collect(),
        path_count,
        interval_s,
        history: json!(history),
    };
    let mut out = view_json(view, name, q)?;
    if let Some(obj) = out.as_object_mut() {
        obj.insert("scope".into(), json!("cluster"));
        obj.insert("instances".into(), json!(instances));
    }
    Some(out)
}

/// Adds one snapshot's period to `agg`, all or nothing.
fn merge_period(
    agg: &mut Aggregate,
    p: &WirePeriod,
    with_paths: bool,
    de: &mut Deserializer,
) -> Result<(), String> {
    let mut add = Aggregate::default();
    p.route.add_to(&mut add.route, de)?;
    if with_paths {
        for (path, wire) in &p.paths {
            let mut c = Counts::default();
            wire.add_to(&mut c, de)?;
            add.paths.insert(path.clone(), c);
        }
    }
    agg.merge(&add);
    Ok(())
}

/// Charts across instances: counts of the same period are summed; the
/// latency figures of a past period are only summaries, so the merged one
/// takes the highest (an upper bound, not an exact merge).
fn merge_history(mine: Vec<Summary>, theirs: &[Summary]) -> Vec<Summary> {
    let mut by_start: BTreeMap<i64, Summary> = mine.into_iter().map(|s| (s.start_ms, s)).collect();
    for s in theirs {
        match by_start.get_mut(&s.start_ms) {
            Some(m) => {
                m.total += s.total;
                m.success += s.success;
                m.failure += s.failure;
                m.median = m.median.max(s.median);
                m.p95 = m.p95.max(s.p95);
                m.p99 = m.p99.max(s.p99);
                m.max = m.max.max(s.max);
            }
            None => {
                by_start.insert(s.start_ms, s.clone());
            }
        }
    }
    by_start.into_values().collect()
}

/// The local answer with the reason the cluster view is missing.
pub fn unavailable(mut local: Value, reason: &str) -> Value {
    if let Some(obj) = local.as_object_mut() {
        obj.insert("scope".into(), json!("local"));
        obj.insert("cluster_unavailable".into(), json!(reason));
    }
    local
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::window::Sample;

    #[test]
    fn the_node_id_is_made_once_and_kept_in_the_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let first = node_id(&data);
        assert!(valid_node_id(&first), "{first:?}");
        let stored = std::fs::read_to_string(data.join(NODE_ID_FILE)).unwrap();
        assert_eq!(stored.trim(), first);
        assert_eq!(node_id(&data), first, "a restart keeps the id");

        let other = tempfile::tempdir().unwrap();
        assert_ne!(
            node_id(other.path()),
            first,
            "another data dir, another node"
        );

        // A name written by an operator is kept; an unusable one replaced.
        std::fs::write(data.join(NODE_ID_FILE), "edge-1\n").unwrap();
        assert_eq!(node_id(&data), "edge-1");
        std::fs::write(data.join(NODE_ID_FILE), "no/such id\n").unwrap();
        let replaced = node_id(&data);
        assert!(valid_node_id(&replaced), "{replaced:?}");
        assert_eq!(node_id(&data), replaced);
        let left: Vec<_> = std::fs::read_dir(&data).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file left: {left:?}");
    }

    #[test]
    fn a_data_dir_that_cannot_keep_the_id_gets_a_new_one_each_run() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, "").unwrap();
        // Below a regular file: never creatable, whoever runs the test.
        let data = file.join("data");
        let (a, b) = (node_id(&data), node_id(&data));
        assert!(valid_node_id(&a), "{a:?}");
        assert_ne!(a, b, "never one shared id");
    }

    fn sample(status: u16, us: u64) -> Sample {
        Sample {
            status,
            success: status < 400,
            duration_us: us,
            retries: 1,
            cache: Some("hit"),
            captured: false,
        }
    }

    #[test]
    fn wire_counts_round_trip_exactly() {
        let mut c = Counts::default();
        for us in 1..=500u64 {
            c.add(&sample(if us % 10 == 0 { 503 } else { 200 }, us * 100));
        }
        let mut ser = V2Serializer::new();
        let wire = WireCounts::encode(&c, &mut ser);
        let json = serde_json::to_string(&wire).unwrap();
        let back: WireCounts = serde_json::from_str(&json).unwrap();
        let mut merged = Counts::default();
        let mut de = Deserializer::new();
        back.add_to(&mut merged, &mut de).unwrap();
        back.add_to(&mut merged, &mut de).unwrap();
        assert_eq!(merged.total, 1000);
        assert_eq!(merged.failure, 100);
        assert_eq!(merged.status_codes[&503], 100);
        assert_eq!(merged.retries, 1000);
        assert_eq!(merged.cache["hit"], 1000);
        // Twice the same distribution: the same percentiles.
        assert_eq!(merged.latency(), c.latency());
    }

    #[test]
    fn history_sums_counts_and_bounds_latency() {
        let s = |start, total, p95| Summary {
            start_ms: start,
            total,
            success: total,
            failure: 0,
            median: 1.0,
            p95,
            p99: p95,
            max: p95,
        };
        let merged = merge_history(
            vec![s(0, 2, 5.0), s(60, 1, 1.0)],
            &[s(60, 3, 9.0), s(120, 4, 2.0)],
        );
        let starts: Vec<i64> = merged.iter().map(|m| m.start_ms).collect();
        assert_eq!(starts, vec![0, 60, 120]);
        assert_eq!(merged[1].total, 4);
        assert!((merged[1].p95 - 9.0).abs() < 1e-9);
    }

    #[test]
    fn finished_periods_are_written_once_while_in_the_history() {
        let hour = |h: i64| Counts::default().summary(h * HOUR_MS);
        let past = vec![hour(1), hour(2), hour(3)];
        let now = 4 * HOUR_MS;
        let (due, newest) = unwritten(&past, None, "hourly", now);
        assert_eq!(due.len(), 3);
        assert_eq!(
            due[0].1,
            HOUR_MS + 7 * 24 * HOUR_MS - now,
            "lives 7 days from its start"
        );
        assert_eq!(newest, Some(3 * HOUR_MS));
        let (due, newest) = unwritten(&past, Some(2 * HOUR_MS), "hourly", now);
        let starts: Vec<i64> = due.iter().map(|(s, _)| s.start_ms).collect();
        assert_eq!((starts, newest), (vec![3 * HOUR_MS], Some(3 * HOUR_MS)));
        let (due, newest) = unwritten(&past, Some(3 * HOUR_MS), "hourly", now);
        assert!(due.is_empty());
        assert_eq!(newest, Some(3 * HOUR_MS));
        // Older than the history: not written, but not tried again either.
        let late = 3 * HOUR_MS + 7 * 24 * HOUR_MS;
        let (due, newest) = unwritten(&past, None, "hourly", late);
        let starts: Vec<i64> = due.iter().map(|(s, _)| s.start_ms).collect();
        assert_eq!((starts, newest), (vec![], Some(3 * HOUR_MS)));
    }

    #[test]
    fn a_histogram_from_redis_is_checked_before_it_is_read() {
        let mut counts = Counts::default();
        counts.add(&sample(200, 1000));
        let wire = WireCounts::encode(&counts, &mut V2Serializer::new());
        let good = BASE64.decode(&wire.latency).unwrap();
        let decoded = |bytes: &[u8]| {
            WireCounts {
                latency: BASE64.encode(bytes),
                ..wire.clone()
            }
            .add_to(&mut Counts::default(), &mut Deserializer::new())
        };
        assert_eq!(decoded(&good), Ok(()));
        let with = |at: usize, value: &[u8]| {
            let mut bytes = good.clone();
            bytes[at..at + value.len()].copy_from_slice(value);
            bytes
        };
        // A payload of 4 GiB, or bounds that would size a large histogram:
        // refused before hdrhistogram allocates for them.
        for bad in [
            with(4, &[0xff; 4]),
            with(24, &u64::MAX.to_be_bytes()),
            with(24, &(1u64 << 30).to_be_bytes()),
            with(12, &5u32.to_be_bytes()),
            good[..20].to_vec(),
        ] {
            assert!(decoded(&bad).is_err());
        }
        // The compressed format's fields lie in its zlib stream, where the
        // check would read bytes that only look like bounds: refused by
        // its cookie, whatever follows.
        assert_eq!(check_histogram_header(&good), Ok(()));
        let compressed = with(0, &0x1c84_9314u32.to_be_bytes());
        assert!(check_histogram_header(&compressed).is_err());
        // Every version sends the full bounds, which an earlier one
        // requires; a histogram sized to its longest latency is read too.
        let highest = |bytes: &[u8]| u64::from_be_bytes(bytes[24..32].try_into().unwrap());
        assert_eq!(highest(&good), window::LATENCY_MAX_US);
        let sized = with(24, &1023u64.to_be_bytes());
        assert_eq!(decoded(&sized), Ok(()));
        counts.add(&sample(200, u64::MAX));
        let wire = WireCounts::encode(&counts, &mut V2Serializer::new());
        assert_eq!(
            highest(&BASE64.decode(&wire.latency).unwrap()),
            window::LATENCY_MAX_US
        );
        let mut into = Counts::default();
        let grown = wire.add_to(&mut into, &mut Deserializer::new());
        assert_eq!(grown, Ok(()));
        assert_eq!(into.latency(), counts.latency());
    }

    #[test]
    fn snapshots_of_an_earlier_hour_are_left_out() {
        let now = now_ms();
        let local = RouteStats::new(now);
        let mut other = Counts::default();
        other.add(&sample(200, 1000));
        let period = |name: &str, start_ms| WirePeriod {
            period: name.to_string(),
            start_ms,
            route: WireCounts::encode(&other, &mut V2Serializer::new()),
            paths: BTreeMap::new(),
            history: Vec::new(),
        };
        let hour_start = local.period(Period::Hourly).1;
        let snapshot = Snapshot {
            v: VERSION,
            instance: "other".into(),
            node: "n".into(),
            at_ms: now,
            path_count: 1,
            periods: vec![period("all", 0), period("hourly", hour_start - 3_600_000)],
            errors: Vec::new(),
        };
        let q = |period| RouteQuery {
            period,
            paths: false,
            path: None,
        };
        let all = merged_json(
            &local,
            "r",
            &q(Period::All),
            std::slice::from_ref(&snapshot),
        )
        .unwrap();
        assert_eq!(
            (all["total"].as_u64(), all["instances"].as_u64()),
            (Some(1), Some(2))
        );
        let hourly = merged_json(&local, "r", &q(Period::Hourly), &[snapshot]).unwrap();
        assert_eq!(
            (hourly["total"].as_u64(), hourly["instances"].as_u64()),
            (Some(0), Some(1))
        );
    }
}
