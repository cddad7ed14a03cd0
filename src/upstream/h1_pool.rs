//! Keep-alive HTTP/1.1 connections to plain `http://` targets.
//!
//! hyper-util's pooled client is general (any scheme, HTTP/2, proxies) and
//! pays for it on every request: the pool is a map keyed by scheme and
//! authority (formatted and hashed per request), checkout and check-in go
//! through several shared structures, and a connection that is not yet idle
//! again gets a task spawned to watch it. Here the route already knows which
//! target it picked, so each target just keeps a list of hyper's own
//! `client::conn::http1` senders: the profile showed this costing a third
//! fewer instructions per request than the general client (19.9k vs 31.8k in
//! the bare benchmark proxy). TLS and HTTP/2 targets stay on hyper-util's
//! client (see `Upstream`), where ALPN decides the protocol.
//!
//! A sender goes back on its target's list as soon as the response head is
//! in; hyper turns it ready again once the body has been read. A request
//! takes the most recently returned ready sender (so a burst's extra
//! connections age out), looking at no more than [`SCAN_LIMIT`] of them, or
//! opens a new connection through hyper-util's `HttpConnector` (DNS, connect
//! timeout, `TCP_NODELAY`). The limit keeps a checkout cheap when a target has
//! thousands of long-busy connections (streams, long polls): those sink to
//! the front of the list, where only the sweeper looks. A request that hyper
//! gives back unsent because its pooled connection had just closed is tried
//! on another, as hyper-util's client does.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderValue, CONNECTION, HOST};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::timeout_at;
use tower_service::Service;

use super::connect_within::ConnectWithin;
use super::h1_client::{self, IdleConns, MAX_BODY};
use crate::body::{RequestBody, UpstreamBody};
use crate::classify::{is_idempotent, Failure};
use crate::headers::{self, ProxySet};
use crate::upload;

/// How often idle connections are looked over for expiry: a quarter of the
/// idle timeout, between 100 ms and 5 s. The exchange's list counts a
/// connection's idle time from the first sweep that finds it idle, so one
/// closes between the timeout and the timeout plus two intervals after its
/// last use (at most 1.5 times a timeout of 0.4 to 20 s; 90–100 s by default).
fn sweep_interval(idle_timeout: Duration) -> Duration {
    (idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(5))
}

/// How many of a target's most recently returned connections a request
/// looks at for a ready one before it opens a new connection.
const SCAN_LIMIT: usize = 128;

/// The HTTP/1.1 connections of one route, per target index; `None` for a
/// target this pool does not serve (https, or the route speaks h2c).
pub struct H1Pool {
    shared: Arc<Shared>,
}

/// What bounds a pool's connections and the answers read from them.
#[derive(Clone, Copy, Debug)]
pub struct PoolLimits {
    pub connect_timeout: Duration,
    /// A connection unused for this long is closed.
    pub idle_timeout: Duration,
    /// At most this many idle connections are kept per target in each of
    /// its lists (the exchange's and hyper's); one more is closed.
    pub max_idle: usize,
    /// How long an answer's body may wait for more (`UpstreamBody`).
    pub stall_limit: Duration,
}

struct Shared {
    targets: Vec<Option<TargetConns>>,
    connector: ConnectWithin<HttpConnector>,
    limits: PoolLimits,
    sweeper: std::sync::Once,
}

/// One target's address and its connections (busy and idle).
struct TargetConns {
    /// What the connector dials: the target's scheme and authority.
    address: Uri,
    /// The `Host` header its requests carry unless the route sets one.
    host: HeaderValue,
    /// hyper's connections, for request bodies that stream.
    conns: Mutex<Vec<Conn>>,
    /// Idle connections of Backstop's own exchange (`h1_client`).
    idle: Arc<IdleConns>,
}

struct Conn {
    sender: SendRequest<RequestBody>,
    /// When the sender came back, or the sweeper last saw it busy: its idle
    /// time is counted from here (so a long response body does not count as
    /// idle time, give or take one sweep interval).
    returned_at: Instant,
}

impl Conn {
    /// Closed, or idle for longer than `idle_timeout`: to be dropped (which
    /// closes the connection).
    fn is_done(&self, now: Instant, idle_timeout: Duration) -> bool {
        self.sender.is_closed()
            || (self.sender.is_ready() && now.duration_since(self.returned_at) >= idle_timeout)
    }
}

