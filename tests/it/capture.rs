//! Capture and replay through the embedded spool: the reference scenario,
//! kill -9 durability, dead letters, backoff, poison records, binary bodies
//! and the `backstop queue` command line.

use std::collections::HashSet;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use crate::harness::{
    client, error_of, wait_queue, Backend, Backstop, ReplayWorker, Reply, Seen, Stopped,
};

fn config(upstream: &str, capture_extra: &str) -> String {
    format!(
        r#"
[replay]
initial_delay = "100ms"
max_delay = "400ms"
max_attempts = 5

[[routes]]
name = "users"
path_prefix = "/api"
upstreams = [{upstream:?}]

  [routes.retry]
  max_attempts = 1

  [routes.capture]
  redact_headers = ["Authorization"]
  {capture_extra}
"#
    )
}

/// An address where nothing listens (a backend that was stopped).
async fn stopped_backend() -> Stopped {
    Backend::echo().await.stop().await
}

async fn queue_status(bs: &Backstop) -> serde_json::Value {
    bs.admin_json("/queue").await
}

fn stored_record(bs: &Backstop, id: &str) -> serde_json::Value {
    let conn = rusqlite::Connection::open(bs.data_dir().join("spool.sqlite3")).unwrap();
    let bytes: Vec<u8> = conn
        .query_row("SELECT record FROM queue WHERE id = ?1 UNION ALL SELECT record FROM dead_letters WHERE id = ?1", [id], |r| r.get(0))
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn schema_validator() -> jsonschema::Validator {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/schema/capture-record.schema.json"
    ))
    .unwrap();
    jsonschema::validator_for(&serde_json::from_str(&text).unwrap()).unwrap()
}

