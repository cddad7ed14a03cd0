//! The test harness: a real `backstop` process on ephemeral ports, backends
//! we control on real sockets, and real HTTP clients.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A running `backstop run` process.
pub struct Backstop {
    child: Child,
    pub dir: Arc<tempfile::TempDir>,
    pub config_path: PathBuf,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub scheme: &'static str,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Backstop {
    /// Starts Backstop with `toml`; the harness sets `listen`,
    /// `admin_listen` (ephemeral ports) and `data_dir` (a temp dir) unless
    /// the file sets them.
    pub fn start(toml: &str) -> Backstop {
        let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
        Self::start_in(dir, toml)
    }

    /// Starts Backstop with its data and config in `dir` (for restarts).
    pub fn start_in(dir: Arc<tempfile::TempDir>, toml: &str) -> Backstop {
        Self::start_in_with_env(dir, toml, &[])
    }

    /// Starts Backstop with its temp dir as the working directory, so
    /// relative paths in `toml` (a `data_dir = "./backstop-data"`) are
    /// this instance's own.
    pub fn start_in_own_cwd(toml: &str) -> Backstop {
        let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
        let config_path = dir.path().join("backstop.toml");
        std::fs::write(&config_path, with_test_server(toml, dir.path())).expect("write config");
        let cwd = dir.path().to_path_buf();
        Self::spawn_in(dir, config_path, &[], Some(&cwd))
    }

    /// Starts Backstop with extra environment variables.
    pub fn start_with_env(toml: &str, env: &[(&str, &str)]) -> Backstop {
        let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
        Self::start_in_with_env(dir, toml, env)
    }

    fn start_in_with_env(
        dir: Arc<tempfile::TempDir>,
        toml: &str,
        env: &[(&str, &str)],
    ) -> Backstop {
        let config_path = dir.path().join("backstop.toml");
        std::fs::write(&config_path, with_test_server(toml, dir.path())).expect("write config");
        Self::spawn_with_env(dir, config_path, env)
    }

    /// Starts with the config file already in `dir` (after a `kill9`).
    pub fn start_existing(dir: Arc<tempfile::TempDir>) -> Backstop {
        let path = dir.path().join("backstop.toml");
        Self::spawn(dir, path)
    }

    /// Starts again with the same directory and config file.
    pub fn restart(self) -> Backstop {
        let dir = self.dir.clone();
        let path = self.config_path.clone();
        drop(self);
        Self::spawn(dir, path)
    }

    fn spawn(dir: Arc<tempfile::TempDir>, config_path: PathBuf) -> Backstop {
        Self::spawn_with_env(dir, config_path, &[])
    }

    fn spawn_with_env(
        dir: Arc<tempfile::TempDir>,
        config_path: PathBuf,
        env: &[(&str, &str)],
    ) -> Backstop {
        Self::spawn_in(dir, config_path, env, None)
    }

