//! Statistics, metrics, trace context and admin security: drive real
//! traffic through a real Backstop and read `/api-stats` and `/metrics`.

use std::time::Duration;

use futures_util::future::join_all;
use serde_json::Value;

use crate::harness::{client, h2_client_giving_up_after, Backend, Backstop, Reply};

/// A backend whose answer depends on the path: `/api/fail` → 500,
/// `/api/missing` → 404, `/api/slow/N` → 200 after N ms, else 200.
pub(crate) async fn path_backend() -> Backend {
    Backend::start(|seen| {
        let path = seen.uri.split('?').next().unwrap_or("").to_string();
        if path == "/api/fail" {
            Reply::status(500)
        } else if path == "/api/missing" {
            Reply::status(404)
        } else if let Some(ms) = path.strip_prefix("/api/slow/") {
            Reply::ok("slow").delay(Duration::from_millis(ms.parse().unwrap_or(0)))
        } else {
            Reply::ok("ok")
        }
    })
    .await
}

fn config(backend: &Backend, extra: &str) -> String {
    format!(
        "{extra}\n[[routes]]\nname = \"users\"\npath_prefix = \"/api\"\nupstreams = [{:?}]\n\
         [routes.retry]\nmax_attempts = 1\n[routes.circuit_breaker]\nfailure_threshold = 100\n",
        backend.url()
    )
}

async fn get_json(url: String) -> Value {
    let r = client().get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200, "{url}");
    r.json().await.unwrap()
}

