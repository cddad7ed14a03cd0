//! Capture and replay through a real Kafka-protocol broker (Tansu, started
//! by scripts/start-tansu.sh): the reference scenario, a broker outage in the
//! middle of a burst, and two replay workers in one consumer group.

use std::collections::{HashMap, HashSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{
    assert_replay_attempt, client, error_of, wait_queue, Backend, Backstop, ReplayWorker, Reply,
    StuckBackend,
};

const SCRIPTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts");

/// A Tansu broker on its own port and directory, stopped on drop.
struct Tansu {
    port: u16,
    dir: tempfile::TempDir,
    durable: bool,
}

impl Tansu {
    /// Starts a broker; `durable` keeps topics and offsets across a restart.
    fn start(durable: bool) -> Tansu {
        // A free port can be taken by another test before the broker binds
        // it: the script then fails, and a new port is tried.
        let mut tries = 0;
        let tansu = loop {
            let tansu = Tansu {
                port: free_port(),
                dir: tempfile::tempdir().unwrap(),
                durable,
            };
            match tansu.try_launch() {
                Ok(()) => break tansu,
                Err(e) if tries < 2 => {
                    eprintln!("Tansu did not start on port {}: {e}", tansu.port);
                    tries += 1;
                }
                Err(e) => panic!("cannot start Tansu (run scripts/install-tansu.sh): {e}"),
            }
        };
        for topic in ["failed-requests", "failed-requests.dlq"] {
            tansu.tool(&["create-topic", "--topic", topic, "--partitions", "1"]);
        }
        tansu
    }

    fn launch(&self) {
        if let Err(e) = self.try_launch() {
            panic!("cannot start Tansu (run scripts/install-tansu.sh): {e}");
        }
    }

    fn try_launch(&self) -> Result<(), String> {
        let out = Command::new("bash")
            .arg(format!("{SCRIPTS}/start-tansu.sh"))
            .arg(self.port.to_string())
            .arg(self.dir.path())
            .env("TANSU_STORAGE", if self.durable { "s3" } else { "memory" })
            .stdin(Stdio::null())
            .output()
            .expect("run start-tansu.sh");
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Stops the broker, keeping its store for a restart.
    fn stop(&self) {
        let out = Command::new("bash")
            .arg(format!("{SCRIPTS}/stop-tansu.sh"))
            .arg(self.port.to_string())
            .arg(self.dir.path())
            .arg("--keep-store")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn tool(&self, args: &[&str]) -> String {
        let brokers = self.brokers();
        let out = Command::new("python3")
            .arg(format!("{SCRIPTS}/kafka_tool.py"))
            .arg(args[0])
            .args(["--brokers", &brokers])
            .args(&args[1..])
            .output()
            .expect("python3");
        assert!(
            out.status.success(),
            "kafka_tool {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Every message of a topic, read with a stock Kafka client.
    fn messages(&self, topic: &str) -> Vec<serde_json::Value> {
        self.tool(&["consume", "--topic", topic, "--timeout", "2"])
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn committed(&self, group: &str) -> HashMap<String, i64> {
        serde_json::from_str(&self.tool(&[
            "committed",
            "--group",
            group,
            "--topic",
            "failed-requests",
        ]))
        .unwrap()
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(format!("{SCRIPTS}/stop-tansu.sh"))
            .arg(self.port.to_string())
            .arg(self.dir.path())
            .output();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn config(tansu: &Tansu, upstream: &str, replay_enabled: bool) -> String {
    format!(
        r#"
[kafka]
brokers = "{}"
ack_timeout = "2s"

[replay]
enabled = {replay_enabled}
initial_delay = "200ms"
max_delay = "1s"

[[routes]]
name = "users"
path_prefix = "/api"
upstreams = [{upstream:?}]
  [routes.retry]
  max_attempts = 1
"#,
        tansu.brokers()
    )
}

async fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !check() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Posts `n` requests (the i-th to `path(i)`, its body `i`), each answered
/// "captured"; their capture ids.
async fn capture_each(bs: &Backstop, n: usize, path: impl Fn(usize) -> String) -> HashSet<String> {
    let c = client();
    let mut ids = HashSet::new();
    for i in 0..n {
        let r = c
            .post(bs.url(&path(i)))
            .body(format!("{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
        let id = r.headers()["x-backstop-capture-id"].to_str().unwrap();
        ids.insert(id.to_string());
    }
    ids
}

/// How many records a worker's log says it replayed from Kafka.
fn replayed(worker: &ReplayWorker) -> usize {
    worker.log().matches("replayed from Kafka").count()
}

fn validator() -> jsonschema::Validator {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/schema/capture-record.schema.json"
    ))
    .unwrap();
    jsonschema::validator_for(&serde_json::from_str(&text).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn backend_down_post_goes_to_kafka_and_is_replayed_once() {
    let tansu = Tansu::start(false);
    let addr = Backend::echo().await.stop().await;
    let bs = Backstop::start(&config(&tansu, &format!("http://{addr}"), true));
    let body = r#"{"name":"John"}"#;
    let r = client()
        .post(bs.url("/api/users"))
        .body(body)
        .send()
        .await
        .unwrap();
    let id = r.headers()["x-backstop-capture-id"]
        .to_str()
        .unwrap()
        .to_string();
    let (status, code, _) = error_of(r).await;
    assert_eq!((status, code.as_str()), (503, "captured"));

    let messages = tokio::task::block_in_place(|| tansu.messages("failed-requests"));
    assert_eq!(messages.len(), 1);
    let m = &messages[0];
    assert_eq!(m["key"], "users", "the route is the message key");
    assert_eq!(m["headers"]["id"], id.as_str());
    assert_eq!(m["headers"]["route"], "users");
    assert_eq!(m["headers"]["reason"], "connect_refused");
    let record: serde_json::Value = serde_json::from_str(m["value"].as_str().unwrap()).unwrap();
    let problems: Vec<String> = validator()
        .iter_errors(&record)
        .map(|e| e.to_string())
        .collect();
    assert!(problems.is_empty(), "{problems:?}");
    let q: serde_json::Value = bs.admin_json("/queue").await;
    assert_eq!(q["sink"], "kafka");
    assert_eq!(q["kafka_lag"], 1, "the record waits in the topic: {q}");
    assert_eq!(q["depth"], 1);

    let backend = Backend::start_on(addr, |_| Reply::status(200)).await;
    backend.wait_for_hits(1, Duration::from_secs(30)).await;
    let seen = &backend.seen()[0];
    assert_eq!(seen.headers["idempotency-key"], id.as_str());
    assert_eq!(seen.body, body.as_bytes());
    wait_until("the offset commit", Duration::from_secs(15), || {
        tansu.committed("backstop-replay").get("0") == Some(&1)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(backend.hits(), 1, "delivered once");
    let q: serde_json::Value = bs.admin_json("/queue").await;
    assert_eq!(
        (q["depth"].as_u64(), q["replayed_total"].as_u64()),
        (Some(0), Some(1)),
        "{q}"
    );
}

/// A record for a route the configuration no longer has (any producer may
/// write the topic) is counted under one `(unconfigured)` series, not a
/// series per name the topic holds.
#[tokio::test(flavor = "multi_thread")]
async fn replays_of_a_route_no_longer_configured_count_under_one_series() {
    let tansu = Tansu::start(false);
    let addr = Backend::echo().await.stop().await;
    let upstream = format!("http://{addr}");
    let gone = format!(
        "[[routes]]\nname = \"gone\"\npath_prefix = \"/gone\"\nupstreams = [{upstream:?}]\n"
    );
    let with_gone = format!("{}{gone}", config(&tansu, &upstream, true));
    let bs = Backstop::start(&with_gone);
    capture_each(&bs, 1, |_| "/gone/x".to_string()).await;
    std::fs::write(&bs.config_path, with_gone.replace(&gone, "")).unwrap();
    bs.signal("HUP");
    bs.wait_for_log("configuration reloaded", Duration::from_secs(5))
        .await;
    let unconfigured = "backstop_replayed_total{route=\"(unconfigured)\",outcome=\"retry\"}";
    let started = std::time::Instant::now();
    while bs.metric(unconfigured).await < 1.0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{}",
            bs.admin_text("/metrics").await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A capture Kafka will never take (2 MiB of body: past librdkafka's 1 MB
/// message limit once in its record) is kept in the spool and replayed
/// from there, and holds up no other capture.
#[tokio::test(flavor = "multi_thread")]
async fn a_capture_too_large_for_kafka_is_replayed_from_the_spool() {
    let tansu = Tansu::start(false);
    let stopped = Backend::echo().await.stop().await;
    let upstream = format!("http://{}", stopped.addr);
    let bs = Backstop::start(&config(&tansu, &upstream, true));
    let big = vec![b'x'; 2 << 20];
    for (path, body) in [("/api/big", big.clone()), ("/api/small", b"small".to_vec())] {
        let r = client().post(bs.url(path)).body(body).send().await.unwrap();
        let (status, code, _) = error_of(r).await;
        assert_eq!((status, code.as_str()), (503, "captured"), "{path}");
    }
    let messages = tokio::task::block_in_place(|| tansu.messages("failed-requests"));
    assert_eq!(messages.len(), 1, "only the small capture is in Kafka");

    let backend = Backend::start_on(stopped, |_| Reply::status(200)).await;
    backend.wait_for_hits(2, Duration::from_secs(30)).await;
    let seen = backend.seen();
    let bodies: HashMap<&str, &[u8]> = seen.iter().map(|s| (s.uri.as_str(), &s.body[..])).collect();
    assert_eq!(bodies.get("/api/small"), Some(&&b"small"[..]));
    assert!(
        bodies.get("/api/big") == Some(&&big[..]),
        "the big body arrives whole"
    );
    let q: serde_json::Value = bs.admin_json("/queue").await;
    assert_eq!(q["waiting_for_kafka"], 0, "{q}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replay_that_finds_no_turn_waits_without_spending_its_attempt() {
    // One turn (`upstream_max_conns`), held by an answer whose body stalls
    // until it is cut (2–4 s); a replay may be sent once only.
    let tansu = Tansu::start(false);
    let stalled = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nten bytes.".to_vec();
    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec();
    let backend = StuckBackend::scripted(vec![stalled, ok]).await;
    let bs = Backstop::start(&format!(
        r#"
[server]
upstream_max_conns = 1

[kafka]
brokers = "{}"
ack_timeout = "2s"

[replay]
initial_delay = "200ms"
max_delay = "400ms"
max_attempts = 1

[[routes]]
name = "users"
path_prefix = "/api"
upstreams = [{:?}]
body_read_timeout = "2s"
  [routes.circuit_breaker]
  request_timeout = 500
  [routes.retry]
  max_attempts = 1
"#,
        tansu.brokers(),
        backend.url
    ));
    let holder = client().get(bs.url("/api/hold")).send().await.unwrap();
    assert_eq!(holder.status(), 200);
    let r = client()
        .post(bs.url("/api/users"))
        .body("{}")
        .send()
        .await
        .unwrap();
    let (status, code, _) = error_of(r).await;
    assert_eq!((status, code.as_str()), (503, "captured"));
    let messages = tokio::task::block_in_place(|| tansu.messages("failed-requests"));
    let value = messages[0]["value"].as_str().unwrap();
    let record: serde_json::Value = serde_json::from_str(value).unwrap();
    assert_eq!(record["reason"], "saturated");
    let problems: Vec<String> = validator()
        .iter_errors(&record)
        .map(|e| e.to_string())
        .collect();
    assert!(problems.is_empty(), "{problems:?}");

    // The replays find the turn taken until the held body is cut.
    assert!(holder.bytes().await.is_err(), "the stalled body is cut");
    wait_queue(&bs, "replayed_total", 1).await;
    let heads = backend.heads();
    assert_eq!(heads.len(), 2, "the held GET, then the replay once");
    // The waits spent no attempt.
    assert_replay_attempt(&heads[1], 1);
    let dead = tokio::task::block_in_place(|| tansu.messages("failed-requests.dlq"));
    assert!(dead.is_empty(), "{dead:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn broker_stopped_mid_burst_loses_nothing() {
    let tansu = Tansu::start(true);
    let addr = Backend::echo().await.stop().await;
    let bs = Backstop::start(&config(&tansu, &format!("http://{addr}"), true));
    let c = client();
    let mut ids = HashSet::new();
    for i in 0..20 {
        if i == 10 {
            tokio::task::block_in_place(|| tansu.stop());
        }
        let r = c
            .post(bs.url("/api/burst"))
            .body(format!("n={i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503, "request {i}");
        ids.insert(
            r.headers()["x-backstop-capture-id"]
                .to_str()
                .unwrap()
                .to_string(),
        );
    }
    let q: serde_json::Value = bs.admin_json("/queue").await;
    assert_eq!(
        q["waiting_for_kafka"], 10,
        "captures during the outage wait in the spool: {q}"
    );

    tokio::task::block_in_place(|| tansu.launch());
    let backend = Backend::start_on(addr, |_| Reply::status(200)).await;
    let delivered = || -> HashSet<String> {
        backend
            .seen()
            .iter()
            .map(|s| s.headers["idempotency-key"].to_str().unwrap().to_string())
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while delivered() != ids && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(delivered(), ids, "every capture delivered");
    let q: serde_json::Value = bs.admin_json("/queue").await;
    assert_eq!(q["waiting_for_kafka"], 0);
}

/// A route's captures reach the topic in capture order across an outage of
/// Kafka: those made after it came back queue behind the ones the spool
/// kept for it, instead of overtaking them.
#[tokio::test(flavor = "multi_thread")]
async fn captures_keep_their_order_across_a_kafka_outage() {
    let tansu = Tansu::start(true);
    let addr = Backend::echo().await.stop().await;
    let bs = Backstop::start(&config(&tansu, &format!("http://{addr}"), false));
    let c = client();
    let post = |i: usize| {
        let c = c.clone();
        let url = bs.url("/api/ordered");
        async move {
            let r = c.post(url).body(format!("{i}")).send().await.unwrap();
            assert_eq!(r.status(), 503, "request {i}");
        }
    };
    for i in 0..3 {
        post(i).await;
    }
    tokio::task::block_in_place(|| tansu.stop());
    for i in 3..6 {
        post(i).await;
    }
    tokio::task::block_in_place(|| tansu.launch());
    // Kafka answers again before the forwarder's next try (its backoff
    // grows to 10 s): these would go straight to the topic.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for i in 6..9 {
        post(i).await;
    }
    wait_until(
        "the spool's captures forwarded",
        Duration::from_secs(60),
        || tansu.messages("failed-requests").len() == 9,
    )
    .await;
    let bodies: Vec<String> = tansu
        .messages("failed-requests")
        .iter()
        .map(|m| {
            use base64::Engine as _;
            let record: serde_json::Value =
                serde_json::from_str(m["value"].as_str().unwrap()).unwrap();
            let b64 = record["request"]["body_b64"].as_str().unwrap();
            let body = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap();
            String::from_utf8(body).unwrap()
        })
        .collect();
    assert_eq!(bodies, ["0", "1", "2", "3", "4", "5", "6", "7", "8"]);
}

/// A partition paused because its worker's buffer is full (512 records,
/// the backend down) is consumed again when a rebalance gives it back to
/// that worker: librdkafka keeps an application's pause across a
/// rebalance, and the buffer behind it is dropped at the revocation.
#[tokio::test(flavor = "multi_thread")]
async fn a_partition_paused_when_revoked_is_consumed_once_assigned_again() {
    let tansu = Tansu::start(false);
    let stopped = Backend::echo().await.stop().await;
    let upstream = format!("http://{}", stopped.addr);
    let bs = Backstop::start(&config(&tansu, &upstream, false));
    let ids = capture_each(&bs, 600, |_| "/api/x".to_string()).await;
    let dir = tempfile::tempdir().unwrap();
    let a = ReplayWorker::start(&bs.config_path, dir.path().join("a.log"));
    wait_until(
        "worker a to pause its partition",
        Duration::from_secs(30),
        || a.log().contains("Kafka partition paused"),
    )
    .await;
    // A second worker joins (every partition is revoked and assigned
    // anew), then dies: the partition is a's again, whoever had it between.
    let b = ReplayWorker::start(&bs.config_path, dir.path().join("b.log"));
    wait_until(
        "the rebalance to take the paused partition from worker a",
        Duration::from_secs(30),
        || a.log().contains("partition revoked"),
    )
    .await;
    wait_until(
        "the rebalance to end with worker b in the group",
        Duration::from_secs(30),
        || b.log().contains("Kafka partitions assigned"),
    )
    .await;
    drop(b);
    let backend = Backend::start_on(stopped, |_| Reply::status(200)).await;
    backend.wait_for_hits(600, Duration::from_secs(90)).await;
    let keys: HashSet<String> = backend
        .seen()
        .iter()
        .map(|s| s.headers["idempotency-key"].to_str().unwrap().to_string())
        .collect();
    assert_eq!(keys, ids, "every record delivered");
    drop(a);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replay_workers_share_the_group_and_deliver_everything() {
    let tansu = Tansu::start(false);
    tansu.tool(&[
        "create-topic",
        "--topic",
        "shared-requests",
        "--partitions",
        "4",
    ]);
    let addr = Backend::echo().await.stop().await;
    let routes: String = (0..8)
        .map(|i| {
            format!(
                "[[routes]]\nname = \"r{i}\"\npath_prefix = \"/r{i}\"\nupstreams = [\"http://{addr}\"]\n[routes.retry]\nmax_attempts = 1\n"
            )
        })
        .collect();
    let toml = format!(
        "[kafka]\nbrokers = \"{}\"\ntopic = \"shared-requests\"\n[replay]\nenabled = false\ninitial_delay = \"200ms\"\nmax_delay = \"1s\"\n{routes}",
        tansu.brokers()
    );
    let bs = Backstop::start(&toml);
    let ids = capture_each(&bs, 80, |i| format!("/r{}/x", i % 8)).await;
    let dir = tempfile::tempdir().unwrap();
    let a = ReplayWorker::start(&bs.config_path, dir.path().join("a.log"));
    let b = ReplayWorker::start(&bs.config_path, dir.path().join("b.log"));
    // The backend comes back once the group holds both: started earlier,
    // one worker could deliver everything before the other joins.
    let holds_a_share = |worker: &ReplayWorker| {
        let log = worker.log();
        let last = log
            .lines()
            .rev()
            .find(|l| l.contains("Kafka partitions assigned"));
        last.is_some_and(|l| !l.contains("[0, 1, 2, 3]") && !l.contains("[]"))
    };
    wait_until(
        "both workers to hold partitions",
        Duration::from_secs(60),
        || holds_a_share(&a) && holds_a_share(&b),
    )
    .await;
    let backend = Backend::start_on(addr, |_| Reply::status(200)).await;
    backend.wait_for_hits(80, Duration::from_secs(90)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let keys: Vec<String> = backend
        .seen()
        .iter()
        .map(|s| s.headers["idempotency-key"].to_str().unwrap().to_string())
        .collect();
    let unique: HashSet<String> = keys.iter().cloned().collect();
    assert_eq!(unique, ids, "every record delivered");
    // Duplicates can only come from a rebalance and carry the same key, so
    // the set comparison above is the whole contract; report them anyway.
    if keys.len() != unique.len() {
        eprintln!(
            "{} duplicate deliveries across a rebalance",
            keys.len() - unique.len()
        );
    }
    assert!(
        replayed(&a) > 0 && replayed(&b) > 0,
        "both workers took part: a={} b={}",
        replayed(&a),
        replayed(&b)
    );
}

/// Two captures of one route in Kafka (replay off in Backstop, whose
/// route has a 30 s request timeout), then their backend back: it answers
/// the first delivery after `slow`, the others at once. Each delivery's
/// key and when it came are in `arrivals`.
struct SlowFirst {
    tansu: Tansu,
    bs: Backstop,
    backend: Backend,
    captured: HashSet<String>,
    arrivals: std::sync::Arc<std::sync::Mutex<Vec<(String, std::time::Instant)>>>,
}

async fn slow_first_delivery(slow: Duration) -> SlowFirst {
    let tansu = Tansu::start(false);
    let stopped = Backend::echo().await.stop().await;
    let upstream = format!("http://{}", stopped.addr);
    // The slow answer comes within the route's request timeout.
    let toml = config(&tansu, &upstream, false).replace(
        "  max_attempts = 1\n",
        "  max_attempts = 1\n  [routes.circuit_breaker]\n  request_timeout = \"30s\"\n",
    );
    let bs = Backstop::start(&toml);
    let captured = capture_each(&bs, 2, |_| "/api/x".to_string()).await;
    let arrivals = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = arrivals.clone();
    let backend = Backend::start_on(stopped, move |s| {
        let mut seen = seen.lock().unwrap();
        let key = s.headers["idempotency-key"].to_str().unwrap().to_string();
        seen.push((key, std::time::Instant::now()));
        match seen.len() {
            1 => Reply::status(200).delay(slow),
            _ => Reply::status(200),
        }
    })
    .await;
    SlowFirst {
        tansu,
        bs,
        backend,
        captured,
        arrivals,
    }
}

/// A rebalance takes a partition from its worker in the middle of a slow
/// delivery and gives it back: the record, read again from the committed
/// offset, waits for that delivery to end instead of going out a second
/// time at once (with the record behind it overtaking the first).
#[tokio::test(flavor = "multi_thread")]
async fn a_partition_given_back_waits_for_the_delivery_it_had_running() {
    use rdkafka::consumer::{Consumer, StreamConsumer};

    const SLOW: Duration = Duration::from_secs(12);
    let SlowFirst {
        tansu,
        bs,
        backend,
        arrivals,
        ..
    } = slow_first_delivery(SLOW).await;
    let dir = tempfile::tempdir().unwrap();
    let worker = ReplayWorker::start(&bs.config_path, dir.path().join("a.log"));
    backend.wait_for_hits(1, Duration::from_secs(30)).await;
    // Another member joins the group (every partition is revoked and
    // assigned anew) and leaves: the partition is the worker's again,
    // whoever had it between.
    let joiner: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", tansu.brokers())
        .set("group.id", "backstop-replay")
        .set("client.id", "test-joiner")
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .create()
        .unwrap();
    joiner.subscribe(&["failed-requests"]).unwrap();
    // The joiner polls (a member that does not is no member) until the
    // worker has let the partition go, well within the slow delivery.
    let revoked_by = tokio::time::Instant::now() + SLOW - Duration::from_secs(3);
    while !worker.log().contains("partition revoked") {
        let poll = tokio::time::Instant::now() + Duration::from_millis(100);
        assert!(poll < revoked_by, "no rebalance within the slow delivery");
        if let Ok(message) = tokio::time::timeout_at(poll, joiner.recv()).await {
            message.unwrap();
        }
    }
    drop(joiner);
    backend.wait_for_hits(3, Duration::from_secs(60)).await;
    let arrivals = arrivals.lock().unwrap().clone();
    let keys: Vec<&str> = arrivals.iter().map(|(key, _)| key.as_str()).collect();
    assert_eq!(keys[0], keys[1], "the first record again, then the second");
    assert_ne!(keys[1], keys[2]);
    let again_after = arrivals[1].1 - arrivals[0].1;
    assert!(
        again_after >= SLOW - Duration::from_millis(500),
        "sent again {again_after:?} after the first delivery began, before it ended"
    );
    drop(worker);
}

/// A worker told to stop finishes the delivery it has under way and
/// commits it before it leaves the group: the partition's next owner does
/// not send that record again.
#[tokio::test(flavor = "multi_thread")]
async fn a_stopping_worker_finishes_and_commits_the_delivery_under_way() {
    // Well past the worker's `max.poll.interval.ms` (10 s, checked about
    // once a second): it must go on polling while it waits, or the group
    // would put it out and refuse its commit.
    const SLOW: Duration = Duration::from_secs(16);
    let SlowFirst {
        tansu: _tansu,
        bs,
        backend,
        captured,
        arrivals,
    } = slow_first_delivery(SLOW).await;
    let dir = tempfile::tempdir().unwrap();
    let mut first = ReplayWorker::start(&bs.config_path, dir.path().join("a.log"));
    backend.wait_for_hits(1, Duration::from_secs(60)).await;
    let stopped_at = std::time::Instant::now();
    let code = first.stop_within(SLOW + Duration::from_secs(10));
    assert_eq!(code, Some(0), "{}", first.log());
    assert!(
        stopped_at.elapsed() >= SLOW - Duration::from_millis(500),
        "it left before the delivery ended"
    );
    assert_eq!(replayed(&first), 1, "{}", first.log());
    assert_eq!(backend.hits(), 1, "the next record was not begun");
    let next = ReplayWorker::start(&bs.config_path, dir.path().join("b.log"));
    wait_until("the next record", Duration::from_secs(60), || {
        replayed(&next) == 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let keys: Vec<String> = arrivals
        .lock()
        .unwrap()
        .iter()
        .map(|(k, _)| k.clone())
        .collect();
    assert_eq!(keys.len(), 2, "each record once: {keys:?}");
    assert_eq!(keys.into_iter().collect::<HashSet<_>>(), captured);
}

/// A record given up (the backend answered 400) whose dead letter cannot
/// be written (the broker stops answering as the backend answers: paused,
/// for less than the group's session) stays in the topic, and only the
/// dead-letter write is tried again, not the delivery, which the backend
/// already had; once the broker is back the dead letter is written and the
/// record committed.
#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_that_cannot_be_written_is_not_delivered_again() {
    let tansu = Tansu::start(false);
    let stopped = Backend::echo().await.stop().await;
    let upstream = format!("http://{}", stopped.addr);
    let bs = Backstop::start(&config(&tansu, &upstream, false));
    capture_each(&bs, 1, |_| "/api/x".to_string()).await;
    let pid = std::fs::read_to_string(tansu.dir.path().join("tansu.pid")).unwrap();
    let pid = pid.trim().to_string();
    let signal = move |name: &str| {
        let sent = Command::new("kill").args([name, pid.as_str()]).status();
        assert!(sent.unwrap().success(), "kill {name}");
    };
    let pause = signal.clone();
    let paused = std::sync::atomic::AtomicBool::new(false);
    let backend = Backend::start_on(stopped, move |_| {
        // Once: a delivery again must find the broker running, to be seen.
        if !paused.swap(true, std::sync::atomic::Ordering::SeqCst) {
            pause("-STOP");
        }
        Reply::status(400)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let worker = ReplayWorker::start(&bs.config_path, dir.path().join("w.log"));
    let failed_write = || worker.log().contains("cannot write the dead-letter topic");
    let waited = Duration::from_secs(40);
    let unwritten = tokio::time::timeout(waited, async {
        while !failed_write() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    signal("-CONT");
    assert!(
        unwritten.is_ok(),
        "no failed dead-letter write: {}",
        worker.log()
    );
    wait_until("the dead letter written", Duration::from_secs(30), || {
        worker.log().contains("replay gave up: dead letter")
    })
    .await;
    assert_eq!(backend.hits(), 1, "the backend had it once");
    // The write that timed out may still land once the broker runs again
    // (a dead-letter write is at least once).
    let dead = tansu.messages("failed-requests.dlq").len();
    assert!((1..=2).contains(&dead), "{dead} dead letters");
    wait_until("the record committed", Duration::from_secs(10), || {
        tansu.committed("backstop-replay").get("0") == Some(&1)
    })
    .await;
}

/// A dead letter the dead-letter topic can never take (a foreign record of
/// 1.5 MB that is no capture, so it is dead-lettered at once: past
/// librdkafka's 1 MB message limit) is kept among the spool's dead letters
/// and its offset committed: tried again, it would hold its partition.
#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_kafka_refuses_is_kept_in_the_spool() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let tansu = Tansu::start(false);
    let backend = Backend::echo().await;
    let bs = Backstop::start(&config(&tansu, &backend.url(), true));
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", tansu.brokers())
        .set("message.max.bytes", "4000000")
        .create()
        .unwrap();
    let payload = vec![b'x'; 1_500_000];
    let record = FutureRecord::to("failed-requests")
        .key("users")
        .payload(&payload);
    producer
        .send(record, Duration::from_secs(10))
        .await
        .unwrap();
    let listed = || async {
        let r = client()
            .get(bs.admin_url("/queue/dead-letters"))
            .send()
            .await;
        let list: serde_json::Value = r.unwrap().json().await.unwrap();
        list["dead_letters"].as_array().cloned().unwrap_or_default()
    };
    let started = Instant::now();
    let mut dead = listed().await;
    while dead.is_empty() {
        assert!(started.elapsed() < Duration::from_secs(30), "{}", bs.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
        dead = listed().await;
    }
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0]["id"], "kafka-failed-requests-0-0",
        "named by its place"
    );
    assert_eq!(dead[0]["route"], "users");
    assert!(bs
        .logs()
        .contains("the dead-letter topic refuses the record"));
    wait_until("the record committed", Duration::from_secs(10), || {
        tansu.committed("backstop-replay").get("0") == Some(&1)
    })
    .await;
    assert!(tansu.messages("failed-requests.dlq").is_empty());
    assert_eq!(backend.hits(), 0);
}

/// Routes share partitions (the key is hashed): a route whose backend is
/// down keeps its own records in order and waiting, while another route's
/// records behind them on the same partition are delivered. The committed
/// offset stays at the first record not delivered, until it is.
#[tokio::test(flavor = "multi_thread")]
async fn a_route_whose_backend_is_down_holds_up_no_other_route_on_its_partition() {
    let tansu = Tansu::start(false);
    let slow = Backend::echo().await.stop().await;
    let fast = Backend::echo().await.stop().await;
    let route = |name: &str, addr: &dyn std::fmt::Display| {
        format!(
            "[[routes]]\nname = \"{name}\"\npath_prefix = \"/{name}\"\nupstreams = [\"http://{addr}\"]\n  [routes.retry]\n  max_attempts = 1\n  [routes.circuit_breaker]\n  reset_timeout = \"1s\"\n"
        )
    };
    let bs = Backstop::start(&format!(
        "[kafka]\nbrokers = \"{}\"\nack_timeout = \"2s\"\n\n[replay]\ninitial_delay = \"200ms\"\nmax_delay = \"1s\"\n\n{}\n{}",
        tansu.brokers(),
        route("slow", &slow),
        route("fast", &fast),
    ));
    capture_each(&bs, 3, |i| format!("/slow/{i}")).await;
    capture_each(&bs, 2, |i| format!("/fast/{i}")).await;

    // The slow route's first record fails and backs off (10 attempts up to
    // 1 s apart, and waits for its circuit: 25 s or more for the three);
    // the fast route's go meanwhile.
    let fast = Backend::start_on(fast, |_| Reply::status(200)).await;
    let slow_retries = "backstop_replayed_total{route=\"slow\",outcome=\"retry\"}";
    let joined = Instant::now();
    while bs.metric(slow_retries).await < 1.0 {
        assert!(
            joined.elapsed() < Duration::from_secs(60),
            "no replay tried"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    fast.wait_for_hits(2, Duration::from_secs(10)).await;
    let paths: Vec<String> = fast.seen().into_iter().map(|s| s.uri).collect();
    assert_eq!(paths, ["/fast/0", "/fast/1"], "in order");
    wait_queue(&bs, "replayed_total", 2).await;
    for _ in 0..5 {
        let committed = tokio::task::block_in_place(|| tansu.committed("backstop-replay"));
        assert!(
            committed.get("0").is_none_or(|&offset| offset <= 0),
            "nothing past the slow route's first record: {committed:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let slow = Backend::start_on(slow, |_| Reply::status(200)).await;
    slow.wait_for_hits(3, Duration::from_secs(30)).await;
    let paths: Vec<String> = slow.seen().into_iter().map(|s| s.uri).collect();
    assert_eq!(paths, ["/slow/0", "/slow/1", "/slow/2"], "in order");
    wait_until("the offset commit", Duration::from_secs(15), || {
        tansu.committed("backstop-replay").get("0") == Some(&5)
    })
    .await;
    assert_eq!(fast.hits(), 2, "delivered once");
}