    fn spawn_in(
        dir: Arc<tempfile::TempDir>,
        config_path: PathBuf,
        env: &[(&str, &str)],
        cwd: Option<&Path>,
    ) -> Backstop {
        let mut command = Command::new(env!("CARGO_BIN_EXE_backstop"));
        if let Some(cwd) = cwd {
            command.current_dir(cwd);
        }
        let mut child = command
            .args(["run", "-c"])
            .arg(&config_path)
            .env("RUST_LOG", "info,backstop=debug")
            .env_remove("PROXY_URLS")
            .env_remove("KAFKA_BROKERS")
            .env_remove("REDIS_HOST")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn backstop");
        let stderr = child.stderr.take().expect("stderr");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                for (marker, kind) in [
                    ("proxy listening on ", "proxy"),
                    ("admin listening on ", "admin"),
                ] {
                    if let Some(rest) = line.split(marker).nth(1) {
                        // With `log.format = "json"` the URL ends at the quote.
                        let url = rest.split('"').next().unwrap_or(rest);
                        let _ = tx.send((kind, url.trim().to_string()));
                    }
                }
                sink.lock().unwrap().push(line);
            }
        });
        let (mut proxy, mut admin) = (None, None);
        let deadline = Instant::now() + Duration::from_secs(20);
        while proxy.is_none() || admin.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(("proxy", url)) => proxy = Some(url),
                Ok((_, url)) => admin = Some(url),
                Err(_) => {
                    let _ = child.kill();
                    panic!(
                        "backstop did not start; logs:\n{}",
                        logs.lock().unwrap().join("\n")
                    );
                }
            }
        }
        let proxy = proxy.unwrap();
        let (scheme, addr) = proxy.split_once("://").unwrap();
        let scheme = if scheme == "https" { "https" } else { "http" };
        let admin = admin.unwrap();
        Backstop {
            child,
            dir,
            config_path,
            addr: addr.parse().unwrap(),
            admin: admin.trim_start_matches("http://").parse().unwrap(),
            scheme,
            logs,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{}", self.scheme, self.addr, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// Sends `request` as it is on a new connection and reads what comes
    /// back until the connection closes (or 5 s pass): for what a client
    /// library would not send.
    pub async fn raw(&self, request: &[u8]) -> String {
        let mut s = TcpStream::connect(self.addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    /// GET an admin path and parse its JSON answer.
    pub async fn admin_json(&self, path: &str) -> serde_json::Value {
        client()
            .get(self.admin_url(path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// One series' value in `/metrics` (0 when the line is absent).
    pub async fn metric(&self, series: &str) -> f64 {
        metric_value(&self.admin_text("/metrics").await, series)
    }

    /// GET an admin path and return its body as text.
    pub async fn admin_text(&self, path: &str) -> String {
        client()
            .get(self.admin_url(path))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// Resident memory of the process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    /// The most resident memory the process has had so far, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        self.status_kib("VmHWM:")
    }

    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// `kill -9`: no chance to flush anything.
    pub fn kill9(mut self) -> Arc<tempfile::TempDir> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.dir.clone()
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        wait_exit(&mut self.child, timeout)
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits until a log line contains `needle`.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.logs().contains(needle) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no log line with {needle:?}; logs:\n{}", self.logs());
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
}

impl Drop for Backstop {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn with_test_server(toml: &str, dir: &Path) -> String {
    let mut lines = Vec::new();
    let has = |key: &str| {
        toml.lines().any(|l| {
            l.trim_start().starts_with(&format!("{key} "))
                || l.trim_start().starts_with(&format!("{key}="))
        })
    };
    if !has("listen") {
        lines.push("listen = \"127.0.0.1:0\"".to_string());
    }
    if !has("admin_listen") {
        lines.push("admin_listen = \"127.0.0.1:0\"".to_string());
    }
    if !has("data_dir") {
        lines.push(format!("data_dir = {:?}", dir.join("data")));
    }
    let injected = lines.join("\n");
    if toml.contains("[server]") {
        toml.replacen("[server]", &format!("[server]\n{injected}"), 1)
    } else {
        format!("[server]\n{injected}\n\n{toml}")
    }
}

/// What a test backend saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub version: http::Version,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    /// For streamed bodies (`/stream-count...`): bytes counted, not kept.
    pub body_len: u64,
    /// The connection's remote address: one per upstream connection.
    pub peer: SocketAddr,
}

/// What a test backend answers.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    pub delay: Duration,
}

impl Reply {
    pub fn ok(body: &str) -> Reply {
        Reply::status(200).body(body.to_string())
    }
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: Bytes::new(),
            delay: Duration::ZERO,
        }
    }
    pub fn body(mut self, body: impl Into<Bytes>) -> Reply {
        self.body = body.into();
        self
    }
    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }
    pub fn delay(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }
}

type Handler = Arc<dyn Fn(&Seen) -> Reply + Send + Sync>;

/// A backend on a real socket that records every request and answers with
/// a handler (or a scripted sequence of replies).
pub struct Backend {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// Connections open now (HTTP/1 or HTTP/2).
    open: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Backend {
    pub async fn start(handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Backend {
        Self::start_with("127.0.0.1:0".parse().unwrap(), None, handler).await
    }

    /// Replies in order, then repeats the last one.
    pub async fn scripted(replies: Vec<Reply>) -> Backend {
        let queue = Mutex::new(VecDeque::from(replies));
        Self::start(move |_| {
            let mut q = queue.lock().unwrap();
            if q.len() > 1 {
                q.pop_front().unwrap()
            } else {
                q.front().cloned().unwrap_or(Reply::status(200))
            }
        })
        .await
    }

    /// An echo backend: answers 200 with the request body.
    pub async fn echo() -> Backend {
        Self::start(|seen| Reply::ok("").body(seen.body.clone())).await
    }

    /// A backend again where one was stopped (a backend coming back).
    pub async fn start_on(
        stopped: Stopped,
        handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static,
    ) -> Backend {
        let addr = stopped.addr;
        drop(stopped);
        Self::start_with(addr, None, handler).await
    }

    /// An HTTPS backend (ALPN h2 and http/1.1) with the given acceptor.
    pub async fn start_tls(
        acceptor: tokio_rustls::TlsAcceptor,
        handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static,
    ) -> Backend {
        Self::start_with("127.0.0.1:0".parse().unwrap(), Some(acceptor), handler).await
    }

    async fn start_with(
        addr: SocketAddr,
        tls: Option<tokio_rustls::TlsAcceptor>,
        handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static,
    ) -> Backend {
        let listener = bind_retrying(addr).await;
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let handler: Handler = Arc::new(handler);
        let log = seen.clone();
        let open = Arc::new(AtomicUsize::new(0));
        let open_count = open.clone();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    continue;
                };
                let handler = handler.clone();
                let log = log.clone();
                let tls = tls.clone();
                let open = OpenGuard::new(&open_count);
                connections.spawn(async move {
                    let _open = open;
                    let service = hyper::service::service_fn(move |req| {
                        let handler = handler.clone();
                        let log = log.clone();
                        async move { Ok::<_, Infallible>(serve(req, peer, handler, log).await) }
                    });
                    let builder = auto::Builder::new(TokioExecutor::new());
                    match tls {
                        None => {
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let _ = builder
                                    .serve_connection(TokioIo::new(stream), service)
                                    .await;
                            }
                        }
                    }
                });
            }
        });
        Backend {
            addr,
            seen,
            open,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn hits(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Stops accepting and drops every open connection; the address then
    /// refuses connections, and stays reserved for this test (see `Stopped`).
    pub async fn stop(mut self) -> Stopped {
        self.task.abort();
        // Cancelled, the task has dropped its listener.
        let _ = (&mut self.task).await;
        Stopped {
            addr: self.addr,
            _reserved: reserve(self.addr),
        }
    }

    pub async fn wait_for_hits(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.hits() < n {
            assert!(
                Instant::now() < deadline,
                "backend saw {} requests, wanted {n}",
                self.hits()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The address of a stopped backend, where nothing listens: connections are
/// refused. The port stays bound (not listening) while this lives, so that
/// no server another test starts meanwhile is given it (a "down" backend
/// that answers); `Backend::start_on` brings a backend back there.
pub struct Stopped {
    pub addr: SocketAddr,
    _reserved: Option<tokio::net::TcpSocket>,
}

/// Binds `addr` without listening. `None` when something else holds the
/// port already: between the listener's close and this bind, another test's
/// outgoing connection can be given the freed port as its own local port
/// (`AddrInUse` here was seen once in a CI dry run). That connection does
/// not listen either, so connections to `addr` are still refused, and no
/// server can bind the port while it lives.
fn reserve(addr: SocketAddr) -> Option<tokio::net::TcpSocket> {
    let socket = tokio::net::TcpSocket::new_v4().ok()?;
    socket.set_reuseaddr(true).ok()?;
    socket.bind(addr).ok()?;
    Some(socket)
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.addr.fmt(f)
    }
}

/// Counts a backend connection as open for as long as it lives (also when
/// its task is aborted).
struct OpenGuard(Arc<AtomicUsize>);

impl OpenGuard {
    fn new(count: &Arc<AtomicUsize>) -> OpenGuard {
        count.fetch_add(1, Ordering::SeqCst);
        OpenGuard(count.clone())
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A hand-written HTTP/1.1 backend for tests about upstream connections:
/// it answers every request head (no bodies) with `200 ok` on a kept-alive
/// connection, closes a connection that stays idle for `idle_close` (when
/// set) without saying so first, and counts connections.
pub struct RawBackend {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl RawBackend {
    pub async fn start(idle_close: Option<Duration>) -> RawBackend {
        RawBackend::serving(idle_close, false).await
    }

    /// Answers the second request on a connection with `408 Request
    /// Timeout` and closes it, as a server does whose idle timer fires
    /// just as that request comes (its 408 crossing the request).
    pub async fn timing_out_reuse() -> RawBackend {
        RawBackend::serving(None, true).await
    }

    async fn serving(idle_close: Option<Duration>, timeout_reuse: bool) -> RawBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let (accepted_count, open_count) = (accepted.clone(), open.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                accepted_count.fetch_add(1, Ordering::SeqCst);
                let open = OpenGuard::new(&open_count);
                tokio::spawn(async move {
                    let _open = open;
                    for served in 0.. {
                        let next = read_request_head(&mut conn);
                        let got = match idle_close {
                            Some(limit) => tokio::time::timeout(limit, next).await == Ok(true),
                            None => next.await,
                        };
                        let reply: &[u8] = if timeout_reuse && served == 1 {
                            b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
                        } else {
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                        };
                        if !got || conn.write_all(reply).await.is_err() || reply[9] == b'4' {
                            break;
                        }
                    }
                });
            }
        });
        RawBackend {
            addr,
            accepted,
            open,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one request head byte by byte; false at EOF or on an error.
async fn read_request_head(conn: &mut TcpStream) -> bool {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match conn.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return false,
        }
    }
    true
}

pub async fn bind_retrying(addr: SocketAddr) -> TcpListener {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("cannot bind {addr}: {e}"),
        }
    }
}

async fn serve(
    req: Request<Incoming>,
    peer: SocketAddr,
    handler: Handler,
    log: Arc<Mutex<Vec<Seen>>>,
) -> Response<Full<Bytes>> {
    let (parts, mut body) = req.into_parts();
    let counting = parts.uri.path().starts_with("/stream-count");
    let (bytes, len) = if counting {
        let mut n = 0u64;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => n += f.data_ref().map_or(0, |d| d.len() as u64),
                Err(_) => break,
            }
        }
        (Bytes::new(), n)
    } else {
        let b = body
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let n = b.len() as u64;
        (b, n)
    };
    let seen = Seen {
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        version: parts.version,
        headers: parts.headers,
        body: bytes,
        body_len: len,
        peer,
    };
    let reply = handler(&seen);
    log.lock().unwrap().push(seen);
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let mut response = Response::new(Full::new(reply.body));
    *response.status_mut() = http::StatusCode::from_u16(reply.status).unwrap();
    for (k, v) in reply.headers {
        response.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            http::HeaderValue::from_str(&v).unwrap(),
        );
    }
    response
}

