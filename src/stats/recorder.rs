//! Recording requests for statistics and metrics, off the hot path.
//!
//! The request path only builds an [`Event`] (it already owns the path
//! string) and `try_send`s it on a bounded channel: no lock, no map lookup,
//! no histogram update per request. One aggregator task receives events in
//! batches and applies them — to the per-route statistics ([`State`]) and to
//! the Prometheus request metrics, whose handles it caches per route so no
//! label map is searched per request either. Consecutive events of one route
//! (and, within those, of one path) share their lookups: under load a batch
//! is mostly such runs. The state sits behind a mutex that only the
//! aggregator (once per batch) and admin readers take.
//!
//! If the aggregator falls behind by a whole channel, events are dropped and
//! counted (`backstop_stats_dropped_total`), never queued without bound and
//! never allowed to slow a request down.
//!
//! State is keyed by route name and held by `Proxy`, so it survives a
//! configuration reload.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, UNIX_EPOCH};

use foldhash::HashMap;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use super::cluster::Cluster;
use super::metrics::{self, Metrics, RouteStatus};
use super::paths::{self, PathBudget};
use super::window::{Aggregate, Counts, Sample, Summary, Window};
use crate::classify::Failure;
use crate::routing::Route;

/// Events waiting for the aggregator at most; past this they are dropped.
const CHANNEL_CAPACITY: usize = 65_536;
/// Events applied per lock of the state.
const BATCH: usize = 1024;
/// Errors kept per route.
pub const RECENT_ERRORS: usize = 100;

const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 86_400_000;

/// One finished request, as the request path reports it.
pub struct Event {
    /// `None` when no route matched (counted in metrics as route `none`).
    pub route: Option<Arc<Route>>,
    pub path: String,
    pub status: u16,
    pub duration: Duration,
    pub attempts: u32,
    pub cache: Option<&'static str>,
    pub capture_id: Option<String>,
    pub failure: Option<Failure>,
    /// The `X-Backstop-Error` code of a proxy-made answer.
    pub error_code: Option<&'static str>,
    pub max_paths: usize,
}

impl Event {
    /// Success is a 1xx–3xx answer that the classifier did not call a
    /// backend failure; everything else (4xx, 5xx, captures) is a failure.
    fn success(&self) -> bool {
        self.failure.is_none() && self.status < 400
    }

    /// Whether two events are of the same route (or both of none).
    fn same_route(a: &Event, b: &Event) -> bool {
        match (&a.route, &b.route) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        }
    }

    fn sample(&self) -> Sample {
        Sample {
            status: self.status,
            success: self.success(),
            duration_us: u64::try_from(self.duration.as_micros()).unwrap_or(u64::MAX),
            retries: self.attempts.saturating_sub(1),
            cache: self.cache,
            captured: self.capture_id.is_some(),
        }
    }
}

/// An event is boxed: unboxed, the channel's slots (and the copies in and
/// out of them) grew eightfold, and a request cost 2–4 % more CPU time
/// for as many instructions (measured; the allocation costs less).
enum Msg {
    Event(Box<Event>),
    Flush(oneshot::Sender<()>),
}

/// The statistics of every route; shared by the proxy and the admin API.
pub struct Stats {
    tx: Option<mpsc::Sender<Msg>>,
    dropped: Counter,
    state: Arc<Mutex<State>>,
    /// This instance's place in the cluster view (`[redis]`).
    pub cluster: Cluster,
}

impl Stats {
    /// Starts the aggregator task (needs a tokio runtime).
    pub fn start(metrics: Arc<Metrics>) -> Arc<Stats> {
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let state = Arc::new(Mutex::new(State::default()));
        let dropped = metrics.stats_dropped.clone();
        let cluster = Cluster::new(metrics.redis_errors.clone());
        tokio::spawn(aggregate(rx, state.clone(), metrics));
        Arc::new(Stats {
            tx: Some(tx),
            dropped,
            state,
            cluster,
        })
    }