/// 20 fast 200s on id paths, 10 slow 200s, 5 × 500, 3 × 404.
async fn drive_mixed_traffic(bs: &Backstop) {
    let c = client();
    for i in 0..20 {
        let r = c
            .get(bs.url(&format!("/api/users/{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    for i in 1..=10 {
        let r = c
            .get(bs.url(&format!("/api/slow/{}", i * 5)))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    for _ in 0..5 {
        assert_eq!(
            c.get(bs.url("/api/fail")).send().await.unwrap().status(),
            500
        );
    }
    for _ in 0..3 {
        assert_eq!(
            c.get(bs.url("/api/missing")).send().await.unwrap().status(),
            404
        );
    }
}

fn assert_ordered(rt: &Value) {
    let v = |k: &str| rt[k].as_f64().unwrap_or_else(|| panic!("{k} in {rt}"));
    let (min, median, p95, p99, max) = (v("min"), v("median"), v("p95"), v("p99"), v("max"));
    assert!(min > 0.0, "{rt}");
    assert!(
        min <= median && median <= p95 && p95 <= p99 && p99 <= max,
        "{rt}"
    );
}

#[tokio::test]
async fn api_stats_counts_every_request_exactly_per_route_path_and_period() {
    let backend = path_backend().await;
    let bs = Backstop::start(&config(&backend, ""));
    drive_mixed_traffic(&bs).await;

    let list = get_json(bs.admin_url("/api-stats")).await;
    assert_eq!(list["apis"], serde_json::json!(["users"]));
    assert!(list["timestamp"].is_string());

    for period in ["all", "daily", "hourly"] {
        let s = get_json(bs.admin_url(&format!("/api-stats?api=users&period={period}"))).await;
        assert_eq!(s["period"], period);
        assert_eq!(s["total"], 38, "{period}: {s}");
        assert_eq!(s["success"], 30, "{period}");
        assert_eq!(s["failure"], 8, "{period}");
        assert_eq!(
            s["status_codes"],
            serde_json::json!({"200": 30, "404": 3, "500": 5})
        );
        assert_ordered(&s["response_time"]);
        // The slowest request waited 50 ms at the backend.
        assert!(s["response_time"]["max"].as_f64().unwrap() >= 50.0, "{s}");
        let errors = s["recent_errors"].as_array().unwrap();
        assert_eq!(errors.len(), 8);
        let newest = &errors[0];
        assert_eq!(newest["status"], 404);
        assert_eq!(newest["path"], "/api/missing");
        assert_eq!(newest["route"], "users");
        assert!(newest["time"].as_str().unwrap().ends_with('Z'));
        assert!(!newest["message"].as_str().unwrap().is_empty());
        assert!(!s["history"].as_array().unwrap().is_empty());
    }

    let s = get_json(bs.admin_url("/api-stats?api=users&paths=1")).await;
    let paths = s["paths"].as_object().unwrap();
    assert_eq!(paths["/api/users/{id}"]["total"], 20, "ids normalised: {s}");
    assert_eq!(paths["/api/slow/{id}"]["total"], 10);
    assert_eq!(paths["/api/fail"]["failure"], 5);
    assert_eq!(paths["/api/missing"]["status_codes"]["404"], 3);
    assert_eq!(paths.len(), 4);
    assert_eq!(s["path_count"], 4);

    let one = get_json(bs.admin_url("/api-stats?api=users&path=/api/users/12345")).await;
    assert_eq!(one["path"], "/api/users/{id}");
    assert_eq!(one["total"], 20);
    assert_eq!(one["success"], 20);
    assert_ordered(&one["response_time"]);
    let fail = get_json(bs.admin_url("/api-stats?api=users&path=/api/fail")).await;
    assert_eq!(fail["recent_errors"].as_array().unwrap().len(), 5);

    let c = client();
    let r = c
        .get(bs.admin_url("/api-stats?api=nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = c
        .get(bs.admin_url("/api-stats?api=users&period=weekly"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = c
        .get(bs.admin_url("/api-stats?api=users&path=/never/seen"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // Not a path: refused, not read as `/`.
    let r = c
        .get(bs.admin_url("/api-stats?api=users&path=api/fail"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn retries_and_proxy_made_errors_are_counted() {
    let flaky =
        Backend::scripted(vec![Reply::status(503), Reply::status(503), Reply::ok("")]).await;
    let toml = format!(
        "[[routes]]\nname = \"flaky\"\npath_prefix = \"/flaky\"\nupstreams = [{:?}]\n\
         [routes.retry]\nmax_attempts = 3\ninitial_delay = \"10ms\"\nmax_delay = \"20ms\"\n\
         [[routes]]\nname = \"down\"\npath_prefix = \"/down\"\nupstreams = [\"http://127.0.0.1:1\"]\n\
         [routes.retry]\nmax_attempts = 1\n",
        flaky.url()
    );
    let bs = Backstop::start(&toml);
    let c = client();
    assert_eq!(
        c.get(bs.url("/flaky/x")).send().await.unwrap().status(),
        200
    );
    assert_eq!(c.get(bs.url("/down/x")).send().await.unwrap().status(), 502);

    let s = get_json(bs.admin_url("/api-stats?api=flaky")).await;
    assert_eq!(
        (s["total"].as_u64(), s["success"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(s["retries"], 2);

    let s = get_json(bs.admin_url("/api-stats?api=down")).await;
    assert_eq!(s["failure"], 1);
    let e = &s["recent_errors"][0];
    assert_eq!(e["status"], 502);
    assert_eq!(e["error"], "connect_refused");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("could not be reached"),
        "{e}"
    );
}

#[tokio::test]
async fn statistics_survive_a_configuration_reload() {
    let backend = path_backend().await;
    let bs = Backstop::start(&config(&backend, ""));
    for _ in 0..7 {
        client().get(bs.url("/api/a")).send().await.unwrap();
    }
    let mut toml = std::fs::read_to_string(&bs.config_path).unwrap();
    toml.push_str(&format!(
        "\n[[routes]]\nname = \"other\"\npath_prefix = \"/other\"\nupstreams = [{:?}]\n",
        backend.url()
    ));
    std::fs::write(&bs.config_path, toml).unwrap();
    bs.signal("HUP");
    bs.wait_for_log("configuration reloaded", Duration::from_secs(5))
        .await;
    client().get(bs.url("/api/a")).send().await.unwrap();
    let list = get_json(bs.admin_url("/api-stats")).await;
    assert_eq!(list["apis"], serde_json::json!(["users", "other"]));
    let s = get_json(bs.admin_url("/api-stats?api=users")).await;
    assert_eq!(s["total"], 8, "counts kept across the reload");
    let other = get_json(bs.admin_url("/api-stats?api=other")).await;
    assert_eq!(other["total"], 0);
}

#[tokio::test]
async fn prometheus_output_parses_and_matches_the_traffic() {
    let backend = path_backend().await;
    let bs = Backstop::start(&config(&backend, ""));
    drive_mixed_traffic(&bs).await;
    // A load balancer's health checks are not traffic: not counted.
    for path in ["/health", "/health", "//health"] {
        let health = client().get(bs.url(path)).send().await.unwrap();
        assert_eq!(health.status(), 200, "{path}");
    }
    client().get(bs.url("/nowhere")).send().await.unwrap();

    let text = bs.admin_text("/metrics").await;
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text");
    let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                prometheus_parse::Value::Histogram(ref buckets) => {
                    buckets.last().map_or(0.0, |b| b.count)
                }
                prometheus_parse::Value::Summary(_) => f64::NAN,
            })
            .unwrap_or_else(|| panic!("no {name} {labels:?} in\n{text}"))
    };
    let requests = "backstop_requests_total";
    assert_eq!(
        value(requests, &[("route", "users"), ("status", "200")]),
        30.0
    );
    assert_eq!(
        value(requests, &[("route", "users"), ("status", "500")]),
        5.0
    );
    assert_eq!(
        value(requests, &[("route", "users"), ("status", "404")]),
        3.0
    );
    assert_eq!(
        value(requests, &[("route", "none"), ("status", "404")]),
        1.0
    );
    let unrouted: Vec<_> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == requests && s.labels.get("route") == Some("none"))
        .map(|s| s.labels.get("status"))
        .collect();
    assert_eq!(unrouted, [Some("404")], "health checks are not counted");
    assert_eq!(
        value(
            "backstop_request_duration_seconds_count",
            &[("route", "users")]
        ),
        38.0
    );
    for name in [
        "backstop_queue_depth",
        "backstop_dead_letters",
        "backstop_stats_dropped_total",
    ] {
        assert_eq!(value(name, &[]), 0.0, "{name}");
    }
    for family in [
        "backstop_upstream_retries",
        "backstop_circuit_state",
        "backstop_cache",
        "backstop_captured",
        "backstop_replayed",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "{family} declared"
        );
    }
}

#[tokio::test]
async fn a_path_cardinality_attack_keeps_memory_and_path_count_bounded() {
    let backend = Backend::start(|_| Reply::ok("")).await;
    let bs = Backstop::start(&config(&backend, ""));
    let c = client();
    let send = |from: usize, to: usize| {
        let c = c.clone();
        let urls: Vec<String> = (from..to)
            .map(|i| bs.url(&format!("/api/attack/p{i}x?q={i}")))
            .collect();
        async move {
            for chunk in urls.chunks(64) {
                let answers = join_all(chunk.iter().map(|u| c.get(u).send())).await;
                for a in answers {
                    assert_eq!(a.unwrap().status(), 200);
                }
            }
        }
    };
    // Fill the budget (100 paths) and warm up allocations first.
    send(0, 5_000).await;
    let before = bs.rss_kib();
    send(5_000, 100_000).await;
    let after = bs.rss_kib();

    let s = get_json(bs.admin_url("/api-stats?api=users&paths=1")).await;
    assert_eq!(s["total"], 100_000);
    assert_eq!(s["path_count"], 100, "path budget");
    let paths = s["paths"].as_object().unwrap();
    assert_eq!(paths.len(), 101, "100 paths and {{other}}");
    assert_eq!(paths["{other}"]["total"], 100_000 - 100);
    let growth_kib = after.saturating_sub(before);
    eprintln!("cardinality attack: RSS {before} KiB after 5,000 paths, {after} KiB after 100,000");
    assert!(
        growth_kib < 16 * 1024,
        "RSS grew {growth_kib} KiB over 95,000 distinct paths ({before} → {after} KiB)"
    );
}

#[tokio::test]
async fn traceparent_is_propagated_or_created() {
    let backend = Backend::echo().await;
    let toml = format!(
        "[[routes]]\nname = \"t\"\npath_prefix = \"/t\"\nupstreams = [{:?}]\nforward_headers = false\n",
        backend.url()
    );
    let bs = Backstop::start(&toml);
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    client()
        .get(bs.url("/t/a"))
        .header("traceparent", tp)
        .header("tracestate", "vendor=1")
        .send()
        .await
        .unwrap();
    client().get(bs.url("/t/b")).send().await.unwrap();
    client()
        .get(bs.url("/t/c"))
        .header("traceparent", tp)
        .header("tracestate", "vendor=1")
        .header("tracestate", "other=2")
        .send()
        .await
        .unwrap();
    let seen = backend.seen();
    let lines: Vec<_> = seen[2].headers.get_all("tracestate").iter().collect();
    assert_eq!(lines, ["vendor=1,other=2"], "several lines make one list");
    assert_eq!(
        seen[0].headers["traceparent"], tp,
        "kept even with forward_headers = false"
    );
    assert_eq!(seen[0].headers["tracestate"], "vendor=1");
    let created = seen[1].headers["traceparent"].to_str().unwrap();
    let parts: Vec<&str> = created.split('-').collect();
    assert_eq!(parts.len(), 4, "{created}");
    assert_eq!(
        (parts[0], parts[1].len(), parts[2].len(), parts[3]),
        ("00", 32, 16, "01")
    );
    assert_ne!(parts[1], "0".repeat(32));
}

#[tokio::test]
async fn json_access_log_has_the_useful_fields() {
    let backend = path_backend().await;
    let bs = Backstop::start(&config(
        &backend,
        "[log]\nformat = \"json\"\naccess_log = true\n",
    ));
    client()
        .get(bs.url("/api/fail?x=1"))
        .header("x-request-id", "req-log-1")
        .send()
        .await
        .unwrap();
    bs.wait_for_log("req-log-1", Duration::from_secs(5)).await;
    let logs = bs.logs();
    let line = logs.lines().find(|l| l.contains("req-log-1")).unwrap();
    let v: Value = serde_json::from_str(line).expect("JSON log line");
    let f = &v["fields"];
    for key in [
        "request_id",
        "client",
        "client_ip",
        "method",
        "path",
        "route",
        "status",
        "attempts",
        "failure",
        "duration_ms",
        "trace_id",
    ] {
        assert!(!f[key].is_null(), "{key} in {line}");
    }
    assert_eq!(f["status"], 500);
    assert_eq!(f["route"], "users");
    assert_eq!(f["path"], "/api/fail");
    assert_eq!(f["trace_id"].as_str().unwrap().len(), 32);
}

#[tokio::test]
async fn admin_off_loopback_requires_the_token_and_mutations_need_post() {
    let backend = path_backend().await;
    let bs = Backstop::start(&config(
        &backend,
        "[server]\nadmin_listen = \"0.0.0.0:0\"\nadmin_token = \"s3cret-token\"\n",
    ));
    let c = client();
    let url = |p: &str| format!("http://127.0.0.1:{}{p}", bs.admin.port());
    assert_eq!(c.get(url("/health")).send().await.unwrap().status(), 200);
    for path in ["/api-stats", "/metrics", "/queue", "/queue/dead-letters"] {
        let r = c.get(url(path)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path} without a token");
        let r = c.get(url(path)).bearer_auth("wrong").send().await.unwrap();
        assert_eq!(r.status(), 401, "{path} with a wrong token");
        let r = c
            .get(url(path))
            .bearer_auth("s3cret-token")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path} with the token");
        assert!(!r.text().await.unwrap().contains("s3cret-token"));
    }
    // Mutations answer only to POST.
    let r = c
        .get(url("/queue/dead-letters/x/requeue"))
        .bearer_auth("s3cret-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert!(!bs.logs().contains("s3cret-token"), "token never logged");
}

/// What axum answers on its own (an unknown path, a method not allowed, a
/// query it cannot read) is in the JSON error shape too.
#[tokio::test]
async fn the_admin_apis_own_refusals_are_in_the_error_shape() {
    let backend = path_backend().await;
    let bs = Backstop::start(&config(&backend, ""));
    let c = client();
    let cases = [
        ("GET", "/no/such/thing", 404, "not_found"),
        ("GET", "/circuits/users/reset", 405, "method_not_allowed"),
        ("GET", "/queue/dead-letters?limit=abc", 400, "bad_request"),
    ];
    for (method, path, status, code) in cases {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let r = c.request(method, bs.admin_url(path)).send().await.unwrap();
        assert_eq!(r.status(), status, "{path}");
        assert_eq!(r.headers()["x-backstop-error"], code, "{path}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{path}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{path}"
        );
    }
}

/// An HTTP/2 client that gives up resets its stream, which cancels its
/// request: it is still counted and logged, as `499 client_closed` (a slow
/// backend's abandoned requests are what the statistics must show).
#[tokio::test]
async fn a_request_its_http2_client_gave_up_on_is_counted_as_499() {
    let slow = Backend::start(|_| Reply::ok("late").delay(Duration::from_secs(3))).await;
    let bs = Backstop::start(&config(&slow, "[log]\naccess_log = true\n"));
    let impatient = h2_client_giving_up_after(Duration::from_millis(300));
    assert!(impatient.get(bs.url("/api/slow")).send().await.is_err());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let s = loop {
        let s = get_json(bs.admin_url("/api-stats?api=users")).await;
        if s["total"] == 1 || std::time::Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(s["total"], 1, "{s}");
    assert_eq!(s["failure"], 1, "{s}");
    assert_eq!(s["status_codes"], serde_json::json!({"499": 1}));
    assert_eq!(s["recent_errors"][0]["status"], 499);
    let metrics = bs.admin_text("/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("backstop_requests_total{") && l.contains("status=\"499\"")),
        "{metrics}"
    );
    assert!(bs.logs().contains("status=499"), "{}", bs.logs());
}
