//! Backends that answer badly: a body that stops coming, a head Backstop
//! cannot pass on, and a failure answer read whole before a retry. Each on
//! both upstream ways: Backstop's own HTTP/1.1 exchange (small buffered
//! bodies) and hyper's connection (a body that streams from the client).
//! And a backend whose every allowed connection stays busy
//! (`upstream_max_conns`).

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::harness::{
    assert_replay_attempt, client, error_of, turn_gauge, wait_queue, Backend, Backstop, Reply,
    StuckBackend,
};

/// An answer with 120 header lines: more than the 100 that Backstop (like
/// hyper) reads.
fn too_many_headers() -> Vec<u8> {
    let mut answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n".to_vec();
    for i in 0..120 {
        answer.extend_from_slice(format!("x-many-{i}: {i}\r\n").as_bytes());
    }
    answer.extend_from_slice(b"\r\nok");
    answer
}

const UNAVAILABLE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n";

fn route(upstream: &str, extra: &str) -> String {
    format!(
        "[[routes]]\nname = \"api\"\npath_prefix = \"/\"\nupstreams = [{upstream:?}]\n{extra}\n"
    )
}

/// A body bigger than the own exchange sends (16 KiB): it streams from the
/// client over hyper's connection.
fn streamed_body() -> Vec<u8> {
    vec![b'x'; 20 * 1024]
}

/// The status and `X-Backstop-Error` of a POST whose body streams.
async fn streamed_post(bs: &Backstop, path: &str) -> (u16, String) {
    let response = client()
        .post(bs.url(path))
        .body(streamed_body())
        .send()
        .await
        .unwrap();
    let (status, code, _) = error_of(response).await;
    (status, code)
}