    /// Statistics that record nothing (the replay-only process).
    pub fn disabled() -> Arc<Stats> {
        Arc::new(Stats {
            tx: None,
            dropped: Counter::default(),
            state: Arc::new(Mutex::new(State::default())),
            cluster: Cluster::new(Counter::default()),
        })
    }

    /// Hands a finished request to the aggregator; never blocks.
    pub fn record(&self, mut event: Event) {
        if let Some(tx) = &self.tx {
            // The queue is bounded by count, not bytes: a path as long as
            // the header limit allows, in every queued event, would hold
            // gigabytes while the aggregator is behind.
            paths::bound_for_counting(&mut event.path);
            if tx.try_send(Msg::Event(Box::new(event))).is_err() {
                self.dropped.inc();
            }
        }
    }

    /// Waits until every event recorded before this call is counted, so an
    /// admin answer includes the requests that finished before it was asked.
    pub async fn flush(&self) {
        let Some(tx) = &self.tx else { return };
        let (done, wait) = oneshot::channel();
        if tx.send(Msg::Flush(done)).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(2), wait).await;
        }
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.get()
    }

    /// The state, for reading (admin) — a poisoned lock still holds valid
    /// counters, so it is used as is.
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

async fn aggregate(mut rx: mpsc::Receiver<Msg>, state: Arc<Mutex<State>>, metrics: Arc<Metrics>) {
    let mut handles = PromHandles::new(metrics);
    let mut batch = Vec::with_capacity(BATCH);
    let mut events = Vec::with_capacity(BATCH);
    let mut flushed = Vec::new();
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        for msg in batch.drain(..) {
            match msg {
                Msg::Event(event) => events.push(event),
                Msg::Flush(done) => flushed.push(done),
            }
        }
        {
            let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
            // One clock reading per batch, not one per request: a batch is
            // what arrived while the aggregator last ran, well under a
            // millisecond's worth under load.
            apply_batch(&mut handles, &mut state, &events, now_ms());
        }
        events.clear();
        for done in flushed.drain(..) {
            let _ = done.send(());
        }
    }
}

/// Counts a batch of events taken at `at_ms`, run by run of one route.
fn apply_batch(handles: &mut PromHandles, state: &mut State, events: &[Box<Event>], at_ms: i64) {
    for run in events.chunk_by(|a, b| Event::same_route(a, b)) {
        handles.apply(run);
        state.apply(run, at_ms);
    }
}

/// Prometheus handles per route, so the aggregator neither allocates label
/// strings nor searches a family's map per event.
struct PromHandles {
    metrics: Arc<Metrics>,
    routes: HashMap<String, RouteHandles>,
}

struct RouteHandles {
    duration: Histogram,
    retries: Counter,
    by_status: HashMap<u16, Counter>,
    by_cache_result: HashMap<&'static str, Counter>,
}

impl PromHandles {
    fn new(metrics: Arc<Metrics>) -> Self {
        PromHandles {
            metrics,
            routes: HashMap::default(),
        }
    }

    /// Counts a run of events of one route.
    fn apply(&mut self, run: &[Box<Event>]) {
        let Some(first) = run.first() else { return };
        let name = first.route.as_deref().map_or("none", Route::name);
        // One hashed lookup per run; the label is made once per route.
        let h = match self.routes.get_mut(name) {
            Some(h) => h,
            None => {
                let label = metrics::route(name);
                let h = RouteHandles {
                    duration: self.metrics.request_duration.get_or_create(&label).clone(),
                    retries: self.metrics.upstream_retries.get_or_create(&label).clone(),
                    by_status: HashMap::default(),
                    by_cache_result: HashMap::default(),
                };
                self.routes.entry(name.to_string()).or_insert(h)
            }
        };
        let metrics = &self.metrics;
        for e in run {
            h.duration.observe(e.duration.as_secs_f64());
            if e.attempts > 1 {
                h.retries.inc_by(u64::from(e.attempts - 1));
            }
            if let Some(result) = e.cache {
                h.by_cache_result
                    .entry(result)
                    .or_insert_with(|| {
                        metrics
                            .cache
                            .get_or_create(&metrics::RouteResult {
                                route: name.to_string(),
                                result: result.to_string(),
                            })
                            .clone()
                    })
                    .inc();
            }
            h.by_status
                .entry(e.status)
                .or_insert_with(|| {
                    metrics
                        .requests
                        .get_or_create(&RouteStatus {
                            route: name.to_string(),
                            status: e.status,
                        })
                        .clone()
                })
                .inc();
        }
    }
}