/// A plain HTTP/1.1 client (no connection reuse surprises, no proxy).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// An HTTP/2 (prior knowledge, h2c) client.
pub fn h2_client() -> reqwest::Client {
    h2_client_giving_up_after(Duration::from_secs(30))
}

/// An HTTP/2 client that gives up after `timeout`: it resets its stream,
/// which cancels its request in Backstop (an HTTP/1 client's close does
/// not).
pub fn h2_client_giving_up_after(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .timeout(timeout)
        .build()
        .unwrap()
}

/// The JSON error object of a proxy-made answer.
pub async fn error_of(response: reqwest::Response) -> (u16, String, serde_json::Value) {
    let status = response.status().as_u16();
    let header = response
        .headers()
        .get("x-backstop-error")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let body: serde_json::Value = response.json().await.expect("JSON error body");
    (status, header, body["error"].clone())
}

/// The value of `series` (name and labels, exactly) in Prometheus text, or
/// 0 when the line is absent.
pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// The series of a turn gauge (`in_flight` or `waiting`, of
/// `upstream_max_conns`) for the target `upstream` (as configured, without a
/// path) of `route`.
pub fn turn_gauge(gauge: &str, route: &str, upstream: &str) -> String {
    format!("backstop_upstream_{gauge}{{route=\"{route}\",upstream=\"{upstream}/\"}}")
}

