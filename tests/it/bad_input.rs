//! Bad input over raw sockets: each case gets a clear answer or a closed
//! connection, and the process stays healthy.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{client, error_of, Backend, Backstop, Reply};

async fn assert_healthy(bs: &mut Backstop) {
    assert!(bs.is_running(), "process died");
    let r = client().get(bs.url("/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

fn config(backend: &Backend) -> String {
    format!(
        "[server]\nheader_read_timeout = \"1s\"\n\n[[routes]]\nname = \"api\"\npath_prefix = \"/\"\nupstreams = [{:?}]\n",
        backend.url()
    )
}

/// hyper frames such a request by `Transfer-Encoding` alone and closes the
/// connection after answering (RFC 9112 §6.3), so bytes smuggled behind the
/// chunked body can never be read as a second request, here or upstream.
#[tokio::test]
async fn content_length_with_transfer_encoding_cannot_smuggle_a_request() {
    let backend = Backend::echo().await;
    let mut bs = Backstop::start(&config(&backend));
    let request = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\
          Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n";
    let answer = bs.raw(request).await;
    assert!(
        answer.starts_with("HTTP/1.1 400") || answer.contains("connection: close"),
        "{answer}"
    );
    assert_eq!(
        answer.matches("HTTP/1.1").count(),
        1,
        "one answer only: {answer}"
    );
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    for seen in backend.seen() {
        assert_ne!(seen.uri, "/smuggled");
        assert!(
            !seen.headers.contains_key("content-length")
                || !seen.headers.contains_key("transfer-encoding")
        );
    }
    assert_healthy(&mut bs).await;
}

#[tokio::test]
async fn invalid_header_bytes_are_refused() {
    let backend = Backend::echo().await;
    let mut bs = Backstop::start(&config(&backend));
    let answer = bs
        .raw(b"GET /x HTTP/1.1\r\nHost: a\r\nX-Bad\x01Name: v\r\n\r\n")
        .await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
        "{answer}"
    );
    let answer = bs
        .raw(b"GET /x HTTP/1.1\r\nHost: a\r\nX-Ok: a\x00b\r\n\r\n")
        .await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
        "{answer}"
    );
    assert_eq!(backend.hits(), 0);
    assert_healthy(&mut bs).await;
}

#[tokio::test]
async fn a_64_kib_header_gets_431() {
    let backend = Backend::echo().await;
    let mut bs = Backstop::start(&config(&backend));
    let big = "a".repeat(64 * 1024);
    let request = format!("GET /x HTTP/1.1\r\nHost: a\r\nX-Big: {big}\r\n\r\n");
    let answer = bs.raw(request.as_bytes()).await;
    assert!(
        answer.starts_with("HTTP/1.1 431"),
        "{}",
        &answer[..answer.len().min(200)]
    );
    assert_eq!(backend.hits(), 0);
    assert_healthy(&mut bs).await;
}

#[tokio::test]
async fn a_client_sending_headers_byte_by_byte_is_cut_off() {
    let backend = Backend::echo().await;
    let mut bs = Backstop::start(&config(&backend));
    let mut s = TcpStream::connect(bs.addr).await.unwrap();
    let started = Instant::now();
    let drip = b"GET /x HTTP/1.1\r\nHost: a\r\nX-Slow: ";
    let mut closed_after = None;
    for byte in drip.iter().chain(std::iter::repeat(&b'a')) {
        if s.write_all(&[*byte]).await.is_err() {
            closed_after = Some(started.elapsed());
            break;
        }
        let mut buf = [0u8; 256];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await
        {
            // EOF or an error answer: the server gave up on us.
            let _ = n;
            closed_after = Some(started.elapsed());
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "never cut off");
    }
    let after = closed_after.unwrap();
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_secs(5),
        "cut off after {after:?}"
    );
    assert_healthy(&mut bs).await;
}