/// Which period a question is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    All,
    Daily,
    Hourly,
}

impl Period {
    pub fn parse(s: &str) -> Option<Period> {
        match s {
            "all" => Some(Period::All),
            "daily" => Some(Period::Daily),
            "hourly" => Some(Period::Hourly),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Period::All => "all",
            Period::Daily => "daily",
            Period::Hourly => "hourly",
        }
    }
}

/// One of the last errors of a route.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorEntry {
    pub time: String,
    #[serde(skip)]
    pub at_ms: i64,
    pub route: String,
    pub path: String,
    pub status: u16,
    pub error: Option<String>,
    pub message: String,
}

/// Everything counted for one route.
///
/// Each request is counted once, for its path, in the current minute; the
/// minute's route counts are its paths' summed when it ends (or is read).
/// When a minute ends it is folded into its hour, and when an hour ends
/// into today's and all-time totals, so `hourly`, `daily` and `all` are
/// those totals plus the current minute: a tenth of the work per request
/// of counting route and path in every period separately.
pub struct RouteStats {
    budget: PathBudget,
    started_ms: i64,
    /// Every finished hour since the start.
    all_before: Aggregate,
    /// The finished hours of the current day.
    today_before: Aggregate,
    /// Past days as summaries, and the current day's start.
    pub days: Window,
    pub hours: Window,
    pub minutes: Window,
    pub errors: VecDeque<ErrorEntry>,
}

impl RouteStats {
    /// A route with nothing counted yet.
    pub fn new(now_ms: i64) -> Self {
        RouteStats {
            budget: PathBudget::default(),
            started_ms: now_ms,
            all_before: Aggregate::default(),
            today_before: Aggregate::default(),
            days: Window::new(DAY_MS, 30, now_ms),
            hours: Window::new(HOUR_MS, 7 * 24, now_ms),
            minutes: Window::new(MINUTE_MS, 60, now_ms),
            errors: VecDeque::with_capacity(RECENT_ERRORS),
        }
    }

    /// Moves every window to the period holding `now_ms`; a finished
    /// minute is folded into its hour.
    pub fn roll(&mut self, now_ms: i64) {
        // Periods start at multiples of their length since the epoch, so
        // an hour or a day can only end where a minute does: within the
        // current minute (nearly every call, once per request) nothing
        // rolls.
        if now_ms < self.minutes.start_ms.saturating_add(self.minutes.len_ms) {
            return;
        }
        // The minute ends here: its route counts are made from its paths'.
        let minute = &mut self.minutes.current;
        minute.route = minute.route_from_paths();
        if let Some((start, minute)) = self.minutes.roll(now_ms) {
            self.roll_hour(start);
            self.hours.current.merge(&minute);
        }
        self.roll_hour(now_ms);
        self.roll_day(now_ms);
    }

    /// Starts the hour holding `t` if it has begun; the finished hour goes
    /// into today's and all-time totals.
    fn roll_hour(&mut self, t: i64) {
        if let Some((start, hour)) = self.hours.roll(t) {
            self.all_before.merge(&hour);
            self.roll_day(start);
            self.today_before.merge(&hour);
        }
    }