#[tokio::test]
async fn a_body_that_stops_coming_is_cut_after_body_read_timeout_on_both_ways() {
    let backend =
        StuckBackend::start(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nten bytes.".to_vec())
            .await;
    // The head's limit (`request_timeout`) is not the body's.
    let bs = Backstop::start(&route(
        &backend.url,
        "body_read_timeout = \"500ms\"\n\
         [routes.circuit_breaker]\nrequest_timeout = 5000\n[routes.retry]\nmax_attempts = 1",
    ));

    // The own exchange, seen by a raw client: the head and the ten bytes
    // come, then the connection is closed, the answer cut short.
    let started = Instant::now();
    let mut conn = TcpStream::connect(bs.addr).await.unwrap();
    conn.write_all(b"GET /stall HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut wire = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut wire))
        .await
        .expect("the connection is closed, not left waiting")
        .unwrap();
    let waited = started.elapsed();
    let text = String::from_utf8_lossy(&wire);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\nten bytes."), "{text}");
    assert!(
        waited >= Duration::from_millis(500) && waited < Duration::from_secs(3),
        "cut after {waited:?}"
    );

    // hyper's connection (a streamed request body), seen by reqwest.
    let started = Instant::now();
    let response = client()
        .post(bs.url("/stall"))
        .body(streamed_body())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.bytes().await.is_err(), "the body is cut short");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(500) && waited < Duration::from_secs(3),
        "cut after {waited:?}"
    );
    assert_eq!(backend.requests(), 2);

    let health = client().get(bs.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    bs.wait_for_log(
        "left its answer's body waiting too long",
        Duration::from_secs(5),
    )
    .await;
}

/// An answer with both `Transfer-Encoding: chunked` and `Content-Length`
/// is read as chunked (RFC 9112 §6.3) and passed on without the length,
/// on both ways: framed by the stale length it would arrive cut short.
#[tokio::test]
async fn a_chunked_answer_that_also_states_a_length_arrives_whole_on_both_ways() {
    let backend = StuckBackend::start(
        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
            .to_vec(),
    )
    .await;
    let bs = Backstop::start(&route(&backend.url, "[routes.retry]\nmax_attempts = 1"));
    let own = client().get(bs.url("/own")).send().await.unwrap();
    assert_eq!(own.status(), 200);
    assert_eq!(own.bytes().await.unwrap(), "hello world");
    let hyper = client()
        .post(bs.url("/hyper"))
        .body(streamed_body())
        .send()
        .await
        .unwrap();
    assert_eq!(hyper.status(), 200);
    assert_eq!(hyper.headers().get("content-length"), None);
    assert_eq!(hyper.bytes().await.unwrap(), "hello world");
}

/// An answer whose `Content-Length` lists its length twice (`5, 5`, which
/// RFC 9110 §8.6 lets a recipient read as one) is passed on with the one
/// number, on both ways, also to a client whose answer hyper writes
/// (HTTP/1.0): stricter clients refuse the list.
#[tokio::test]
async fn a_length_listed_twice_is_passed_on_as_one_number() {
    let backend =
        StuckBackend::start(b"HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\nhello".to_vec()).await;
    let bs = Backstop::start(&route(&backend.url, "[routes.retry]\nmax_attempts = 1"));
    let own = bs.raw(b"GET /own HTTP/1.0\r\nhost: x\r\n\r\n").await;
    assert!(own.contains("content-length: 5\r\n"), "{own}");
    assert!(own.ends_with("\r\n\r\nhello"), "{own}");
    let hyper = client()
        .post(bs.url("/hyper"))
        .version(http::Version::HTTP_10)
        .body(streamed_body())
        .send()
        .await
        .unwrap();
    assert_eq!(hyper.status(), 200);
    assert_eq!(hyper.headers()["content-length"], "5");
    assert_eq!(hyper.bytes().await.unwrap(), "hello");
}

/// A `101 Switching Protocols` no one asked for (Backstop sends no
/// `Upgrade`) is no answer to pass on, on both ways.
#[tokio::test]
async fn an_unasked_for_switch_of_protocols_is_an_invalid_answer_on_both_ways() {
    let backend = StuckBackend::start(
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: foo\r\nconnection: upgrade\r\n\r\n".to_vec(),
    )
    .await;
    let bs = Backstop::start(&route(
        &backend.url,
        "[routes.retry]\nmax_attempts = 1\n[routes.capture]\nenabled = false",
    ));
    let (status, code, _) = error_of(client().get(bs.url("/own")).send().await.unwrap()).await;
    assert_eq!((status, code.as_str()), (502, "upstream_invalid_response"));
    assert_eq!(
        streamed_post(&bs, "/hyper").await,
        (502, "upstream_invalid_response".to_string())
    );
}

#[tokio::test]
async fn a_body_that_keeps_coming_slowly_is_not_cut() {
    // Chunks 700 ms apart, 2.1 s in all, under a 2 s limit: the limit is on
    // each wait, not on the whole body; and the head's shorter limit
    // (`request_timeout`, 300 ms) does not apply to the body.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if conn.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let _ = conn
                    .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                    .await;
                for _ in 0..3 {
                    tokio::time::sleep(Duration::from_millis(700)).await;
                    let _ = conn.write_all(b"5\r\nslow.\r\n").await;
                }
                let _ = conn.write_all(b"0\r\n\r\n").await;
                tokio::time::sleep(Duration::from_secs(30)).await;
            });
        }
    });
    let bs = Backstop::start(&route(
        &url,
        "body_read_timeout = \"2s\"\n\
         [routes.circuit_breaker]\nrequest_timeout = 300\n[routes.retry]\nmax_attempts = 1",
    ));
    let body = client()
        .get(bs.url("/slow"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "slow.".repeat(3));
}