/// HTTP/2's own frames are no request: a client that only pings (every
/// 300 ms) does not keep a connection without streams open past
/// `idle_timeout`, as an HTTP/1 client's trickled head would not.
#[tokio::test]
async fn pings_do_not_keep_an_idle_http2_connection_open() {
    let backend = Backend::echo().await;
    let bs = Backstop::start(&format!(
        "[server]\nidle_timeout = \"1s\"\n\n[[routes]]\nname = \"api\"\npath_prefix = \"/\"\nupstreams = [{:?}]\n",
        backend.url()
    ));
    let tcp = TcpStream::connect(bs.addr).await.unwrap();
    let (_h2, mut connection) = h2::client::handshake(tcp).await.unwrap();
    let _h2: h2::client::SendRequest<bytes::Bytes> = _h2;
    let mut ping_pong = connection.ping_pong().unwrap();
    let connection = tokio::spawn(connection);
    let started = Instant::now();
    while !connection.is_finished() {
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "pings kept the connection open"
        );
        let _ = tokio::time::timeout(
            Duration::from_millis(300),
            ping_pong.ping(h2::Ping::opaque()),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let open = started.elapsed();
    assert!(
        open >= Duration::from_millis(900) && open < Duration::from_secs(4),
        "closed after {open:?}"
    );
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed() {
    let backend = Backend::echo().await;
    let toml = format!(
        "[server]\nidle_timeout = \"1s\"\n\n[[routes]]\nname = \"api\"\npath_prefix = \"/\"\nupstreams = [{:?}]\n",
        backend.url()
    );
    let bs = Backstop::start(&toml);
    let mut s = TcpStream::connect(bs.addr).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let started = Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "connection closed");
    let idle = started.elapsed();
    assert!(
        idle >= Duration::from_millis(900) && idle < Duration::from_millis(2500),
        "closed after {idle:?}"
    );
}

/// The header timeout is for a request head that has begun: a keep-alive
/// connection waiting between requests is governed by `idle_timeout` alone.
#[tokio::test]
async fn the_header_timeout_does_not_cut_idle_keep_alive_connections() {
    let backend = Backend::echo().await;
    let toml = format!(
        "[server]\nheader_read_timeout = \"300ms\"\nidle_timeout = \"10s\"\n\n[[routes]]\nname = \"api\"\npath_prefix = \"/\"\nupstreams = [{:?}]\n",
        backend.url()
    );
    let bs = Backstop::start(&toml);
    let mut s = TcpStream::connect(bs.addr).await.unwrap();
    let mut buf = vec![0u8; 1024];
    for round in 0..2 {
        s.write_all(b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let n = s.read(&mut buf).await.unwrap();
        assert!(
            String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
            "round {round}: {:?}",
            String::from_utf8_lossy(&buf[..n])
        );
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }

    // HTTP/2 (prior knowledge): frames between requests are not a head.
    let stream = TcpStream::connect(bs.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    for round in 0..2 {
        let request = http::Request::get(format!("http://{}/health", bs.addr))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200, "round {round}");
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
}

/// A request head that never completes is cut at `header_read_timeout`
/// even when the connection was first marked idle (a shorter
/// `idle_timeout`) or asked to finish at shutdown: a graceful close waits
/// for the head, so only the head timeout ends it.
#[tokio::test]
async fn a_stalled_head_is_cut_even_after_an_idle_or_shutdown_close() {
    let backend = Backend::echo().await;
    let toml = format!(
        "[server]\nheader_read_timeout = \"1s\"\nidle_timeout = \"300ms\"\ndrain_timeout = \"20s\"\n\n[[routes]]\nname = \"api\"\npath_prefix = \"/\"\nupstreams = [{:?}]\n",
        backend.url()
    );
    let mut bs = Backstop::start(&toml);
    let stall = |addr| async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /x HTTP/1.1\r\nHost: a\r\n")
            .await
            .unwrap();
        s
    };
    let closed_within = |mut s: TcpStream, limit: Duration| async move {
        let started = Instant::now();
        let mut buf = [0u8; 256];
        let read = tokio::time::timeout(limit, s.read(&mut buf)).await;
        assert!(read.is_ok(), "still open after {limit:?}");
        started.elapsed()
    };

    let s = stall(bs.addr).await;
    let after = closed_within(s, Duration::from_secs(5)).await;
    assert!(after >= Duration::from_millis(900), "cut after {after:?}");

    // At shutdown the stalled client does not hold the drain for 20 s.
    let s = stall(bs.addr).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    bs.signal("TERM");
    closed_within(s, Duration::from_secs(5)).await;
    assert_eq!(bs.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "exited after {:?}",
        started.elapsed()
    );
}

/// Bytes past a request (the start of a next head, or a stray line
/// ending) start the head timeout as a new byte would: the client cannot
/// keep its connection open by sending one byte too many and going quiet.
#[tokio::test]
async fn a_head_begun_with_the_last_request_is_cut_after_the_head_timeout() {
    let backend = Backend::echo().await;
    // No idle close within the test: only the head timeout can end it.
    let toml = format!(
        "[server]\nheader_read_timeout = \"1s\"\nidle_timeout = \"60s\"\n\n[[routes]]\nname = \"api\"\npath_prefix = \"/\"\nupstreams = [{:?}]\n",
        backend.url()
    );
    let bs = Backstop::start(&toml);
    for extra in [&b"G"[..], b"\r\n"] {
        let mut s = TcpStream::connect(bs.addr).await.unwrap();
        let mut request = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n".to_vec();
        request.extend_from_slice(extra);
        s.write_all(&request).await.unwrap();
        let started = Instant::now();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
            .await
            .unwrap_or_else(|_| panic!("still open 5 s after {extra:?}"))
            .ok();
        let answer = String::from_utf8_lossy(&out);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let after = started.elapsed();
        assert!(after >= Duration::from_millis(900), "cut after {after:?}");
    }
}

/// A streamed request body that breaks (a malformed chunk) is the
/// client's fault: answered 400 `bad_request`, and the circuit breaker is
/// not told the backend failed (five such requests would open it).
#[tokio::test]
async fn a_broken_streamed_body_is_the_clients_fault_not_the_backends() {
    let backend = Backend::echo().await;
    let toml = format!(
        "[[routes]]\nname = \"api\"\npath_prefix = \"/\"\nupstreams = [{:?}]\n[routes.retry]\nmax_attempts = 1\n[routes.capture]\nenabled = false\n[routes.circuit_breaker]\nfailure_threshold = 2\n",
        backend.url()
    );
    let mut bs = Backstop::start(&toml);
    for _ in 0..4 {
        let request = b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
              5\r\nhello\r\nzz\r\n";
        let answer = bs.raw(request).await;
        // hyper may close the connection before the answer: no answer is
        // fine, a wrong one is not.
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
            "{answer}"
        );
        assert!(!answer.contains("upstream"), "{answer}");
    }
    let r = client().get(bs.url("/after")).send().await.unwrap();
    assert_eq!(r.status(), 200, "the circuit stayed closed");
    assert_healthy(&mut bs).await;
}

/// A body the route reads whole (capture, retry) that stops coming is
/// given up after the route's `body_read_timeout`: 408 `request_timeout`,
/// and nothing goes upstream.
/// A client that writes its whole body before it reads (Python's
/// `http.client`, many simple clients) gets the answer Backstop made
/// without reading the body (413 too large, 404 no route), not a reset:
/// the body's rest is read and dropped before the connection closes.
#[tokio::test]
async fn a_body_answered_unread_is_drained_so_the_client_reads_the_answer() {
    let backend = Backend::start(|_| Reply::ok("ok")).await;
    let toml = format!(
        "[server]\nmax_body_bytes = 1048576\n\n[[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nupstreams = [{:?}]\n",
        backend.url()
    );
    let mut bs = Backstop::start(&toml);
    let body = vec![b'b'; 16 * 1024 * 1024];
    for (path, want) in [
        ("/api/upload", "HTTP/1.1 413"),
        ("/elsewhere", "HTTP/1.1 404"),
    ] {
        for _ in 0..3 {
            let mut s = TcpStream::connect(bs.addr).await.unwrap();
            let head = format!(
                "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            s.write_all(head.as_bytes()).await.unwrap();
            let written = s.write_all(&body).await;
            assert!(written.is_ok(), "{path}: {written:?}");
            let mut answer = vec![0u8; 12];
            let read =
                tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut answer)).await;
            assert!(matches!(read, Ok(Ok(_))), "{path}: {read:?}");
            assert_eq!(String::from_utf8_lossy(&answer), want);
        }
    }
    assert_eq!(backend.hits(), 0);
    assert_healthy(&mut bs).await;
}