    /// Starts the day holding `t` if it has begun; the finished day
    /// becomes a summary.
    fn roll_day(&mut self, t: i64) {
        let before = self.days.start_ms;
        if self.days.roll(t).is_some() {
            let done = std::mem::take(&mut self.today_before);
            if done.route.total > 0 {
                self.days.push_summary(done.route.summary(before));
            }
        }
    }

    /// Counts requests of one path; returns the path key they were counted
    /// under. Each is counted once, for its path in the current minute,
    /// which is folded into its hour when it ends (`roll`); the route's
    /// counts are summed from the paths' then (a hashed lookup and a
    /// histogram update less per request). `at_ms` is when the aggregator
    /// took the events: one that finished just before a minute ended counts
    /// in the next, which is close enough and loses nothing.
    fn count<'p>(
        &mut self,
        at_ms: i64,
        raw_path: &'p str,
        max_paths: usize,
        samples: impl IntoIterator<Item = Sample>,
    ) -> Cow<'p, str> {
        let path = paths::normalize(raw_path);
        self.roll(at_ms);
        let minute = &mut self.minutes.current;
        // A path this minute has counted is known to the budget: only one
        // new in this minute is checked against it.
        if let Some(counts) = minute.paths.get_mut(path.as_ref()) {
            counts.add_all(samples);
            return path;
        }
        let path = self.budget.admit(path, max_paths);
        minute.add_path(&path, samples);
        path
    }

    pub fn path_count(&self) -> usize {
        self.budget.len()
    }

    /// The counts of a period (and when it started): its finished parts
    /// plus the current hour's finished minutes and the current minute.
    pub fn period(&self, period: Period) -> (Aggregate, i64) {
        let (mut counts, start_ms) = match period {
            Period::Hourly => (self.hours.current.clone(), self.hours.start_ms),
            Period::Daily => {
                let mut day = self.today_before.clone();
                day.merge(&self.hours.current);
                (day, self.days.start_ms)
            }
            Period::All => {
                let mut all = self.all_before.clone();
                all.merge(&self.hours.current);
                (all, self.started_ms)
            }
        };
        counts.merge_minute(&self.minutes.current);
        (counts, start_ms)
    }

    /// Summaries over time for charts: per minute for `all` (the last
    /// hour), per hour for `hourly` (7 days), per day for `daily` (30 days).
    pub fn history(&self, period: Period) -> (i64, Value) {
        let (interval_s, series) = self.history_series(period);
        (interval_s, json!(series))
    }

    /// [`Self::history`] as summaries (the cluster view merges them).
    pub fn history_series(&self, period: Period) -> (i64, Vec<Summary>) {
        // An hour's or a day's current period is more than its window's
        // `current` (finished minutes and hours are folded in later): it is
        // the period's whole count, as `period` gives it.
        let window = match period {
            Period::All => {
                let minutes = &self.minutes;
                let mut series: Vec<Summary> = minutes.history.iter().cloned().collect();
                let current = minutes.current.route_from_paths();
                series.push(current.summary(minutes.start_ms));
                return (MINUTE_MS / 1000, series);
            }
            Period::Hourly => &self.hours,
            Period::Daily => &self.days,
        };
        let mut series: Vec<Summary> = window.history.iter().cloned().collect();
        let (current, start) = self.period(period);
        series.push(current.route.summary(start));
        (window.len_ms / 1000, series)
    }
}

/// The statistics of every route, by route name.
#[derive(Default)]
pub struct State {
    pub routes: HashMap<String, RouteStats>,
}

