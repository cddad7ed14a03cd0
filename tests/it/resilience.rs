//! Circuit breakers, retries, retry budgets and rate limits, over real
//! sockets: the reference setup's scenarios, with backends we control.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::forward_proxy::ForwardProxy;
use crate::harness::{
    client, error_of, h2_client_giving_up_after, Backend, Backstop, Reply, Stopped, StuckBackend,
};

/// A backend that answers 503 while `failing` is set, else 200 (after
/// `ok_delay`).
async fn switchable(failing: Arc<AtomicBool>, ok_delay: Duration) -> Backend {
    Backend::start(move |_| {
        if failing.load(Ordering::SeqCst) {
            Reply::status(503)
        } else {
            Reply::ok("fine").delay(ok_delay)
        }
    })
    .await
}

fn route(upstream: &str, extra: &str) -> String {
    format!(
        r#"
[[routes]]
name = "flaky"
path_prefix = "/api"
upstreams = [{upstream:?}]
{extra}
"#
    )
}

async fn metrics(bs: &Backstop) -> String {
    bs.admin_text("/metrics").await
}

async fn circuit(bs: &Backstop) -> serde_json::Value {
    let status: serde_json::Value = bs.admin_json("/circuit-status").await;
    status["circuits"][0].clone()
}

/// Sends `request`, whose first attempt fails and whose retry then waits
/// out its backoff, while a GET of `/api/x` (answered `503` by `backend`)
/// opens the circuit; `request`'s answer.
async fn answer_once_the_circuit_opened(
    bs: &Backstop,
    backend: &Backend,
    request: reqwest::RequestBuilder,
) -> reqwest::Response {
    let sent = tokio::spawn(async move { request.send().await.unwrap() });
    backend.wait_for_hits(1, Duration::from_secs(5)).await;
    let r = client().get(bs.url("/api/x")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(circuit(bs).await["state"], "open");
    sent.await.unwrap()
}

/// Waits (5 s at most) until the route's circuit is in `state`.
async fn wait_for_circuit(bs: &Backstop, state: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while circuit(bs).await["state"] != state {
        assert!(Instant::now() < deadline, "{}", circuit(bs).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn has_line(text: &str, line: &str) -> bool {
    text.lines().any(|l| l == line)
}

/// A reload that gives a route other upstreams closes its circuit: the
/// failures were the old backend's. One that changes anything else keeps
/// the circuit as it is.
#[tokio::test]
async fn a_reload_that_moves_a_route_closes_its_circuit() {
    let dead = Backend::start(|_| Reply::status(503)).await;
    let live = Backend::start(|_| Reply::ok("moved")).await;
    let toml = route(
        &dead.url(),
        "  [routes.retry]\n  max_attempts = 1\n  [routes.circuit_breaker]\n  \
         failure_threshold = 2\n  reset_timeout = \"60s\"\n",
    );
    let bs = Backstop::start(&toml);
    let c = client();
    let reload = |text: String| {
        let bs = &bs;
        async move {
            let reloads = || bs.logs().matches("configuration reloaded").count();
            let before = reloads();
            std::fs::write(&bs.config_path, text).unwrap();
            bs.signal("HUP");
            let started = Instant::now();
            while reloads() == before {
                assert!(started.elapsed() < Duration::from_secs(5), "not reloaded");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    for _ in 0..2 {
        assert_eq!(c.get(bs.url("/api/x")).send().await.unwrap().status(), 503);
    }
    let open = || async {
        let r = c.get(bs.url("/api/x")).send().await.unwrap();
        error_of(r).await.1 == "circuit_open"
    };
    assert!(open().await);
    reload(toml.replace("reset_timeout = \"60s\"", "reset_timeout = \"50s\"")).await;
    assert!(open().await, "the same upstreams: still open");
    reload(toml.replace(&dead.url(), &live.url())).await;
    let r = c.get(bs.url("/api/x")).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "moved");
    let closed = "circuit closed: the reload gave the route other upstreams";
    assert_eq!(bs.logs().matches(closed).count(), 1);
}

#[tokio::test]
async fn circuit_opens_after_the_threshold_and_closes_after_successful_probes() {
    let failing = Arc::new(AtomicBool::new(true));
    let backend = switchable(failing.clone(), Duration::ZERO).await;
    let bs = Backstop::start(&route(
        &backend.url(),
        r#"
  [routes.retry]
  max_attempts = 1
  [routes.circuit_breaker]
  failure_threshold = 3
  reset_timeout = "2s"
  success_threshold = 2
"#,
    ));
    let c = client();
    for _ in 0..3 {
        let r = c.get(bs.url("/api/x")).send().await.unwrap();
        assert_eq!(r.status(), 503);
        assert!(
            r.headers().get("x-backstop-error").is_none(),
            "the backend's own 503"
        );
    }
    assert_eq!(backend.hits(), 3);

    // Open: the backend is not called; the answer says when to come back.
    let r = c.get(bs.url("/api/x")).send().await.unwrap();
    assert_eq!(r.headers()["retry-after"], "2");
    let (status, code, error) = error_of(r).await;
    assert_eq!((status, code.as_str()), (503, "circuit_open"));
    assert_eq!(
        error["message"],
        "Service temporarily unavailable. Please try again in 2 seconds"
    );
    assert_eq!(error["retry_after_s"], 2);
    assert_eq!(error["route"], "flaky");
    assert_eq!(
        backend.hits(),
        3,
        "an open circuit never reaches the backend"
    );
    let status = circuit(&bs).await;
    assert_eq!(status["route"], "flaky");
    assert_eq!(status["state"], "open");
    assert!(status["time_to_reset"].as_f64().unwrap() > 1.0, "{status}");
    assert_eq!(status["config"]["failure_threshold"], 3);
    assert!(has_line(
        &metrics(&bs).await,
        "backstop_circuit_state{route=\"flaky\"} 1"
    ));

    // After reset_timeout: half-open; two successful probes close it.
    failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(circuit(&bs).await["state"], "half_open");
    assert_eq!(c.get(bs.url("/api/x")).send().await.unwrap().status(), 200);
    let status = circuit(&bs).await;
    assert_eq!(status["state"], "half_open");
    assert_eq!(status["successes"], 1);
    assert!(has_line(
        &metrics(&bs).await,
        "backstop_circuit_state{route=\"flaky\"} 2"
    ));
    assert_eq!(c.get(bs.url("/api/x")).send().await.unwrap().status(), 200);
    assert_eq!(circuit(&bs).await["state"], "closed");
    assert!(has_line(
        &metrics(&bs).await,
        "backstop_circuit_state{route=\"flaky\"} 0"
    ));
    assert_eq!(backend.hits(), 5);
}

#[tokio::test]
async fn retries_count_towards_the_threshold_and_stop_when_the_circuit_opens() {
    let failing = Arc::new(AtomicBool::new(true));
    let backend = switchable(failing, Duration::ZERO).await;
    let bs = Backstop::start(&route(
        &backend.url(),
        r#"
  [routes.retry]
  max_attempts = 3
  initial_delay = "10ms"
  [routes.circuit_breaker]
  failure_threshold = 5
"#,
    ));
    // 3 attempts, then 2 more: the fifth failure opens the circuit and the
    // second request's third attempt is never made.
    for _ in 0..2 {
        let r = client().get(bs.url("/api/x")).send().await.unwrap();
        assert_eq!(r.status(), 503);
    }
    assert_eq!(backend.hits(), 5, "exactly failure_threshold calls");
    let (_, code, _) = error_of(client().get(bs.url("/api/x")).send().await.unwrap()).await;
    assert_eq!(code, "circuit_open");
    assert_eq!(backend.hits(), 5);
}

/// A retry waiting through its backoff while other requests' failures open
/// the circuit is not sent: an open circuit never calls the backend.
#[tokio::test]
async fn a_retry_is_not_sent_once_the_circuit_opened_during_its_backoff() {
    let failing = Arc::new(AtomicBool::new(true));
    let backend = switchable(failing, Duration::ZERO).await;
    let bs = Backstop::start(&route(
        &backend.url(),
        r#"
  [routes.retry]
  max_attempts = 2
  initial_delay = "1s"
  [routes.circuit_breaker]
  failure_threshold = 2
"#,
    ));
    // The second failure opens the circuit; this request's own retry is
    // refused at once.
    let first = client().get(bs.url("/api/x"));
    let first = answer_once_the_circuit_opened(&bs, &backend, first).await;
    let (status, code, _) = error_of(first).await;
    assert_eq!(backend.hits(), 2, "the first request's retry was not sent");
    assert_eq!(
        (status, code.as_str()),
        (503, "circuit_open"),
        "answered as the open circuit answers"
    );
}

/// A retry the circuit refuses after its backoff does not turn the
/// backend's own answer into a capture: a `500` to a `PUT` is the
/// backend's word about that request (it may have applied it), so it is
/// not queued for a replay that would apply it again. The client gets that
/// answer, as when the retries run out.
#[tokio::test]
async fn a_retry_refused_after_its_backoff_does_not_capture_the_backends_answer() {
    let backend = Backend::start(|seen| {
        if seen.method == "PUT" {
            Reply::status(500).body("order 1 half written")
        } else {
            Reply::status(503)
        }
    })
    .await;
    let bs = Backstop::start(&route(
        &backend.url(),
        r#"
  [routes.retry]
  max_attempts = 2
  initial_delay = "1s"
  [routes.circuit_breaker]
  failure_threshold = 2
"#,
    ));
    let put = client().put(bs.url("/api/orders/1")).body("{}");
    let r = answer_once_the_circuit_opened(&bs, &backend, put).await;
    assert!(!r.headers().contains_key("x-backstop-capture-id"));
    assert!(!r.headers().contains_key("x-backstop-error"));
    assert_eq!(r.status(), 500);
    assert_eq!(r.text().await.unwrap(), "order 1 half written");
    assert_eq!(backend.hits(), 2, "the PUT's retry was not sent");
    let queue: serde_json::Value = bs.admin_json("/queue").await;
    assert_eq!(queue["depth"], 0, "nothing captured: {queue}");
}

/// A `429` whose retry the circuit refuses after the backoff reaches the
/// client as the backend sent it, `Retry-After` and all: the client is
/// told when to come back, not that the backend is unreachable.
#[tokio::test]
async fn a_429_whose_retry_is_refused_keeps_its_retry_after() {
    let backend = Backend::start(|seen| {
        if seen.uri.contains("/limited") {
            Reply::status(429)
                .header("retry-after", "1")
                .body("slow down")
        } else {
            Reply::status(503)
        }
    })
    .await;
    let bs = Backstop::start(&route(
        &backend.url(),
        r#"
  [routes.retry]
  max_attempts = 2
  initial_delay = "1s"
  [routes.circuit_breaker]
  failure_threshold = 1
"#,
    ));
    let limited = client().get(bs.url("/api/limited"));
    let r = answer_once_the_circuit_opened(&bs, &backend, limited).await;
    assert_eq!(backend.hits(), 2, "the 429's retry was not sent");
    assert_eq!(r.status(), 429);
    assert!(!r.headers().contains_key("x-backstop-error"));
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(r.text().await.unwrap(), "slow down");
}

/// `backstop_circuit_state` says what `/circuit-status` says: a route with
/// no traffic yet has its series, and an open circuit past its reset
/// timeout reads half-open though no call came to turn it so.
#[tokio::test]
async fn the_circuit_state_metric_follows_the_status_without_traffic() {
    let dead = dead_address().await;
    let bs = Backstop::start(&route(
        &format!("http://{dead}"),
        r#"
  [routes.retry]
  max_attempts = 1
  [routes.circuit_breaker]
  failure_threshold = 1
  reset_timeout = "1s"
"#,
    ));
    let series = "backstop_circuit_state{route=\"flaky\"}";
    assert!(has_line(&metrics(&bs).await, &format!("{series} 0")));
    let r = client().get(bs.url("/api/x")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert!(has_line(&metrics(&bs).await, &format!("{series} 1")));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(circuit(&bs).await["state"], "half_open");
    assert!(has_line(&metrics(&bs).await, &format!("{series} 2")));
}

/// A route a reload removes is forgotten: its open circuit no longer shows
/// in `/metrics` (it would alert forever, with no route left to reset).
#[tokio::test]
async fn a_route_removed_by_a_reload_leaves_no_circuit_behind() {
    let backend = switchable(Arc::new(AtomicBool::new(true)), Duration::ZERO).await;
    let bs = Backstop::start(&route(
        &backend.url(),
        "  [routes.retry]\n  max_attempts = 1\n  [routes.circuit_breaker]\n  failure_threshold = 1\n",
    ));
    let r = client().get(bs.url("/api/x")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(has_line(
        &metrics(&bs).await,
        "backstop_circuit_state{route=\"flaky\"} 1"
    ));
    let text = std::fs::read_to_string(&bs.config_path).unwrap();
    std::fs::write(&bs.config_path, text.replace("\"flaky\"", "\"steady\"")).unwrap();
    bs.signal("HUP");
    bs.wait_for_log("configuration reloaded", Duration::from_secs(5))
        .await;
    let metrics = metrics(&bs).await;
    assert!(
        !metrics.contains("backstop_circuit_state{route=\"flaky\"}"),
        "{metrics}"
    );
    let r = client().get(bs.url("/api/x")).send().await.unwrap();
    assert!(
        !r.headers().contains_key("x-backstop-error"),
        "the new route starts closed: the backend's own 503"
    );
}

#[tokio::test]
async fn half_open_lets_only_a_limited_number_of_probes_through() {
    let failing = Arc::new(AtomicBool::new(true));
    let backend = switchable(failing.clone(), Duration::from_millis(500)).await;
    let bs = Backstop::start(&route(
        &backend.url(),
        r#"
  [routes.retry]
  max_attempts = 1
  [routes.circuit_breaker]
  failure_threshold = 1
  reset_timeout = "500ms"
  success_threshold = 2
"#,
    ));
    assert_eq!(
        client()
            .get(bs.url("/api/x"))
            .send()
            .await
            .unwrap()
            .status(),
        503
    );
    failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let requests = (0..6).map(|_| {
        let url = bs.url("/api/x");
        async move { client().get(url).send().await.unwrap() }
    });
    let answers = futures_util::future::join_all(requests).await;
    let mut ok = 0;
    let mut open = 0;
    for r in answers {
        match r.status().as_u16() {
            200 => ok += 1,
            503 => {
                assert_eq!(r.headers()["x-backstop-error"], "circuit_open");
                open += 1;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!((ok, open), (2, 4), "two probes at once, the rest refused");
    assert_eq!(backend.hits(), 1 + 2);
    assert_eq!(circuit(&bs).await["state"], "closed");
}

/// A half-open circuit's probe answered 429 (a success for the breaker)
/// is retried after its `Retry-After`; through that wait it holds no probe
/// place, so another request is still let through beside a probe in flight.
#[tokio::test]
async fn a_retry_waiting_out_its_backoff_holds_no_half_open_probe_place() {
    let failing = Arc::new(AtomicBool::new(true));
    let flag = failing.clone();
    let throttled_once = Arc::new(AtomicBool::new(false));
    let backend = Backend::start(move |seen| match seen.uri.as_str() {
        _ if flag.load(Ordering::SeqCst) => Reply::status(503),
        "/api/throttled" if !throttled_once.swap(true, Ordering::SeqCst) => {
            Reply::status(429).header("retry-after", "4")
        }
        "/api/slow" => Reply::ok("slow").delay(Duration::from_secs(3)),
        _ => Reply::ok("fine"),
    })
    .await;
    let bs = Backstop::start(&route(
        &backend.url(),
        r#"
  [routes.retry]
  max_attempts = 2
  initial_delay = "10ms"
  max_delay = "10s"
  [routes.circuit_breaker]
  failure_threshold = 1
  reset_timeout = "300ms"
  success_threshold = 2
"#,
    ));
    let r = client().get(bs.url("/api/x")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(circuit(&bs).await["state"], "open");
    failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(400)).await;

    let throttled = tokio::spawn(client().get(bs.url("/api/throttled")).send());
    backend.wait_for_hits(2, Duration::from_secs(5)).await;
    let slow = tokio::spawn(client().get(bs.url("/api/slow")).send());
    backend.wait_for_hits(3, Duration::from_secs(5)).await;
    // One probe (the slow one, 3 s) is in flight, one success counted;
    // the throttled request waits out its 4 s.
    assert_eq!(circuit(&bs).await["state"], "half_open");
    let r = client().get(bs.url("/api/other")).send().await.unwrap();
    assert_eq!(
        r.status(),
        200,
        "refused: {:?}",
        r.headers().get("x-backstop-error")
    );
    assert_eq!(slow.await.unwrap().unwrap().status(), 200);
    assert_eq!(throttled.await.unwrap().unwrap().status(), 200);
}

#[tokio::test]
async fn a_post_is_captured_while_open_and_replayed_after_a_reset() {
    let failing = Arc::new(AtomicBool::new(false));
    let flag = failing.clone();
    let backend = Backend::start(move |seen| {
        if seen.method == "GET" {
            Reply::status(500)
        } else if flag.load(Ordering::SeqCst) {
            Reply::status(503)
        } else {
            Reply::status(201)
        }
    })
    .await;
    let bs = Backstop::start(&route(
        &backend.url(),
        r#"
  [routes.retry]
  max_attempts = 1
  [routes.circuit_breaker]
  failure_threshold = 2
  reset_timeout = "60s"
"#,
    ));
    for _ in 0..2 {
        let r = client().get(bs.url("/api/x")).send().await.unwrap();
        assert_eq!(r.status(), 500, "a 500 is passed on (and counted)");
    }
    let r = client()
        .post(bs.url("/api/orders"))
        .body("{\"n\":1}")
        .send()
        .await
        .unwrap();
    assert!(r.headers().contains_key("x-backstop-capture-id"));
    let (status, code, error) = error_of(r).await;
    assert_eq!((status, code.as_str()), (503, "captured"));
    assert_eq!(error["captured"], true);
    assert!(has_line(
        &metrics(&bs).await,
        "backstop_captured_total{route=\"flaky\",reason=\"circuit_open\"} 1"
    ));

    // The replay worker waits while the circuit is open.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(backend.hits(), 2, "nothing replayed into an open circuit");

    let r = client()
        .post(bs.admin_url("/circuits/flaky/reset"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(circuit(&bs).await["state"], "closed");
    backend.wait_for_hits(3, Duration::from_secs(10)).await;
    let seen = backend.seen();
    assert_eq!(seen[2].method, "POST");
    assert_eq!(seen[2].body, "{\"n\":1}");

    let r = client()
        .post(bs.admin_url("/circuits/nope/reset"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

/// Replays go through the route's circuit as clients' requests do: on a
/// route whose only traffic is replays, the replay that succeeds once the
/// circuit is half-open closes it (else it would read half-open for ever).
#[tokio::test]
async fn a_successful_replay_closes_a_half_open_circuit() {
    let failing = Arc::new(AtomicBool::new(true));
    let backend = switchable(failing.clone(), Duration::ZERO).await;
    let bs = Backstop::start(&route(
        &backend.url(),
        r#"
  [routes.retry]
  max_attempts = 1
  [routes.circuit_breaker]
  failure_threshold = 1
  success_threshold = 1
  reset_timeout = "1s"
"#,
    ));
    let r = client()
        .post(bs.url("/api/orders"))
        .body("{}")
        .send()
        .await
        .unwrap();
    let (status, code, _) = error_of(r).await;
    assert_eq!((status, code.as_str()), (503, "captured"));
    assert_eq!(circuit(&bs).await["state"], "open");
    failing.store(false, Ordering::SeqCst);
    backend.wait_for_hits(2, Duration::from_secs(10)).await;
    wait_for_circuit(&bs, "closed").await;
}

/// Another site's page in the operator's browser cannot act on the admin
/// API (a form posting to the reset) nor read it through DNS rebinding (a
/// name of its own resolving to 127.0.0.1); the admin's own pages and
/// tools without a browser's headers still can.
#[tokio::test]
async fn the_admin_api_refuses_other_sites_pages() {
    let backend = Backend::start(|_| Reply::ok("ok")).await;
    let bs = Backstop::start(&route(&backend.url(), ""));
    let reset = bs.admin_url("/circuits/flaky/reset");
    let own_origin = bs.admin_url("").trim_end_matches('/').to_string();
    let post = |origin: Option<&str>, site: Option<&str>| {
        let mut r = client().post(&reset);
        if let Some(origin) = origin {
            r = r.header("origin", origin);
        }
        if let Some(site) = site {
            r = r.header("sec-fetch-site", site);
        }
        async move { error_or_ok(r.send().await.unwrap()).await }
    };
    assert_eq!(post(None, None).await, (200, String::new()), "curl");
    assert_eq!(post(Some(&own_origin), Some("same-origin")).await.0, 200);
    let forbidden = (403, "forbidden".to_string());
    assert_eq!(
        post(Some("http://evil.example"), Some("cross-site")).await,
        forbidden
    );
    assert_eq!(post(Some("http://evil.example"), None).await, forbidden);
    assert_eq!(post(None, Some("same-site")).await, forbidden);

    let rebound = client()
        .get(bs.admin_url("/queue"))
        .header("host", "evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(error_or_ok(rebound).await, forbidden);
    let local = client()
        .get(bs.admin_url("/queue"))
        .header("host", "localhost")
        .send()
        .await
        .unwrap();
    assert_eq!(local.status(), 200);
}

/// The status and, for a proxy-made error, its code.
async fn error_or_ok(r: reqwest::Response) -> (u16, String) {
    if r.status().is_success() {
        return (r.status().as_u16(), String::new());
    }
    let (status, code, _) = error_of(r).await;
    (status, code)
}

#[tokio::test]
async fn failure_rate_mode_opens_on_the_share_of_failures() {
    let backend = Backend::start(|seen| {
        if seen.uri.contains("bad") {
            Reply::status(502)
        } else {
            Reply::ok("ok")
        }
    })
    .await;
    let bs = Backstop::start(&route(
        &backend.url(),
        r#"
  [routes.retry]
  max_attempts = 1
  [routes.circuit_breaker]
  mode = "failure_rate"
  failure_rate_threshold = 50
  minimum_calls = 4
  window = "30s"
"#,
    ));
    let c = client();
    for path in ["/api/ok", "/api/bad", "/api/ok"] {
        c.get(bs.url(path)).send().await.unwrap();
    }
    assert_eq!(circuit(&bs).await["state"], "closed", "under minimum_calls");
    c.get(bs.url("/api/bad")).send().await.unwrap();
    let status = circuit(&bs).await;
    assert_eq!(status["state"], "open", "2 of 4 failed: {status}");
    assert_eq!(status["config"]["mode"], "failure_rate");
    let (_, code, _) = error_of(c.get(bs.url("/api/ok")).send().await.unwrap()).await;
    assert_eq!(code, "circuit_open");
}

/// A backend that notes when each request arrived.
async fn timed(
    reply: impl Fn(usize) -> Reply + Send + Sync + 'static,
) -> (Backend, Arc<Mutex<Vec<Instant>>>) {
    let times = Arc::new(Mutex::new(Vec::new()));
    let log = times.clone();
    let backend = Backend::start(move |_| {
        let mut t = log.lock().unwrap();
        t.push(Instant::now());
        reply(t.len())
    })
    .await;
    (backend, times)
}

fn gaps(times: &Mutex<Vec<Instant>>) -> Vec<Duration> {
    let t = times.lock().unwrap();
    t.windows(2).map(|w| w[1] - w[0]).collect()
}

#[tokio::test]
async fn backoff_follows_the_configured_schedule() {
    let (backend, times) = timed(|_| Reply::status(503)).await;
    let bs = Backstop::start(&route(
        &backend.url(),
        r#"
  [routes.retry]
  max_attempts = 4
  initial_delay = "200ms"
  backoff_factor = 2.0
  max_delay = "600ms"
  [routes.circuit_breaker]
  failure_threshold = 100
"#,
    ));
    let r = client().get(bs.url("/api/x")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(backend.hits(), 4);
    // 200 ms, 400 ms, then capped at 600 ms; jitter adds up to 20 %.
    let want = [200u64, 400, 600];
    for (gap, base) in gaps(&times).iter().zip(want) {
        let base = Duration::from_millis(base);
        assert!(*gap >= base, "{gap:?} shorter than {base:?}");
        assert!(
            *gap < base.mul_f64(1.2) + Duration::from_millis(250),
            "{gap:?} much longer than {base:?}"
        );
    }
    assert!(has_line(
        &metrics(&bs).await,
        "backstop_upstream_retries_total{route=\"flaky\"} 3"
    ));
}

#[tokio::test]
async fn retry_after_from_the_backend_is_honoured_up_to_max_delay() {
    let (backend, times) = timed(|n| match n {
        1 => Reply::status(503).header("retry-after", "1"),
        3 => Reply::status(429).header("retry-after", "30"),
        _ => Reply::ok("done"),
    })
    .await;
    let bs = Backstop::start(&route(
        &backend.url(),
        r#"
  [routes.retry]
  initial_delay = "50ms"
  max_delay = "1500ms"
"#,
    ));
    let r = client().get(bs.url("/api/a")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = client().get(bs.url("/api/b")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let g = gaps(&times);
    assert!(
        g[0] >= Duration::from_secs(1),
        "Retry-After: 1 honoured: {g:?}"
    );
    assert!(
        g[2] >= Duration::from_millis(1500) && g[2] < Duration::from_secs(5),
        "Retry-After: 30 capped by max_delay: {g:?}"
    );
}

#[tokio::test]
async fn a_post_is_not_retried_on_a_500_but_a_get_is() {
    let backend = Backend::start(|_| Reply::status(500)).await;
    let bs = Backstop::start(&route(
        &backend.url(),
        r#"
  [routes.retry]
  initial_delay = "10ms"
  [routes.capture]
  enabled = false
"#,
    ));
    let r = client()
        .post(bs.url("/api/x"))
        .body("once")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    assert_eq!(
        backend.hits(),
        1,
        "a POST may have had effects: never resent"
    );
    let r = client().get(bs.url("/api/x")).send().await.unwrap();
    assert_eq!(r.status(), 500);
    assert_eq!(backend.hits(), 4, "a GET is retried up to max_attempts");
}

#[tokio::test]
async fn the_retry_budget_stops_a_retry_storm() {
    let backend = Backend::start(|_| Reply::status(503)).await;
    let bs = Backstop::start(&route(
        &backend.url(),
        r#"
  [routes.retry]
  max_attempts = 5
  initial_delay = "1ms"
  max_delay = "2ms"
  budget_percent = 20
  budget_min_per_second = 0
  [routes.circuit_breaker]
  failure_threshold = 100000
"#,
    ));
    let requests = 50;
    for _ in 0..requests {
        let r = client().get(bs.url("/api/x")).send().await.unwrap();
        assert_eq!(r.status(), 503);
    }
    let attempts = backend.hits();
    // Without a budget: 5 × 50 = 250 attempts. With it: 50 + 20 %.
    assert!(
        attempts > requests && attempts <= requests + requests / 5,
        "{attempts} attempts for {requests} requests"
    );
    assert!(has_line(
        &metrics(&bs).await,
        &format!(
            "backstop_upstream_retries_total{{route=\"flaky\"}} {}",
            attempts - requests
        )
    ));
}

#[tokio::test]
async fn the_deadline_bounds_the_whole_request() {
    let backend = Backend::start(|_| Reply::ok("late").delay(Duration::from_secs(5))).await;
    let bs = Backstop::start(&route(
        &backend.url(),
        r#"
  [routes.retry]
  max_attempts = 10
  initial_delay = "50ms"
  deadline = "1s"
  [routes.circuit_breaker]
  request_timeout = 300
  failure_threshold = 100
"#,
    ));
    let started = Instant::now();
    let (status, code, _) = error_of(client().get(bs.url("/api/x")).send().await.unwrap()).await;
    assert_eq!((status, code.as_str()), (504, "upstream_timeout"));
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "took {:?}",
        started.elapsed()
    );
    assert!(backend.hits() <= 4, "{} attempts", backend.hits());
}

/// A retry that starts with little of the deadline left and times out
/// tells the breaker nothing: only the first attempt, which had its whole
/// `request_timeout`, counts as a failure.
#[tokio::test]
async fn a_retry_cut_short_by_the_deadline_is_no_breaker_failure() {
    let backend = Backend::start(|_| Reply::ok("late").delay(Duration::from_secs(5))).await;
    let bs = Backstop::start(&route(
        &backend.url(),
        r#"
  [routes.retry]
  max_attempts = 2
  initial_delay = "50ms"
  deadline = "1500ms"
  [routes.circuit_breaker]
  request_timeout = 1000
  failure_threshold = 2
"#,
    ));
    let (status, code, _) = error_of(client().get(bs.url("/api/x")).send().await.unwrap()).await;
    assert_eq!((status, code.as_str()), (504, "upstream_timeout"));
    assert_eq!(backend.hits(), 2, "the retry was sent");
    let state = circuit(&bs).await;
    assert_eq!(state["state"], "closed", "{state}");
    // A second request's first attempt is the second failure that counts.
    let (status, _, _) = error_of(client().get(bs.url("/api/x")).send().await.unwrap()).await;
    assert_eq!(status, 504);
    assert_eq!(circuit(&bs).await["state"], "open");
}

#[tokio::test]
async fn over_the_rate_limit_is_429_with_ratelimit_headers() {
    let backend = Backend::start(|_| Reply::ok("ok")).await;
    let bs = Backstop::start(&route(
        &backend.url(),
        r#"
  [routes.rate_limit]
  requests_per_second = 0.5
  burst = 3
"#,
    ));
    let c = client();
    for remaining in ["2", "1", "0"] {
        let r = c.get(bs.url("/api/x")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["ratelimit-limit"], "3");
        assert_eq!(r.headers()["ratelimit-remaining"], remaining);
    }
    let r = c.get(bs.url("/api/x")).send().await.unwrap();
    assert_eq!(r.headers()["retry-after"], "2");
    assert_eq!(r.headers()["ratelimit-remaining"], "0");
    assert_eq!(r.headers()["ratelimit-reset"], "6");
    let (status, code, error) = error_of(r).await;
    assert_eq!((status, code.as_str()), (429, "rate_limited"));
    assert_eq!(error["retry_after_s"], 2);
    assert_eq!(backend.hits(), 3);
    assert!(has_line(
        &metrics(&bs).await,
        "backstop_requests_total{route=\"flaky\",status=\"429\"} 1"
    ));
}

#[tokio::test]
async fn rate_limits_keyed_by_header_are_per_client() {
    let backend = Backend::start(|_| Reply::ok("ok")).await;
    let bs = Backstop::start(&route(
        &backend.url(),
        r#"
  [routes.rate_limit]
  requests_per_second = 0.1
  burst = 2
  key = "header:X-API-Key"
"#,
    ));
    let send = |key: &'static str| {
        let url = bs.url("/api/x");
        async move {
            client()
                .get(url)
                .header("x-api-key", key)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let a: Vec<u16> = vec![send("a").await, send("a").await, send("a").await];
    assert_eq!(a, [200, 200, 429]);
    assert_eq!(send("b").await, 200, "another key has its own bucket");
}

/// Behind a trusted proxy, `client_ip` is the client it names in
/// `X-Forwarded-For` (the rightmost address it did not vouch for, so what a
/// client wrote left of it is never read): each client has its own bucket.
/// From a peer that is not trusted the header is the client's own claim:
/// ignored, and every request shares the peer's bucket.
#[tokio::test]
async fn client_ip_limits_behind_a_trusted_proxy_are_per_client() {
    let backend = Backend::start(|_| Reply::ok("ok")).await;
    let limit = r#"
  [routes.rate_limit]
  requests_per_second = 0.1
  burst = 1
  key = "client_ip"
"#;
    for trusted in [true, false] {
        let server = if trusted {
            "[server]\ntrusted_proxies = [\"127.0.0.0/8\", \"10.0.0.0/8\"]\n"
        } else {
            ""
        };
        let bs = Backstop::start(&format!("{server}{}", route(&backend.url(), limit)));
        let send = |forwarded_for: &'static str| {
            let url = bs.url("/api/x");
            async move {
                let r = client()
                    .get(url)
                    .header("x-forwarded-for", forwarded_for)
                    .send()
                    .await
                    .unwrap();
                r.status().as_u16()
            }
        };
        let statuses = [
            send("203.0.113.1").await,
            // Another client's address written by this one, then its own
            // through a second trusted hop.
            send("203.0.113.2, 203.0.113.1, 10.0.0.7").await,
            send("203.0.113.2").await,
        ];
        let want = if trusted {
            [200, 429, 200]
        } else {
            [200, 429, 429]
        };
        assert_eq!(statuses, want, "trusted: {trusted}");
    }
}

fn proxied_route(upstream: &str, proxies: &[String], strategy: &str, extra: &str) -> String {
    proxied_routes(&[upstream.to_string()], proxies, strategy, extra)
}

/// Route `thirdparty` on `/api` to `upstreams` through `proxies`, with
/// the route keys in `extra`.
fn proxied_routes(upstreams: &[String], proxies: &[String], strategy: &str, extra: &str) -> String {
    format!(
        r#"
[outbound_proxies]
urls = {proxies:?}

[[routes]]
name = "thirdparty"
path_prefix = "/api"
upstreams = {upstreams:?}
{extra}
  [routes.retry]
  initial_delay = "10ms"
  [routes.proxy]
  use_proxy = true
  strategy = {strategy:?}
"#
    )
}

const PROXY_PASSWORD: &str = "s3cr3t-pw";

fn proxy_url(addr: std::net::SocketAddr) -> String {
    format!("http://user:{PROXY_PASSWORD}@{addr}")
}

/// `Basic base64("user:s3cr3t-pw")`.
const PROXY_AUTH: &str = "Basic dXNlcjpzM2NyM3QtcHc=";

/// An address where nothing listens, kept from other tests' servers while
/// it lives.
async fn dead_address() -> Stopped {
    Backend::echo().await.stop().await
}

#[tokio::test]
async fn round_robin_rotates_through_two_forward_proxies() {
    let backend = Backend::start(|_| Reply::ok("ok")).await;
    let (a, b) = (
        ForwardProxy::start("proxy-a").await,
        ForwardProxy::start("proxy-b").await,
    );
    let bs = Backstop::start(&proxied_route(
        &backend.url(),
        &[proxy_url(a.addr), proxy_url(b.addr)],
        "round_robin",
        "",
    ));
    for _ in 0..10 {
        let r = client().get(bs.url("/api/items?x=1")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!((a.hits(), b.hits()), (5, 5), "each proxy sees its share");
    for seen in a.seen().iter().chain(b.seen().iter()) {
        assert_eq!(seen.method, "GET");
        assert_eq!(
            seen.target,
            format!("{}/api/items?x=1", backend.url()),
            "absolute form"
        );
        assert_eq!(seen.proxy_authorization.as_deref(), Some(PROXY_AUTH));
    }
    let seen = backend.seen();
    assert_eq!(seen.len(), 10);
    let vias: Vec<_> = seen.iter().map(|s| s.headers["via"].clone()).collect();
    assert_eq!(vias.iter().filter(|v| *v == "proxy-a").count(), 5);
    assert!(seen
        .iter()
        .all(|s| !s.headers.contains_key("proxy-authorization")));

    let status = bs.admin_text("/circuit-status").await;
    assert!(!status.contains(PROXY_PASSWORD), "{status}");
    assert!(!bs.logs().contains(PROXY_PASSWORD));
}

#[tokio::test]
async fn https_targets_go_through_connect_tunnels() {
    let (backend, ca_path, _dir) = secure_backend().await;
    let (a, b) = (
        ForwardProxy::start("proxy-a").await,
        ForwardProxy::start("proxy-b").await,
    );
    let upstream = format!("https://localhost:{}", backend.addr.port());
    let bs = Backstop::start(&proxied_route(
        &upstream,
        &[proxy_url(a.addr), proxy_url(b.addr)],
        "round_robin",
        &format!("tls_ca_file = {ca_path:?}"),
    ));
    for _ in 0..4 {
        let r = client().get(bs.url("/api/secure")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), "secure");
    }
    for proxy in [&a, &b] {
        let seen = proxy.seen();
        assert!(!seen.is_empty(), "both proxies carried a tunnel");
        for s in seen {
            assert_eq!(s.method, "CONNECT");
            assert_eq!(s.target, format!("localhost:{}", backend.addr.port()));
            assert_eq!(s.proxy_authorization.as_deref(), Some(PROXY_AUTH));
        }
    }
    let seen = backend.seen();
    assert_eq!(seen.len(), 4);
    assert!(
        seen.iter()
            .all(|s| !s.headers.contains_key("proxy-authorization")),
        "the credentials stay on the CONNECT"
    );
}

#[tokio::test]
async fn on_rate_limit_goes_direct_first_then_through_a_proxy() {
    let backend = Backend::start(|seen| {
        if seen.headers.contains_key("via") {
            Reply::ok("through a proxy")
        } else {
            Reply::status(429)
        }
    })
    .await;
    let proxy = ForwardProxy::start("proxy-a").await;
    let bs = Backstop::start(&proxied_route(
        &backend.url(),
        &[proxy_url(proxy.addr)],
        "on_rate_limit",
        "",
    ));
    let r = client().get(bs.url("/api/x")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "through a proxy");
    let seen = backend.seen();
    assert_eq!(seen.len(), 2);
    assert!(
        !seen[0].headers.contains_key("via"),
        "the first try is direct"
    );
    assert_eq!(proxy.hits(), 1);
}

/// A captured request is replayed through the route's outbound proxies,
/// as its clients' requests go.
#[tokio::test]
async fn a_replay_goes_through_the_routes_outbound_proxy() {
    let stopped = Backend::echo().await.stop().await;
    let upstream = format!("http://{}", stopped.addr);
    let proxy = ForwardProxy::start("proxy-a").await;
    let extra = "[replay]\ninitial_delay = \"100ms\"\nmax_delay = \"300ms\"\n";
    let bs = Backstop::start(&format!(
        "{extra}{}",
        proxied_route(&upstream, &[proxy_url(proxy.addr)], "round_robin", "")
    ));
    let r = client()
        .post(bs.url("/api/orders"))
        .body("order")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["x-backstop-error"], "captured");
    let proxied_before = proxy.hits();
    let backend = Backend::start_on(stopped, |_| Reply::status(200)).await;
    backend.wait_for_hits(1, Duration::from_secs(10)).await;
    let seen = &backend.seen()[0];
    assert!(
        seen.headers.contains_key("x-backstop-replay-attempt"),
        "a replay"
    );
    assert_eq!(seen.headers["via"], "proxy-a", "through the proxy");
    assert_eq!(seen.body, &b"order"[..]);
    assert!(proxy.hits() > proxied_before);
}

#[tokio::test]
async fn a_dead_proxy_is_skipped() {
    let backend = Backend::start(|_| Reply::ok("ok")).await;
    let live = ForwardProxy::start("live").await;
    let dead = dead_address().await;
    let bs = Backstop::start(&proxied_route(
        &backend.url(),
        &[proxy_url(dead.addr), proxy_url(live.addr)],
        "round_robin",
        "",
    ));
    for _ in 0..6 {
        let r = client().get(bs.url("/api/x")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(live.hits(), 6);
    assert_eq!(backend.hits(), 6);
    bs.wait_for_log("outbound proxy failed", Duration::from_secs(5))
        .await;
    assert!(!bs.logs().contains(PROXY_PASSWORD), "{}", bs.logs());
}

/// With every proxy skipped one is tried anyway, and the one that answers
/// is used again at once: it does not wait out the rest of its skip while
/// requests keep going to the one still down.
#[tokio::test]
async fn a_proxy_that_answers_again_is_no_longer_skipped() {
    let backend = Backend::start(|_| Reply::ok("ok")).await;
    let (first, second) = (dead_address().await, dead_address().await);
    let bs = Backstop::start(&proxied_route(
        &backend.url(),
        &[proxy_url(first.addr), proxy_url(second.addr)],
        "round_robin",
        "",
    ));
    for _ in 0..2 {
        let r = client().get(bs.url("/api/x")).send().await.unwrap();
        assert_eq!(r.status(), 502, "both proxies are down");
    }
    let back = ForwardProxy::start_at("back", first).await;
    let mut failed = 0;
    for _ in 0..6 {
        let r = client().get(bs.url("/api/x")).send().await.unwrap();
        failed += usize::from(r.status() != 200);
    }
    assert!(failed <= 1, "{failed} of 6 went to the proxy still down");
    assert_eq!(back.hits(), 6 - failed);
}

/// A proxy that asks for credentials (407) it was not given refused the
/// request itself: the 407 is not the backend's answer. The proxy is
/// skipped and the attempt retried through the other, a POST too (it never
/// reached the backend). With no other proxy, the client gets a 502 that
/// says so.
#[tokio::test]
async fn a_proxy_that_asks_for_credentials_is_skipped() {
    let backend = Backend::echo().await;
    let locked = ForwardProxy::locked("locked").await;
    let live = ForwardProxy::start("live").await;
    let bs = Backstop::start(&proxied_route(
        &backend.url(),
        &[proxy_url(locked.addr), proxy_url(live.addr)],
        "round_robin",
        "",
    ));
    for i in 0..6 {
        let r = client()
            .post(bs.url("/api/order"))
            .body(format!("order {i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(locked.hits(), 1, "skipped after its 407");
    assert_eq!(live.hits(), 6);
    let seen = backend.seen();
    let bodies: Vec<_> = seen
        .iter()
        .map(|s| String::from_utf8_lossy(&s.body))
        .collect();
    let want: Vec<_> = (0..6).map(|i| format!("order {i}")).collect();
    assert_eq!(bodies, want, "each order once, through the live proxy");
    bs.wait_for_log("asks for credentials (407)", Duration::from_secs(5))
        .await;

    // With no other proxy, the client is told so, not that the backend failed.
    let alone = Backstop::start(&proxied_route(
        &backend.url(),
        &[proxy_url(locked.addr)],
        "round_robin",
        "",
    ));
    let r = client().get(alone.url("/api/order")).send().await.unwrap();
    let (status, code, body) = error_of(r).await;
    assert_eq!((status, code.as_str()), (502, "upstream_unreachable"));
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.contains("No outbound proxy"), "{body}");
    assert_eq!(locked.hits(), 2, "no retry through a proxy being skipped");
    assert_eq!(backend.hits(), 6);
}

/// An HTTPS backend answering "secure" for `localhost`, and the path of
/// its CA's certificate (in the directory returned with it).
async fn secure_backend() -> (Backend, std::path::PathBuf, tempfile::TempDir) {
    let pki = crate::tls::make_pki();
    let backend =
        Backend::start_tls(crate::tls::acceptor(&pki, false), |_| Reply::ok("secure")).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, &pki.ca_pem).unwrap();
    (backend, ca_path, dir)
}

/// Route `thirdparty` on `/api` to `upstreams` through `proxies`, trusting
/// the CA certificate at `ca_path`.
fn proxied_https_route(
    proxies: &[String],
    upstreams: &[String],
    ca_path: &std::path::Path,
) -> String {
    let extra = format!("tls_ca_file = {ca_path:?}");
    proxied_routes(upstreams, proxies, "round_robin", &extra)
}

/// A proxy that answers a `CONNECT` 503 because the target is down did its
/// job: the target is skipped for a while, not the proxy.
#[tokio::test]
async fn a_target_the_proxy_cannot_reach_is_skipped_not_the_proxy() {
    let (backend, ca_path, _dir) = secure_backend().await;
    let down = dead_address().await;
    let dead = format!("localhost:{}", down.addr.port());
    let live = format!("localhost:{}", backend.addr.port());
    let proxy = ForwardProxy::start("proxy-a").await;
    let bs = Backstop::start(&proxied_https_route(
        &[proxy_url(proxy.addr)],
        &[format!("https://{dead}"), format!("https://{live}")],
        &ca_path,
    ));
    for _ in 0..6 {
        let r = client().get(bs.url("/api/secure")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(backend.hits(), 6);
    let tunnels_to = |target: &str| proxy.seen().iter().filter(|s| s.target == target).count();
    assert_eq!(
        tunnels_to(&dead),
        1,
        "the dead target is tried once, then skipped"
    );
    assert!(
        !bs.logs().contains("outbound proxy failed"),
        "the proxy is not blamed:\n{}",
        bs.logs()
    );
}

/// A listener that takes connections and never says a word: its address,
/// how many it took, and the task holding them.
async fn silent_listener() -> (
    std::net::SocketAddr,
    Arc<std::sync::atomic::AtomicUsize>,
    tokio::task::JoinHandle<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            held.push(stream);
        }
    });
    (addr, accepted, holder)
}

/// An HTTP/2 client whose deadline is shorter than `request_timeout`
/// cancels its request; an attempt it cancels after `slow_call_duration`
/// counts as the slow call it was, else a hung backend's circuit would
/// never open while every caller waits out its whole deadline. One
/// cancelled sooner says nothing of the backend.
#[tokio::test]
async fn an_attempt_its_client_cancels_counts_once_it_was_slow() {
    let (addr, _accepted, _holder) = silent_listener().await;
    let bs = Backstop::start(&route(
        &format!("http://{addr}"),
        r#"
  [routes.retry]
  max_attempts = 1
  [routes.circuit_breaker]
  failure_threshold = 2
  slow_call_duration = "300ms"
"#,
    ));
    let url = bs.url("/api/x");
    let quick = h2_client_giving_up_after(Duration::from_millis(100));
    assert!(quick.get(&url).send().await.is_err());
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(circuit(&bs).await["failures"], 0, "gone before it was slow");
    let patient = h2_client_giving_up_after(Duration::from_millis(600));
    for _ in 0..2 {
        assert!(patient.get(&url).send().await.is_err());
    }
    // The cancellation reaches Backstop a moment after the client left.
    wait_for_circuit(&bs, "open").await;
}

/// A proxy that takes the connection but never answers the `CONNECT` is
/// the one skipped: the attempt fails as `proxy_failed` after
/// `connect_timeout`, the retry goes through the other proxy, and the hung
/// one gets no second connection while it is skipped.
#[tokio::test]
async fn a_proxy_that_leaves_the_connect_unanswered_is_skipped() {
    let (backend, ca_path, _dir) = secure_backend().await;
    let (hung_addr, accepted, holder) = silent_listener().await;
    let live = ForwardProxy::start("live").await;
    let route = proxied_https_route(
        &[proxy_url(hung_addr), proxy_url(live.addr)],
        &[format!("https://localhost:{}", backend.addr.port())],
        &ca_path,
    );
    let bs = Backstop::start(&format!("[server]\nconnect_timeout = \"300ms\"\n{route}"));
    for _ in 0..4 {
        let r = client().get(bs.url("/api/secure")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(backend.hits(), 4);
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "skipped after its first silence"
    );
    bs.wait_for_log("outbound proxy failed", Duration::from_secs(5))
        .await;
    holder.abort();
}

/// A route whose target takes the check's whole `timeout` (10 s here: it
/// never answers) holds up no other route's checks: a failing target
/// elsewhere is out of rotation after its 100 ms checks, not 10 s ones.
#[tokio::test]
async fn a_hanging_health_check_holds_up_no_other_targets_checks() {
    let (silent, _, _holder) = silent_listener().await;
    let sick = Backend::start(|_| Reply::status(503)).await;
    let toml = format!(
        r#"
[[routes]]
name = "hanging"
path_prefix = "/hanging"
upstreams = ["http://{silent}"]
  [routes.health_check]
  path = "/healthz"
  interval = "100ms"
  timeout = "10s"

[[routes]]
name = "sick"
path_prefix = "/sick"
upstreams = [{:?}]
  [routes.health_check]
  path = "/healthz"
  interval = "100ms"
  unhealthy_threshold = 3
"#,
        sick.url()
    );
    let bs = Backstop::start(&toml);
    // Only the sick target can be out so soon: the hanging one's three
    // failures take 30 s.
    bs.wait_for_log("target unhealthy", Duration::from_secs(3))
        .await;
}

/// A health check is a request to the route's backend like any other: it
/// carries the route's `headers` (an API key, a `Host` for a virtual host
/// reached by address), or a backend that needs them fails every check.
#[tokio::test]
async fn health_checks_carry_the_routes_headers() {
    let backend = Backend::start(|seen| {
        let keyed = seen.headers.get("x-api-key").is_some_and(|v| v == "k-1");
        let host = seen
            .headers
            .get("host")
            .is_some_and(|v| v == "api.internal");
        if seen.uri == "/healthz" && !(keyed && host) {
            Reply::status(401)
        } else {
            Reply::ok("fine")
        }
    })
    .await;
    let toml = format!(
        r#"
[[routes]]
name = "keyed"
path_prefix = "/api"
upstreams = [{:?}]
headers = {{ "X-Api-Key" = "k-1", "Host" = "api.internal" }}
  [routes.health_check]
  path = "/healthz"
  interval = "100ms"
  unhealthy_threshold = 1
"#,
        backend.url()
    );
    let bs = Backstop::start(&toml);
    let deadline = Instant::now() + Duration::from_secs(5);
    while backend
        .seen()
        .iter()
        .filter(|s| s.uri == "/healthz")
        .count()
        < 3
    {
        assert!(Instant::now() < deadline, "no health checks came");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !bs.logs().contains("target unhealthy"),
        "a check was refused for want of the route's headers"
    );
}

/// A reload that shortens a health check's `interval` takes effect at
/// once: a target found unhealthy under `interval = "1h"` is not kept out
/// of rotation for the rest of that hour once it recovers.
#[tokio::test]
async fn a_reloaded_health_check_interval_does_not_wait_out_the_old_one() {
    let sick = Arc::new(AtomicBool::new(true));
    let flag = sick.clone();
    let backend = Backend::start(move |seen| {
        if seen.uri == "/healthz" && flag.load(Ordering::SeqCst) {
            Reply::status(503)
        } else {
            Reply::ok("fine")
        }
    })
    .await;
    let toml = format!(
        r#"
[[routes]]
name = "slow-checks"
path_prefix = "/api"
upstreams = [{:?}]
  [routes.health_check]
  path = "/healthz"
  interval = "1h"
  unhealthy_threshold = 1
  healthy_threshold = 1
"#,
        backend.url()
    );
    let bs = Backstop::start(&toml);
    bs.wait_for_log("target unhealthy", Duration::from_secs(5))
        .await;
    sick.store(false, Ordering::SeqCst);
    let config = std::fs::read_to_string(&bs.config_path).unwrap();
    std::fs::write(&bs.config_path, config.replace("\"1h\"", "\"100ms\"")).unwrap();
    bs.signal("HUP");
    bs.wait_for_log("configuration reloaded", Duration::from_secs(10))
        .await;
    bs.wait_for_log("target healthy again", Duration::from_secs(3))
        .await;
}

/// Two backends answering "a" and "b"; b's `/healthz` fails while the
/// flag is set (it starts set).
async fn a_and_b_whose_health_check_fails() -> (Backend, Backend, Arc<AtomicBool>) {
    let sick = Arc::new(AtomicBool::new(true));
    let flag = sick.clone();
    let a = Backend::start(|_| Reply::ok("a")).await;
    let b = Backend::start(move |seen| {
        if seen.uri == "/healthz" && flag.load(Ordering::SeqCst) {
            Reply::status(503)
        } else {
            Reply::ok("b")
        }
    })
    .await;
    (a, b, sick)
}

/// A target a reload removes is forgotten by the health checks: put back
/// later, it starts healthy and is checked anew, not kept out of rotation
/// on the verdict it had (here for an hour, the check's interval).
#[tokio::test]
async fn a_target_removed_and_put_back_is_not_judged_by_its_old_verdict() {
    let (a, b, sick) = a_and_b_whose_health_check_fails().await;
    let toml = |upstreams: &[&Backend]| {
        let urls: Vec<String> = upstreams.iter().map(|u| u.url()).collect();
        format!(
            "[[routes]]\nname = \"pair\"\npath_prefix = \"/api\"\nupstreams = {urls:?}\n\
             [routes.health_check]\npath = \"/healthz\"\ninterval = \"1h\"\n\
             unhealthy_threshold = 1\nhealthy_threshold = 1\n"
        )
    };
    let bs = Backstop::start(&toml(&[&a, &b]));
    bs.wait_for_log("target unhealthy", Duration::from_secs(5))
        .await;
    sick.store(false, Ordering::SeqCst);
    for (reloads, upstreams) in [(1, vec![&a]), (2, vec![&a, &b])] {
        let text = std::fs::read_to_string(&bs.config_path).unwrap();
        let (server, _) = text.split_once("[[routes]]").unwrap();
        std::fs::write(&bs.config_path, format!("{server}{}", toml(&upstreams))).unwrap();
        bs.signal("HUP");
        let deadline = Instant::now() + Duration::from_secs(10);
        while bs.logs().matches("configuration reloaded").count() < reloads {
            assert!(Instant::now() < deadline, "reload {reloads}: {}", bs.logs());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A few health-check ticks under the new table.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut answers = Vec::new();
    for _ in 0..4 {
        let r = client().get(bs.url("/api/x")).send().await.unwrap();
        answers.push(r.text().await.unwrap());
    }
    assert!(answers.iter().any(|a| a == "b"), "{answers:?}");
}

#[tokio::test]
async fn active_health_checks_take_a_target_out_of_rotation_and_back() {
    let (a, b, sick) = a_and_b_whose_health_check_fails().await;
    let toml = format!(
        r#"
[[routes]]
name = "pair"
path_prefix = "/api"
upstreams = [{:?}, {:?}]
  [routes.health_check]
  path = "/healthz"
  interval = "100ms"
  unhealthy_threshold = 2
  healthy_threshold = 2
"#,
        a.url(),
        b.url()
    );
    let bs = Backstop::start(&toml);
    bs.wait_for_log("target unhealthy", Duration::from_secs(5))
        .await;
    let api_hits = |backend: &Backend| {
        backend
            .seen()
            .iter()
            .filter(|s| s.uri.starts_with("/api"))
            .count()
    };
    for _ in 0..6 {
        assert_eq!(
            client()
                .get(bs.url("/api/x"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
            "a"
        );
    }
    assert_eq!(api_hits(&b), 0, "an unhealthy target gets no traffic");

    sick.store(false, Ordering::SeqCst);
    bs.wait_for_log("target healthy again", Duration::from_secs(5))
        .await;
    for _ in 0..6 {
        client().get(bs.url("/api/x")).send().await.unwrap();
    }
    assert_eq!(api_hits(&b), 3, "back in the rotation");
    assert!(b.seen().iter().any(|s| s.uri == "/healthz"));
}

fn shared_limit_config(upstream: &str, redis_url: &str, prefix: &str) -> String {
    format!(
        r#"
[redis]
url = {redis_url:?}
key_prefix = {prefix:?}
timeout = "500ms"

[[routes]]
name = "shared"
path_prefix = "/api"
upstreams = [{upstream:?}]
  [routes.rate_limit]
  requests_per_second = 0.1
  burst = 4
  shared = true
"#
    )
}

/// A Redis key prefix no other test run uses.
fn unique_prefix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("backstop-test-{}-{nanos}:", std::process::id())
}

#[tokio::test]
async fn a_shared_rate_limit_holds_across_two_instances() {
    let backend = Backend::start(|_| Reply::ok("ok")).await;
    let prefix = unique_prefix();
    let toml = shared_limit_config(&backend.url(), "redis://127.0.0.1:6379", &prefix);
    let (one, two) = (Backstop::start(&toml), Backstop::start(&toml));
    let mut statuses = Vec::new();
    for i in 0..6 {
        let bs = if i % 2 == 0 { &one } else { &two };
        let r = client().get(bs.url("/api/x")).send().await.unwrap();
        statuses.push(r.status().as_u16());
        if r.status() == 200 {
            assert_eq!(r.headers()["ratelimit-limit"], "4");
        }
    }
    assert_eq!(
        statuses,
        [200, 200, 200, 200, 429, 429],
        "one bucket for both"
    );
    assert_eq!(backend.hits(), 4);
}

/// A limit keyed on a header shares its bucket through Redis under a
/// digest of the value: the value is often a credential, and Redis keys are
/// listed by anyone who can run `KEYS` or `MONITOR`.
#[tokio::test]
async fn a_shared_rate_limit_keyed_on_a_header_keeps_the_value_out_of_redis() {
    let backend = Backend::start(|_| Reply::ok("ok")).await;
    let prefix = unique_prefix();
    let toml = shared_limit_config(&backend.url(), "redis://127.0.0.1:6379", &prefix).replace(
        "shared = true",
        "shared = true\n  key = \"header:X-API-Key\"",
    );
    let bs = Backstop::start(&toml);
    let send = |token: &'static str| {
        let url = bs.url("/api/x");
        async move {
            let r = client().get(url).header("x-api-key", token).send().await;
            r.unwrap().status().as_u16()
        }
    };
    let statuses = [
        send("tok-secret-1").await,
        send("tok-secret-1").await,
        send("tok-secret-1").await,
        send("tok-secret-1").await,
        send("tok-secret-1").await,
        send("tok-secret-2").await,
    ];
    assert_eq!(
        statuses,
        [200, 200, 200, 200, 429, 200],
        "a bucket per value"
    );
    let mut redis = redis::Client::open("redis://127.0.0.1:6379")
        .unwrap()
        .get_connection()
        .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query(&mut redis)
        .unwrap();
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert!(keys.iter().all(|k| !k.contains("secret")), "{keys:?}");
}

/// Redis's Lua prints numbers with 14 digits: a bucket just short of a
/// token must not read back as a whole one, neither for this request nor
/// where it is written back for the next.
#[tokio::test]
async fn a_shared_bucket_just_short_of_a_token_refuses() {
    let backend = Backend::start(|_| Reply::ok("ok")).await;
    let prefix = unique_prefix();
    let bs = Backstop::start(&shared_limit_config(
        &backend.url(),
        "redis://127.0.0.1:6379",
        &prefix,
    ));
    let send = || async {
        client()
            .get(bs.url("/api/x"))
            .send()
            .await
            .unwrap()
            .status()
    };
    assert_eq!(send().await, 200);
    let mut redis = redis::Client::open("redis://127.0.0.1:6379")
        .unwrap()
        .get_connection()
        .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query(&mut redis)
        .unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    // A last refill in the far future: no time passes for the bucket.
    let _: i64 = redis::cmd("HSET")
        .arg(&keys[0])
        .arg("tokens")
        .arg("0.99999999999999989")
        .arg("ts")
        .arg("99999999999999")
        .query(&mut redis)
        .unwrap();
    assert_eq!(send().await, 429, "0.99999999999999989 tokens are not one");
    assert_eq!(backend.hits(), 1);
    let stored: String = redis::cmd("HGET")
        .arg(&keys[0])
        .arg("tokens")
        .query(&mut redis)
        .unwrap();
    assert!(
        stored.parse::<f64>().unwrap() < 1.0,
        "written back as {stored}, not rounded up to a token"
    );
}

/// A TCP relay to `to` that holds every chunk for `delay` before passing
/// it on, both ways: a Redis that answers slowly.
async fn delaying_relay(to: &'static str, delay: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    async fn pump(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        delay: Duration,
    ) {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            tokio::time::sleep(delay).await;
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let Ok(outbound) = tokio::net::TcpStream::connect(to).await else {
                continue;
            };
            let (in_read, in_write) = inbound.into_split();
            let (out_read, out_write) = outbound.into_split();
            tokio::spawn(pump(in_read, out_write, delay));
            tokio::spawn(pump(out_read, in_write, delay));
        }
    });
    format!("redis://{addr}")
}

/// A reload that raises `[redis] timeout` reaches the shared limits' Redis
/// connection, which was kept with the timeout it was made with.
#[tokio::test]
async fn a_reloaded_redis_timeout_reaches_the_shared_rate_limit() {
    let backend = Backend::start(|_| Reply::ok("ok")).await;
    let prefix = unique_prefix();
    let slow = delaying_relay("127.0.0.1:6379", Duration::from_millis(150)).await;
    let toml = shared_limit_config(&backend.url(), &slow, &prefix)
        .replace("timeout = \"500ms\"", "timeout = \"50ms\"")
        .replace(
            "shared = true",
            "shared = true\n  key = \"header:X-API-Key\"",
        );
    let bs = Backstop::start(&toml);
    let send = |key: &'static str| {
        let url = bs.url("/api/x");
        async move {
            let r = client().get(url).header("x-api-key", key).send().await;
            r.unwrap().status().as_u16()
        }
    };
    for _ in 0..4 {
        assert_eq!(send("before").await, 200, "Redis too slow: judged here");
    }
    let fallbacks = "backstop_rate_limit_local_fallback_total{route=\"shared\"} 4";
    assert!(has_line(&metrics(&bs).await, fallbacks));
    let text = std::fs::read_to_string(&bs.config_path).unwrap();
    std::fs::write(
        &bs.config_path,
        text.replace("timeout = \"50ms\"", "timeout = \"3s\""),
    )
    .unwrap();
    bs.signal("HUP");
    bs.wait_for_log("configuration reloaded", Duration::from_secs(5))
        .await;
    // Past the second Redis is skipped after a failure.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(send("after").await);
    }
    assert_eq!(statuses, [200, 200, 200, 200, 429, 429], "the limit holds");
    assert!(
        has_line(&metrics(&bs).await, fallbacks),
        "judged by Redis, not by the instance's own bucket"
    );
}

/// Redis down neither fails the requests nor lifts the limit: each
/// instance holds it on its own (burst 4 here), with its headers.
#[tokio::test]
async fn a_shared_rate_limit_falls_back_to_the_instance_when_redis_is_down() {
    let backend = Backend::start(|_| Reply::ok("ok")).await;
    let dead = dead_address().await;
    let bs = Backstop::start(&shared_limit_config(
        &backend.url(),
        &format!("redis://{dead}"),
        "unused:",
    ));
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let r = client().get(bs.url("/api/x")).send().await.unwrap();
        assert_eq!(r.headers()["ratelimit-limit"], "4");
        statuses.push(r.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 200, 429, 429]);
    assert_eq!(backend.hits(), 4);
    assert!(has_line(
        &metrics(&bs).await,
        "backstop_rate_limit_local_fallback_total{route=\"shared\"} 6"
    ));
    assert_eq!(
        bs.logs().matches("shared rate limit unavailable").count(),
        1,
        "one log line per skip period, not one per request"
    );
}

/// A Redis that fails only after `redis.timeout` (2 s here: it never
/// answers) is skipped for the second after its failure, not after the
/// call's start (a skip over before it began): the requests behind the
/// first go at once, and the outage is logged once.
#[tokio::test]
async fn a_redis_that_times_out_is_skipped_for_a_second_after_its_failure() {
    let backend = Backend::start(|_| Reply::ok("ok")).await;
    let (silent, _, _holder) = silent_listener().await;
    let bs = Backstop::start(
        &shared_limit_config(&backend.url(), &format!("redis://{silent}"), "unused:")
            .replace("timeout = \"500ms\"", "timeout = \"2s\""),
    );
    let started = Instant::now();
    for _ in 0..4 {
        let r = client().get(bs.url("/api/x")).send().await.unwrap();
        assert_eq!(
            r.status(),
            200,
            "Redis silent: judged here, within the burst"
        );
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(3500),
        "{took:?}: the requests after the first waited for Redis too"
    );
    assert_eq!(
        bs.logs().matches("shared rate limit unavailable").count(),
        1
    );
}

#[test]
fn invalid_resilience_keys_are_listed_by_check() {
    let route =
        "[[routes]]\nname = \"a\"\npath_prefix = \"/a\"\nupstreams = [\"http://127.0.0.1:1\"]\n";
    let cases: Vec<(String, Vec<&str>)> = vec![
        (
            format!("{route}[routes.circuit_breaker]\nmode = \"sometimes\"\nfailure_rate_threshold = 150\nwindow = \"10ms\"\nminimum_calls = 0\n"),
            vec![
                "routes[0].circuit_breaker.mode: expected consecutive or failure_rate, found \"sometimes\"",
                "routes[0].circuit_breaker.failure_rate_threshold: must be a percentage in (0, 100]",
                "routes[0].circuit_breaker.window: must be at least 1s",
                "routes[0].circuit_breaker.minimum_calls: must be at least 1",
            ],
        ),
        (
            format!("{route}[routes.retry]\nbudget_percent = -1\nbudget_min_per_second = -2\nbudget_window = \"0s\"\ndeadline = \"soon\"\n"),
            vec![
                "routes[0].retry.budget_percent: must be a number >= 0",
                "routes[0].retry.budget_min_per_second: must be a number >= 0",
                "routes[0].retry.budget_window: must be at least 1s",
                "routes[0].retry.deadline: invalid duration \"soon\"",
            ],
        ),
        (
            format!("{route}[routes.rate_limit]\nshared = true\nmax_keys = 0\n"),
            vec![
                "routes[0].rate_limit.max_keys: must be at least 1",
                "routes[0].rate_limit.shared: needs a [redis] section",
            ],
        ),
        (
            format!("{route}[routes.health_check]\npath = \"healthz\"\ninterval = \"0s\"\nunhealthy_threshold = 0\n"),
            vec![
                "routes[0].health_check.path: \"healthz\" must start with '/'",
                "routes[0].health_check.interval: must be greater than 0",
                "routes[0].health_check.unhealthy_threshold: must be at least 1",
            ],
        ),
    ];
    for (toml, want) in cases {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, &toml).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_backstop"))
            .args(["check", "-c"])
            .arg(&path)
            .env_remove("REDIS_HOST")
            .output()
            .unwrap();
        assert_ne!(out.status.code(), Some(0), "{toml}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        for line in want {
            assert!(stderr.contains(line), "no {line:?} in\n{stderr}");
        }
    }
}

/// A retry goes to another target than the one whose attempt just failed:
/// with concurrent requests the shared round-robin turn would often hand
/// it back to the target that just timed out.
#[tokio::test]
async fn a_retry_goes_to_another_target_than_the_one_that_failed() {
    let hung = StuckBackend::start(Vec::new()).await;
    let live = Backend::start(|_| Reply::ok("live")).await;
    let bs = Backstop::start(&format!(
        r#"
[[routes]]
name = "api"
path_prefix = "/"
upstreams = [{:?}, {:?}]
  [routes.retry]
  max_attempts = 2
  initial_delay = "10ms"
  [routes.circuit_breaker]
  request_timeout = 300
  failure_threshold = 100
"#,
        hung.url,
        live.url()
    ));
    let requests = (0..10).map(|i| {
        let url = bs.url(&format!("/r/{i}"));
        async move { client().get(url).send().await.unwrap().status().as_u16() }
    });
    let statuses = futures_util::future::join_all(requests).await;
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    assert!(hung.requests() >= 1, "the hung target had its turns");
}

/// A health check whose answer's body stalls is given up at the check's
/// `timeout`: the checks of every route are awaited together, so it must
/// not hold up another route's (here, taking a failing target out).
#[tokio::test]
async fn a_health_check_whose_body_stalls_holds_up_no_other_check() {
    let stalled =
        StuckBackend::start(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nten bytes.".to_vec())
            .await;
    let sick = Backend::start(|_| Reply::status(503)).await;
    let toml = format!(
        r#"
[[routes]]
name = "stalled"
path_prefix = "/stalled"
upstreams = [{:?}]
  [routes.health_check]
  path = "/healthz"
  interval = "100ms"
  timeout = "300ms"

[[routes]]
name = "sick"
path_prefix = "/sick"
upstreams = [{:?}]
  [routes.health_check]
  path = "/healthz"
  interval = "100ms"
  timeout = "300ms"
  unhealthy_threshold = 2
"#,
        stalled.url,
        sick.url()
    );
    let bs = Backstop::start(&toml);
    // Without the bound the first round waits for the stalled body until
    // `body_read_timeout` (60 s).
    bs.wait_for_log("target unhealthy", Duration::from_secs(5))
        .await;
}

/// A target that takes the TCP connection but never finishes the TLS
/// handshake fails within `connect_timeout` as a connect timeout: the
/// request is retried on the other target at once (even a POST, which
/// never left) and the silent target is skipped, not waited on for the
/// whole `request_timeout` by every request in its turn.
#[tokio::test]
async fn a_target_that_stalls_the_tls_handshake_fails_as_a_connect_timeout() {
    let (backend, ca_path, _dir) = secure_backend().await;
    let (hung_addr, accepted, holder) = silent_listener().await;
    let hung_port = hung_addr.port();
    let toml = format!(
        r#"[server]
connect_timeout = "300ms"

[[routes]]
name = "secure"
path_prefix = "/api"
upstreams = ["https://localhost:{hung_port}", "https://localhost:{}"]
tls_ca_file = {ca_path:?}
  [routes.retry]
  max_attempts = 2
  initial_delay = "10ms"
  [routes.circuit_breaker]
  request_timeout = 5000
  failure_threshold = 100
"#,
        backend.addr.port()
    );
    let bs = Backstop::start(&toml);
    let started = Instant::now();
    for _ in 0..4 {
        let r = client()
            .post(bs.url("/api/secure"))
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert_eq!(backend.hits(), 4);
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "skipped after its first stall"
    );
    holder.abort();
}