impl H1Pool {
    /// A pool for the `http://` targets among `bases`; `None` when none is.
    pub fn new(bases: &[Uri], limits: PoolLimits) -> Option<Self> {
        let targets: Vec<Option<TargetConns>> = bases
            .iter()
            .map(|base| TargetConns::new(base, limits.max_idle))
            .collect();
        if targets.iter().all(Option::is_none) {
            return None;
        }
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(limits.connect_timeout));
        connector.set_nodelay(true);
        connector.set_keepalive(Some(super::TCP_KEEPALIVE));
        Some(H1Pool {
            shared: Arc::new(Shared {
                targets,
                connector: ConnectWithin::new(connector, limits.connect_timeout),
                limits,
                sweeper: std::sync::Once::new(),
            }),
        })
    }

    /// Whether requests to this target go through this pool.
    pub fn serves(&self, index: usize) -> bool {
        matches!(self.shared.targets.get(index), Some(Some(_)))
    }

    /// Sends `request` (with an absolute URI of target `index`) and returns
    /// the response head. Callers check `serves(index)` first. A buffered
    /// (or empty) body of at most [`MAX_BODY`] goes through Backstop's own
    /// exchange; a larger one, or one that streams from the client, goes
    /// through hyper's connection.
    pub async fn send(
        &self,
        index: usize,
        request: Request<RequestBody>,
        set: Option<&ProxySet>,
        deadline: Instant,
    ) -> Result<Response<UpstreamBody>, Failure> {
        let Some(Some(target)) = self.shared.targets.get(index) else {
            return Err(Failure::ConnectFailed);
        };
        let (mut parts, body) = request.into_parts();
        let request = match body {
            Either::Right(buffered) => {
                let body = full_bytes(buffered);
                if body.len() <= MAX_BODY {
                    let head = h1_client::Head {
                        method: &parts.method,
                        target: parts.uri.path_and_query().map_or("/", |p| p.as_str()),
                        headers: &parts.headers,
                        set,
                    };
                    return self.exchange_with(target, &head, &body, deadline).await;
                }
                // A large body goes the way that can take an early answer.
                Either::Right(Full::new(body))
            }
            streaming => streaming,
        };
        if let Some(set) = set {
            set.apply_to(&mut parts.headers);
        }
        let request = Request::from_parts(parts, request);
        let upload = upload::progress_of(&request);
        // Boxed: the rarer way, whose future would make every request's
        // future larger.
        let sent = Box::pin(upload::answer_by(
            self.send_hyper(target, request),
            deadline,
            upload.as_deref(),
        ))
        .await;
        match sent {
            Some(Ok(response)) => super::from_hyper(response, self.shared.limits.stall_limit),
            Some(Err(failure)) => Err(upload::blame(upload.as_deref(), failure)),
            None => Err(Failure::Timeout),
        }
    }

    /// Sends `head` and its buffered `body` (at most [`MAX_BODY`]) to target
    /// `index` through Backstop's own exchange, borrowing both: nothing of
    /// the request is built or moved. Callers check `serves(index)` first.
    pub async fn exchange(
        &self,
        index: usize,
        head: &h1_client::Head<'_>,
        body: &Bytes,
        deadline: Instant,
    ) -> Result<Response<UpstreamBody>, Failure> {
        match self.shared.targets.get(index) {
            Some(Some(target)) => self.exchange_with(target, head, body, deadline).await,
            _ => Err(Failure::ConnectFailed),
        }
    }

    /// The request on one of the target's idle connections (or a new one),
    /// exchanged in this future (`h1_client`), by `deadline`.
    async fn exchange_with(
        &self,
        target: &TargetConns,
        head: &h1_client::Head<'_>,
        body: &Bytes,
        deadline: Instant,
    ) -> Result<Response<UpstreamBody>, Failure> {
        let mut retried = false;
        loop {
            let pooled = if retried {
                None
            } else {
                target.idle.checkout()
            };
            let (conn, reused) = match pooled {
                Some(conn) => (conn, true),
                // Boxed: connecting is rare, and its future would make
                // every request's future larger.
                None => {
                    let connect = timeout_at(deadline.into(), self.connect_conn(target));
                    match Box::pin(connect).await {
                        Ok(conn) => (conn?, false),
                        // Still connecting at the attempt's deadline: a
                        // timeout, not a connect timeout — the deadline may
                        // be the client's retry deadline running out, which
                        // says nothing of the target (it is not skipped).
                        Err(_) => return Err(Failure::Timeout),
                    }
                }
            };
            let exchange = h1_client::exchange(
                conn,
                head,
                &target.host,
                body,
                &target.idle,
                deadline.into(),
            );
            match exchange.await {
                // A backend may say `408` with `Connection: close` as it
                // closes a kept-alive connection it found idle (Apache and
                // Node do), and the request met it on the way: that is no
                // answer to the request (nor the client's timeout), but
                // the close.
                Ok(response) if reused && is_idle_close(&response) => {
                    if retried || !is_idempotent(head.method) {
                        return Err(Failure::Reset);
                    }
                    tracing::debug!("pooled connection timed out by the backend; trying a new one");
                    retried = true;
                }
                Ok(response) => {
                    let stall_limit = self.shared.limits.stall_limit;
                    return Ok(response.map(|body| UpstreamBody::own(body, stall_limit)));
                }
                // A kept-alive connection that the backend closed while it
                // sat idle (its close still on the way when it was checked
                // out) answers nothing; an idempotent request goes again,
                // once, on a new connection.
                Err(failed)
                    if reused
                        && !failed.answered
                        && failed.failure != Failure::Timeout
                        && !retried
                        && is_idempotent(head.method) =>
                {
                    tracing::debug!("pooled connection closed before answering; trying a new one");
                    retried = true;
                }
                Err(failed) => return Err(failed.failure),
            }
        }
    }

    /// The request over hyper's HTTP/1.1 connection, which writes a body as
    /// it streams in (and can take an early answer meanwhile).
    async fn send_hyper(
        &self,
        target: &TargetConns,
        request: Request<RequestBody>,
    ) -> Result<Response<Incoming>, Failure> {
        let mut request = origin_form(request, &target.host);
        loop {
            let pooled = target.checkout(self.shared.limits.idle_timeout);
            let reused = pooled.is_some();
            let mut sender = match pooled {
                Some(sender) => sender,
                None => self.connect(target).await?,
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    // With keep-alive off (`max_idle` 0) the sender is
                    // dropped: its connection closes after the answer.
                    if self.shared.limits.max_idle > 0 {
                        target.check_in(sender);
                    }
                    return Ok(response);
                }
                Err(mut e) => match e.take_message() {
                    // The pooled connection closed before the request was
                    // written: nothing reached the backend, try another.
                    Some(unsent) if reused => {
                        tracing::debug!(error = %e.error(), "pooled connection closed; trying another");
                        request = unsent;
                    }
                    Some(_) => return Err(Failure::ConnectFailed),
                    None => {
                        tracing::debug!(error = %super::ErrorChain(e.error()), "upstream attempt failed");
                        return Err(Failure::from_exchange_error(e.error()));
                    }
                },
            }
        }
    }

    /// A new connection to the target, as a plain socket for `h1_client`.
    async fn connect_conn(&self, target: &TargetConns) -> Result<Box<h1_client::Conn>, Failure> {
        let io = self.connect_io(target).await?;
        Ok(h1_client::Conn::new(io.into_inner()))
    }

    /// Connects (DNS and connect within the connect timeout, `TCP_NODELAY`,
    /// TCP keep-alive) and starts the sweeper
    /// with the first connection.
    async fn connect_io(&self, target: &TargetConns) -> Result<TokioIo<TcpStream>, Failure> {
        self.start_sweeper();
        // `HttpConnector` is always ready (its resolver is), so `call`
        // needs no `poll_ready` first.
        let mut connector = self.shared.connector.clone();
        connector.call(target.address.clone()).await.map_err(|e| {
            let failure = Failure::from_connect_error(e.as_ref());
            tracing::debug!(error = %super::ErrorChain(e.as_ref()), ?failure, "upstream connect failed");
            failure
        })
    }

    async fn connect(&self, target: &TargetConns) -> Result<SendRequest<RequestBody>, Failure> {
        let io = self.connect_io(target).await?;
        let (sender, connection) = http1::handshake(io).await.map_err(|e| {
            tracing::debug!(error = %e, "upstream handshake failed");
            Failure::ConnectFailed
        })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// Closes connections idle for longer than the idle timeout, even when
    /// no request comes to notice: started with the first connection (there
    /// is a runtime then), it ends when the pool is dropped (route reload).
    fn start_sweeper(&self) {
        self.shared.sweeper.call_once(|| {
            let weak: Weak<Shared> = Arc::downgrade(&self.shared);
            let every = sweep_interval(self.shared.limits.idle_timeout);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tick.tick().await;
                    let Some(shared) = weak.upgrade() else { break };
                    let now = Instant::now();
                    let limits = &shared.limits;
                    for target in shared.targets.iter().flatten() {
                        target.sweep(now, limits);
                        target.idle.sweep(now, limits.idle_timeout);
                    }
                }
            });
        });
    }
}

