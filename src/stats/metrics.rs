//! The Prometheus metrics of DESIGN.md, registered in one place so their
//! names and labels stay stable. Labels are bounded: route names come from
//! the configuration, statuses are HTTP codes, reasons and outcomes are
//! fixed sets.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteStatus {
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteResult {
    pub route: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteReason {
    pub route: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteOutcome {
    pub route: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteUpstream {
    pub route: String,
    pub upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

/// Latency buckets in seconds, from 0.5 ms to 30 s.
const DURATION_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
    30.0,
];

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RouteStatus, Counter>,
    pub request_duration: Family<RouteLabel, Histogram, fn() -> Histogram>,
    pub upstream_retries: Family<RouteLabel, Counter>,
    pub circuit_state: Family<RouteLabel, Gauge>,
    pub cache: Family<RouteResult, Counter>,
    pub captured: Family<RouteReason, Counter>,
    pub capture_failures: Family<RouteLabel, Counter>,
    pub queue_depth: Gauge,
    pub queue_oldest_age_seconds: Gauge<f64, AtomicU64>,
    pub dead_letters: Gauge,
    /// 1 when the last scrape read the spool, 0 when it could not (the
    /// queue gauges then keep their last values).
    pub spool_up: Gauge,
    /// Bytes of request bodies buffered now (`server.max_buffered_bytes`),
    /// read at scrape time.
    pub buffered_request_bytes: Gauge,
    pub kafka_fallbacks: Counter,
    pub replayed: Family<RouteOutcome, Counter>,
    pub rate_limit_local_fallback: Family<RouteLabel, Counter>,
    /// Read at scrape time from the targets of capped routes
    /// (`upstream_max_conns`), like the queue gauges: see [`Metrics::set_turns`].
    upstream_in_flight: Family<RouteUpstream, Gauge>,
    upstream_waiting: Family<RouteUpstream, Gauge>,
    /// The series of both, as last set.
    turn_series: Mutex<Vec<RouteUpstream>>,
    pub stats_dropped: Counter,
    pub redis_errors: Counter,
    pub otlp_spans_exported: Counter,
    /// By `reason`: `queue_full` or `export_failed`.
    pub otlp_spans_dropped: Family<ReasonLabel, Counter>,
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("backstop");
        let requests = Family::<RouteStatus, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by route and status",
            requests.clone(),
        );
        let request_duration =
            Family::<RouteLabel, Histogram, fn() -> Histogram>::new_with_constructor(
                duration_histogram,
            );
        registry.register(
            "request_duration_seconds",
            "Time from request to response head, by route",
            request_duration.clone(),
        );
        let upstream_retries = Family::<RouteLabel, Counter>::default();
        registry.register(
            "upstream_retries",
            "Upstream attempts after the first",
            upstream_retries.clone(),
        );
        let circuit_state = Family::<RouteLabel, Gauge>::default();
        registry.register(
            "circuit_state",
            "Circuit breaker state: 0 closed, 1 open, 2 half-open",
            circuit_state.clone(),
        );
        let cache = Family::<RouteResult, Counter>::default();
        registry.register(
            "cache",
            "Cache lookups by result (hit, miss, bypass, stale)",
            cache.clone(),
        );
        let captured = Family::<RouteReason, Counter>::default();
        registry.register(
            "captured",
            "Requests captured for later delivery, by reason",
            captured.clone(),
        );
        let capture_failures = Family::<RouteLabel, Counter>::default();
        registry.register(
            "capture_failures",
            "Requests that could be stored nowhere (answered capture_failed)",
            capture_failures.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "queue_depth",
            "Captured requests waiting for replay",
            queue_depth.clone(),
        );
        let queue_oldest_age_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "queue_oldest_age_seconds",
            "Age of the oldest captured request waiting for replay",
            queue_oldest_age_seconds.clone(),
        );
        let dead_letters = Gauge::default();
        registry.register(
            "dead_letters",
            "Records in the dead-letter queue",
            dead_letters.clone(),
        );
        let spool_up = Gauge::default();
        registry.register(
            "spool_up",
            "Whether the last scrape could read the spool (0: the queue gauges are stale)",
            spool_up.clone(),
        );
        let buffered_request_bytes = Gauge::default();
        registry.register(
            "buffered_request_bytes",
            "Bytes of request bodies buffered now (bounded by server.max_buffered_bytes)",
            buffered_request_bytes.clone(),
        );
        let kafka_fallbacks = Counter::default();
        registry.register(
            "kafka_fallbacks",
            "Captures written to the spool because Kafka failed or was slower than ack_timeout, or queued behind such captures",
            kafka_fallbacks.clone(),
        );
        let replayed = Family::<RouteOutcome, Counter>::default();
        registry.register(
            "replayed",
            "Replay attempts by outcome (delivered, retry, dead_letter; busy: not sent, no turn at the target)",
            replayed.clone(),
        );
        let rate_limit_local_fallback = Family::<RouteLabel, Counter>::default();
        registry.register(
            "rate_limit_local_fallback",
            "Requests of a route with a shared rate limit judged by this instance's own bucket because Redis could not answer",
            rate_limit_local_fallback.clone(),
        );
        let upstream_in_flight = Family::<RouteUpstream, Gauge>::default();
        registry.register(
            "upstream_in_flight",
            "Requests in flight to a target of a route with server.upstream_max_conns",
            upstream_in_flight.clone(),
        );
        let upstream_waiting = Family::<RouteUpstream, Gauge>::default();
        registry.register(
            "upstream_waiting",
            "Requests waiting for a turn at a target of a route with server.upstream_max_conns",
            upstream_waiting.clone(),
        );
        let stats_dropped = Counter::default();
        registry.register(
            "stats_dropped",
            "Requests not counted in statistics because the aggregator fell behind",
            stats_dropped.clone(),
        );
        let redis_errors = Counter::default();
        registry.register(
            "redis_errors",
            "Redis commands that failed or timed out (the cache skipped them)",
            redis_errors.clone(),
        );
        // Registered in every build, so dashboards and alerts need not know
        // how Backstop was built: both stay 0 while no exporter runs.
        let otlp_spans_exported = Counter::default();
        registry.register(
            "otlp_spans_exported",
            "Spans the OTLP collector accepted",
            otlp_spans_exported.clone(),
        );
        let otlp_spans_dropped = Family::<ReasonLabel, Counter>::default();
        for reason in ["queue_full", "export_failed"] {
            let _ = otlp_spans_dropped.get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            });
        }
        registry.register(
            "otlp_spans_dropped",
            "Spans not exported: the export queue was full, or the collector failed or timed out",
            otlp_spans_dropped.clone(),
        );
        Metrics {
            registry,
            otlp_spans_exported,
            otlp_spans_dropped,
            stats_dropped,
            requests,
            request_duration,
            upstream_retries,
            circuit_state,
            cache,
            captured,
            capture_failures,
            queue_depth,
            queue_oldest_age_seconds,
            dead_letters,
            spool_up,
            buffered_request_bytes,
            kafka_fallbacks,
            replayed,
            rate_limit_local_fallback,
            upstream_in_flight,
            upstream_waiting,
            turn_series: Mutex::new(Vec::new()),
            redis_errors,
        }
    }

    /// Counts one replay outcome (`delivered`, `retry`, `dead_letter`, `busy`).
    pub fn count_replay(&self, route: &str, outcome: &str) {
        self.replayed
            .get_or_create(&RouteOutcome {
                route: route.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// Sets the turn gauges to `turns` (in flight, waiting) and removes the
    /// series of targets gone since the last call (a reload). Never clears
    /// both families: a scrape at the same time would find no series.
    pub fn set_turns(&self, turns: HashMap<RouteUpstream, (i64, i64)>) {
        let mut series = self.turn_series.lock().unwrap_or_else(|p| p.into_inner());
        for gone in series.iter().filter(|labels| !turns.contains_key(labels)) {
            self.upstream_in_flight.remove(gone);
            self.upstream_waiting.remove(gone);
        }
        series.clear();
        for (labels, (in_flight, waiting)) in turns {
            self.upstream_in_flight
                .get_or_create(&labels)
                .set(in_flight);
            self.upstream_waiting.get_or_create(&labels).set(waiting);
            series.push(labels);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// `value` as a label value must be written: prometheus-client writes label
/// values as they are, and a `"` or a backslash (an upstream URL's path may
/// hold either) would break the whole exposition.
pub fn label_value(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub fn route(name: &str) -> RouteLabel {
    RouteLabel {
        route: name.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(upstream: &str) -> RouteUpstream {
        RouteUpstream {
            route: "api".to_string(),
            upstream: label_value(upstream),
        }
    }

    #[test]
    fn turn_series_of_gone_targets_are_removed_and_odd_urls_escaped() {
        let metrics = Metrics::new();
        metrics.set_turns(HashMap::from([
            (target("http://a/"), (2, 1)),
            (target("http://b/x\"y\\z"), (1, 0)),
        ]));
        let text = metrics.encode();
        let odd = r#"backstop_upstream_in_flight{route="api",upstream="http://b/x\"y\\z"} 1"#;
        assert!(text.contains(odd), "{text}");
        assert!(text.contains(r#"backstop_upstream_waiting{route="api",upstream="http://a/"} 1"#));

        metrics.set_turns(HashMap::from([(target("http://a/"), (0, 0))]));
        let text = metrics.encode();
        assert!(!text.contains("http://b/"), "{text}");
        assert!(text.contains(r#"backstop_upstream_in_flight{route="api",upstream="http://a/"} 0"#));
    }
}