impl State {
    /// Counts a run of events of one route, taken at `at_ms`.
    fn apply(&mut self, run: &[Box<Event>], at_ms: i64) {
        let Some(route) = run.first().and_then(|e| e.route.as_deref()) else {
            return;
        };
        let name = route.name();
        let stats = match self.routes.get_mut(name) {
            Some(s) => s,
            None => self
                .routes
                .entry(name.to_string())
                .or_insert_with(|| RouteStats::new(at_ms)),
        };
        for same_path in run.chunk_by(|a, b| a.path == b.path) {
            let first = &same_path[0];
            let samples = same_path.iter().map(|e| e.sample());
            let path = stats.count(at_ms, &first.path, first.max_paths, samples);
            for e in same_path.iter().filter(|e| !e.success()) {
                if stats.errors.len() == RECENT_ERRORS {
                    stats.errors.pop_front();
                }
                stats.errors.push_back(ErrorEntry {
                    time: rfc3339(at_ms),
                    at_ms,
                    route: name.to_string(),
                    message: error_message(e, name),
                    error: e
                        .failure
                        .map(Failure::reason)
                        .or_else(|| e.error_code.map(str::to_string)),
                    status: e.status,
                    path: path.clone().into_owned(),
                });
            }
        }
    }

    /// Route names with statistics, sorted.
    pub fn route_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.routes.keys().cloned().collect();
        names.sort();
        names
    }
}

fn error_message(e: &Event, route: &str) -> String {
    match (e.failure, &e.capture_id, e.error_code) {
        (Some(f), Some(id), _) => format!("captured as {id} ({})", f.reason()),
        (Some(f), None, _) => crate::pipeline::failure_error(f, route).message,
        (None, _, Some(code)) => format!("answered by Backstop: {code}"),
        (None, _, None) => format!("the backend answered {}", e.status),
    }
}

/// The answer for one route and period (`/api-stats?api=...`).
pub struct RouteQuery<'a> {
    pub period: Period,
    pub paths: bool,
    pub path: Option<&'a str>,
}

/// What a route's answer is made of: this instance's statistics, or the
/// cluster's merged from every instance (`cluster`).
pub struct RouteView<'a> {
    pub agg: &'a Aggregate,
    pub start_ms: i64,
    /// Oldest first.
    pub errors: Vec<&'a ErrorEntry>,
    pub path_count: usize,
    pub interval_s: i64,
    pub history: Value,
}

/// `None` when the path asked for has no statistics.
pub fn route_json(stats: &RouteStats, name: &str, q: &RouteQuery<'_>) -> Option<Value> {
    let (agg, start_ms) = stats.period(q.period);
    let (interval_s, history) = stats.history(q.period);
    let view = RouteView {
        agg: &agg,
        start_ms,
        errors: stats.errors.iter().collect(),
        path_count: stats.path_count(),
        interval_s,
        history,
    };
    view_json(view, name, q)
}

/// The answer for one route and period, from any view of it.
pub fn view_json(view: RouteView<'_>, name: &str, q: &RouteQuery<'_>) -> Option<Value> {
    let (agg, start_ms) = (view.agg, view.start_ms);
    let (counts, path) = match q.path {
        // `{other}` is asked for by its name: normalised it would be `/`.
        Some(p) if p == paths::OTHER => (agg.paths.get(p)?, Some(p.into())),
        Some(p) => {
            let key = paths::normalize(p);
            (agg.paths.get(key.as_ref())?, Some(key))
        }
        None => (&agg.route, None),
    };
    let mut out = counts.to_json();
    let errors: Vec<&ErrorEntry> = view
        .errors
        .into_iter()
        .rev()
        .filter(|e| e.at_ms >= start_ms || q.period == Period::All)
        .filter(|e| path.as_ref().is_none_or(|p| e.path == *p))
        .collect();
    if let Some(obj) = out.as_object_mut() {
        obj.insert("api".into(), json!(name));
        obj.insert("period".into(), json!(q.period.as_str()));
        obj.insert("period_start".into(), json!(rfc3339(start_ms)));
        obj.insert("recent_errors".into(), json!(errors));
        if let Some(p) = &path {
            obj.insert("path".into(), json!(p));
        } else {
            obj.insert("path_count".into(), json!(view.path_count));
            obj.insert("history_interval_s".into(), json!(view.interval_s));
            obj.insert("history".into(), view.history);
        }
        if q.paths && path.is_none() {
            obj.insert("paths".into(), paths_json(&agg.paths));
        }
    }
    Some(out)
}

