//! Cluster statistics through Redis: two real Backstop processes share the
//! machine's Redis (a unique key prefix per test), each gets its own
//! traffic, and `/api-stats?scope=cluster` on either shows the sum. Redis
//! that is down or never answers gives the local answer, quickly, marked.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::browser::Browser;
use crate::harness::{client, error_of, Backend, Backstop};
use crate::stats::path_backend;

const MACHINE_REDIS: &str = "redis://127.0.0.1:6379";

fn prefix(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("bs-test:{test}:{}:{nanos}:", std::process::id())
}

fn config(redis: Option<&str>, prefix: &str, backend: &Backend) -> String {
    let redis = redis.map_or(String::new(), |url| {
        format!("[redis]\nurl = {url:?}\nkey_prefix = {prefix:?}\ntimeout = \"50ms\"\n\n")
    });
    format!(
        "{redis}[stats]\npush_interval = \"200ms\"\n\n\
         [[routes]]\nname = \"users\"\npath_prefix = \"/api\"\nupstreams = [{:?}]\n\
         [routes.retry]\nmax_attempts = 1\n[routes.circuit_breaker]\nfailure_threshold = 100\n",
        backend.url()
    )
}

async fn get_status(url: String) -> u16 {
    client().get(&url).send().await.unwrap().status().as_u16()
}

async fn get_json(url: String) -> Value {
    let r = client().get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200, "{url}");
    r.json().await.unwrap()
}

