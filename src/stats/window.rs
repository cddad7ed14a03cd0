//! Counters of one period: [`Counts`] (totals, statuses, an HDR latency
//! histogram), [`Aggregate`] (a route and its paths), [`Window`] (the
//! current hour or day, and summaries of the past ones).
//!
//! Everything here is plain data owned by the one aggregator task: no locks,
//! no atomics. Past periods keep only a [`Summary`] (a few numbers), never a
//! histogram, so history costs little memory.

use std::collections::{BTreeMap, VecDeque};

use foldhash::HashMap;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Latencies are recorded in microseconds, from 1 µs to 10 minutes (longer
/// ones are clamped), with 2 significant digits (1 % precision). A
/// histogram holds buckets up to the longest latency it has seen: 256 `u32`
/// buckets under 256 µs and 128 more for each doubling past that, so 4 KiB
/// for a path that never took more than 16 ms and 12 KiB at most. Each of a
/// route's paths has one in each of four periods (`RouteStats`), so its
/// size is what `max_paths_per_route` multiplies.
pub(crate) const LATENCY_MAX_US: u64 = 600_000_000;
pub(crate) const SIGNIFICANT_DIGITS: u8 = 2;

/// One request's outcome, as counted.
#[derive(Debug, Clone)]
pub struct Sample {
    pub status: u16,
    pub success: bool,
    pub duration_us: u64,
    pub retries: u32,
    pub cache: Option<&'static str>,
    pub captured: bool,
}

/// Totals of one route or path in one period.
#[derive(Debug, Clone)]
pub struct Counts {
    pub total: u64,
    pub success: u64,
    pub failure: u64,
    pub status_codes: BTreeMap<u16, u64>,
    pub retries: u64,
    pub cache: BTreeMap<&'static str, u64>,
    pub captures: u64,
    latency: Histogram<u32>,
}

impl Default for Counts {
    fn default() -> Self {
        Counts {
            total: 0,
            success: 0,
            failure: 0,
            status_codes: BTreeMap::new(),
            retries: 0,
            cache: BTreeMap::new(),
            captures: 0,
            latency: new_histogram(),
        }
    }
}

/// A histogram of the full bounds (1 µs to [`LATENCY_MAX_US`]), as every
/// version of Backstop reads them from Redis (`cluster`).
pub(crate) fn wire_histogram() -> Histogram<u32> {
    up_to(LATENCY_MAX_US)
}

fn new_histogram() -> Histogram<u32> {
    let mut histogram = up_to(2);
    // Grown by a longer latency than it has room for, recorded or added.
    histogram.auto(true);
    histogram
}

/// A histogram from 1 µs to `highest`, a constant at least 2.
fn up_to(highest: u64) -> Histogram<u32> {
    // Constant bounds that hdrhistogram documents as valid: not input.
    Histogram::new_with_bounds(1, highest, SIGNIFICANT_DIGITS)
        .expect("constant histogram bounds are valid")
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Latency {
    pub min: f64,
    pub median: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Counts {
    pub fn add(&mut self, s: &Sample) {
        self.total += 1;
        if s.success {
            self.success += 1;
        } else {
            self.failure += 1;
        }
        *self.status_codes.entry(s.status).or_default() += 1;
        self.retries += u64::from(s.retries);
        if let Some(c) = s.cache {
            *self.cache.entry(c).or_default() += 1;
        }
        if s.captured {
            self.captures += 1;
        }
        let us = s.duration_us.clamp(1, LATENCY_MAX_US);
        // u32 buckets halve the memory; a bucket saturates at 4 billion
        // requests of one latency in one period, which is harmless. Growing
        // can fail only where `usize` is narrower than 32 bits.
        if self.latency.record(us).is_err() {
            self.latency.saturating_record(us);
        }
    }

    /// Counts each of `samples` (a run of one path's requests).
    pub fn add_all(&mut self, samples: impl IntoIterator<Item = Sample>) {
        for s in samples {
            self.add(&s);
        }
    }

    /// Adds another period's counts (used for cluster totals).
    pub fn merge(&mut self, other: &Counts) {
        self.total += other.total;
        self.success += other.success;
        self.failure += other.failure;
        for (k, v) in &other.status_codes {
            *self.status_codes.entry(*k).or_default() += v;
        }
        self.retries += other.retries;
        for (k, v) in &other.cache {
            *self.cache.entry(k).or_default() += v;
        }
        self.captures += other.captures;
        let _ = self.latency.add(&other.latency);
    }

    /// min ≤ median ≤ p95 ≤ p99 ≤ max, in ms; all zero when empty.
    pub fn latency(&self) -> Latency {
        let h = &self.latency;
        if h.is_empty() {
            return Latency::default();
        }
        let (min, max) = (h.min(), h.max());
        // Percentiles are bucket values: keep them inside [min, max] and in
        // order, which is what a reader expects of them.
        let mut last = min;
        let mut at = |q: f64| {
            let v = h.value_at_quantile(q).clamp(last, max);
            last = v;
            v
        };
        let (median, p95, p99) = (at(0.5), at(0.95), at(0.99));
        Latency {
            min: ms(min),
            median: ms(median),
            p95: ms(p95),
            p99: ms(p99),
            max: ms(max),
        }
    }

    pub fn to_json(&self) -> Value {
        let codes: serde_json::Map<String, Value> = self
            .status_codes
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        json!({
            "total": self.total,
            "success": self.success,
            "failure": self.failure,
            "status_codes": codes,
            "response_time": self.latency(),
            "retries": self.retries,
            "cache": self.cache,
            "captures": self.captures,
        })
    }

    pub fn summary(&self, start_ms: i64) -> Summary {
        let l = self.latency();
        Summary {
            start_ms,
            total: self.total,
            success: self.success,
            failure: self.failure,
            median: l.median,
            p95: l.p95,
            p99: l.p99,
            max: l.max,
        }
    }

    /// Serialized histogram and counters, for pushing to Redis.
    pub fn latency_histogram(&self) -> &Histogram<u32> {
        &self.latency
    }

    pub fn add_latency_histogram(&mut self, h: &Histogram<u32>) {
        let _ = self.latency.add(h);
    }
}

fn ms(us: u64) -> f64 {
    (us as f64 / 1000.0 * 1000.0).round() / 1000.0
}

/// A route's counts and its paths' counts in one period.
#[derive(Debug, Default, Clone)]
pub struct Aggregate {
    pub route: Counts,
    pub paths: HashMap<String, Counts>,
}

impl Aggregate {
    /// Adds a finished period (an hour into its day and into `all`).
    pub fn merge(&mut self, other: &Aggregate) {
        self.route.merge(&other.route);
        self.merge_paths(other);
    }

    /// The route's counts as its paths' summed: the current minute counts
    /// each request for its path only (`RouteStats::count`).
    pub fn route_from_paths(&self) -> Counts {
        let mut route = Counts::default();
        for counts in self.paths.values() {
            route.merge(counts);
        }
        route
    }

    /// Adds the current minute, whose route counts are its paths'.
    pub fn merge_minute(&mut self, minute: &Aggregate) {
        for counts in minute.paths.values() {
            self.route.merge(counts);
        }
        self.merge_paths(minute);
    }

    fn merge_paths(&mut self, other: &Aggregate) {
        for (path, counts) in &other.paths {
            match self.paths.get_mut(path) {
                Some(c) => c.merge(counts),
                None => {
                    self.paths.insert(path.clone(), counts.clone());
                }
            }
        }
    }

    /// Counts `samples` for `path` only.
    pub fn add_path(&mut self, path: &str, samples: impl IntoIterator<Item = Sample>) {
        match self.paths.get_mut(path) {
            Some(c) => c.add_all(samples),
            None => {
                let mut c = Counts::default();
                c.add_all(samples);
                self.paths.insert(path.to_string(), c);
            }
        }
    }
}

/// One past period, kept for charts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub start_ms: i64,
    pub total: u64,
    pub success: u64,
    pub failure: u64,
    pub median: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

/// The current period of a fixed length (an hour, a day) and summaries of
/// the past ones, kept `keep` periods back.
#[derive(Debug)]
pub struct Window {
    pub len_ms: i64,
    keep: usize,
    pub start_ms: i64,
    pub current: Aggregate,
    pub history: VecDeque<Summary>,
}

impl Window {
    pub fn new(len_ms: i64, keep: usize, now_ms: i64) -> Window {
        Window {
            len_ms,
            keep,
            start_ms: now_ms - now_ms.rem_euclid(len_ms),
            current: Aggregate::default(),
            history: VecDeque::new(),
        }
    }

    /// Moves to the period holding `now_ms` if it has begun: the finished
    /// one becomes a summary (summaries older than `keep` periods go) and
    /// is returned with its start, for the caller to fold into longer ones.
    /// (Per request, `RouteStats::roll` returns before calling this within
    /// the current minute.)
    pub fn roll(&mut self, now_ms: i64) -> Option<(i64, Aggregate)> {
        let start = now_ms - now_ms.rem_euclid(self.len_ms);
        if start <= self.start_ms {
            return None;
        }
        let done = std::mem::take(&mut self.current);
        let done_start = std::mem::replace(&mut self.start_ms, start);
        if done.route.total > 0 {
            self.history.push_back(done.route.summary(done_start));
        }
        self.push_summary_limit();
        Some((done_start, done))
    }

    /// Records a summary of a period built elsewhere (a day from its hours).
    pub fn push_summary(&mut self, summary: Summary) {
        self.history.push_back(summary);
        self.push_summary_limit();
    }

    /// Adds summaries of past periods kept elsewhere (Redis, across a
    /// restart). Periods already known, the current one and those older
    /// than `keep` periods are left out.
    pub fn restore(&mut self, past: Vec<Summary>) {
        for s in past {
            let known = self.history.iter().any(|h| h.start_ms == s.start_ms);
            if s.start_ms < self.start_ms && !known {
                self.history.push_back(s);
            }
        }
        self.history.make_contiguous().sort_by_key(|s| s.start_ms);
        self.push_summary_limit();
    }

    fn push_summary_limit(&mut self) {
        let oldest = self.start_ms - self.len_ms * self.keep as i64;
        while self.history.front().is_some_and(|s| s.start_ms < oldest) {
            self.history.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(status: u16, us: u64) -> Sample {
        Sample {
            status,
            success: status < 400,
            duration_us: us,
            retries: 0,
            cache: None,
            captured: false,
        }
    }

    #[test]
    fn percentiles_are_ordered_and_in_ms() {
        let mut c = Counts::default();
        for us in 1..=1000u64 {
            c.add(&sample(200, us * 1000));
        }
        let l = c.latency();
        assert!(l.min <= l.median && l.median <= l.p95 && l.p95 <= l.p99 && l.p99 <= l.max);
        assert!((l.min - 1.0).abs() < 0.02, "{l:?}");
        assert!((l.median - 500.0).abs() < 6.0, "{l:?}");
        assert!((l.p99 - 990.0).abs() < 11.0, "{l:?}");
        assert!((l.max - 1000.0).abs() < 11.0, "{l:?}");
        assert_eq!(Counts::default().latency(), Latency::default());
    }

    #[test]
    fn counts_statuses_and_outcomes() {
        let mut c = Counts::default();
        c.add(&sample(200, 10));
        c.add(&sample(200, 10));
        c.add(&sample(503, 10));
        assert_eq!((c.total, c.success, c.failure), (3, 2, 1));
        assert_eq!(c.status_codes[&200], 2);
        assert_eq!(c.status_codes[&503], 1);
    }

    #[test]
    fn window_rolls_and_forgets() {
        let hour = 3_600_000;
        let mut w = Window::new(hour, 2, 0);
        w.current.route.add(&sample(200, 5));
        let (start, done) = w.roll(hour + 1).unwrap();
        assert_eq!((start, done.route.total), (0, 1));
        w.current.route.add(&sample(200, 5));
        assert_eq!(w.history.len(), 1);
        assert_eq!(w.current.route.total, 1);
        assert!(w.roll(hour + 2).is_none());
        w.roll(5 * hour);
        w.current.route.add(&sample(200, 5));
        assert_eq!(w.history.len(), 0, "older than 2 periods: forgotten");
    }

    #[test]
    fn restored_history_is_ordered_and_bounded() {
        let hour = 3_600_000;
        let mut w = Window::new(hour, 3, 10 * hour);
        w.current.route.add(&sample(200, 5));
        w.roll(11 * hour);
        let summary = |h: i64| Counts::default().summary(h * hour);
        w.restore(vec![
            summary(9),
            summary(10),
            summary(11),
            summary(2),
            summary(8),
        ]);
        let starts: Vec<i64> = w.history.iter().map(|s| s.start_ms / hour).collect();
        // 10 was already there, 11 is current, 2 is older than 3 periods.
        assert_eq!(starts, vec![8, 9, 10]);
        assert_eq!(w.history[2].total, 1, "the known period is kept as it was");
    }

    #[test]
    fn a_histogram_grows_with_its_longest_latency() {
        let mut c = Counts::default();
        for ms in 1..=16 {
            c.add(&sample(200, ms * 1000 - 1));
        }
        let buckets = c.latency.distinct_values();
        assert!(
            buckets <= 1024,
            "{buckets} buckets for latencies under 16 ms"
        );
        let mut hour = Counts::default();
        hour.merge(&c);
        assert_eq!(hour.latency.distinct_values(), buckets);
        assert_eq!(hour.latency(), c.latency());
        c.add(&sample(200, u64::MAX));
        let buckets = c.latency.distinct_values();
        assert!(buckets <= 3072, "{buckets} buckets at the 10-minute clamp");
        let max = c.latency().max;
        assert!((600_000.0..606_000.0).contains(&max), "clamped: {max}");
        hour.merge(&c);
        assert_eq!((hour.total, hour.latency().max), (33, max));
    }
}