/// A hand-written backend that answers the requests it reads with `answers`
/// in turn (the last one again once they run out), whatever they say: they
/// need not be HTTP, nor end where they claim to. It keeps every connection
/// open until the other side closes it, as a stuck backend would, and
/// keeps the heads of the requests it read.
pub struct StuckBackend {
    pub url: String,
    heads: Arc<Mutex<Vec<String>>>,
}

impl StuckBackend {
    pub async fn start(answer: Vec<u8>) -> StuckBackend {
        StuckBackend::scripted(vec![answer]).await
    }

    pub async fn scripted(answers: Vec<Vec<u8>>) -> StuckBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let heads = Arc::new(Mutex::new(Vec::new()));
        let kept = heads.clone();
        let answers = Arc::new(answers);
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let (answers, kept) = (answers.clone(), kept.clone());
                tokio::spawn(async move { serve_stuck(conn, &answers, &kept).await });
            }
        });
        StuckBackend { url, heads }
    }

    pub fn requests(&self) -> usize {
        self.heads.lock().unwrap().len()
    }

    /// The heads of the requests read so far, lowercased.
    pub fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

/// Asserts that a replay's request head (lowercased) says it is attempt
/// `n`.
pub fn assert_replay_attempt(head: &str, n: u32) {
    assert!(
        head.contains(&format!("\r\nx-backstop-replay-attempt: {n}\r\n")),
        "not attempt {n}: {head}"
    );
}