impl TargetConns {
    fn new(base: &Uri, max_idle: usize) -> Option<TargetConns> {
        if base.scheme_str() != Some("http") {
            return None;
        }
        let authority = base.authority()?;
        // As hyper-util writes it: the port only when it is not the default.
        let host = match authority.port_u16() {
            Some(80) => HeaderValue::from_str(authority.host()),
            _ => HeaderValue::from_str(authority.as_str()),
        }
        .ok()?;
        let address = Uri::builder()
            .scheme("http")
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .ok()?;
        Some(TargetConns {
            address,
            host,
            conns: Mutex::new(Vec::new()),
            idle: Arc::new(IdleConns::new(max_idle)),
        })
    }

    /// The most recently returned ready sender among the last
    /// [`SCAN_LIMIT`], dropping closed and expired ones on the way.
    fn checkout(&self, idle_timeout: Duration) -> Option<SendRequest<RequestBody>> {
        let mut conns = self.lock();
        let mut i = conns.len();
        let stop = i.saturating_sub(SCAN_LIMIT);
        while i > stop {
            i -= 1;
            let sender = &conns[i].sender;
            if !sender.is_ready() && !sender.is_closed() {
                continue; // busy
            }
            let conn = conns.remove(i);
            if !conn.is_done(Instant::now(), idle_timeout) {
                return Some(conn.sender);
            }
        }
        None
    }

