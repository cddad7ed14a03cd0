//! HTTP/1.1 as clients see it over raw sockets: requests without a body are
//! served by Backstop's own server side, and the first request with a body
//! moves the connection to hyper's, with nothing lost or reordered between.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::harness::{Backend, Backstop, Reply};

fn config(upstream: &str) -> String {
    format!(
        "[server]\nheader_read_timeout = \"2s\"\n\n[[routes]]\nname = \"api\"\npath_prefix = \"/\"\nupstreams = [{upstream:?}]\n"
    )
}

/// One answer read off the wire.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Splits what a connection sent into answers framed by `Content-Length`
/// (answers to `HEAD`, flagged in `heads`, carry no body).
fn answers(mut wire: &[u8], heads: &[bool]) -> Vec<Answer> {
    let mut out = Vec::new();
    for &is_head in heads {
        let mut fields = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut fields);
        let Ok(httparse::Status::Complete(len)) = response.parse(wire) else {
            panic!(
                "answer {} is not a complete head: {:?}",
                out.len() + 1,
                String::from_utf8_lossy(wire)
            );
        };
        let headers: Vec<(String, String)> = response
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect();
        let status = response.code.unwrap();
        wire = &wire[len..];
        let mut answer = Answer {
            status,
            headers,
            body: Vec::new(),
        };
        if !is_head {
            let n: usize = answer.header("content-length").unwrap().parse().unwrap();
            answer.body = wire[..n].to_vec();
            wire = &wire[n..];
        }
        out.push(answer);
    }
    assert!(
        wire.is_empty(),
        "bytes after the last answer: {:?}",
        String::from_utf8_lossy(wire)
    );
    out
}

/// Each answer's body, as text.
fn bodies(got: &[Answer]) -> Vec<String> {
    got.iter()
        .map(|a| String::from_utf8_lossy(&a.body).into_owned())
        .collect()
}

/// A backend that answers with the request's URI and the length of its
/// `X-Big` header.
async fn uri_and_big_header_backend() -> Backend {
    Backend::start(|seen| {
        let big = seen.headers.get("x-big").map_or(0, |v| v.len());
        Reply::ok(&format!("{} {big}", seen.uri))
    })
    .await
}