#[tokio::test]
async fn backend_down_post_is_captured_then_replayed_once_when_it_returns() {
    let addr = stopped_backend().await;
    let bs = Backstop::start(&config(&format!("http://{addr}"), ""));
    let body = r#"{"name":"John"}"#;
    // obs-text (Latin-1), which is not UTF-8.
    let latin1 = http::HeaderValue::from_bytes(b"r\xe9sum\xe9.pdf").unwrap();
    let r = client()
        .post(bs.url("/api/users?source=test"))
        .header("content-type", "application/json")
        .header("authorization", "Bearer secret-token")
        .header("x-trace", "a")
        .header("x-trace", "b")
        .header("x-file", latin1.clone())
        // A client's claims about itself (no proxy is trusted): neither
        // kept in the record nor replayed.
        .header("x-real-ip", "203.0.113.9")
        .header("x-forwarded-proto", "https")
        .body(body)
        .send()
        .await
        .unwrap();
    let capture_id = r.headers()["x-backstop-capture-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(r.headers()["retry-after"], "1");
    let (status, code, error) = error_of(r).await;
    assert_eq!((status, code.as_str()), (503, "captured"));
    assert_eq!(error["capture_id"], capture_id.as_str());
    assert_eq!(error["captured"], true);

    let record = stored_record(&bs, &capture_id);
    let validator = schema_validator();
    let problems: Vec<String> = validator
        .iter_errors(&record)
        .map(|e| e.to_string())
        .collect();
    assert!(
        problems.is_empty(),
        "record does not match the schema: {problems:?}\n{record}"
    );
    assert_eq!(record["route"], "users");
    assert_eq!(record["reason"], "connect_refused");
    assert_eq!(record["request"]["path"], "/api/users");
    assert_eq!(record["request"]["query"], "source=test");
    let headers = record["request"]["headers"].as_array().unwrap();
    assert!(
        headers.contains(&serde_json::json!(["authorization", "[redacted]"])),
        "{headers:?}"
    );
    assert!(!record.to_string().contains("secret-token"));
    assert!(!record.to_string().contains("203.0.113.9"), "{record}");

    // The backend comes back: the request is delivered once, as captured.
    let backend = Backend::start_on(addr, |_| Reply::status(201)).await;
    wait_queue(&bs, "depth", 0).await;
    backend.wait_for_hits(1, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen = backend.seen();
    assert_eq!(seen.len(), 1, "delivered exactly once");
    let got = &seen[0];
    assert_eq!(got.method, "POST");
    assert_eq!(got.uri, "/api/users?source=test");
    assert_eq!(got.body, body.as_bytes());
    assert_eq!(got.headers["idempotency-key"], capture_id.as_str());
    let attempt: u32 = got.headers["x-backstop-replay-attempt"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        attempt >= 1,
        "replay attempts count from 1 (the ones made while the backend was down count too)"
    );
    assert_eq!(got.headers["content-type"], "application/json");
    // The replay says where the client came from as the first try did.
    let client_host = bs.addr.to_string();
    assert_eq!(record["client"]["host"], client_host.as_str());
    assert_eq!(record["client"]["proto"], "http");
    assert_eq!(got.headers["x-forwarded-host"], client_host.as_str());
    assert_eq!(got.headers["x-forwarded-proto"], "http");
    assert!(!got.headers.contains_key("x-real-ip"));
    let traces: Vec<_> = got.headers.get_all("x-trace").iter().collect();
    assert_eq!(traces, ["a", "b"]);
    assert_eq!(got.headers["x-file"], latin1, "byte for byte");
    let q = queue_status(&bs).await;
    assert_eq!(q["replayed_total"], 1);
    assert_eq!(q["sink"], "spool");

    let metrics = bs.admin_text("/metrics").await;
    for line in [
        "backstop_captured_total{route=\"users\",reason=\"connect_refused\"} 1",
        "backstop_replayed_total{route=\"users\",outcome=\"delivered\"} 1",
        "backstop_requests_total{route=\"users\",status=\"503\"} 1",
        "backstop_queue_depth 0",
        "backstop_spool_up 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in\n{metrics}"
        );
    }
}

#[tokio::test]
async fn gets_are_not_captured_and_202_is_configurable() {
    let addr = stopped_backend().await;
    let bs = Backstop::start(&config(&format!("http://{addr}"), "respond_status = 202"));
    let (status, code, _) = error_of(client().get(bs.url("/api/x")).send().await.unwrap()).await;
    assert_eq!((status, code.as_str()), (502, "upstream_unreachable"));
    let r = client().delete(bs.url("/api/x/1")).send().await.unwrap();
    assert_eq!(r.status(), 202);
    assert!(r.headers().get("retry-after").is_none());
    assert_eq!(queue_status(&bs).await["depth"], 1);
}

#[tokio::test]
async fn a_replayed_write_invalidates_the_cached_reads_of_its_uri() {
    let (reads, puts) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let seen_puts = puts.clone();
    let backend = Backend::start(move |seen| match seen.method.as_str() {
        // Unavailable at first: the write is captured, and replayed.
        "PUT" if seen_puts.fetch_add(1, Ordering::SeqCst) == 0 => Reply::status(503),
        "PUT" => Reply::status(204),
        _ => Reply::ok(&format!(
            "read {}",
            reads.fetch_add(1, Ordering::SeqCst) + 1
        )),
    })
    .await;
    let bs = Backstop::start(&config(&backend.url(), "\n[routes.cache]\nenabled = true"));
    let read = || async {
        let r = client().get(bs.url("/api/items/1")).send().await.unwrap();
        let x_cache = r.headers()["x-cache"].to_str().unwrap().to_string();
        (x_cache, r.text().await.unwrap())
    };
    assert_eq!(read().await, ("MISS".into(), "read 1".into()));
    assert_eq!(read().await, ("HIT".into(), "read 1".into()));
    let r = client()
        .put(bs.url("/api/items/1"))
        .body("{}")
        .send()
        .await
        .unwrap();
    let (status, code, _) = error_of(r).await;
    assert_eq!((status, code.as_str()), (503, "captured"));
    wait_queue(&bs, "depth", 0).await;
    assert_eq!(puts.load(Ordering::SeqCst), 2, "replayed once");
    assert_eq!(read().await, ("MISS".into(), "read 2".into()));
}

#[tokio::test]
async fn a_backend_503_is_captured_but_a_500_is_passed_on() {
    let backend = Backend::start(|seen| {
        if seen.uri.contains("unavailable") {
            Reply::status(503)
        } else {
            Reply::status(500).body("backend bug")
        }
    })
    .await;
    let toml = config(&backend.url(), "").replace("[replay]", "[replay]\nenabled = false");
    let bs = Backstop::start(&toml);
    let r = client()
        .post(bs.url("/api/unavailable"))
        .body("x")
        .send()
        .await
        .unwrap();
    let (status, code, _) = error_of(r).await;
    assert_eq!((status, code.as_str()), (503, "captured"));
    let r = client()
        .post(bs.url("/api/bug"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    assert_eq!(r.text().await.unwrap(), "backend bug");
    let q = queue_status(&bs).await;
    assert_eq!(q["depth"], 1);
}

/// A request the backend may have applied (it timed out after it was sent)
/// is captured, and its replay carries the idempotency key its live attempt
/// carried: the capture id, or the client's own key, which is kept.
#[tokio::test]
async fn a_replay_carries_the_idempotency_key_of_its_live_attempt() {
    let up = Arc::new(AtomicBool::new(false));
    let backend = Backend::start({
        let up = up.clone();
        move |seen| match (up.load(Ordering::SeqCst), seen.uri.contains("slow")) {
            (true, _) => Reply::status(201),
            // Applied, but answered too late: the client never learns.
            (false, true) => Reply::status(201).delay(Duration::from_secs(2)),
            (false, false) => Reply::status(503),
        }
    })
    .await;
    let extra = "\n  [routes.circuit_breaker]\n  request_timeout = 300";
    let bs = Backstop::start(&config(&backend.url(), extra));
    let capture_id = captured(client().post(bs.url("/api/slow")).body("a")).await;
    let own_key = client()
        .post(bs.url("/api/own-key"))
        .header("idempotency-key", "client-key-1");
    captured(own_key.body("b")).await;
    up.store(true, Ordering::SeqCst);
    wait_queue(&bs, "depth", 0).await;

    let seen = backend.seen();
    let keys = |path: &str, replayed: bool| -> HashSet<String> {
        seen.iter()
            .filter(|s| s.uri.contains(path))
            .filter(|s| s.headers.contains_key("x-backstop-replay-attempt") == replayed)
            .map(|s| s.headers["idempotency-key"].to_str().unwrap().to_string())
            .collect()
    };
    let only = |key: &str| HashSet::from([key.to_string()]);
    assert_eq!(keys("slow", false), only(&capture_id), "the live attempt's");
    assert_eq!(
        keys("slow", true),
        only(&capture_id),
        "the key the backend applied"
    );
    assert_eq!(keys("own-key", false), only("client-key-1"));
    assert_eq!(
        keys("own-key", true),
        only("client-key-1"),
        "the client's key is kept"
    );
}

/// A client's key that the record redacts cannot be replayed: the live
/// attempt carries the capture id instead, as the replay does.
#[tokio::test]
async fn a_redacted_idempotency_key_gives_way_to_the_capture_id() {
    let up = Arc::new(AtomicBool::new(false));
    let backend = Backend::start({
        let up = up.clone();
        move |_| Reply::status(if up.load(Ordering::SeqCst) { 201 } else { 503 })
    })
    .await;
    let toml = config(&backend.url(), "").replace(
        "redact_headers = [\"Authorization\"]",
        "redact_headers = [\"Authorization\", \"Idempotency-Key\"]",
    );
    let bs = Backstop::start(&toml);
    let with_key = client()
        .post(bs.url("/api/x"))
        .header("idempotency-key", "secret-key");
    let capture_id = captured(with_key.body("a")).await;
    up.store(true, Ordering::SeqCst);
    wait_queue(&bs, "depth", 0).await;
    let keys: HashSet<String> = backend
        .seen()
        .iter()
        .map(|s| s.headers["idempotency-key"].to_str().unwrap().to_string())
        .collect();
    assert_eq!(keys, HashSet::from([capture_id]), "live and replayed");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_acknowledged_capture_survives_kill_9() {
    let addr = stopped_backend().await;
    let bs = Backstop::start(
        &config(&format!("http://{addr}"), "").replace("[replay]", "[replay]\nenabled = false"),
    );
    let c = client();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let (c, url) = (c.clone(), bs.url("/api/burst"));
        tasks.push(tokio::spawn(async move {
            let r = c
                .post(url)
                .body(format!("request {i}"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 503);
            r.headers()["x-backstop-capture-id"]
                .to_str()
                .unwrap()
                .to_string()
        }));
    }
    let mut acknowledged = HashSet::new();
    for t in tasks {
        acknowledged.insert(t.await.unwrap());
    }
    assert_eq!(acknowledged.len(), 200);
    let toml = std::fs::read_to_string(&bs.config_path).unwrap();
    let dir = bs.kill9();

    let backend = Backend::start_on(addr, |_| Reply::status(200)).await;
    std::fs::write(
        dir.path().join("backstop.toml"),
        toml.replace("enabled = false", "enabled = true"),
    )
    .unwrap();
    let bs = Backstop::start_existing(dir);
    backend.wait_for_hits(200, Duration::from_secs(30)).await;
    wait_queue(&bs, "depth", 0).await;
    let delivered: HashSet<String> = backend
        .seen()
        .iter()
        .map(|s| s.headers["idempotency-key"].to_str().unwrap().to_string())
        .collect();
    assert_eq!(
        delivered, acknowledged,
        "every acknowledged capture delivered"
    );
    assert_eq!(backend.hits(), 200, "and each once");
}

fn queue_cli(bs: &Backstop, args: &[&str]) -> String {
    let out = queue_cli_run(bs, args);
    assert!(
        out.status.success(),
        "queue {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `backstop queue ARGS -c FILE` (the README's order), however it ends.
fn queue_cli_run(bs: &Backstop, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_backstop"))
        .arg("queue")
        .args(args)
        .arg("-c")
        .arg(&bs.config_path)
        .output()
        .unwrap()
}

/// Live: 503 (captured). The worker's replay: 400 (a dead letter). Then 200.
async fn dead_letter_backend() -> Backend {
    Backend::scripted(vec![
        Reply::status(503),
        Reply::status(400),
        Reply::status(200),
    ])
    .await
}

async fn capture_one(bs: &Backstop, path: &str, body: impl Into<reqwest::Body>) -> String {
    captured(client().post(bs.url(path)).body(body)).await
}

/// Sends `request`, which must be answered 503 `captured`; its capture id.
async fn captured(request: reqwest::RequestBuilder) -> String {
    let r = request.send().await.unwrap();
    let id = r.headers()["x-backstop-capture-id"]
        .to_str()
        .unwrap()
        .to_string();
    let (status, code, _) = error_of(r).await;
    assert_eq!((status, code.as_str()), (503, "captured"));
    id
}

/// A backend that answers a replayed write with a large body does not
/// grow the process: the replay reads the status and forgets the body.
#[tokio::test]
async fn a_replays_answer_body_is_not_kept() {
    let addr = stopped_backend().await;
    let bs = Backstop::start(&config(&format!("http://{addr}"), ""));
    capture_one(&bs, "/api/export", "{}").await;
    let before = bs.rss_kib();
    let huge = bytes::Bytes::from(vec![b'x'; 256 * 1024 * 1024]);
    let backend = Backend::start_on(addr, move |_| Reply::ok("").body(huge.clone())).await;
    backend.wait_for_hits(1, Duration::from_secs(10)).await;
    let mut peak = before;
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while queue_status(&bs).await["depth"] != 0 && tokio::time::Instant::now() < until {
        peak = peak.max(bs.rss_kib());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    peak = peak.max(bs.rss_kib());
    assert_eq!(queue_status(&bs).await["depth"], 0, "delivered");
    assert!(
        peak < before + 64 * 1024,
        "RSS grew from {before} KiB to {peak} KiB"
    );
}

/// A `409` (the request under the same idempotency key still in
/// progress) is tried again, not dead-lettered.
#[tokio::test]
async fn a_replay_answered_409_is_tried_again() {
    let addr = stopped_backend().await;
    let bs = Backstop::start(&config(&format!("http://{addr}"), ""));
    capture_one(&bs, "/api/orders", "{}").await;
    let backend = Backend::start_on(addr, {
        let replies = std::sync::Mutex::new(vec![Reply::status(201), Reply::status(409)]);
        move |_| replies.lock().unwrap().pop().unwrap_or(Reply::status(201))
    })
    .await;
    backend.wait_for_hits(2, Duration::from_secs(10)).await;
    let q = wait_queue(&bs, "depth", 0).await;
    assert_eq!(q["dead_letters"], 0, "{q}");
}

#[tokio::test]
async fn a_400_goes_to_the_dead_letters_and_can_be_requeued() {
    // The 200 comes after a requeue.
    let backend = dead_letter_backend().await;
    let bs = Backstop::start(&config(&backend.url(), ""));
    let id = capture_one(&bs, "/api/orders", "order").await;
    let q = wait_queue(&bs, "dead_letters", 1).await;
    assert_eq!(q["depth"], 0);

    let listed = queue_cli(&bs, &["list", "--dead-letters", "--json"]);
    let list: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(list[0]["error"], "backend answered 400");
    assert_eq!(list[0]["summary"], "POST /api/orders");

    let r = client()
        .post(bs.admin_url(&format!("/queue/dead-letters/{id}/requeue")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client()
        .post(bs.admin_url("/queue/dead-letters/nope/requeue"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    wait_queue(&bs, "replayed_total", 1).await;
    let q = wait_queue(&bs, "depth", 0).await;
    assert_eq!(q["dead_letters"], 0);
    assert_eq!(backend.hits(), 3);
}

#[tokio::test]
async fn a_flapping_backend_gets_backoff_then_the_request() {
    let backend = Backend::scripted(vec![
        Reply::status(503),
        Reply::status(503),
        Reply::status(502),
        Reply::status(200),
    ])
    .await;
    let bs = Backstop::start(&config(&backend.url(), ""));
    let id = capture_one(&bs, "/api/flap", "x").await;
    wait_queue(&bs, "replayed_total", 1).await;
    let seen = backend.seen();
    assert_eq!(seen.len(), 4);
    let attempts: Vec<_> = seen[1..]
        .iter()
        .map(|s| {
            s.headers["x-backstop-replay-attempt"]
                .to_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(attempts, ["1", "2", "3"]);
    assert!(seen[1..]
        .iter()
        .all(|s| s.headers["idempotency-key"] == id.as_str()));
}

#[tokio::test]
async fn gives_up_after_max_attempts_with_the_last_error() {
    let backend = Backend::scripted(vec![Reply::status(503)]).await;
    let toml = config(&backend.url(), "").replace("max_attempts = 5", "max_attempts = 2");
    let bs = Backstop::start(&toml);
    let id = capture_one(&bs, "/api/never", "x").await;
    wait_queue(&bs, "dead_letters", 1).await;
    let shown = queue_cli(&bs, &["show", &id]);
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["status"]["state"], "dead");
    assert_eq!(
        shown["status"]["error"],
        "backend answered 503 (after 2 attempts)"
    );
    assert_eq!(shown["record"]["id"], id.as_str());
    assert_eq!(backend.hits(), 3, "one live attempt and two replays");

    assert!(queue_cli(&bs, &["purge", "--dead-letters"]).contains("purged 1"));
    assert_eq!(queue_status(&bs).await["dead_letters"], 0);
}

#[tokio::test]
async fn poison_records_are_dead_lettered_and_the_worker_goes_on() {
    let addr = stopped_backend().await;
    let bs = Backstop::start(&config(&format!("http://{addr}"), ""));
    let conn = rusqlite::Connection::open(bs.data_dir().join("spool.sqlite3")).unwrap();
    conn.execute(
        "INSERT INTO queue (id, route, record, dest, captured_ms) VALUES ('00000000-0000-7000-8000-000000000001', 'users', x'ff00ff', 'replay', 0), ('00000000-0000-7000-8000-000000000002', 'users', '{\"v\":2}', 'replay', 0), ('00000000-0000-7000-8000-000000000003', 'users', x'7b2272657175657374223a7b226d6574686f64223a22474554222c2270617468223a222f636166e9227d7d', 'replay', 0)",
        [],
    )
    .unwrap();
    let id = capture_one(&bs, "/api/after-poison", "good").await;
    let backend = Backend::start_on(addr, |_| Reply::status(200)).await;
    wait_queue(&bs, "replayed_total", 1).await;
    let q = wait_queue(&bs, "dead_letters", 3).await;
    assert_eq!(q["depth"], 0);
    assert_eq!(backend.seen()[0].headers["idempotency-key"], id.as_str());
    let dead: serde_json::Value =
        serde_json::from_str(&queue_cli(&bs, &["list", "--dead-letters", "--json"])).unwrap();
    let errors: Vec<&str> = dead
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["error"].as_str().unwrap())
        .collect();
    // Newest first; only the third's request line can be read (JSON with a
    // byte that is not UTF-8 in its path, shown replaced).
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert!(errors[2].starts_with("not a capture record"), "{errors:?}");
    assert!(
        errors[1].starts_with("unsupported record version 2"),
        "{errors:?}"
    );
    assert!(errors[0].starts_with("not a capture record"), "{errors:?}");
    let listed = bs.admin_json("/queue/dead-letters").await;
    assert_eq!(
        listed["dead_letters"].as_array().unwrap().len(),
        3,
        "{listed}"
    );
    assert_eq!(
        listed["dead_letters"][0]["path"], "/caf\u{fffd}",
        "{listed}"
    );
    assert!(listed["dead_letters"][1]["path"].is_null(), "{listed}");
    let summaries: Vec<&str> = dead
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["summary"].as_str().unwrap())
        .collect();
    assert_eq!(
        summaries,
        [
            "GET /caf\u{fffd}",
            "(unreadable record)",
            "(unreadable record)"
        ]
    );
}

#[tokio::test]
async fn a_body_that_is_not_utf8_is_replayed_byte_for_byte() {
    let addr = stopped_backend().await;
    let bs = Backstop::start(&config(&format!("http://{addr}"), ""));
    let body: Vec<u8> = (0..=255u8).rev().chain([0xff, 0xfe, 0x00, 0xc3]).collect();
    let id = capture_one(&bs, "/api/binary", body.clone()).await;
    let listed = queue_cli(&bs, &["list"]);
    assert!(
        listed.contains(&id) && listed.contains("POST /api/binary"),
        "{listed}"
    );
    let backend = Backend::start_on(addr, |_| Reply::status(204)).await;
    wait_queue(&bs, "replayed_total", 1).await;
    assert_eq!(backend.seen()[0].body.as_ref(), body.as_slice());
}

#[tokio::test(flavor = "multi_thread")]
async fn queue_replay_all_delivers_in_capture_order() {
    let addr = stopped_backend().await;
    let toml =
        config(&format!("http://{addr}"), "").replace("[replay]", "[replay]\nenabled = false");
    let bs = Backstop::start(&toml);
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(capture_one(&bs, "/api/ordered", format!("n={i}")).await);
    }
    let backend = Backend::start_on(addr, |_| Reply::status(200)).await;
    // The CLI blocks this thread; the backend runs on the other worker.
    let out = tokio::task::block_in_place(|| queue_cli(&bs, &["replay", "--all", "--json"]));
    let out: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(out["delivered"], 3);
    let keys: Vec<String> = backend
        .seen()
        .iter()
        .map(|s| s.headers["idempotency-key"].to_str().unwrap().to_string())
        .collect();
    assert_eq!(keys, ids, "delivered once each, in capture order");
    assert_eq!(queue_status(&bs).await["depth"], 0);
}

/// `queue replay` of queued records beside a running replay worker would
/// deliver a second time what the worker holds: it refuses and says why.
/// Nor is a record waiting for Kafka replayed from here. A dead letter, no
/// worker's, is replayed by hand beside a worker.
#[tokio::test(flavor = "multi_thread")]
async fn queue_replay_leaves_queued_records_to_a_running_worker() {
    // The backend is down: the worker's attempts wait 30 s apart, the
    // record stays queued.
    let addr = stopped_backend().await;
    let toml = config(&format!("http://{addr}"), "").replace(
        "initial_delay = \"100ms\"\nmax_delay = \"400ms\"",
        "initial_delay = \"30s\"\nmax_delay = \"60s\"",
    );
    let bs = Backstop::start(&toml);
    let queued = capture_one(&bs, "/api/orders", "order").await;
    // The worker's first attempt (at once) has failed: the next is 30 s away.
    let attempts = || {
        let shown = queue_cli(&bs, &["show", &queued]);
        let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
        shown["status"]["attempts"].as_u64().unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while attempts() == 0 {
        assert!(Instant::now() < deadline, "no replay attempt");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let backend = Backend::start_on(addr, |_| Reply::status(200)).await;
    for args in [&["replay", "--all"][..], &["replay", &queued]] {
        let out = queue_cli_run(&bs, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr.contains("a replay worker is running"), "{stderr}");
    }
    assert_eq!(backend.hits(), 0, "left to the worker");
    assert_eq!(queue_status(&bs).await["depth"], 1);
    // A record waiting for Kafka (captured while Kafka was down) is the
    // forwarder's, lock or no lock.
    let conn = rusqlite::Connection::open(bs.data_dir().join("spool.sqlite3")).unwrap();
    let for_kafka = "00000000-0000-7000-8000-00000000000a";
    conn.execute(
        "INSERT INTO queue (id, route, record, dest, captured_ms) SELECT ?1, route, record, 'kafka', 0 FROM queue",
        [for_kafka],
    )
    .unwrap();
    let out = queue_cli_run(&bs, &["replay", for_kafka]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is waiting for Kafka"), "{stderr}");
    assert_eq!(backend.hits(), 0);

    // The 200 comes to a replay by hand.
    let backend = dead_letter_backend().await;
    let bs = Backstop::start(&config(&backend.url(), ""));
    let dead = capture_one(&bs, "/api/orders", "order").await;
    wait_queue(&bs, "dead_letters", 1).await;
    let out = tokio::task::block_in_place(|| queue_cli(&bs, &["replay", &dead]));
    assert!(out.contains("delivered (200)"), "{out}");
    let q = queue_status(&bs).await;
    let left = (q["depth"].as_u64(), q["dead_letters"].as_u64());
    assert_eq!(left, (Some(0), Some(0)));
    assert_eq!(backend.hits(), 3);
}

/// A dead letter requeued (from the admin API) while `queue replay`
/// delivers it by hand leaves the spool with that delivery: its queued
/// copy would be delivered a second time.
#[tokio::test]
async fn a_dead_letter_requeued_while_delivered_by_hand_is_not_delivered_again() {
    let addr = stopped_backend().await;
    let toml =
        config(&format!("http://{addr}"), "").replace("[replay]\n", "[replay]\nenabled = false\n");
    let bs = Backstop::start(&toml);
    let id = capture_one(&bs, "/api/orders", "order").await;
    let conn = rusqlite::Connection::open(bs.data_dir().join("spool.sqlite3")).unwrap();
    conn.execute(
        "INSERT INTO dead_letters (id, route, record, attempts, error, dead_at_ms) \
         SELECT id, route, record, 5, 'test', 0 FROM queue WHERE id = ?1",
        [&id],
    )
    .unwrap();
    conn.execute("DELETE FROM queue WHERE id = ?1", [&id])
        .unwrap();
    let backend =
        Backend::start_on(addr, |_| Reply::status(200).delay(Duration::from_secs(5))).await;
    let mut by_hand = Command::new(env!("CARGO_BIN_EXE_backstop"));
    by_hand
        .args(["queue", "replay", &id, "-c"])
        .arg(&bs.config_path);
    let by_hand = tokio::task::spawn_blocking(move || by_hand.output());
    backend.wait_for_hits(1, Duration::from_secs(10)).await;
    let url = bs.admin_url(&format!("/queue/dead-letters/{id}/requeue"));
    let r = client().post(url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(queue_status(&bs).await["depth"], 1, "requeued meanwhile");
    let out = by_hand.await.unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("delivered (200)"), "{stdout}");
    let q = queue_status(&bs).await;
    let left = (q["depth"].as_u64(), q["dead_letters"].as_u64());
    assert_eq!(left, (Some(0), Some(0)), "{q}");
}

/// `workers = 1` runs everything on Tokio's single-threaded scheduler: the
/// proxy, capture, replay and the admin listener must all still make
/// progress on that one thread, and SIGTERM must still drain and exit.
#[tokio::test]
async fn one_worker_proxies_captures_replays_and_shuts_down() {
    let addr = stopped_backend().await;
    let toml = format!(
        "[server]\nworkers = 1\n{}",
        config(&format!("http://{addr}"), "")
    );
    let mut bs = Backstop::start(&toml);
    let captured = client()
        .post(bs.url("/api/orders"))
        .body("order-1")
        .send()
        .await
        .unwrap();
    assert_eq!(captured.status(), 503);
    assert_eq!(captured.headers()["x-backstop-error"], "captured");

    let backend = Backend::start_on(addr, |_| Reply::ok("served")).await;
    wait_queue(&bs, "depth", 0).await;
    backend.wait_for_hits(1, Duration::from_secs(5)).await;
    assert_eq!(backend.seen()[0].body, &b"order-1"[..]);

    // Concurrent clients are all served by the one thread.
    let requests = (0..32).map(|i| {
        let url = bs.url(&format!("/api/item/{i}"));
        async move { client().get(url).send().await.unwrap().status() }
    });
    let statuses = futures_util::future::join_all(requests).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(queue_status(&bs).await["replayed_total"], 1);

    bs.signal("TERM");
    assert_eq!(bs.wait_exit(Duration::from_secs(10)), Some(0));
}

#[tokio::test]
async fn a_routes_backlog_or_slow_replays_never_hold_up_another_route() {
    // "down" has more records queued than one read of the whole queue
    // took (512) and a backend that never recovers; "slow" has recovered
    // but takes 6 s per replay; "quick" has recovered.
    let down = Backend::scripted(vec![Reply::status(503)]).await;
    // Clients get 503s (and are captured), replays the answer.
    let replays_get = |reply: Reply| {
        move |seen: &Seen| match seen.headers.contains_key("x-backstop-replay-attempt") {
            true => reply.clone(),
            false => Reply::status(503),
        }
    };
    let slow = Backend::start(replays_get(Reply::ok("late").delay(Duration::from_secs(6)))).await;
    let quick = Backend::start(replays_get(Reply::ok("done"))).await;
    let routes: String = [("down", &down), ("slow", &slow), ("quick", &quick)]
        .iter()
        .map(|(name, backend)| {
            format!(
                "[[routes]]\nname = \"{name}\"\npath_prefix = \"/{name}\"\n\
                 upstreams = [\"{}\"]\n[routes.retry]\nmax_attempts = 1\n\n",
                backend.url()
            )
        })
        .collect();
    let bs = Backstop::start(&format!(
        "[replay]\ninitial_delay = \"100ms\"\nmax_delay = \"400ms\"\nmax_attempts = 1000\n\n{routes}"
    ));
    let c = client();
    let backlog = futures_util::stream::iter(0..520)
        .map(|i| c.post(bs.url("/down/order")).body(format!("n={i}")).send())
        .buffer_unordered(16)
        .map(|sent| sent.unwrap().status().as_u16())
        .collect::<Vec<u16>>()
        .await;
    assert!(backlog.iter().all(|&s| s == 503), "every one captured");
    capture_one(&bs, "/slow/a", "a").await;
    capture_one(&bs, "/slow/b", "b").await;
    // The first of the slow replays is under way (after the two captured).
    slow.wait_for_hits(3, Duration::from_secs(10)).await;

    let captured = std::time::Instant::now();
    capture_one(&bs, "/quick/c", "c").await;
    quick.wait_for_hits(2, Duration::from_secs(10)).await;
    let took = captured.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "the quick route's record waited {took:?} (a slow replay takes 6 s)"
    );
    assert_eq!(slow.hits(), 3, "the first slow replay is still under way");
    assert!(queue_status(&bs).await["depth"].as_u64().unwrap() >= 520);
}

/// A `[kafka]` section whose broker never answers.
fn unanswering_kafka() -> String {
    let no_broker = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    format!("[kafka]\nbrokers = \"{no_broker}\"\nack_timeout = \"300ms\"\n")
}

/// Captures spooled for a Kafka that never answered are replayed by the
/// spool after a restart without `[kafka]`: nothing else would send them.
#[tokio::test]
async fn captures_left_for_kafka_are_replayed_after_a_restart_without_kafka() {
    let stopped = stopped_backend().await;
    let upstream = format!("http://{}", stopped.addr);
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let with_kafka = format!("{}{}", unanswering_kafka(), config(&upstream, ""));
    let bs = Backstop::start_in(dir.clone(), &with_kafka);
    capture_one(&bs, "/api/users", "kept for kafka").await;
    assert_eq!(queue_status(&bs).await["waiting_for_kafka"], 1);
    drop(bs);

    let bs = Backstop::start_in(dir, &config(&upstream, ""));
    let backend = Backend::start_on(stopped, |_| Reply::status(200)).await;
    backend.wait_for_hits(1, Duration::from_secs(10)).await;
    assert_eq!(&backend.seen()[0].body[..], b"kept for kafka");
    let q = wait_queue(&bs, "depth", 0).await;
    assert_eq!(q["waiting_for_kafka"], 0, "{q}");
}

/// A restart without `[kafka]` and without replay hands them to the
/// spool's replay queue all the same, where `queue replay` finds them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captures_left_for_kafka_are_queued_for_replay_by_a_run_that_replays_nothing() {
    let stopped = stopped_backend().await;
    let upstream = format!("http://{}", stopped.addr);
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let with_kafka = format!("{}{}", unanswering_kafka(), config(&upstream, ""));
    let bs = Backstop::start_in(dir.clone(), &with_kafka);
    let id = capture_one(&bs, "/api/users", "kept for kafka").await;
    drop(bs);

    let without = config(&upstream, "").replace("[replay]\n", "[replay]\nenabled = false\n");
    let bs = Backstop::start_in(dir, &without);
    let q = wait_queue(&bs, "waiting_for_kafka", 0).await;
    assert_eq!(q["depth"], 1, "{q}");
    let backend = Backend::start_on(stopped, |_| Reply::status(200)).await;
    let out = tokio::task::block_in_place(|| queue_cli(&bs, &["replay", &id]));
    assert!(out.contains("delivered (200)"), "{out}");
    assert_eq!(&backend.seen()[0].body[..], b"kept for kafka");
}

/// So are they by a standalone `backstop replay` without `[kafka]` (a
/// host whose instance died with captures waiting for Kafka, drained by
/// hand).
#[tokio::test]
async fn captures_left_for_kafka_are_replayed_by_a_replay_worker_without_kafka() {
    let stopped = stopped_backend().await;
    let upstream = format!("http://{}", stopped.addr);
    let kafka = unanswering_kafka();
    let bs = Backstop::start(&format!("{kafka}{}", config(&upstream, "")));
    capture_one(&bs, "/api/users", "kept for kafka").await;
    assert_eq!(queue_status(&bs).await["waiting_for_kafka"], 1);
    bs.signal("TERM");
    let with_kafka = std::fs::read_to_string(&bs.config_path).unwrap();
    let without = bs.config_path.with_file_name("replay.toml");
    std::fs::write(&without, with_kafka.replace(&kafka, "")).unwrap();
    let backend = Backend::start_on(stopped, |_| Reply::status(200)).await;
    let logs = tempfile::tempdir().unwrap();
    let worker = ReplayWorker::start(&without, logs.path().join("worker.log"));
    backend.wait_for_hits(1, Duration::from_secs(10)).await;
    assert_eq!(&backend.seen()[0].body[..], b"kept for kafka");
    drop(worker);
}

/// A run without `[kafka]` started on the spool of a running one with it
/// (a second instance by mistake, or the new process of a hand-over) takes
/// the captures waiting for Kafka only once it holds the replay lock: until
/// then the first forwards them, and replaying them too would send them
/// twice.
#[tokio::test]
async fn a_run_without_kafka_beside_one_with_it_leaves_its_captures_to_it() {
    let backend = Backend::start(|_| Reply::status(200)).await;
    let stopped = stopped_backend().await;
    let with_kafka = format!(
        "{}{}",
        unanswering_kafka(),
        config(&format!("http://{}", stopped.addr), "")
    );
    let first = Backstop::start(&with_kafka);
    capture_one(&first, "/api/users", "kept for kafka").await;
    let shared = format!("[server]\ndata_dir = {:?}\n", first.data_dir());
    let second = Backstop::start(&(shared + &config(&backend.url(), "")));
    second
        .wait_for_log("this worker stands by", Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(backend.hits(), 0, "{}", second.logs());
    assert_eq!(queue_status(&first).await["waiting_for_kafka"], 1);

    drop(first);
    backend.wait_for_hits(1, Duration::from_secs(10)).await;
    assert_eq!(&backend.seen()[0].body[..], b"kept for kafka");
    wait_queue(&second, "depth", 0).await;
}

/// A record keeps a trusted proxy's word about the client, which its
/// replay passes on as the first try did. A replay asks again whether the
/// peer is trusted, under the setting of the day: a record from a peer no
/// longer trusted is replayed without it.
#[tokio::test]
async fn a_replay_passes_a_trusted_proxys_word_only_while_it_is_trusted() {
    for still_trusted in [true, false] {
        let stopped = stopped_backend().await;
        let upstream = format!("http://{}", stopped.addr);
        let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
        let untrusted = config(&upstream, "");
        let trusted = format!("[server]\ntrusted_proxies = [\"127.0.0.1\"]\n{untrusted}");
        let bs = Backstop::start_in(dir.clone(), &trusted);
        let r = client()
            .post(bs.url("/api/users"))
            .header("x-forwarded-for", "203.0.113.9")
            .header("x-forwarded-proto", "https")
            .header("x-real-ip", "203.0.113.9")
            .body("b")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
        drop(bs);

        let bs = Backstop::start_in(dir, if still_trusted { &trusted } else { &untrusted });
        let backend = Backend::start_on(stopped, |_| Reply::status(200)).await;
        backend.wait_for_hits(1, Duration::from_secs(10)).await;
        let h = &backend.seen()[0].headers;
        let real_ip = h.get("x-real-ip").map(|v| v.to_str().unwrap());
        let got = (
            h["x-forwarded-for"].to_str().unwrap(),
            h["x-forwarded-proto"].to_str().unwrap(),
            real_ip,
        );
        let want = if still_trusted {
            ("203.0.113.9, 127.0.0.1", "https", Some("203.0.113.9"))
        } else {
            ("127.0.0.1", "http", None)
        };
        assert_eq!(got, want, "still trusted: {still_trusted}");
        wait_queue(&bs, "depth", 0).await;
    }
}

/// A `backstop replay` started beside `backstop run` on the same spool
/// stands by while `run` replays: each record is delivered once, not once
/// by each worker.
#[tokio::test]
async fn a_second_replay_worker_on_one_spool_stands_by() {
    let stopped = stopped_backend().await;
    // The circuit stays closed: the replays go as soon as the backend is up.
    let breaker = "[routes.circuit_breaker]\nfailure_threshold = 1000";
    let bs = Backstop::start(&config(&format!("http://{}", stopped.addr), breaker));
    let mut ids = HashSet::new();
    for i in 0..30 {
        ids.insert(capture_one(&bs, &format!("/api/orders/{i}"), format!("{i}")).await);
    }
    let logs = tempfile::tempdir().unwrap();
    let second = ReplayWorker::start(&bs.config_path, logs.path().join("replay.log"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !["stands by", "replay worker started"]
        .iter()
        .any(|line| second.log().contains(line))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the second worker did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let backend = Backend::start_on(stopped, |_| Reply::status(200)).await;
    backend.wait_for_hits(30, Duration::from_secs(20)).await;
    wait_queue(&bs, "depth", 0).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let keys: Vec<String> = backend
        .seen()
        .iter()
        .map(|s| s.headers["idempotency-key"].to_str().unwrap().to_string())
        .collect();
    assert_eq!(
        keys.len(),
        30,
        "each record delivered once: {}",
        second.log()
    );
    assert_eq!(keys.into_iter().collect::<HashSet<_>>(), ids);
}

/// While the spool cannot delete what was delivered (a full disk; here a
/// trigger refuses every delete), replay pauses, longer each time in a
/// row, instead of sending the same records again every second; once
/// deletes work again, the records leave the queue.
#[tokio::test]
async fn replay_pauses_while_delivered_records_cannot_be_deleted() {
    let addr = stopped_backend().await;
    let toml = config(&format!("http://{addr}"), "").replace("\"400ms\"", "\"8s\"")
        + "\n  [routes.circuit_breaker]\n  failure_threshold = 100\n";
    let bs = Backstop::start(&toml);
    let conn = rusqlite::Connection::open(bs.data_dir().join("spool.sqlite3")).unwrap();
    conn.execute_batch(
        "CREATE TRIGGER full_disk BEFORE DELETE ON queue \
         BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END;",
    )
    .unwrap();
    for i in 0..3 {
        capture_one(&bs, &format!("/api/r{i}"), "x").await;
    }
    let backend = Backend::start_on(addr, |_| Reply::status(200)).await;
    // Pauses of 1, 2 and 4 s: three reads of at most 3 records in 6.5 s
    // (sent again every second, there would be about 20).
    tokio::time::sleep(Duration::from_millis(6500)).await;
    let sent = backend.hits();
    assert!((3..=9).contains(&sent), "{sent} deliveries of 3 records");
    bs.wait_for_log("spool writes fail: replay pauses", Duration::from_secs(1))
        .await;

    conn.execute_batch("DROP TRIGGER full_disk").unwrap();
    let q = wait_queue(&bs, "depth", 0).await;
    assert_eq!(q["dead_letters"], 0, "{q}");
}

/// `queue requeue --all` and `queue purge --dead-letters` go a few hundred
/// dead letters per transaction (one transaction over gigabytes of bodies
/// would hold the live process's writes past their busy timeout), and
/// still take every one.
#[tokio::test]
async fn requeue_all_and_purge_take_every_dead_letter_in_chunks() {
    let addr = stopped_backend().await;
    let toml =
        config(&format!("http://{addr}"), "").replace("[replay]\n", "[replay]\nenabled = false\n");
    let bs = Backstop::start(&toml);
    let conn = rusqlite::Connection::open(bs.data_dir().join("spool.sqlite3")).unwrap();
    let fill = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 600) \
                INSERT INTO dead_letters (id, route, record, attempts, error, dead_at_ms) \
                SELECT printf('00000000-0000-7000-8000-%012d', i), 'users', '{}', 1, 'test', i FROM n";
    conn.execute_batch(fill).unwrap();
    assert!(queue_cli(&bs, &["requeue", "--all"]).contains("requeued 600 record(s)"));
    let q = wait_queue(&bs, "depth", 600).await;
    assert_eq!(q["dead_letters"], 0, "{q}");

    conn.execute_batch(fill).unwrap();
    let purged = queue_cli(&bs, &["purge", "--dead-letters", "--json"]);
    let purged: serde_json::Value = serde_json::from_str(&purged).unwrap();
    assert_eq!(purged["purged"], 600);
    assert_eq!(queue_status(&bs).await["dead_letters"], 0);
}

/// A requeued dead letter is as old as its capture (its UUIDv7 says when),
/// not as its requeue: `backstop_queue_oldest_age_seconds` and the
/// dashboard's "oldest waiting" stay true.
#[tokio::test]
async fn a_requeued_dead_letter_keeps_its_capture_age() {
    let addr = stopped_backend().await;
    let toml =
        config(&format!("http://{addr}"), "").replace("[replay]\n", "[replay]\nenabled = false\n");
    let bs = Backstop::start(&toml);
    let conn = rusqlite::Connection::open(bs.data_dir().join("spool.sqlite3")).unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let captured = now_ms - 60_000;
    let id = format!(
        "{:08x}-{:04x}-7000-8000-000000000001",
        captured >> 16,
        captured & 0xffff
    );
    conn.execute(
        "INSERT INTO dead_letters (id, route, record, attempts, error, dead_at_ms) \
         VALUES (?1, 'users', '{}', 1, 'test', 0)",
        [&id],
    )
    .unwrap();
    assert!(queue_cli(&bs, &["requeue", "--all"]).contains("requeued 1 record(s)"));
    let q = wait_queue(&bs, "depth", 1).await;
    let age = q["oldest_age_s"].as_f64().unwrap();
    assert!((59.0..120.0).contains(&age), "{q}");
}

/// A record's next try is stored as wall-clock time; one due further out
/// than the longest backoff (400 ms here, plus jitter) was put off before
/// the clock stepped back, and is tried now rather than hours later, with
/// its route's backlog stalled behind it.
#[tokio::test]
async fn a_retry_put_off_before_the_clock_stepped_back_is_not_waited_for() {
    let addr = stopped_backend().await;
    // The circuit stays closed through the failed tries.
    let breaker = "[routes.circuit_breaker]\nfailure_threshold = 1000";
    let bs = Backstop::start(&config(&format!("http://{addr}"), breaker));
    let id = capture_one(&bs, "/api/stepped", "body").await;
    wait_queue(&bs, "dead_letters", 1).await;
    // Back in the queue as if its last try had set the next one three
    // hours out by a clock since stepped back by as much.
    let conn = rusqlite::Connection::open(bs.data_dir().join("spool.sqlite3")).unwrap();
    let three_hours_out = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        + 3 * 3_600_000;
    let moved = conn
        .execute(
            "INSERT INTO queue (id, route, record, dest, captured_ms, attempts, next_at_ms) \
             SELECT id, route, record, 'replay', 0, 1, ?2 FROM dead_letters WHERE id = ?1",
            rusqlite::params![id, three_hours_out],
        )
        .unwrap();
    assert_eq!(moved, 1);
    conn.execute("DELETE FROM dead_letters WHERE id = ?1", [&id])
        .unwrap();
    let backend = Backend::start_on(addr, |_| Reply::status(200)).await;
    wait_queue(&bs, "replayed_total", 1).await;
    assert_eq!(backend.seen()[0].headers["idempotency-key"], id.as_str());
}

/// `queue` commands never make a new, empty spool: run from another
/// directory than the proxy's, a relative `data_dir` names none, and they
/// say so rather than list nothing (with every record waiting elsewhere).
#[test]
fn queue_commands_refuse_a_data_dir_that_holds_no_spool() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("backstop.toml");
    std::fs::write(
        &config,
        "[server]\ndata_dir = \"spool-here\"\n[[routes]]\nname = \"a\"\npath_prefix = \"/a\"\nupstreams = [\"http://127.0.0.1:1\"]\n",
    )
    .unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_backstop"))
        .args(["queue", "list", "--json", "-c"])
        .arg(&config)
        .current_dir(elsewhere.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let spool = elsewhere.path().join("spool-here").join("spool.sqlite3");
    assert!(
        stderr.contains(&format!("no spool at {}", spool.display())),
        "{stderr}"
    );
    assert!(
        !elsewhere.path().join("spool-here").exists(),
        "nothing made"
    );
}