/// Reads the next request on `conn` (head and `content-length` body), with
/// `wire` holding what was read past the previous one; its head, lowercased.
/// `None` once the connection ends.
pub async fn next_request(conn: &mut TcpStream, wire: &mut Vec<u8>) -> Option<String> {
    let mut buf = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(at) = wire.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        match conn.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => wire.extend_from_slice(&buf[..n]),
        }
    };
    let head = String::from_utf8_lossy(&wire[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap_or(0));
    while wire.len() < head_end + length {
        match conn.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => wire.extend_from_slice(&buf[..n]),
        }
    }
    wire.drain(..head_end + length);
    Some(head)
}

/// Reads requests (head and `content-length` body) and answers each.
async fn serve_stuck(mut conn: TcpStream, answers: &[Vec<u8>], heads: &Mutex<Vec<String>>) {
    let mut wire = Vec::new();
    while let Some(head) = next_request(&mut conn, &mut wire).await {
        let n = {
            let mut heads = heads.lock().unwrap();
            heads.push(head);
            heads.len() - 1
        };
        let answer = &answers[n.min(answers.len() - 1)];
        if conn.write_all(answer).await.is_err() {
            return;
        }
    }
}

/// Waits (20 s at most) until `/queue` shows `want` for `what`; the status.
pub async fn wait_queue(bs: &Backstop, what: &str, want: u64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let q: serde_json::Value = bs.admin_json("/queue").await;
        if q[what] == want {
            return q;
        }
        assert!(
            Instant::now() < deadline,
            "queue {what} never reached {want}: {q}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `backstop replay` process with its log in a file; killed on drop.
pub struct ReplayWorker {
    child: Child,
    log: PathBuf,
}

impl ReplayWorker {
    pub fn start(config: &Path, log: PathBuf) -> ReplayWorker {
        let child = Command::new(env!("CARGO_BIN_EXE_backstop"))
            .args(["replay", "-c"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        ReplayWorker { child, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then waits up to `timeout` for the exit; its exit code.
    pub fn stop_within(&mut self, timeout: Duration) -> Option<i32> {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM failed");
        wait_exit(&mut self.child, timeout)
    }
}

/// Waits up to `timeout` for `child` to exit; its exit code.
fn wait_exit(child: &mut Child, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

impl Drop for ReplayWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
