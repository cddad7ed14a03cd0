//! The OTLP trace exporter (cargo feature `otlp`), over real sockets: a real
//! Backstop process exports to a collector written here (an HTTP server
//! that decodes OTLP/HTTP protobuf with `opentelemetry-proto`), in front of
//! harness backends that record the `traceparent` they receive.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::harness::{client, h2_client_giving_up_after, Backend, Backstop, Reply};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

/// Exports every 50 ms, so the tests need not wait for the 5 s default.
const FAST: &[(&str, &str)] = &[("OTEL_BSP_SCHEDULE_DELAY", "50")];

/// What the collector answers.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// 200 with an empty `ExportTraceServiceResponse`.
    Accept,
    /// Reads the request, then never answers.
    Stall,
    /// `503` with `Retry-After: 3`: a collector shedding load.
    Throttle,
}

/// One export request as the collector received it.
#[derive(Clone)]
struct Export {
    headers: http::HeaderMap,
    body: ExportTraceServiceRequest,
}

/// An OTLP/HTTP collector on an ephemeral port.
struct Collector {
    addr: SocketAddr,
    exports: Arc<Mutex<Vec<Export>>>,
    task: JoinHandle<()>,
}

impl Collector {
    async fn start(mode: Mode) -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let exports = Arc::new(Mutex::new(Vec::new()));
        let log = exports.clone();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let log = log.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let log = log.clone();
                        async move { Ok::<_, Infallible>(receive(req, mode, log).await) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Collector {
            addr,
            exports,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/v1/traces", self.addr)
    }

    fn exports(&self) -> Vec<Export> {
        self.exports.lock().unwrap().clone()
    }

    fn spans(&self) -> Vec<Span> {
        self.exports()
            .into_iter()
            .flat_map(|e| e.body.resource_spans)
            .flat_map(|r| r.scope_spans)
            .flat_map(|s| s.spans)
            .collect()
    }

    /// Every `service.name` of the resources received.
    fn service_names(&self) -> Vec<String> {
        self.exports()
            .into_iter()
            .flat_map(|e| e.body.resource_spans)
            .filter_map(|r| r.resource)
            .filter_map(|r| string_value(&r.attributes, "service.name"))
            .collect()
    }

    async fn wait_for_spans(&self, n: usize, timeout: Duration) -> Vec<Span> {
        let deadline = Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if spans.len() >= n {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "the collector got {} spans, wanted {n}",
                spans.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn receive(
    req: Request<Incoming>,
    mode: Mode,
    log: Arc<Mutex<Vec<Export>>>,
) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let bytes = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    if parts.method != http::Method::POST || parts.uri.path() != "/v1/traces" {
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = http::StatusCode::NOT_FOUND;
        return response;
    }
    assert_eq!(
        parts.headers[http::header::CONTENT_TYPE],
        "application/x-protobuf",
        "OTLP/HTTP protobuf"
    );
    let body = ExportTraceServiceRequest::decode(bytes).expect("an OTLP protobuf body");
    log.lock().unwrap().push(Export {
        headers: parts.headers,
        body,
    });
    if mode == Mode::Stall {
        std::future::pending::<()>().await;
    }
    if mode == Mode::Throttle {
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
        response.headers_mut().insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from_static("3"),
        );
        return response;
    }
    let answer = ExportTraceServiceResponse::default().encode_to_vec();
    let mut response = Response::new(Full::new(Bytes::from(answer)));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/x-protobuf"),
    );
    response
}

fn config(collector: &str, backend: &str, otlp: &str, route: &str) -> String {
    format!(
        r#"
[otlp]
enabled = true
endpoint = "{collector}"
service_name = "backstop-test"
{otlp}

[[routes]]
name = "api"
path_prefix = "/api"
upstreams = ["{backend}"]
{route}
"#
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn value<'a>(
    attributes: &'a [opentelemetry_proto::tonic::common::v1::KeyValue],
    key: &str,
) -> Option<&'a Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn string_value(
    attributes: &[opentelemetry_proto::tonic::common::v1::KeyValue],
    key: &str,
) -> Option<String> {
    match value(attributes, key)? {
        Value::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn text(span: &Span, key: &str) -> Option<String> {
    string_value(&span.attributes, key)
}

fn int(span: &Span, key: &str) -> Option<i64> {
    match value(&span.attributes, key)? {
        Value::IntValue(n) => Some(*n),
        _ => None,
    }
}

fn boolean(span: &Span, key: &str) -> Option<bool> {
    match value(&span.attributes, key)? {
        Value::BoolValue(b) => Some(*b),
        _ => None,
    }
}

/// The server span and the first attempt's span of the one request sent.
async fn server_and_attempt(collector: &Collector) -> (Span, Span) {
    let spans = collector.wait_for_spans(2, Duration::from_secs(10)).await;
    assert_eq!(spans.len(), 2, "one server and one client span");
    let server = of_kind(&spans, SpanKind::Server).remove(0);
    (server, of_kind(&spans, SpanKind::Client).remove(0))
}

fn of_kind(spans: &[Span], kind: SpanKind) -> Vec<Span> {
    let mut found: Vec<Span> = spans
        .iter()
        .filter(|s| s.kind == kind as i32)
        .cloned()
        .collect();
    found.sort_by_key(|s| int(s, "backstop.attempt"));
    found
}

fn is_error(span: &Span) -> bool {
    span.status
        .as_ref()
        .is_some_and(|s| s.code == StatusCode::Error as i32)
}

const EXPORTED: &str = "backstop_otlp_spans_exported_total";
const QUEUE_FULL: &str = "backstop_otlp_spans_dropped_total{reason=\"queue_full\"}";
const EXPORT_FAILED: &str = "backstop_otlp_spans_dropped_total{reason=\"export_failed\"}";

async fn wait_for_counter(bs: &Backstop, series: &str, at_least: f64, timeout: Duration) -> f64 {
    let deadline = Instant::now() + timeout;
    loop {
        let value = bs.metric(series).await;
        if value >= at_least {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{series} is {value}, wanted at least {at_least}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A request its client gave up on is a 499 error span
/// (as the access log and statistics count it), and its attempt a
/// cancelled one, not spans with no status.
#[tokio::test]
async fn a_request_its_client_left_is_a_client_closed_span() {
    let collector = Collector::start(Mode::Accept).await;
    let backend = Backend::start(|_| Reply::ok("late").delay(Duration::from_secs(3))).await;
    let bs = Backstop::start_with_env(&config(&collector.url(), &backend.url(), "", ""), FAST);
    // Its stream reset: the request is cancelled at once.
    let impatient = h2_client_giving_up_after(Duration::from_millis(300));
    assert!(impatient.get(bs.url("/api/slow")).send().await.is_err());
    let (server, attempt) = &server_and_attempt(&collector).await;
    assert_eq!(int(server, "http.response.status_code"), Some(499));
    assert_eq!(text(server, "error.type").as_deref(), Some("client_closed"));
    assert!(is_error(server));
    assert_eq!(text(attempt, "error.type").as_deref(), Some("cancelled"));
    assert!(is_error(attempt));
}

/// A method HTTP does not define names no span: each made-up one a client
/// sends would otherwise be a span name of its own in the trace store.
#[tokio::test]
async fn a_made_up_method_is_other_in_spans() {
    let collector = Collector::start(Mode::Accept).await;
    let backend = Backend::echo().await;
    let bs = Backstop::start_with_env(&config(&collector.url(), &backend.url(), "", ""), FAST);
    let method = reqwest::Method::from_bytes(b"FROBNICATE7").unwrap();
    let r = client()
        .request(method, bs.url("/api/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (server, attempt) = &server_and_attempt(&collector).await;
    assert_eq!(server.name, "HTTP /api");
    assert_eq!(attempt.name, "HTTP");
    for span in [server, attempt] {
        let method = text(span, "http.request.method");
        assert_eq!(method.as_deref(), Some("_OTHER"));
    }
    let original = text(server, "http.request.method_original");
    assert_eq!(original.as_deref(), Some("FROBNICATE7"));
}

#[tokio::test]
async fn a_traced_request_is_a_server_span_under_the_caller_and_a_client_span_the_backend_nests_under(
) {
    let collector = Collector::start(Mode::Accept).await;
    let backend = Backend::echo().await;
    let bs = Backstop::start_with_env(&config(&collector.url(), &backend.url(), "", ""), FAST);

    let r = client()
        .get(bs.url("/api/items/7?q=1"))
        .header("traceparent", format!("00-{TRACE_ID}-{PARENT_ID}-01"))
        .header("tracestate", "vendor=abc")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let request_id = r.headers()["x-request-id"].to_str().unwrap().to_string();

    let (server, attempt) = &server_and_attempt(&collector).await;

    // The server span continues the caller's trace, under the caller's span.
    assert_eq!(hex(&server.trace_id), TRACE_ID);
    assert_eq!(hex(&server.parent_span_id), PARENT_ID);
    assert_eq!(server.trace_state, "vendor=abc");
    assert_eq!(server.name, "GET /api");
    assert_eq!(text(server, "http.request.method").as_deref(), Some("GET"));
    assert_eq!(text(server, "url.path").as_deref(), Some("/api/items/7"));
    assert_eq!(text(server, "http.route").as_deref(), Some("/api"));
    assert_eq!(text(server, "backstop.route").as_deref(), Some("api"));
    assert_eq!(int(server, "http.response.status_code"), Some(200));
    assert_eq!(
        text(server, "backstop.request_id").as_deref(),
        Some(request_id.as_str())
    );
    assert_eq!(boolean(server, "backstop.captured"), Some(false));
    assert!(!is_error(server));

    // The attempt is the server span's child.
    assert_eq!(attempt.trace_id, server.trace_id);
    assert_eq!(attempt.parent_span_id, server.span_id);
    assert_eq!(attempt.name, "GET");
    assert_eq!(
        text(attempt, "server.address").as_deref(),
        Some("127.0.0.1")
    );
    assert_eq!(
        int(attempt, "server.port"),
        Some(i64::from(backend.addr.port()))
    );
    assert_eq!(int(attempt, "backstop.attempt"), Some(1));
    assert_eq!(int(attempt, "http.request.resend_count"), None);
    assert_eq!(int(attempt, "http.response.status_code"), Some(200));
    assert!(attempt.start_time_unix_nano >= server.start_time_unix_nano);
    assert!(attempt.end_time_unix_nano <= server.end_time_unix_nano);

    // The backend's parent is the attempt span; the caller's state goes on.
    let seen = &backend.seen()[0];
    assert_eq!(
        seen.headers["traceparent"],
        format!("00-{TRACE_ID}-{}-01", hex(&attempt.span_id)).as_str()
    );
    assert_eq!(seen.headers["tracestate"], "vendor=abc");

    assert_eq!(collector.service_names()[0], "backstop-test");
    wait_for_counter(&bs, EXPORTED, 2.0, Duration::from_secs(5)).await;
    assert_eq!(bs.metric(QUEUE_FULL).await, 0.0);
    assert_eq!(bs.metric(EXPORT_FAILED).await, 0.0);
}

#[tokio::test]
async fn each_retry_is_its_own_client_span_with_its_resend_count() {
    let collector = Collector::start(Mode::Accept).await;
    let backend = Backend::scripted(vec![Reply::status(503), Reply::ok("fine")]).await;
    let bs = Backstop::start_with_env(
        &config(
            &collector.url(),
            &backend.url(),
            "",
            "[routes.retry]\nmax_attempts = 3\ninitial_delay = \"10ms\"\n",
        ),
        FAST,
    );

    let r = client().get(bs.url("/api/flaky")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "fine");

    let spans = collector.wait_for_spans(3, Duration::from_secs(10)).await;
    assert_eq!(spans.len(), 3, "one server span and two attempts");
    let server = &of_kind(&spans, SpanKind::Server)[0];
    let attempts = of_kind(&spans, SpanKind::Client);
    assert_eq!(int(server, "backstop.attempts"), Some(2));
    assert_eq!(int(server, "http.response.status_code"), Some(200));
    assert!(!is_error(server));

    let (first, second) = (&attempts[0], &attempts[1]);
    assert_eq!(int(first, "backstop.attempt"), Some(1));
    assert_eq!(int(first, "http.request.resend_count"), None);
    assert_eq!(int(first, "http.response.status_code"), Some(503));
    assert_eq!(text(first, "error.type").as_deref(), Some("503"));
    assert!(is_error(first));
    assert_eq!(int(second, "backstop.attempt"), Some(2));
    assert_eq!(int(second, "http.request.resend_count"), Some(1));
    assert_eq!(int(second, "http.response.status_code"), Some(200));
    assert!(!is_error(second));
    for attempt in &attempts {
        assert_eq!(attempt.parent_span_id, server.span_id);
        assert_eq!(attempt.trace_id, server.trace_id);
    }
    assert!(second.start_time_unix_nano >= first.end_time_unix_nano);

    // Each attempt told the backend its own span id.
    let parents: Vec<String> = backend
        .seen()
        .iter()
        .map(|s| s.headers["traceparent"].to_str().unwrap().to_string())
        .collect();
    let trace = hex(&server.trace_id);
    assert_eq!(
        parents,
        vec![
            format!("00-{trace}-{}-01", hex(&first.span_id)),
            format!("00-{trace}-{}-01", hex(&second.span_id)),
        ]
    );
}

#[tokio::test]
async fn without_a_traceparent_the_server_span_is_a_root_on_the_logged_trace_id() {
    let collector = Collector::start(Mode::Accept).await;
    let backend = Backend::echo().await;
    let bs = Backstop::start_with_env(
        &format!(
            "[log]\naccess_log = true\n{}",
            config(&collector.url(), &backend.url(), "", "")
        ),
        FAST,
    );

    let r = client()
        .post(bs.url("/api/orders"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let (server, attempt) = &server_and_attempt(&collector).await;
    assert!(server.parent_span_id.is_empty(), "a root span");
    assert_eq!(server.name, "POST /api");
    assert_eq!(attempt.parent_span_id, server.span_id);
    let trace = hex(&server.trace_id);
    assert_ne!(trace, "0".repeat(32));
    assert_eq!(
        backend.seen()[0].headers["traceparent"],
        format!("00-{trace}-{}-01", hex(&attempt.span_id)).as_str()
    );
    bs.wait_for_log(&trace, Duration::from_secs(5)).await;
}

#[tokio::test]
async fn sample_ratio_zero_exports_nothing_but_a_sampled_caller_is_honoured() {
    let collector = Collector::start(Mode::Accept).await;
    let backend = Backend::echo().await;
    let bs = Backstop::start_with_env(
        &config(&collector.url(), &backend.url(), "sample_ratio = 0", ""),
        FAST,
    );
    let c = client();
    for _ in 0..20 {
        let r = c.get(bs.url("/api/x")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    // An unsampled caller: its traceparent goes upstream untouched.
    let unsampled = format!("00-{TRACE_ID}-{PARENT_ID}-00");
    let r = c
        .get(bs.url("/api/x"))
        .header("traceparent", &unsampled)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(collector.spans().len(), 0, "nothing sampled, nothing sent");
    assert_eq!(bs.metric(EXPORTED).await, 0.0);
    let seen = backend.seen();
    assert_eq!(seen.len(), 21);
    // Traces Backstop starts reach backends marked unsampled, so that
    // backends sampling by their parent leave them out too.
    let tp = seen[0].headers["traceparent"].to_str().unwrap();
    assert!(tp.starts_with("00-") && tp.ends_with("-00"), "{tp}");
    assert_ne!(
        tp, seen[1].headers["traceparent"],
        "each request its own trace"
    );
    assert_eq!(seen[20].headers["traceparent"], unsampled.as_str());

    // Parent-based: a caller that sampled its trace gets its spans.
    let r = c
        .get(bs.url("/api/x"))
        .header("traceparent", format!("00-{TRACE_ID}-{PARENT_ID}-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let spans = collector.wait_for_spans(2, Duration::from_secs(10)).await;
    assert!(spans.iter().all(|s| hex(&s.trace_id) == TRACE_ID));
}

#[tokio::test]
async fn a_collector_that_is_down_costs_spans_not_requests() {
    // A port with nobody listening.
    let closed = Backend::echo().await.stop().await;
    let endpoint = format!("http://{closed}/v1/traces");
    let backend = Backend::echo().await;
    let bs = Backstop::start_with_env(
        &config(&endpoint, &backend.url(), "timeout = \"1s\"", ""),
        FAST,
    );
    let c = client();
    for _ in 0..10 {
        let started = Instant::now();
        let r = c.get(bs.url("/api/x")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(started.elapsed() < Duration::from_secs(1));
    }
    wait_for_counter(&bs, EXPORT_FAILED, 20.0, Duration::from_secs(10)).await;
    assert_eq!(bs.metric(EXPORTED).await, 0.0);
    bs.wait_for_log("otlp: export failed", Duration::from_secs(5))
        .await;
    // The cause, at debug level (the exporter only says "network error").
    bs.wait_for_log("Connection refused", Duration::from_secs(5))
        .await;
}

/// A collector that sheds load (`503`, `Retry-After`) is not waited for
/// on the proxy's threads: with one worker, a wait there would stop every
/// request and `/health` until it ended.
#[tokio::test]
async fn a_throttling_collector_holds_up_no_request() {
    let collector = Collector::start(Mode::Throttle).await;
    let backend = Backend::echo().await;
    let bs = Backstop::start_with_env(
        &format!(
            "[server]\nworkers = 1\n{}",
            config(&collector.url(), &backend.url(), "timeout = \"10s\"", "")
        ),
        FAST,
    );
    let c = client();
    let mut slowest = Duration::ZERO;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let started = Instant::now();
        let r = c.get(bs.url("/api/x")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        slowest = slowest.max(started.elapsed());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!collector.exports().is_empty(), "the collector was asked");
    // Held up by the collector's `Retry-After: 3`, one would take about 3 s.
    assert!(
        slowest < Duration::from_millis(1500),
        "the slowest request took {slowest:?}"
    );
    wait_for_counter(&bs, EXPORT_FAILED, 1.0, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_collector_fills_the_queue_and_requests_stay_fast() {
    let collector = Collector::start(Mode::Stall).await;
    let backend = Backend::echo().await;
    let bs = Backstop::start_with_env(
        &config(&collector.url(), &backend.url(), "timeout = \"60s\"", ""),
        FAST,
    );
    // The first export is sent and never answered: the export task waits.
    let r = client().get(bs.url("/api/first")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    while collector.exports().is_empty() {
        assert!(Instant::now() < deadline, "no export reached the collector");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // 1600 requests = 3200 spans: more than the 2048 the queue holds.
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..16 {
        let url = bs.url("/api/x");
        workers.push(tokio::spawn(async move {
            let c = client();
            let mut slowest = Duration::ZERO;
            for _ in 0..100 {
                let t = Instant::now();
                let r = c.get(&url).send().await.unwrap();
                assert_eq!(r.status(), 200);
                slowest = slowest.max(t.elapsed());
            }
            slowest
        }));
    }
    let mut slowest = Duration::ZERO;
    for w in workers {
        slowest = slowest.max(w.await.unwrap());
    }
    let total = started.elapsed();
    assert!(
        slowest < Duration::from_secs(1),
        "slowest request took {slowest:?}"
    );
    assert!(
        total < Duration::from_secs(30),
        "1600 requests took {total:?}"
    );
    let dropped = wait_for_counter(&bs, QUEUE_FULL, 1000.0, Duration::from_secs(5)).await;
    eprintln!("1600 requests in {total:?}, slowest {slowest:?}, {dropped} spans dropped");
    assert!(
        dropped <= 3202.0 - 2048.0,
        "at most the overflow is dropped: {dropped}"
    );
    assert_eq!(bs.metric(EXPORTED).await, 0.0);
    assert_eq!(collector.exports().len(), 1, "one export at a time");
}

#[tokio::test]
async fn a_reload_that_changes_otlp_warns_and_keeps_the_running_exporter() {
    let collector = Collector::start(Mode::Accept).await;
    let backend = Backend::echo().await;
    let bs = Backstop::start_with_env(&config(&collector.url(), &backend.url(), "", ""), FAST);
    let text = std::fs::read_to_string(&bs.config_path).unwrap();
    std::fs::write(
        &bs.config_path,
        text.replace("\"backstop-test\"", "\"renamed\""),
    )
    .unwrap();
    bs.signal("HUP");
    bs.wait_for_log("configuration reloaded", Duration::from_secs(5))
        .await;
    assert!(
        bs.logs()
            .contains("[otlp] changed: it takes effect after a restart"),
        "{}",
        bs.logs()
    );

    let r = client().get(bs.url("/api/x")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    collector.wait_for_spans(2, Duration::from_secs(10)).await;
    assert!(collector
        .service_names()
        .iter()
        .all(|n| n == "backstop-test"));
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_exports_the_spans_still_queued() {
    let collector = Collector::start(Mode::Accept).await;
    let backend = Backend::echo().await;
    // Ten minutes between exports: only the shutdown flush can send them.
    let mut bs = Backstop::start_with_env(
        &config(&collector.url(), &backend.url(), "", ""),
        &[("OTEL_BSP_SCHEDULE_DELAY", "600000")],
    );
    for _ in 0..3 {
        let r = client().get(bs.url("/api/x")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(collector.spans().len(), 0, "nothing exported yet");
    bs.signal("TERM");
    let code = tokio::task::block_in_place(|| bs.wait_exit(Duration::from_secs(10)));
    assert_eq!(code, Some(0));
    assert_eq!(collector.spans().len(), 6, "every span flushed at shutdown");
}

#[tokio::test]
async fn otel_environment_variables_change_nothing_but_the_schedule_delay() {
    let collector = Collector::start(Mode::Accept).await;
    let backend = Backend::echo().await;
    let bs = Backstop::start_with_env(
        &config(
            &collector.url(),
            &backend.url(),
            "[otlp.headers]\nauthorization = \"Bearer s3cret\"",
            "",
        ),
        &[
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
            ("OTEL_SDK_DISABLED", "true"),
            ("OTEL_TRACES_SAMPLER", "always_off"),
            ("OTEL_TRACES_EXPORTER", "none"),
            ("OTEL_SERVICE_NAME", "intruder"),
            ("OTEL_RESOURCE_ATTRIBUTES", "service.name=intruder"),
            ("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "0"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "1"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://127.0.0.1:9/v1/traces",
            ),
            ("OTEL_EXPORTER_OTLP_HEADERS", "x-leak=1"),
            ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-leak=2"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd"),
            ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "not-a-number"),
            ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "1"),
        ],
    );
    let r = client().get(bs.url("/api/x")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let spans = collector.wait_for_spans(2, Duration::from_secs(10)).await;
    let server = &of_kind(&spans, SpanKind::Server)[0];
    assert_eq!(text(server, "backstop.route").as_deref(), Some("api"));
    assert_eq!(collector.service_names()[0], "backstop-test");
    let export = &collector.exports()[0];
    assert_eq!(export.headers["authorization"], "Bearer s3cret");
    assert!(export.headers.get("x-leak").is_none());
    assert!(export.headers.get(http::header::CONTENT_ENCODING).is_none());
    assert!(!bs.logs().contains("s3cret"), "headers are never logged");
}