    fn check_in(&self, sender: SendRequest<RequestBody>) {
        let conn = Conn {
            sender,
            returned_at: Instant::now(),
        };
        self.lock().push(conn);
    }

    /// Drops closed and expired connections, and idle ones beyond
    /// `max_idle` (the earliest returned first); moves the busy ones to the
    /// front (in their order), so that idle ones come back within a
    /// checkout's [`SCAN_LIMIT`] even behind many long-busy ones. (A sender
    /// comes back here busy, with its answer's head, so its list is bounded
    /// here rather than at check-in.)
    fn sweep(&self, now: Instant, limits: &PoolLimits) {
        let mut conns = self.lock();
        let (mut busy, mut idle): (Vec<Conn>, Vec<Conn>) = std::mem::take(&mut *conns)
            .into_iter()
            .filter(|c| !c.is_done(now, limits.idle_timeout))
            .partition(|c| !c.sender.is_ready());
        idle.drain(..idle.len().saturating_sub(limits.max_idle));
        for conn in &mut busy {
            conn.returned_at = now;
        }
        busy.extend(idle);
        *conns = busy;
    }

    /// The list stays usable after a panic elsewhere: it holds no invariant
    /// a half-done update could break.
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Conn>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The bytes of a buffered body (`Full` yields them at once, whole).
fn full_bytes(mut body: Full<Bytes>) -> Bytes {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::Pin::new(&mut body).poll_frame(&mut cx) {
        std::task::Poll::Ready(Some(Ok(frame))) => frame.into_data().unwrap_or_default(),
        _ => Bytes::new(),
    }
}

/// An HTTP/1.1 connection to a known target takes the path only, and the
/// `Host` header in place of the authority.
fn origin_form(request: Request<RequestBody>, host: &HeaderValue) -> Request<RequestBody> {
    let (mut parts, body) = request.into_parts();
    let path = std::mem::take(&mut parts.uri).into_parts().path_and_query;
    parts.uri = path.map_or_else(|| Uri::from_static("/"), Uri::from);
    parts.headers.entry(HOST).or_insert_with(|| host.clone());
    Request::from_parts(parts, body)
}

/// A `408 Request Timeout` that closes the connection (`Connection:
/// close`, or HTTP/1.0): what a backend sends as it closes a kept-alive
/// connection it found idle.
fn is_idle_close<B>(response: &Response<B>) -> bool {
    let closes = || {
        response.version() == Version::HTTP_10
            || response
                .headers()
                .get_all(CONNECTION)
                .iter()
                .any(|v| headers::has_token(v, "close"))
    };
    response.status() == StatusCode::REQUEST_TIMEOUT && closes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::BufferedBody;
    use futures_util::FutureExt;
    use http::Method;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    const SECOND: Duration = Duration::from_secs(1);

    fn limits() -> PoolLimits {
        PoolLimits {
            connect_timeout: SECOND,
            idle_timeout: SECOND,
            max_idle: 8,
            stall_limit: Duration::from_secs(60),
        }
    }

    /// Reads one request head (the test sends no bodies); `None` at EOF.
    async fn read_head(stream: &mut TcpStream) -> Option<String> {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if stream.read(&mut byte).await.ok()? == 0 {
                return None;
            }
            head.push(byte[0]);
        }
        Some(String::from_utf8_lossy(&head).into_owned())
    }