#[tokio::test]
async fn a_request_finding_every_slot_busy_until_its_deadline_is_a_503_or_captured() {
    // One slot, held by an answer whose body stalls until it is cut
    // (`body_read_timeout`, 1.5–3 s after its head).
    let backend =
        StuckBackend::start(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nten bytes.".to_vec())
            .await;
    let bs = Backstop::start(&format!(
        "[server]\nupstream_max_conns = 1\n\
         [replay]\ninitial_delay = \"100ms\"\nmax_delay = \"200ms\"\nmax_attempts = 1\n\n{}",
        route(
            &backend.url,
            "body_read_timeout = \"1500ms\"\n\
             [routes.circuit_breaker]\nrequest_timeout = 500\n[routes.retry]\nmax_attempts = 1",
        )
    ));
    let holder = client().get(bs.url("/hold")).send().await.unwrap();
    assert_eq!(holder.status(), 200);

    let started = Instant::now();
    let (status, code, body) = error_of(client().get(bs.url("/wait")).send().await.unwrap()).await;
    let waited = started.elapsed();
    assert_eq!((status, code.as_str()), (503, "upstream_busy"), "{body}");
    assert!(
        waited >= Duration::from_millis(450) && waited < Duration::from_secs(3),
        "answered after {waited:?}, request_timeout is 500 ms"
    );
    // The wait given up is no longer counted.
    let waiting = bs.metric(&turn_gauge("waiting", "api", &backend.url)).await;
    assert_eq!(waiting, 0.0);
    // A POST that cannot go is kept for later, not lost; its replays wait
    // for a turn too, and one that gets none spends no attempt (of the one
    // allowed here).
    let (status, code, _) = error_of(
        client()
            .post(bs.url("/order"))
            .body("{}")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, code.as_str()), (503, "captured"));
    assert_eq!(backend.requests(), 1, "neither was sent");
    let captured = bs
        .metric("backstop_captured_total{route=\"api\",reason=\"saturated\"}")
        .await;
    assert_eq!(captured, 1.0);

    // The first answer's body is cut: its slot is free again, for the
    // POST's replay, then for a new request.
    assert!(holder.bytes().await.is_err(), "the stalled body is cut");
    wait_queue(&bs, "replayed_total", 1).await;
    let heads = backend.heads();
    assert_eq!(heads.len(), 2, "the held GET and the replay");
    // The waits spent no attempt.
    assert_replay_attempt(&heads[1], 1);
    let response = client().get(bs.url("/next")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(backend.requests(), 3);
}

#[tokio::test]
async fn an_answer_that_cannot_be_passed_on_is_a_502_not_retried_nor_held_against_the_backend() {
    let backend = StuckBackend::start(too_many_headers()).await;
    let bs = Backstop::start(&route(
        &backend.url,
        "[routes.circuit_breaker]\nfailure_threshold = 2\n\
         [routes.retry]\nmax_attempts = 3\ninitial_delay = \"10ms\"\n\
         [routes.capture]\nenabled = true",
    ));
    let c = client();
    for _ in 0..3 {
        let (status, code, error) = error_of(c.get(bs.url("/many")).send().await.unwrap()).await;
        assert_eq!((status, code.as_str()), (502, "upstream_invalid_response"));
        assert_eq!(error["route"], "api");
    }
    // A POST on hyper's way (streamed body, so not captured either way).
    assert_eq!(
        streamed_post(&bs, "/many").await,
        (502, "upstream_invalid_response".to_string())
    );
    // A small POST is buffered for capture, but the backend had it: not
    // captured (a replay would apply it twice).
    let (status, code, _) = error_of(c.post(bs.url("/many")).body("x").send().await.unwrap()).await;
    assert_eq!((status, code.as_str()), (502, "upstream_invalid_response"));

    assert_eq!(backend.requests(), 5, "each sent once, none retried");
    let circuit: serde_json::Value = bs.admin_json("/circuit-status").await;
    assert_eq!(
        circuit["circuits"][0]["state"], "closed",
        "five invalid answers over a threshold of two: {circuit}"
    );
    let queue: serde_json::Value = bs.admin_json("/queue").await;
    assert_eq!(queue["depth"], 0, "nothing captured: {queue}");
    let metrics = bs.admin_text("/metrics").await;
    assert!(!metrics.contains("backstop_captured_total{"), "{metrics}");
    assert_eq!(
        crate::harness::metric_value(&metrics, "backstop_upstream_retries_total{route=\"api\"}"),
        0.0
    );
}

#[tokio::test]
async fn a_failure_answer_read_whole_leaves_its_connection_to_the_retry() {
    let backend = Backend::scripted(vec![Reply::status(503).body("busy"), Reply::ok("fine")]).await;
    let bs = Backstop::start(&route(
        &backend.url(),
        "[routes.retry]\nmax_attempts = 2\ninitial_delay = \"10ms\"\n\
         [routes.capture]\nenabled = false",
    ));
    let r = client().get(bs.url("/again")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "fine");
    let seen = backend.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        seen[0].peer, seen[1].peer,
        "the retry went out on the connection the 503 came on"
    );
}

/// Asserts that `answer` is refused as an invalid answer on both ways to
/// the backend: Backstop's own exchange (a GET) and hyper's (a streamed
/// POST), each tried once.
async fn refused_on_both_ways(answer: &[u8]) {
    let backend = StuckBackend::start(answer.to_vec()).await;
    let bs = Backstop::start(&route(
        &backend.url,
        "[routes.retry]\nmax_attempts = 1\n[routes.capture]\nenabled = false",
    ));
    let c = client();
    let (status, code, _) = error_of(c.get(bs.url("/x")).send().await.unwrap()).await;
    assert_eq!((status, code.as_str()), (502, "upstream_invalid_response"));
    assert_eq!(
        streamed_post(&bs, "/x").await,
        (502, "upstream_invalid_response".to_string())
    );
    assert_eq!(backend.requests(), 2);
}