/// A client that asked for `100 Continue` and was answered without it
/// sends no body: what it sends next on the connection is never drained as
/// that body (its requests would be lost, and the rest read from their
/// middle). The connection is closed, or its next requests are answered.
#[tokio::test]
async fn a_body_never_invited_by_100_continue_is_not_drained_from_the_next_requests() {
    let backend = Backend::start(|_| Reply::ok("ok")).await;
    let toml = format!(
        "[[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nupstreams = [{:?}]\n",
        backend.url()
    );
    let mut bs = Backstop::start(&toml);
    let mut s = TcpStream::connect(bs.addr).await.unwrap();
    let head =
        "POST /elsewhere HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\nExpect: 100-continue\r\n\r\n";
    s.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 12];
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut answer)).await;
    assert!(matches!(read, Ok(Ok(_))), "{read:?}");
    assert_eq!(String::from_utf8_lossy(&answer), "HTTP/1.1 404");
    // The body is dropped, as the answer allows; two requests follow.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let next = "GET /api/a HTTP/1.1\r\nHost: x\r\n\r\nGET /api/b HTTP/1.1\r\nHost: x\r\n\r\n";
    let _ = s.write_all(next.as_bytes()).await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut rest)).await;
    let rest = String::from_utf8_lossy(&rest);
    assert!(!rest.contains("HTTP/1.1 400"), "{rest}");
    let answered = rest.matches("HTTP/1.1 200").count();
    assert_eq!(answered, backend.hits(), "{rest}");
    assert!(answered == 0 || answered == 2, "one request lost: {rest}");
    assert_healthy(&mut bs).await;
}