    /// A listener standing in for the backend, and a pool to it alone.
    async fn pool_to_listener(idle_timeout: Duration) -> (TcpListener, Uri, H1Pool) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base: Uri = format!("http://{}/", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let limits = PoolLimits {
            idle_timeout,
            ..limits()
        };
        let pool = H1Pool::new(std::slice::from_ref(&base), limits).unwrap();
        (listener, base, pool)
    }

    fn only_target(pool: &H1Pool) -> &TargetConns {
        pool.shared.targets[0].as_ref().unwrap()
    }

    fn get(base: &Uri, path: &str) -> Request<RequestBody> {
        let mut request = Request::new(BufferedBody::default().to_request_body());
        *request.uri_mut() = format!("{base}{}", &path[1..]).parse().unwrap();
        request
    }

    #[tokio::test]
    async fn reuses_a_connection_and_closes_it_once_idle_too_long() {
        let (listener, base, pool) = pool_to_listener(Duration::from_millis(200)).await;

        let send = |path: &'static str| {
            let request = get(&base, path);
            let pool = &pool;
            async move {
                let response = pool.send(0, request, None, far()).await.unwrap();
                assert_eq!(response.status(), 200);
                http_body_util::BodyExt::collect(response.into_body())
                    .await
                    .unwrap();
            }
        };
        let backend = async {
            let (mut conn, _) = listener.accept().await.unwrap();
            for _ in 0..2 {
                let head = read_head(&mut conn).await.unwrap();
                assert!(head.starts_with("GET /p HTTP/1.1\r\n"), "{head}");
                assert!(head.to_ascii_lowercase().contains("\r\nhost: 127.0.0.1:"));
                conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await
                    .unwrap();
            }
            conn
        };
        let client = async {
            send("/p").await;
            send("/p").await;
        };
        let both = async { tokio::join!(backend, client) };
        let (mut conn, ()) = tokio::time::timeout(Duration::from_secs(5), both)
            .await
            .expect("the second request reused the first connection");
        let idle = &only_target(&pool).idle;
        assert_eq!(idle.len(), 1);