async fn read_until_closed(conn: &mut TcpStream) -> Vec<u8> {
    let mut wire = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut wire))
        .await
        .expect("the connection was not closed after `Connection: close`")
        .unwrap();
    wire
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_across_the_hand_over_to_hyper() {
    let backend = Backend::start(|seen| {
        let body = String::from_utf8_lossy(&seen.body);
        Reply::ok(&format!("{} {} {body}", seen.method, seen.uri))
    })
    .await;
    let bs = Backstop::start(&config(&backend.url()));
    let mut conn = TcpStream::connect(bs.addr).await.unwrap();
    // All in one write: two requests for the own side, a HEAD, a body (hyper
    // from here on), and a last request that asks to close.
    conn.write_all(
        b"GET /one?q=1 HTTP/1.1\r\nHost: a\r\nX-Twice: 1\r\nx-twice: 2\r\n\r\n\
          HEAD /two HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\n\r\n\
          GET /three HTTP/1.1\r\nHost: a\r\n\r\n\
          POST /four HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nxyz\
          GET /five HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let wire = read_until_closed(&mut conn).await;
    let got = answers(&wire, &[false, true, false, false, false]);
    assert_eq!(
        bodies(&got),
        [
            "GET /one?q=1 ",
            "",
            "GET /three ",
            "POST /four xyz",
            "GET /five "
        ]
    );
    assert!(got.iter().all(|a| a.status == 200), "{got:?}");
    assert!(got.iter().all(|a| a.header("date").is_some()), "{got:?}");
    assert!(got.iter().all(|a| a.header("x-request-id").is_some()));
    // The HEAD answer says the length its GET would have, and sends nothing.
    assert_eq!(got[1].header("content-length"), Some("10"));
    assert_eq!(got[4].header("connection"), Some("close"));
    let seen = backend.seen();
    let uris: Vec<&str> = seen.iter().map(|s| s.uri.as_str()).collect();
    assert_eq!(uris, ["/one?q=1", "/two", "/three", "/four", "/five"]);
    let twice: Vec<_> = seen[0].headers.get_all("x-twice").iter().collect();
    assert_eq!(twice, ["1", "2"], "repeated headers keep their order");
    assert_eq!(seen[1].method, "HEAD");
}

#[tokio::test]
async fn a_head_larger_than_the_read_buffer_arrives_in_pieces_and_the_next_one_follows() {
    let backend = uri_and_big_header_backend().await;
    let bs = Backstop::start(&config(&backend.url()));
    let mut conn = TcpStream::connect(bs.addr).await.unwrap();
    // 20 KiB of header, in pieces: well past the own side's first read
    // buffer (2 KiB), well under `max_header_bytes` (32 KiB).
    let big = "b".repeat(20 * 1024);
    let head = format!("GET /big HTTP/1.1\r\nHost: a\r\nX-Big: {big}\r\n\r\n");
    for piece in head.as_bytes().chunks(3000) {
        conn.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    conn.write_all(b"GET /small HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let wire = read_until_closed(&mut conn).await;
    let got = answers(&wire, &[false, false]);
    assert_eq!(bodies(&got), ["/big 20480", "/small 0"]);
    assert!(got.iter().all(|a| a.status == 200), "{got:?}");
}

#[tokio::test]
async fn a_connection_idle_long_enough_to_let_go_of_its_buffers_serves_what_comes_next() {
    let backend = uri_and_big_header_backend().await;
    // `header_read_timeout = "2s"`: the reaper looks every 0.5 s and asks a
    // connection idle for a whole look to drop its buffers.
    let bs = Backstop::start(&config(&backend.url()));
    let mut conn = TcpStream::connect(bs.addr).await.unwrap();
    let mut wire = Vec::new();
    conn.write_all(b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut conn, &mut wire, |w| w.ends_with(b"/first 0")).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // After the idle spell: a head larger than a fresh buffer, then two
    // pipelined heads, in one write.
    let big = "b".repeat(5000);
    let next = format!(
        "GET /big HTTP/1.1\r\nHost: a\r\nX-Big: {big}\r\n\r\n\
         GET /two HTTP/1.1\r\nHost: a\r\n\r\n\
         GET /three HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    );
    conn.write_all(next.as_bytes()).await.unwrap();
    wire.extend(read_until_closed(&mut conn).await);
    let got = answers(&wire, &[false; 4]);
    assert_eq!(
        bodies(&got),
        ["/first 0", "/big 5000", "/two 0", "/three 0"]
    );
    assert!(got.iter().all(|a| a.status == 200), "{got:?}");
}

#[tokio::test]
async fn an_http_1_0_request_and_a_proxy_made_answer_are_framed_and_closed() {
    let backend = Backend::start(|_| Reply::ok("fine")).await;
    let bs = Backstop::start(&config(&backend.url()));

    let mut conn = TcpStream::connect(bs.addr).await.unwrap();
    conn.write_all(b"GET /old HTTP/1.0\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let got = answers(&read_until_closed(&mut conn).await, &[false]);
    assert_eq!(got[0].body, b"fine");

    // A health check answered by the proxy itself, then a close.
    let mut conn = TcpStream::connect(bs.addr).await.unwrap();
    conn.write_all(
        b"GET /health HTTP/1.1\r\nHost: a\r\n\r\nGET /health HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let got = answers(&read_until_closed(&mut conn).await, &[false, false]);
    assert_eq!(got[0].status, 200);
    assert!(got[0].header("content-length").is_some());
    assert_eq!(got[1].header("connection"), Some("close"));
}

/// Reads into `wire` until `done` says so; fails on a close or after 10 s.
async fn read_until(conn: &mut TcpStream, wire: &mut Vec<u8>, done: impl Fn(&[u8]) -> bool) {
    let mut buf = [0u8; 4096];
    while !done(wire) {
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("nothing more came: {:?}", String::from_utf8_lossy(wire)))
            .unwrap();
        assert_ne!(n, 0, "closed early: {:?}", String::from_utf8_lossy(wire));
        wire.extend_from_slice(&buf[..n]);
    }
}

/// A backend that answers one request with a chunked body and sends its
/// second chunk only when told to.
async fn slow_chunked_backend() -> (String, tokio::sync::oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (go, wait) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            if conn.read(&mut byte).await.unwrap() == 0 {
                return;
            }
            head.push(byte[0]);
        }
        conn.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
            .await
            .unwrap();
        let _ = wait.await;
        conn.write_all(b"6\r\nsecond\r\n0\r\n\r\n").await.unwrap();
        // Held open, as a keep-alive backend would.
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    (url, go)
}

#[tokio::test]
async fn an_answer_of_unknown_length_streams_chunked_as_it_comes() {
    let (url, go) = slow_chunked_backend().await;
    let bs = Backstop::start(&config(&url));
    let mut conn = TcpStream::connect(bs.addr).await.unwrap();
    conn.write_all(b"GET /stream HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    // The head and the first chunk arrive while the backend still holds the
    // rest back.
    let mut wire = Vec::new();
    read_until(&mut conn, &mut wire, |w| {
        String::from_utf8_lossy(w).contains("first")
    })
    .await;
    let text = String::from_utf8_lossy(&wire).into_owned();
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(
        text.contains("\r\ntransfer-encoding: chunked\r\n"),
        "{text}"
    );
    assert!(!text.contains("content-length"), "{text}");
    go.send(()).unwrap();
    read_until(&mut conn, &mut wire, |w| w.ends_with(b"\r\n0\r\n\r\n")).await;
    let text = String::from_utf8_lossy(&wire).into_owned();
    let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
    assert_eq!(body, "5\r\nfirst\r\n6\r\nsecond\r\n0\r\n\r\n");
    // The connection stays open for the next request.
    conn.write_all(b"GET /health HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let got = answers(&read_until_closed(&mut conn).await, &[false]);
    assert_eq!(got[0].status, 200);
}

/// A shutdown that comes while a request head is still arriving lets that
/// request finish, body and all, on the connection that the own side hands
/// to hyper at that moment.
#[tokio::test]
async fn a_request_whose_head_is_arriving_at_shutdown_is_answered_and_closed() {
    let backend = Backend::start(|seen| {
        let body = String::from_utf8_lossy(&seen.body);
        Reply::ok(&format!("{} {body}", seen.method))
    })
    .await;
    let mut bs = Backstop::start(&config(&backend.url()));
    let mut conn = TcpStream::connect(bs.addr).await.unwrap();
    conn.write_all(b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    bs.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    conn.write_all(b"\r\nxyz").await.unwrap();
    let got = answers(&read_until_closed(&mut conn).await, &[false]);
    assert_eq!(got[0].status, 200);
    assert_eq!(got[0].body, b"POST xyz");
    assert_eq!(got[0].header("connection"), Some("close"));
    assert_eq!(bs.wait_exit(Duration::from_secs(10)), Some(0));
}

/// The HTTP/2 preface is a way to start a connection, not a request: after
/// an HTTP/1.1 request it is bad input, and the connection ends.
#[tokio::test]
async fn the_http2_preface_after_an_http1_request_ends_the_connection() {
    let backend = Backend::start(|_| Reply::ok("fine")).await;
    let bs = Backstop::start(&config(&backend.url()));
    let mut conn = TcpStream::connect(bs.addr).await.unwrap();
    // The preface, then an empty SETTINGS frame.
    conn.write_all(
        b"GET /one HTTP/1.1\r\nHost: a\r\n\r\nPRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0",
    )
    .await
    .unwrap();
    let wire = read_until_closed(&mut conn).await;
    let text = String::from_utf8_lossy(&wire);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert_eq!(text.matches("fine").count(), 1, "{text}");
    // Whatever follows the first answer is HTTP/1 (hyper's 400), never an
    // HTTP/2 frame.
    let rest = &text[text.find("fine").unwrap() + 4..];
    assert!(
        rest.is_empty() || rest.starts_with("HTTP/1.1 400"),
        "{rest:?}"
    );
}