#[tokio::test]
async fn a_transfer_coding_other_than_chunked_is_refused_on_both_ways() {
    // Passed on, the body would reach the client gzipped with no
    // `Content-Encoding` to say so (`Transfer-Encoding` is hop-by-hop).
    refused_on_both_ways(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
}

/// HTTP/1.0 has no transfer codings: an HTTP/1.0 answer that names one has
/// faulty framing (RFC 9112 §6.1), refused on both ways as hyper's client
/// refuses it.
#[tokio::test]
async fn a_transfer_coding_in_an_http_1_0_answer_is_refused_on_both_ways() {
    refused_on_both_ways(
        b"HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
}

#[tokio::test]
async fn an_invalid_answer_does_not_close_a_half_open_circuit() {
    // A 503 opens the circuit; once it half-opens, the backend answers
    // what cannot be passed on: no success, so the circuit stays half-open
    // (one success would close it) and takes the next probe.
    let backend = StuckBackend::scripted(vec![UNAVAILABLE.to_vec(), too_many_headers()]).await;
    let bs = Backstop::start(&route(
        &backend.url,
        "[routes.circuit_breaker]\nfailure_threshold = 1\nsuccess_threshold = 1\nreset_timeout = \"1s\"\n\
         [routes.retry]\nmax_attempts = 1\n[routes.capture]\nenabled = false",
    ));
    let c = client();
    assert_eq!(c.get(bs.url("/probe")).send().await.unwrap().status(), 503);
    assert_eq!(circuit_state(&bs).await, "open");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for _ in 0..2 {
        let (status, code, _) = error_of(c.get(bs.url("/probe")).send().await.unwrap()).await;
        assert_eq!((status, code.as_str()), (502, "upstream_invalid_response"));
        assert_eq!(circuit_state(&bs).await, "half_open");
    }
    assert_eq!(backend.requests(), 3);
}

#[tokio::test]
async fn a_replay_answered_invalidly_is_dead_lettered_not_sent_again() {
    // Live: 503, captured. Replay: an answer that cannot be passed on — the
    // backend had the request, so it is not sent a third time.
    let backend = StuckBackend::scripted(vec![UNAVAILABLE.to_vec(), too_many_headers()]).await;
    let bs = Backstop::start(&format!(
        "[replay]\ninitial_delay = \"100ms\"\nmax_delay = \"200ms\"\nmax_attempts = 5\n\n{}",
        route(
            &backend.url,
            "[routes.retry]\nmax_attempts = 1\n[routes.capture]\nenabled = true"
        )
    ));
    post_captured_order(&bs).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let dead = loop {
        let dead: serde_json::Value = bs.admin_json("/queue/dead-letters").await;
        if dead["dead_letters"]
            .as_array()
            .is_some_and(|d| !d.is_empty())
        {
            break dead;
        }
        assert!(Instant::now() < deadline, "never dead-lettered: {dead}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        dead["dead_letters"][0]["error"], "invalid_response",
        "{dead}"
    );
    assert_eq!(dead["dead_letters"][0]["attempts"], 1, "{dead}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(backend.requests(), 2, "sent live once and replayed once");
}

#[tokio::test]
async fn a_replay_whose_answer_body_stalls_is_delivered_by_its_deadline() {
    // Live: 503, captured. Replay: a 200 whose body stops after ten bytes.
    // The status is what a replay needs: it is delivered once the attempt's
    // deadline (`request_timeout`, 1 s) has passed, not held for the body's
    // 60 s default `body_read_timeout`, which would hold up the queue.
    let stalled = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nten bytes.".to_vec();
    let backend = StuckBackend::scripted(vec![UNAVAILABLE.to_vec(), stalled]).await;
    let bs = Backstop::start(&format!(
        "[replay]\ninitial_delay = \"100ms\"\nmax_delay = \"200ms\"\n\n{}",
        route(
            &backend.url,
            "[routes.circuit_breaker]\nrequest_timeout = 1000\n\
             [routes.retry]\nmax_attempts = 1\n[routes.capture]\nenabled = true"
        )
    ));
    post_captured_order(&bs).await;
    wait_queue(&bs, "replayed_total", 1).await;
    assert_eq!(backend.requests(), 2, "sent live once and replayed once");
}

/// A POST that the backend's 503 has captured (for a replay to send).
async fn post_captured_order(bs: &Backstop) {
    let r = client()
        .post(bs.url("/orders"))
        .body("order")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("x-backstop-capture-id"));
}

async fn circuit_state(bs: &Backstop) -> serde_json::Value {
    let status: serde_json::Value = bs.admin_json("/circuit-status").await;
    status["circuits"][0]["state"].clone()
}