        // A sweep starts the idle clock (this one, or the sweeper task's
        // first, moments ago); one a timeout later closes the connection.
        let now = Instant::now();
        idle.sweep(now, pool.shared.limits.idle_timeout);
        assert_eq!(idle.len(), 1, "idle for less than the timeout");
        idle.sweep(
            now + Duration::from_millis(250),
            pool.shared.limits.idle_timeout,
        );
        assert_eq!(idle.len(), 0);
        let closed = tokio::time::timeout(Duration::from_secs(2), read_head(&mut conn)).await;
        assert_eq!(closed, Ok(None), "the expired connection is closed");
    }

    #[test]
    fn sweeps_come_four_times_per_idle_timeout_within_bounds() {
        let ms = Duration::from_millis;
        assert_eq!(
            sweep_interval(Duration::from_secs(90)),
            Duration::from_secs(5)
        );
        assert_eq!(
            sweep_interval(Duration::from_secs(8)),
            Duration::from_secs(2)
        );
        assert_eq!(sweep_interval(ms(300)), ms(100));
    }

    #[tokio::test]
    async fn a_sweep_moves_busy_connections_in_front_of_idle_ones() {
        let (listener, base, pool) = pool_to_listener(Duration::from_secs(60)).await;
        // Two connections: the first answers whole, the second sends a head
        // and only part of its body, so it stays busy.
        let backend = async {
            let mut conns = Vec::new();
            for reply in [
                &b"content-length: 2\r\n\r\nok"[..],
                b"content-length: 9\r\n\r\npart",
            ] {
                let (mut conn, _) = listener.accept().await.unwrap();
                read_head(&mut conn).await.unwrap();
                conn.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
                conn.write_all(reply).await.unwrap();
                conns.push(conn);
            }
            conns
        };
        let client = async {
            let target = only_target(&pool);
            let first = pool.send_hyper(target, get(&base, "/whole")).await.unwrap();
            http_body_util::BodyExt::collect(first.into_body())
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            let idle = target.checkout(Duration::from_secs(60)).unwrap();
            // The second request checks out first (finding nothing, so it
            // connects); the idle one goes back before its head arrives.
            let second = pool.send_hyper(target, get(&base, "/partial"));
            tokio::pin!(second);
            assert!(second.as_mut().now_or_never().is_none());
            target.check_in(idle);
            second.await.unwrap()
        };
        let both = async { tokio::join!(backend, client) };
        // Both sockets and the unfinished response stay open until the end.
        let (_sockets, _unfinished) = tokio::time::timeout(Duration::from_secs(5), both)
            .await
            .unwrap();
        let target = only_target(&pool);
        let ready = |t: &TargetConns| -> Vec<bool> {
            t.lock().iter().map(|c| c.sender.is_ready()).collect()
        };
        assert_eq!(
            ready(target),
            [true, false],
            "the idle one behind the busy one"
        );
        target.sweep(Instant::now(), &pool.shared.limits);
        assert_eq!(ready(target), [false, true], "busy ones moved to the front");
        // The idle one is what the next checkout finds.
        let idle = target.checkout(Duration::from_secs(60)).unwrap();
        assert_eq!(ready(target), [false]);
        // Beyond `max_idle`, a sweep drops idle connections, never busy ones.
        target.check_in(idle);
        let no_idle = PoolLimits {
            max_idle: 0,
            ..pool.shared.limits
        };
        target.sweep(Instant::now(), &no_idle);
        assert_eq!(ready(target), [false]);
    }

    /// A backend that answers each request on its connections with the
    /// next reply of `script`, written in the pieces given (a reply of no
    /// pieces closes the connection instead), and returns the request heads
    /// it saw per connection.
    async fn scripted_backend(
        listener: TcpListener,
        script: Vec<Vec<&'static [u8]>>,
    ) -> Vec<Vec<String>> {
        let mut replies = script.into_iter();
        let mut seen = Vec::new();
        'conns: while replies.len() > 0 {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut heads = Vec::new();
            loop {
                let Some(head) = read_head(&mut conn).await else {
                    seen.push(heads);
                    continue 'conns;
                };
                heads.push(head);
                let Some(reply) = replies.next() else { break };
                if reply.is_empty() {
                    break;
                }
                for piece in reply {
                    conn.write_all(piece).await.unwrap();
                    conn.flush().await.unwrap();
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                if replies.len() == 0 {
                    break;
                }
            }
            seen.push(heads);
        }
        seen
    }

    /// Runs the backend and the client side by side, within 5 s.
    async fn both<B: std::future::Future, C: std::future::Future>(
        backend: B,
        client: C,
    ) -> (B::Output, C::Output) {
        tokio::time::timeout(Duration::from_secs(5), async {
            tokio::join!(backend, client)
        })
        .await
        .expect("backend and client done within 5 s")
    }

    /// A pool to a backend that follows `script` (see `scripted_backend`).
    async fn scripted_pool(
        script: Vec<Vec<&'static [u8]>>,
    ) -> (
        H1Pool,
        Uri,
        impl std::future::Future<Output = Vec<Vec<String>>>,
    ) {
        let (listener, base, pool) = pool_to_listener(Duration::from_secs(60)).await;
        (pool, base, scripted_backend(listener, script))
    }

    async fn body_text(response: Response<UpstreamBody>) -> String {
        let bytes = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap()
            .to_bytes();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn request(base: &Uri, method: Method, path: &str) -> Request<RequestBody> {
        let mut request = get(base, path);
        *request.method_mut() = method;
        request
    }

    #[tokio::test]
    async fn decodes_chunked_bodies_split_anywhere_and_reuses_the_connection() {
        let (pool, base, backend) = scripted_pool(vec![
            vec![
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r",
                b"\nhel",
                b"lo\r\n7\r\n, world\r\n0\r\nx-trailer: t\r\n",
                b"\r\n",
            ],
            vec![b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nab", b"c"],
        ])
        .await;
        let client = async {
            let first = pool
                .send(0, get(&base, "/chunked"), None, far())
                .await
                .unwrap();
            assert_eq!(body_text(first).await, "hello, world");
            let second = pool
                .send(0, get(&base, "/length"), None, far())
                .await
                .unwrap();
            assert_eq!(body_text(second).await, "abc");
        };
        let (seen, ()) = both(backend, client).await;
        assert_eq!(seen.len(), 1, "one connection for both: {seen:?}");
        assert_eq!(only_target(&pool).idle.len(), 1);
    }

    #[tokio::test]
    async fn skips_interim_answers_and_frames_bodiless_ones() {
        let (pool, base, backend) = scripted_pool(vec![
            vec![
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok",
            ],
            // HEAD: a length, but no body follows.
            vec![b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n"],
            vec![b"HTTP/1.1 204 No Content\r\n\r\n"],
            vec![b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n!"],
        ])
        .await;
        let client = async {
            let created = pool
                .send(0, request(&base, Method::POST, "/c"), None, far())
                .await
                .unwrap();
            assert_eq!(created.status(), 201);
            assert_eq!(body_text(created).await, "ok");
            let head = pool
                .send(0, request(&base, Method::HEAD, "/h"), None, far())
                .await
                .unwrap();
            assert_eq!(head.headers()["content-length"], "10");
            assert_eq!(body_text(head).await, "");
            let none = pool.send(0, get(&base, "/n"), None, far()).await.unwrap();
            assert_eq!(none.status(), 204);
            assert_eq!(body_text(none).await, "");
            let last = pool.send(0, get(&base, "/l"), None, far()).await.unwrap();
            assert_eq!(body_text(last).await, "!");
        };
        let (seen, ()) = both(backend, client).await;
        assert_eq!(seen.len(), 1, "all on one connection: {seen:?}");
        let heads = &seen[0];
        assert!(heads[0].starts_with("POST /c HTTP/1.1\r\n"), "{}", heads[0]);
        assert!(
            heads[0].contains("\r\ncontent-length: 0\r\n"),
            "{}",
            heads[0]
        );
        assert!(heads[1].starts_with("HEAD /h HTTP/1.1\r\n"), "{}", heads[1]);
        assert!(!heads[2].contains("content-length"), "{}", heads[2]);
    }

    #[tokio::test]
    async fn a_body_until_close_is_read_whole_and_its_connection_not_reused() {
        let (listener, base, pool) = pool_to_listener(Duration::from_secs(60)).await;
        let backend = async {
            let (mut conn, _) = listener.accept().await.unwrap();
            read_head(&mut conn).await.unwrap();
            conn.write_all(b"HTTP/1.1 200 OK\r\n\r\nall of ")
                .await
                .unwrap();
            conn.write_all(b"it").await.unwrap();
            drop(conn);
        };
        let client = async {
            let response = pool
                .send(0, get(&base, "/close"), None, far())
                .await
                .unwrap();
            body_text(response).await
        };
        let ((), text) = both(backend, client).await;
        assert_eq!(text, "all of it");
        assert_eq!(only_target(&pool).idle.len(), 0);
    }

    #[tokio::test]
    async fn a_connection_closed_unanswered_is_retried_only_when_idempotent() {
        let (listener, base, pool) = pool_to_listener(Duration::from_secs(60)).await;
        let ok: &'static [u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        // Connection 1 answers once, then closes on the next request
        // unanswered, as a backend closing an idle connection does when a
        // request crosses its close; connection 2 answers the GET again and
        // closes on the POST the same way.
        let backend = scripted_backend(listener, vec![vec![ok], vec![], vec![ok], vec![]]);
        let client = async {
            let first = pool.send(0, get(&base, "/a"), None, far()).await.unwrap();
            assert_eq!(body_text(first).await, "ok");
            let again = pool.send(0, get(&base, "/b"), None, far()).await.unwrap();
            assert_eq!(body_text(again).await, "ok", "retried on a new connection");
            let post = pool
                .send(0, request(&base, Method::POST, "/c"), None, far())
                .await;
            assert_eq!(post.err(), Some(Failure::Reset), "a POST is not sent twice");
        };
        let (seen, ()) = both(backend, client).await;
        let paths: Vec<Vec<&str>> = seen
            .iter()
            .map(|heads| {
                heads
                    .iter()
                    .map(|h| h.split(' ').nth(1).unwrap_or(""))
                    .collect()
            })
            .collect();
        assert_eq!(paths, [vec!["/a", "/b"], vec!["/b", "/c"]]);
    }

    /// A deadline no test reaches.
    fn far() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    #[tokio::test]
    async fn an_attempt_past_its_deadline_times_out_and_its_connection_is_dropped() {
        let (listener, base, pool) = pool_to_listener(Duration::from_secs(60)).await;
        // Connection 1 answers the first request and then holds the second
        // unanswered; connection 2 answers the third.
        let backend = async {
            let (mut first, _) = listener.accept().await.unwrap();
            read_head(&mut first).await.unwrap();
            first
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await
                .unwrap();
            let held = read_head(&mut first).await.unwrap();
            let (mut second, _) = listener.accept().await.unwrap();
            let third = read_head(&mut second).await.unwrap();
            second
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await
                .unwrap();
            (held, third, first)
        };
        let client = async {
            let first = pool.send(0, get(&base, "/a"), None, far()).await.unwrap();
            assert_eq!(body_text(first).await, "ok");
            // The connection's timer was set far ahead; this deadline is
            // nearer, so the timer must move back, not only forward.
            let started = Instant::now();
            let late = pool
                .send(
                    0,
                    get(&base, "/b"),
                    None,
                    started + Duration::from_millis(200),
                )
                .await;
            let waited = started.elapsed();
            assert_eq!(late.err(), Some(Failure::Timeout));
            assert!(
                waited >= Duration::from_millis(150) && waited < Duration::from_secs(2),
                "{waited:?}"
            );
            assert_eq!(only_target(&pool).idle.len(), 0, "not kept for reuse");
            let third = pool.send(0, get(&base, "/c"), None, far()).await.unwrap();
            assert_eq!(body_text(third).await, "ok");
        };
        let ((held, third, _first), ()) = both(backend, client).await;
        assert!(held.starts_with("GET /b "), "{held}");
        assert!(third.starts_with("GET /c "), "{third}");
    }

    #[tokio::test]
    async fn answers_that_cannot_be_framed_are_failures() {
        for reply in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            b"NOT HTTP\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n",
        ] {
            let (pool, base, backend) = scripted_pool(vec![vec![reply]]).await;
            let client = pool.send(0, get(&base, "/bad"), None, far());
            let (_, result) = both(backend, client).await;
            assert_eq!(
                result.err(),
                Some(Failure::InvalidResponse),
                "{}",
                String::from_utf8_lossy(reply)
            );
        }
    }

    #[tokio::test]
    async fn an_answer_framed_both_ways_is_read_chunked_and_its_connection_closed() {
        let (pool, base, backend) = scripted_pool(
            vec![vec![
                b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            ]],
        ).await;
        let client = async {
            let response = pool
                .send(0, get(&base, "/both"), None, far())
                .await
                .unwrap();
            let length = response.headers().get("content-length").cloned();
            (length, body_text(response).await)
        };
        let (_, (length, text)) = both(backend, client).await;
        assert_eq!(length, None, "the stale length is not passed on");
        assert_eq!(text, "ok");
        assert_eq!(only_target(&pool).idle.len(), 0);
    }

    #[tokio::test]
    async fn a_broken_chunked_body_is_an_error_not_an_end() {
        let (pool, base, backend) = scripted_pool(vec![vec![
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        ]])
        .await;
        let client = async {
            let response = pool
                .send(0, get(&base, "/broken"), None, far())
                .await
                .unwrap();
            http_body_util::BodyExt::collect(response.into_body())
                .await
                .is_err()
        };
        let (_, failed) = both(backend, client).await;
        assert!(failed);
        assert_eq!(only_target(&pool).idle.len(), 0);
    }

    #[test]
    fn serves_plain_http_targets_only() {
        let bases: Vec<Uri> = ["https://a", "http://b:8080/v1", "http://c:80"]
            .iter()
            .map(|u| u.parse().unwrap())
            .collect();
        let pool = H1Pool::new(&bases, limits()).unwrap();
        assert!(!pool.serves(0));
        assert!(pool.serves(1));
        let host = |i: usize| pool.shared.targets[i].as_ref().unwrap().host.clone();
        assert_eq!(host(1), "b:8080");
        assert_eq!(
            host(2),
            "c",
            "the default port is left out, as hyper-util does"
        );
        assert!(H1Pool::new(&bases[..1], limits()).is_none());
    }
}