/// The paths as an object keyed by path: in path order (serde_json's map
/// is sorted by key), whatever order they are given in.
fn paths_json(paths: &HashMap<String, Counts>) -> Value {
    let map: serde_json::Map<String, Value> = paths
        .iter()
        .map(|(p, c)| (p.clone(), c.to_json()))
        .collect();
    Value::Object(map)
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Epoch milliseconds → RFC 3339 UTC with milliseconds.
pub fn rfc3339(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::RouteTable;

    /// One batch with runs of two routes, of several paths within a run,
    /// and an unrouted request, counted as if each came alone.
    #[test]
    fn a_batch_counts_each_event_for_its_route_and_path() {
        let table = RouteTable::from_toml(
            r#"routes = [
                { name = "a", path_prefix = "/a", upstreams = ["http://127.0.0.1:1"] },
                { name = "b", path_prefix = "/b", upstreams = ["http://127.0.0.1:1"] },
            ]"#,
        );
        let route = |name| table.get(name).cloned();
        let event = |route: Option<Arc<Route>>, path: &str, status| {
            Box::new(Event {
                route,
                path: path.to_string(),
                status,
                duration: Duration::from_millis(2),
                attempts: 1,
                cache: (status == 200).then_some("miss"),
                capture_id: None,
                failure: None,
                error_code: None,
                max_paths: 10,
            })
        };
        let events = [
            event(route("a"), "/a/x", 200),
            event(route("a"), "/a/x", 200),
            event(route("a"), "/a/y", 500),
            event(route("a"), "/a/1", 200),
            event(route("a"), "/a/2", 200),
            event(route("b"), "/b", 200),
            event(route("a"), "/a/x", 404),
            event(None, "/nowhere", 404),
        ];
        let metrics = Arc::new(Metrics::new());
        let mut handles = PromHandles::new(metrics.clone());
        let mut state = State::default();
        let t0 = 10 * DAY_MS;
        apply_batch(&mut handles, &mut state, &events, t0);

        let (a, _) = state.routes["a"].period(Period::All);
        assert_eq!((a.route.total, a.route.success, a.route.failure), (6, 4, 2));
        let paths: Vec<(&str, u64)> = {
            let mut p: Vec<_> = a.paths.iter().map(|(k, c)| (k.as_str(), c.total)).collect();
            p.sort();
            p
        };
        assert_eq!(paths, [("/a/x", 3), ("/a/y", 1), ("/a/{id}", 2)]);
        let errors: Vec<(&str, u16)> = state.routes["a"]
            .errors
            .iter()
            .map(|e| (e.path.as_str(), e.status))
            .collect();
        assert_eq!(errors, [("/a/y", 500), ("/a/x", 404)]);
        assert_eq!(state.routes["b"].period(Period::All).0.route.total, 1);
        assert_eq!(
            state.routes.len(),
            2,
            "an unrouted request has no route stats"
        );

        let requests = |route: &str, status| {
            let labels = RouteStatus {
                route: route.to_string(),
                status,
            };
            metrics.requests.get_or_create(&labels).get()
        };
        assert_eq!(requests("a", 200), 4);
        assert_eq!(requests("a", 404), 1);
        assert_eq!(requests("b", 200), 1);
        assert_eq!(requests("none", 404), 1);
        let misses = metrics
            .cache
            .get_or_create(&metrics::RouteResult {
                route: "a".to_string(),
                result: "miss".to_string(),
            })
            .get();
        assert_eq!(misses, 4);
    }

    fn ok() -> Sample {
        Sample {
            status: 200,
            success: true,
            duration_us: 1500,
            retries: 0,
            cache: None,
            captured: false,
        }
    }

    #[test]
    fn minutes_fold_into_their_hour() {
        let t0 = 10 * DAY_MS + 30 * MINUTE_MS;
        let mut r = RouteStats::new(t0);
        r.count(t0, "/a/1", 10, [ok()]);
        r.count(t0 + MINUTE_MS, "/a/2", 10, [ok()]);
        r.count(t0 + MINUTE_MS + 1, "/b", 10, [ok()]);
        let hour = r.period(Period::Hourly).0;
        assert_eq!(hour.route.total, 3, "finished minutes and the current one");
        assert_eq!(hour.paths["/a/{id}"].total, 2);
        assert_eq!(hour.paths["/b"].total, 1);
        let (_, minutes) = r.history_series(Period::All);
        let per_minute: Vec<u64> = minutes.iter().map(|s| s.total).collect();
        assert_eq!(per_minute, vec![1, 2]);
        let (_, hours) = r.history_series(Period::Hourly);
        assert_eq!(hours.last().map(|s| s.total), Some(3));

        // The hour's last minute, then the next hour: that minute is folded
        // into the hour it belongs to, not into the new one.
        r.count(t0 + 29 * MINUTE_MS, "/b", 10, [ok()]);
        r.count(t0 + 31 * MINUTE_MS, "/b", 10, [ok()]);
        assert_eq!(r.period(Period::Hourly).0.route.total, 1);
        assert_eq!(r.hours.history.back().map(|s| s.total), Some(4));
        let day = r.period(Period::Daily).0;
        assert_eq!((day.route.total, day.paths["/b"].total), (5, 3));
    }

    #[test]
    fn paths_past_the_budget_stay_other_in_every_minute() {
        let t0 = 10 * DAY_MS;
        let mut r = RouteStats::new(t0);
        assert_eq!(r.count(t0, "/a", 1, [ok()]), "/a");
        assert_eq!(r.count(t0, "/b", 1, [ok()]), paths::OTHER);
        assert_eq!(r.count(t0 + 1, "/b", 1, [ok()]), paths::OTHER);
        assert_eq!(r.count(t0 + MINUTE_MS, "/b", 1, [ok()]), paths::OTHER);
        assert_eq!(r.count(t0 + MINUTE_MS, "/a", 1, [ok()]), "/a");
        let hour = r.period(Period::Hourly).0;
        assert_eq!(
            (hour.paths["/a"].total, hour.paths[paths::OTHER].total),
            (2, 3)
        );
        assert_eq!(hour.paths.len(), 2);
    }

    #[test]
    fn hours_fold_into_days_and_all() {
        let t0 = 10 * DAY_MS + 30 * MINUTE_MS;
        let mut r = RouteStats::new(t0);
        r.count(t0, "/a/1", 10, [ok()]);
        r.count(t0 + HOUR_MS, "/a/2", 10, [ok()]);
        r.count(t0 + 2 * HOUR_MS, "/b", 10, [ok()]);
        let total = |r: &RouteStats, p| r.period(p).0.route.total;
        assert_eq!(total(&r, Period::Hourly), 1);
        assert_eq!(total(&r, Period::Daily), 3);
        assert_eq!(total(&r, Period::All), 3);
        assert_eq!(r.period(Period::All).0.paths["/a/{id}"].total, 2);

        // The next day: yesterday becomes a summary; `all` keeps everything.
        r.count(t0 + DAY_MS, "/b", 10, [ok()]);
        assert_eq!(total(&r, Period::Daily), 1);
        assert_eq!(total(&r, Period::All), 4);
        assert_eq!(r.days.history.len(), 1);
        assert_eq!(r.days.history[0].total, 3);
        assert_eq!(r.days.history[0].start_ms, 10 * DAY_MS);
        let (interval, series) = r.history(Period::Daily);
        assert_eq!(interval, 86_400);
        assert_eq!(series.as_array().map(Vec::len), Some(2));

        // A quiet hour later, a query sees an empty current hour.
        r.roll(t0 + DAY_MS + 3 * HOUR_MS);
        assert_eq!(total(&r, Period::Hourly), 0);
        assert_eq!(total(&r, Period::Daily), 1);
    }
}