/// The drain outlasts the head timeout: the drained bytes are the answered
/// request's body, not a slow next head.
#[tokio::test]
async fn a_slow_body_answered_unread_is_drained_past_the_head_timeout() {
    let backend = Backend::start(|_| Reply::ok("ok")).await;
    let toml = format!(
        "[server]\nmax_body_bytes = 1024\nheader_read_timeout = \"1s\"\n\n[[routes]]\nname = \"api\"\npath_prefix = \"/\"\nupstreams = [{:?}]\n",
        backend.url()
    );
    let mut bs = Backstop::start(&toml);
    let mut s = TcpStream::connect(bs.addr).await.unwrap();
    let chunk = vec![b'b'; 64 * 1024];
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        chunk.len() * 16
    );
    s.write_all(head.as_bytes()).await.unwrap();
    for _ in 0..16 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let written = s.write_all(&chunk).await;
        assert!(written.is_ok(), "{written:?}");
    }
    let mut answer = vec![0u8; 12];
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut answer)).await;
    assert!(matches!(read, Ok(Ok(_))), "{read:?}");
    assert_eq!(String::from_utf8_lossy(&answer), "HTTP/1.1 413");
    assert_healthy(&mut bs).await;
}

#[tokio::test]
async fn a_buffered_body_that_stops_coming_is_answered_408() {
    let backend = Backend::echo().await;
    let toml = format!(
        "[[routes]]\nname = \"api\"\npath_prefix = \"/\"\nupstreams = [{:?}]\nbody_read_timeout = \"500ms\"\n",
        backend.url()
    );
    let mut bs = Backstop::start(&toml);
    let mut s = TcpStream::connect(bs.addr).await.unwrap();
    s.write_all(b"POST /slow HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nten bytes.")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("an answer within 5 s")
        .unwrap();
    let waited = started.elapsed();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    assert!(
        waited >= Duration::from_millis(500) && waited < Duration::from_secs(4),
        "answered after {waited:?}"
    );
    assert_eq!(backend.hits(), 0);
    assert_healthy(&mut bs).await;
}