/// Polls `url` until `done` holds (the other instance pushes every 200 ms).
async fn wait_for(url: String, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let body = get_json(url.clone()).await;
        if done(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "never reached: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
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
async fn two_instances_show_cluster_totals_on_either() {
    let prefix = prefix("cluster-sum");
    let backend = path_backend().await;
    let config = config(Some(MACHINE_REDIS), &prefix, &backend);
    let a = Backstop::start(&config);
    let b = Backstop::start(&config);

    // A: 12 fast 200s on id paths and 3 × 500 (15).
    for i in 0..12 {
        assert_eq!(get_status(a.url(&format!("/api/users/{i}"))).await, 200);
    }
    for _ in 0..3 {
        assert_eq!(get_status(a.url("/api/fail")).await, 500);
    }
    // B: 7 slow 200s (30 ms), 2 × 500 and one 404 (10).
    for _ in 0..7 {
        assert_eq!(get_status(b.url("/api/slow/30")).await, 200);
    }
    for _ in 0..2 {
        assert_eq!(get_status(b.url("/api/fail")).await, 500);
    }
    assert_eq!(get_status(b.url("/api/missing")).await, 404);

    // Local answers are unchanged by the cluster.
    let local = get_json(a.admin_url("/api-stats?api=users")).await;
    assert_eq!(local["total"], 15, "{local}");
    assert_eq!(local.get("scope"), None, "{local}");
    let local = get_json(b.admin_url("/api-stats?api=users&scope=local")).await;
    assert_eq!(local["total"], 10, "{local}");

    for bs in [&a, &b] {
        for period in ["all", "daily", "hourly"] {
            let url = bs.admin_url(&format!(
                "/api-stats?api=users&scope=cluster&period={period}"
            ));
            let s = wait_for(url, |s| s["total"] == 25).await;
            assert_eq!(s["scope"], "cluster", "{s}");
            assert_eq!(s["instances"], 2, "{s}");
            assert_eq!(s["period"], period);
            assert_eq!(s["success"], 19, "{s}");
            assert_eq!(s["failure"], 6, "{s}");
            let codes = &s["status_codes"];
            assert_eq!(
                (&codes["200"], &codes["500"], &codes["404"]),
                (&Value::from(19), &Value::from(5), &Value::from(1)),
                "{s}"
            );
            let rt = &s["response_time"];
            assert_ordered(rt);
            // B's 30 ms answers are in the merged histogram whoever asks
            // (29: histogram buckets are 1 % wide).
            assert!(rt["max"].as_f64().unwrap() >= 29.0, "{rt}");
            assert_eq!(s["recent_errors"].as_array().map(Vec::len), Some(6), "{s}");
        }
    }

    // Paths merge too.
    let s = get_json(a.admin_url("/api-stats?api=users&scope=cluster&paths=1")).await;
    assert_eq!(s["paths"]["/api/users/{id}"]["total"], 12, "{s}");
    assert_eq!(s["paths"]["/api/slow/{id}"]["total"], 7, "{s}");
    assert_eq!(s["paths"]["/api/fail"]["total"], 5, "{s}");
    let s = get_json(a.admin_url("/api-stats?api=users&scope=cluster&path=/api/slow/9")).await;
    assert_eq!(s["path"], "/api/slow/{id}");
    assert_eq!(s["total"], 7, "{s}");
    assert!(s["response_time"]["min"].as_f64().unwrap() >= 29.0, "{s}");

    // A bad scope is refused.
    let r = client()
        .get(a.admin_url("/api-stats?api=users&scope=galaxy"))
        .send()
        .await
        .unwrap();
    let (status, code, _) = error_of(r).await;
    assert_eq!((status, code.as_str()), (400, "bad_request"));

    // A stopped instance leaves the cluster view when its keys expire.
    drop(b);
    let s = wait_for(a.admin_url("/api-stats?api=users&scope=cluster"), |s| {
        s["instances"] == 1
    })
    .await;
    assert_eq!(s["total"], 15, "{s}");
}

#[tokio::test]
async fn cluster_scope_without_redis_is_a_clear_error() {
    let backend = path_backend().await;
    let bs = Backstop::start(&config(None, "", &backend));
    assert_eq!(get_status(bs.url("/api/x")).await, 200);
    let r = client()
        .get(bs.admin_url("/api-stats?api=users&scope=cluster"))
        .send()
        .await
        .unwrap();
    let (status, code, error) = error_of(r).await;
    assert_eq!((status, code.as_str()), (400, "bad_request"));
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("[redis]"), "{message}");
}

/// Asks for the cluster view and checks it falls back to the local one.
async fn assert_local_fallback(bs: &Backstop, total: u64) {
    let started = Instant::now();
    let s = get_json(bs.admin_url("/api-stats?api=users&scope=cluster")).await;
    let took = started.elapsed();
    // A bound against hanging, not a performance figure: the budget is
    // two 50 ms Redis timeouts.
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert_eq!(s["total"], total, "{s}");
    assert_eq!(s["scope"], "local", "{s}");
    let reason = s["cluster_unavailable"].as_str().unwrap_or_default();
    assert!(reason.contains("Redis"), "{s}");
}

#[tokio::test]
async fn redis_down_or_silent_gives_the_local_view_quickly_and_marked() {
    let backend = path_backend().await;

    // Nothing listens: connections are refused.
    let closed = Backend::echo().await.stop().await;
    let refused_url = format!("redis://{closed}");
    let bs = Backstop::start(&config(Some(&refused_url), &prefix("down"), &backend));
    for _ in 0..3 {
        assert_eq!(get_status(bs.url("/api/x")).await, 200);
    }
    assert_local_fallback(&bs, 3).await;
    bs.wait_for_log("serving without cluster statistics", Duration::from_secs(5))
        .await;
    drop(bs);

    // Something accepts connections and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("redis://{}", silent.local_addr().unwrap());
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let bs = Backstop::start(&config(Some(&silent_url), &prefix("silent"), &backend));
    for _ in 0..2 {
        assert_eq!(get_status(bs.url("/api/x")).await, 200);
    }
    // Twice: once through the timeouts, once with the breaker open.
    assert_local_fallback(&bs, 2).await;
    assert_local_fallback(&bs, 2).await;
    holder.abort();
}

/// Two instances on one host with the same relative `data_dir`, each
/// started in its own working directory (or two containers sharing a
/// hostname), are two nodes: each one's cluster view counts the other.
#[tokio::test]
async fn instances_with_the_same_relative_data_dir_are_two_nodes() {
    let prefix = prefix("relative-dir");
    let backend = path_backend().await;
    let config = format!(
        "[server]\ndata_dir = \"./backstop-data\"\n\n{}",
        config(Some(MACHINE_REDIS), &prefix, &backend)
    );
    let a = Backstop::start_in_own_cwd(&config);
    let b = Backstop::start_in_own_cwd(&config);
    for i in 0..4 {
        assert_eq!(get_status(a.url(&format!("/api/a/{i}"))).await, 200);
    }
    for i in 0..3 {
        assert_eq!(get_status(b.url(&format!("/api/b/{i}"))).await, 200);
    }
    for bs in [&a, &b] {
        wait_for(bs.admin_url("/api-stats?api=users&scope=cluster"), |s| {
            s["total"] == 7
        })
        .await;
    }
    let node = |bs: &Backstop| {
        std::fs::read_to_string(bs.dir.path().join("backstop-data").join("node-id")).unwrap()
    };
    assert_ne!(node(&a), node(&b), "each data directory has its own id");
}

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 86_400_000;

/// Whether `history` holds the period starting at `start` with `total`.
fn has_period(s: &Value, start: i64, total: u64) -> bool {
    s["history"].as_array().is_some_and(|h| {
        h.iter()
            .any(|p| p["start_ms"] == start && p["total"] == total)
    })
}

#[tokio::test]
async fn past_periods_are_read_back_from_redis_after_a_restart() {
    let prefix = prefix("history");
    let backend = path_backend().await;
    let dir = Arc::new(tempfile::tempdir().unwrap());
    // What an earlier run of this instance (the node id kept in its data
    // directory, made here as that run made it) wrote when its hour and
    // its day ended.
    let node = backstop::stats::cluster::node_id(&dir.path().join("data"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let past_hour = now - now % HOUR_MS - 2 * HOUR_MS;
    let past_day = now - now % DAY_MS - DAY_MS;
    let summary = |start: i64, total: u64| {
        json!({"start_ms": start, "total": total, "success": total - 2, "failure": 2,
               "median": 1.5, "p95": 3.0, "p99": 4.0, "max": 5.0})
        .to_string()
    };
    let mut conn = redis::Client::open(MACHINE_REDIS)
        .unwrap()
        .get_connection()
        .unwrap();
    for (kind, start, total) in [("hourly", past_hour, 42), ("daily", past_day, 500)] {
        let key = format!("{prefix}stats:history:{node}:users:{kind}:{start}");
        redis::cmd("SET")
            .arg(key)
            .arg(summary(start, total))
            .arg("PX")
            .arg(120_000)
            .query::<()>(&mut conn)
            .unwrap();
    }

    let bs = Backstop::start_in(dir, &config(Some(MACHINE_REDIS), &prefix, &backend));
    for _ in 0..3 {
        assert_eq!(get_status(bs.url("/api/x")).await, 200);
    }
    let hourly = assert_history(&bs, past_hour, past_day).await;
    assert_eq!(hourly["total"], 3, "{hourly}");
    let bs = bs.restart();
    let hourly = assert_history(&bs, past_hour, past_day).await;
    assert_eq!(
        hourly["total"], 0,
        "a new process counts from zero: {hourly}"
    );
}

/// The restored hour and day are in the `hourly` and `daily` history, in
/// both scopes; returns the local `hourly` answer.
async fn assert_history(bs: &Backstop, past_hour: i64, past_day: i64) -> Value {
    let hourly = wait_for(bs.admin_url("/api-stats?api=users&period=hourly"), |s| {
        has_period(s, past_hour, 42)
    })
    .await;
    wait_for(bs.admin_url("/api-stats?api=users&period=daily"), |s| {
        has_period(s, past_day, 500)
    })
    .await;
    let cluster = get_json(bs.admin_url("/api-stats?api=users&period=hourly&scope=cluster")).await;
    assert!(has_period(&cluster, past_hour, 42), "{cluster}");
    hourly
}

#[tokio::test]
async fn the_stats_dashboard_shows_the_cluster_and_switches_to_the_instance() {
    let prefix = prefix("dashboard");
    let backend = path_backend().await;
    let config = config(Some(MACHINE_REDIS), &prefix, &backend);
    let a = Backstop::start(&config);
    let b = Backstop::start(&config);
    for i in 0..5 {
        assert_eq!(get_status(a.url(&format!("/api/a/{i}"))).await, 200);
    }
    for i in 0..3 {
        assert_eq!(get_status(b.url(&format!("/api/b/{i}"))).await, 200);
    }
    wait_for(a.admin_url("/api-stats?api=users&scope=cluster"), |s| {
        s["total"] == 8
    })
    .await;

    let browser = Browser::start().await;
    browser.goto(&a.admin_url("/stats-dashboard")).await;
    let total_is = |n: u32| {
        format!(
            "const r = document.querySelector('#routes tr[data-api=users]'); \
             return r && r.cells[1].innerText === '{n}'"
        )
    };
    // With [redis], the dashboard opens on the cluster.
    browser.wait_for("the cluster total", &total_is(8)).await;
    let shown = browser
        .eval("return document.getElementById('scope').style.display !== 'none'")
        .await;
    assert_eq!(shown, true, "the scope switch is shown");
    let kpis = browser.text("#kpis").await;
    assert!(kpis.contains("INSTANCES\n2"), "{kpis}");
    browser.screenshot("stats-dashboard-cluster").await;

    browser.click("#scope button[data-s=local]").await;
    browser
        .wait_for("this instance's total", &total_is(5))
        .await;
    let kpis = browser.text("#kpis").await;
    assert!(!kpis.contains("INSTANCES"), "{kpis}");
    let errors = browser.console_errors(|_| false).await;
    assert!(errors.is_empty(), "console errors: {errors:?}");
    drop(b);
}