/// A body buffered for retries costs about its size, however it comes:
/// in 1-byte chunks, kept chunk by chunk, a 256 KiB body took over 10 MiB.
#[tokio::test]
async fn a_body_buffered_in_one_byte_chunks_costs_about_its_size() {
    let backend = Backend::start(|seen| Reply::ok(&seen.body_len.to_string())).await;
    let bs = Backstop::start(&config(&backend));
    let warm = client().get(bs.url("/warm")).send().await.unwrap();
    assert_eq!(warm.status(), 200);
    let before = bs.peak_rss_kib();
    const BYTES: usize = 256 << 10;
    let mut request = b"POST /chunks HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\
          Transfer-Encoding: chunked\r\n\r\n"
        .to_vec();
    request.extend(b"1\r\nx\r\n".repeat(BYTES));
    request.extend(b"0\r\n\r\n");
    let answer = bs.raw(&request).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with(&BYTES.to_string()), "{answer}");
    let grew_mib = bs.peak_rss_kib().saturating_sub(before) as f64 / 1024.0;
    assert!(
        grew_mib < 4.0,
        "peak RSS grew {grew_mib:.1} MiB for a 256 KiB body"
    );
}

/// Bodies buffered side by side share `server.max_buffered_bytes`: one
/// that would pass it gets `503 overloaded` (its client may retry); a body
/// takes its declared length before it is read, and gives back what it
/// took when its request ends.
#[tokio::test]
async fn buffered_bodies_share_the_servers_budget() {
    let backend = Backend::start(|seen| Reply::ok(&seen.body_len.to_string())).await;
    let toml = format!(
        "[server]\nmax_body_bytes = 1048576\nmax_buffered_bytes = 1048576\n\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/\"\nupstreams = [{:?}]\n",
        backend.url()
    );
    let mut bs = Backstop::start(&toml);
    // A body of which 800 KB came, the rest still to come.
    let mut slow = TcpStream::connect(bs.addr).await.unwrap();
    slow.write_all(b"POST /slow HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\n")
        .await
        .unwrap();
    slow.write_all(&vec![b'x'; 800_000]).await.unwrap();
    let post = |len: usize| client().post(bs.url("/quick")).body(vec![b'y'; len]).send();
    // The slow body takes its whole declared length once its head is read.
    let deadline = Instant::now() + Duration::from_secs(5);
    while bs.metric("backstop_buffered_request_bytes").await != 1_000_000.0 {
        assert!(
            Instant::now() < deadline,
            "the slow body never took its share"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // 48,576 bytes are left.
    let refused = post(300_000).await.unwrap();
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    let (status, code, error) = error_of(refused).await;
    assert_eq!((status, code.as_str()), (503, "overloaded"), "{error}");
    assert_eq!(error["code"], "overloaded");
    let within = post(40_000).await.unwrap();
    assert_eq!(within.status(), 200, "within what is left");
    drop(slow);
    // Each of two whole-budget bodies passes only if every body before
    // gave back all it took.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = post(1_048_576).await.unwrap();
        if r.status() == 200 {
            assert_eq!(r.text().await.unwrap(), "1048576");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slow body's share was never given back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(post(1_048_576).await.unwrap().status(), 200);
    assert_eq!(bs.metric("backstop_buffered_request_bytes").await, 0.0);
    assert_eq!(backend.hits(), 3, "no refused body went upstream");
    assert_healthy(&mut bs).await;
}

/// A client may shut down its sending side once its request is out (as
/// `nc -N` does): it still gets the answer.
#[tokio::test]
async fn a_client_that_half_closes_after_its_request_gets_the_answer() {
    let backend = Backend::echo().await;
    let mut bs = Backstop::start(&config(&backend));
    let mut s = TcpStream::connect(bs.addr).await.unwrap();
    s.write_all(b"POST /half HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello")
        .await
        .unwrap();
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("the answer and the close come in time")
        .unwrap();
    let answer = String::from_utf8_lossy(&out);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let seen = backend.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(&seen[0].body[..], b"hello");
    assert_healthy(&mut bs).await;
}

/// An HTTP/1 client that goes away while its request is being proxied does not
/// cancel it: the request runs its course upstream (here a retry after a
/// backoff the client does not wait for), so a request the proxy took is
/// never dropped halfway.
#[tokio::test]
async fn a_request_whose_client_leaves_runs_its_course_upstream() {
    let backend = Backend::scripted(vec![Reply::status(503), Reply::ok("done")]).await;
    let mut bs = Backstop::start(&format!(
        "{}  [routes.retry]\n  max_attempts = 2\n  initial_delay = \"400ms\"\n  max_delay = \"400ms\"\n",
        config(&backend)
    ));
    let mut s = TcpStream::connect(bs.addr).await.unwrap();
    s.write_all(b"PUT /leaving HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc")
        .await
        .unwrap();
    backend.wait_for_hits(1, Duration::from_secs(5)).await;
    drop(s);
    backend.wait_for_hits(2, Duration::from_secs(5)).await;
    let seen = backend.seen();
    assert_eq!(seen.len(), 2, "the retry went out after the client left");
    assert_eq!(&seen[1].body[..], b"abc");
    assert_healthy(&mut bs).await;
}

/// RFC 9112 §3.2: an HTTP/1.1 request without one valid `Host`, and
/// targets in a form the method may not use, get 400 `bad_request` (the
/// JSON shape) and never reach the backend; the connection stays usable.
#[tokio::test]
async fn malformed_hosts_and_targets_get_400_and_stay_away_from_the_backend() {
    let backend = Backend::echo().await;
    let mut bs = Backstop::start(&config(&backend));
    let cases: [&[u8]; 10] = [
        b"GET /a HTTP/1.1\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: evil.example/x\r\n\r\n",
        // HTTP/1.0 may leave Host out, but one it sends is checked.
        b"GET /a HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET /a HTTP/1.0\r\nHost: evil.example/p?q\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: admin@a\r\n\r\n",
        b"GET http://admin:pw@a/x HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET a.example:80 HTTP/1.1\r\nHost: a.example\r\n\r\n",
        b"GET * HTTP/1.1\r\nHost: a\r\n\r\n",
        b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n",
    ];
    for request in cases {
        let shown = String::from_utf8_lossy(request);
        let mut s = TcpStream::connect(bs.addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let answer = String::from_utf8_lossy(&buf[..n]);
        assert!(
            answer.starts_with("HTTP/1.1 400") || answer.starts_with("HTTP/1.0 400"),
            "{shown:?} → {answer}"
        );
        assert!(
            answer.contains("x-backstop-error: bad_request"),
            "{shown:?} → {answer}"
        );
        assert!(answer.contains(r#""code":"bad_request""#), "{answer}");
    }
    assert_eq!(backend.hits(), 0, "none of them was forwarded");
    // HTTP/1.0 may leave Host out; a Host with a port or an IPv6 literal is
    // a host; a health check is answered whatever its Host.
    for request in [
        &b"GET /a HTTP/1.0\r\n\r\n"[..],
        b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: a.example:8080\r\nConnection: close\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: [2001:db8::1]:8080\r\nConnection: close\r\n\r\n",
    ] {
        let answer = bs.raw(request).await;
        // hyper answers an HTTP/1.0 request in HTTP/1.0.
        assert!(
            answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200"),
            "{answer}"
        );
    }
    assert_healthy(&mut bs).await;
}

/// A host whose port is not a number does not reach a route bound to the
/// name before it (nor go on whole as `X-Forwarded-Host`, where Rails reads
/// its last element): from the `Host` header, an absolute-form target, or
/// HTTP/2's `:authority`.
#[tokio::test]
async fn a_host_whose_port_is_no_number_reaches_no_host_bound_route() {
    let backend = Backend::echo().await;
    let bs = Backstop::start(&format!(
        "[[routes]]\nname = \"bound\"\npath_prefix = \"/\"\nhost = \"a.example\"\nupstreams = [{:?}]\n",
        backend.url()
    ));
    for request in [
        &b"GET /a HTTP/1.1\r\nHost: a.example:1,evil.example\r\nConnection: close\r\n\r\n"[..],
        b"GET /a HTTP/1.1\r\nHost: a.example:80x\r\nConnection: close\r\n\r\n",
        b"GET http://a.example:1,evil.example/a HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n",
    ] {
        let answer = bs.raw(request).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains("x-backstop-error: bad_request"), "{answer}");
    }
    assert_eq!(backend.hits(), 0);
    let answer = bs
        .raw(b"GET /a HTTP/1.1\r\nHost: a.example:8080\r\nConnection: close\r\n\r\n")
        .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// Every `X-Forwarded-For` and `Forwarded` line a trusted proxy sent is
/// one list (RFC 9110 §5.3), and Backstop appends to the whole of it.
#[tokio::test]
async fn repeated_forwarding_lines_are_kept_as_one_list() {
    let backend = Backend::echo().await;
    let trusted = config(&backend).replace(
        "[server]\n",
        "[server]\ntrusted_proxies = [\"127.0.0.1\"]\n",
    );
    let bs = Backstop::start(&trusted);
    let answer = bs
        .raw(
            b"GET /f HTTP/1.1\r\nHost: shop.example\r\nX-Forwarded-For: 10.0.0.1\r\n\
          Forwarded: for=10.0.0.1\r\nX-Forwarded-For: 10.0.0.2\r\n\
          Forwarded: for=10.0.0.2\r\nConnection: close\r\n\r\n",
        )
        .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let seen = &backend.seen()[0];
    assert_eq!(
        seen.headers["x-forwarded-for"],
        "10.0.0.1, 10.0.0.2, 127.0.0.1"
    );
    assert_eq!(
        seen.headers["forwarded"],
        "for=10.0.0.1, for=10.0.0.2, for=127.0.0.1;proto=http;host=shop.example"
    );
}

/// A backend whose `/big` answers 64 MiB (far more than the sockets between
/// can hold) and anything else `small`, behind a Backstop with a 1 s
/// `send_timeout` and one turn at the backend: the next request gets one
/// only when a stuck answer is let go.
async fn big_answers_behind_one_turn() -> (Backend, Backstop) {
    let big = bytes::Bytes::from(vec![b'x'; 64 << 20]);
    let backend = Backend::start(move |seen| match seen.uri.as_str() {
        "/big" => Reply::ok("").body(big.clone()),
        _ => Reply::ok("small"),
    })
    .await;
    let bs = Backstop::start(&format!(
        "[server]\nsend_timeout = \"1s\"\nupstream_max_conns = 1\n\n[[routes]]\nname = \"api\"\n\
         path_prefix = \"/\"\nupstreams = [{:?}]\n",
        backend.url()
    ));
    (backend, bs)
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_after_send_timeout_and_frees_its_turn() {
    let (backend, bs) = big_answers_behind_one_turn().await;
    let mut stuck = TcpStream::connect(bs.addr).await.unwrap();
    stuck
        .write_all(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    backend.wait_for_hits(1, Duration::from_secs(5)).await;

    let started = Instant::now();
    let r = client().get(bs.url("/small")).send().await.unwrap();
    let waited = started.elapsed();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "small");
    assert!(
        waited < Duration::from_secs(5),
        "the turn came back after {waited:?} (send_timeout 1 s)"
    );
    // The stuck client finds its answer cut short.
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stuck.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the connection is closed");
    assert!(got.len() < 64 << 20, "cut short at {} bytes", got.len());
    bs.wait_for_log("took nothing of its answer", Duration::from_secs(5))
        .await;
}

#[tokio::test]
async fn an_http2_stream_granted_no_window_is_reset_after_send_timeout_and_frees_its_turn() {
    // The client reads its socket all along (so the connection's send
    // timeout never fires) but grants one stream's 64 MiB answer no window
    // beyond the first 64 KiB.
    let (_backend, bs) = big_answers_behind_one_turn().await;
    let tcp = TcpStream::connect(bs.addr).await.unwrap();
    let (h2, connection) = h2::client::Builder::new()
        .initial_window_size(65_535)
        .initial_connection_window_size(16 << 20)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .unwrap();
    tokio::spawn(connection);
    let get = |path: &str| {
        let uri = format!("http://{}{path}", bs.addr);
        http::Request::get(uri).body(()).unwrap()
    };
    let mut h2 = h2.ready().await.unwrap();
    let (response, _) = h2.send_request(get("/big"), true).unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), 200);
    let mut starved = response.into_body();

    let started = Instant::now();
    let r = client().get(bs.url("/small")).send().await.unwrap();
    let waited = started.elapsed();
    assert_eq!(r.status(), 200);
    assert!(
        waited < Duration::from_secs(5),
        "the turn came back after {waited:?} (send_timeout 1 s)"
    );
    // Only the stream was reset: the connection serves the next one.
    let mut h2 = h2.ready().await.unwrap();
    let (response, _) = h2.send_request(get("/small"), true).unwrap();
    let mut body = response.await.unwrap().into_body();
    assert_eq!(body.data().await.unwrap().unwrap(), "small");
    // The starved stream ends in a reset, its answer cut short.
    let mut got = 0;
    let ended = loop {
        match starved.data().await {
            Some(Ok(chunk)) => got += chunk.len(),
            Some(Err(e)) => break e,
            None => panic!("the starved stream ended whole after {got} bytes"),
        }
    };
    assert_eq!(ended.reason(), Some(h2::Reason::CANCEL), "{ended}");
    assert!(got <= 65_535, "{got} bytes beyond the window");
    bs.wait_for_log("granted its stream no window", Duration::from_secs(5))
        .await;
}

#[tokio::test]
async fn request_targets_without_a_path_reach_the_base_path_as_such() {
    let backend = Backend::echo().await;
    let toml = format!(
        "[[routes]]\nname = \"public\"\npath_prefix = \"/\"\nupstreams = [\"{0}/public/\"]\n\n\
         [[routes]]\nname = \"svc\"\npath_prefix = \"/\"\nhost = \"svc.example\"\nupstreams = [\"{0}\"]\n",
        backend.url()
    );
    let bs = Backstop::start(&toml);

    // An HTTP/2 `:path` of only a query (sent without `:authority`, as the
    // h2 client sends an HTTP/1.1 request's relative URI) has the path `/`.
    // (http 1.5 refuses any other path that does not start with `/`.)
    let tcp = TcpStream::connect(bs.addr).await.unwrap();
    let (h2, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut parts = http::uri::Parts::default();
    parts.path_and_query = Some(http::uri::PathAndQuery::from_static("?q=1"));
    let request = http::Request::get(http::Uri::from_parts(parts).unwrap())
        .body(())
        .unwrap();
    let mut h2 = h2.ready().await.unwrap();
    let (response, _) = h2.send_request(request, true).unwrap();
    assert_eq!(response.await.unwrap().status(), 200);
    // `OPTIONS *` asks about the server, whatever the base path.
    let answer = bs
        .raw(b"OPTIONS * HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // An absolute-form target with an empty path goes up as `/?x=1`, with
    // a base path and without (the target as it came would be `?x=1`).
    for host in ["public.example", "svc.example"] {
        let request =
            format!("GET http://{host}?x=1 HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let answer = bs.raw(request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    let uris: Vec<String> = backend.seen().into_iter().map(|s| s.uri).collect();
    assert_eq!(uris, ["/public/?q=1", "*", "/public/?x=1", "/?x=1"]);
}
