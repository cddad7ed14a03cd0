//! Outbound forward proxies (`[outbound_proxies]` or `PROXY_URLS`) for
//! routes with `proxy.use_proxy`: one pooled client per proxy, rotated round
//! robin, a proxy that fails to connect skipped for a while.
//!
//! `http://` targets are sent in absolute form to the proxy (with
//! `Proxy-Authorization` on each request); `https://` targets go through a
//! `CONNECT` tunnel (authorised on the tunnel only, so the target never sees
//! the proxy's credentials) and TLS runs end to end inside it.
//!
//! Proxy credentials live only in the `Proxy-Authorization` value: this
//! module never logs, formats or returns them — a proxy is named by its
//! `host:port` alone.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use base64::Engine;
use http::header::{HeaderValue, PROXY_AUTHORIZATION};
use http::{Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::balance::fair_turn;
use super::connect_within::ConnectWithin;
use super::{tls, ErrorChain};
use crate::body::RequestBody;
use crate::classify::Failure;
use crate::config::{ProxyConfig, ProxyStrategy, RouteConfig, ServerConfig};
use crate::upload;

/// How long a proxy that could not be reached is skipped.
const EJECT_FOR: Duration = Duration::from_secs(10);
/// The longest `CONNECT` answer head we read.
const MAX_CONNECT_HEAD: usize = 8 * 1024;

/// Where one attempt goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Direct,
    /// The pool's proxy with this index.
    Proxy(usize),
}

/// Picks the way for one attempt: `round_robin` sends every attempt through
/// the next proxy; `on_rate_limit` goes direct until the target answered
/// 429 to this request, then through a proxy.
pub fn choose(pool: Option<&ProxyPool>, config: &ProxyConfig, saw_429: bool) -> Via {
    let Some(pool) = pool else {
        return Via::Direct;
    };
    match config.strategy {
        ProxyStrategy::RoundRobin => Via::Proxy(pool.pick()),
        ProxyStrategy::OnRateLimit if saw_429 => Via::Proxy(pool.pick()),
        ProxyStrategy::OnRateLimit | ProxyStrategy::Never => Via::Direct,
    }
}

struct OutboundProxy {
    /// `host:port`, for logs (never the credentials).
    name: String,
    auth: Option<HeaderValue>,
    client: Client<ConnectWithin<HttpsConnector<ProxyConnector>>, RequestBody>,
    /// Milliseconds since the pool's epoch before which it is skipped.
    ejected_until_ms: AtomicU64,
}

impl OutboundProxy {
    /// Not skipped at `ms` (since the pool's epoch).
    fn usable_at(&self, ms: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) <= ms
    }

    /// An answer came through it: it works again, whatever its last
    /// failure said (with every proxy skipped, one is tried anyway, and
    /// the one that answers should not wait out the rest of its skip).
    fn restore(&self) {
        if self.ejected_until_ms.load(Ordering::Relaxed) != 0 {
            self.ejected_until_ms.store(0, Ordering::Relaxed);
        }
    }
}

/// A route's outbound proxies.
pub struct ProxyPool {
    proxies: Vec<OutboundProxy>,
    next: AtomicUsize,
    epoch: Instant,
}

impl ProxyPool {
    /// The pool of a route, or `None` when the route does not use proxies.
    pub fn build(
        urls: &[String],
        route: &RouteConfig,
        server: &ServerConfig,
    ) -> Result<Option<ProxyPool>, String> {
        if !route.proxy.use_proxy || route.proxy.strategy == ProxyStrategy::Never || urls.is_empty()
        {
            return Ok(None);
        }
        let mut proxies = Vec::with_capacity(urls.len());
        for (i, url) in urls.iter().enumerate() {
            let (host, port, auth) = parse_proxy_url(url)
                .ok_or_else(|| format!("outbound proxy {i} is not a valid URL"))?;
            let connector = ProxyConnector {
                host: host.clone(),
                port,
                auth: auth.clone(),
                connect_timeout: server.connect_timeout,
            };
            let tls = tls::client_config(route.tls_ca_file.as_deref(), route.tls_verify)?;
            let https = HttpsConnectorBuilder::new()
                .with_tls_config(tls)
                .https_or_http()
                .enable_all_versions()
                .wrap_connector(connector);
            let mut builder = Client::builder(TokioExecutor::new());
            builder
                .pool_idle_timeout(server.upstream_idle_timeout)
                .pool_max_idle_per_host(server.upstream_max_idle)
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new());
            super::ping_http2_connections(&mut builder);
            // The proxy's TCP connect and its tunnel have their own limits
            // (a proxy's failure, not the target's); this one, over all three
            // steps, ends a TLS handshake through the tunnel that stalls: the
            // proxy reached the target, so that is the target's failure, as
            // it is without a proxy.
            let set_up_limit = server.connect_timeout.saturating_mul(3);
            proxies.push(OutboundProxy {
                name: format!("{host}:{port}"),
                auth,
                client: builder.build(ConnectWithin::new(https, set_up_limit)),
                ejected_until_ms: AtomicU64::new(0),
            });
        }
        Ok(Some(ProxyPool {
            proxies,
            next: AtomicUsize::new(0),
            epoch: Instant::now(),
        }))
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The next proxy in turn that is not skipped; when all are, the next
    /// one anyway (better to try than to refuse).
    pub fn pick(&self) -> usize {
        let n = self.proxies.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let now = self.now_ms();
        fair_turn(n, start, |i| self.proxies[i].usable_at(now)).unwrap_or(start % n)
    }

    /// Whether some proxy will not be skipped `after` this long (a retry's
    /// backoff): when none will, a retry after a proxy's failure would only
    /// meet a proxy known to fail.
    pub fn any_usable_after(&self, after: Duration) -> bool {
        let after = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
        let then = self.now_ms().saturating_add(after);
        self.proxies.iter().any(|p| p.usable_at(then))
    }

    /// Skips a proxy that could not be reached (or refused the tunnel).
    pub fn eject(&self, index: usize) {
        if let Some(p) = self.proxies.get(index) {
            let now = self.now_ms();
            let until = now + EJECT_FOR.as_millis() as u64;
            let was_until = p.ejected_until_ms.swap(until, Ordering::Relaxed);
            // Once per failing spell: with every proxy down, each request
            // still tries one and would log a line.
            if was_until <= now {
                tracing::warn!(proxy = %p.name, "outbound proxy failed; skipping it for {EJECT_FOR:?}");
            }
        }
    }

    /// Sends one attempt through proxy `index`, waiting until `deadline` at
    /// most for the response head.
    pub async fn send(
        &self,
        index: usize,
        mut request: Request<RequestBody>,
        deadline: std::time::Instant,
    ) -> Result<Response<Incoming>, Failure> {
        let Some(proxy) = self.proxies.get(index) else {
            return Err(Failure::ConnectFailed);
        };
        // Absolute form: the proxy reads the credentials from each request.
        // Over a tunnel they were on the CONNECT and must not reach the target.
        let absolute_form = request.uri().scheme_str() == Some("http");
        if absolute_form {
            if let Some(auth) = &proxy.auth {
                request
                    .headers_mut()
                    .insert(PROXY_AUTHORIZATION, auth.clone());
            }
        }
        let upload = upload::progress_of(&request);
        match upload::answer_by(proxy.client.request(request), deadline, upload.as_deref()).await {
            // The proxy's own refusal, not the backend's answer (a `CONNECT`'s
            // is found by the connector): the request went no further.
            Some(Ok(response))
                if absolute_form
                    && response.status() == StatusCode::PROXY_AUTHENTICATION_REQUIRED =>
            {
                tracing::warn!(proxy = %proxy.name, "the outbound proxy asks for credentials (407): check the user and password in its URL");
                Err(Failure::ProxyFailed)
            }
            Some(Ok(response)) => {
                proxy.restore();
                Ok(response)
            }
            Some(Err(e)) => {
                let failure = if e.is_connect() && proxy_at_fault(&e) {
                    Failure::ProxyFailed
                } else {
                    upload::blame(upload.as_deref(), Failure::from_client_error(&e))
                };
                tracing::debug!(proxy = %proxy.name, error = %ErrorChain(&e), ?failure, "attempt through proxy failed");
                Err(failure)
            }
            None => Err(Failure::Timeout),
        }
    }
}

/// `http://[user:pass@]host[:port]` → host, port, `Basic` credentials
/// (the scheme in any case, as URLs allow). `check` validates the
/// configured URLs with this function, so a URL it passed always builds.
pub(crate) fn parse_proxy_url(url: &str) -> Option<(String, u16, Option<HeaderValue>)> {
    let scheme = url.get(..7)?;
    if !scheme.eq_ignore_ascii_case("http://") {
        return None;
    }
    let authority = url[7..].split('/').next()?;
    let (userinfo, hostport) = match authority.rfind('@') {
        Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
        None => (None, authority),
    };
    if !super::port_is_valid(hostport.as_bytes()) {
        return None;
    }
    let uri: Uri = format!("http://{hostport}/").parse().ok()?;
    let host = uri.host().filter(|h| !h.is_empty())?;
    let host = host.trim_matches(['[', ']']).to_string();
    let port = uri.port_u16().unwrap_or(80);
    let auth = match userinfo {
        Some(info) => {
            // `%XX` escapes: a password may contain `@` or `:`. A user
            // without a password (a provider's token) is `token:`, as
            // Basic requires and curl sends.
            let mut decoded: Vec<u8> = percent_encoding::percent_decode_str(info).collect();
            if !info.contains(':') {
                decoded.push(b':');
            }
            let token = base64::engine::general_purpose::STANDARD.encode(decoded);
            let mut value = HeaderValue::from_str(&format!("Basic {token}")).ok()?;
            value.set_sensitive(true);
            Some(value)
        }
        None => None,
    };
    Some((host, port, auth))
}

/// Connects to the proxy; for `https://` targets opens a `CONNECT` tunnel.
#[derive(Clone)]
struct ProxyConnector {
    host: String,
    port: u16,
    auth: Option<HeaderValue>,
    connect_timeout: Duration,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Uri> for ProxyConnector {
    type Response = ProxyStream;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<ProxyStream, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let connect = TcpStream::connect((this.host.as_str(), this.port));
            let mut stream = tokio::time::timeout(this.connect_timeout, connect)
                .await
                .unwrap_or_else(|_| {
                    Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "proxy connect timed out",
                    ))
                })
                .map_err(ProxyUnavailable)?;
            stream.set_nodelay(true).map_err(ProxyUnavailable)?;
            // As on direct connections: a proxy host that vanished is
            // found by the kernel's probes. Without them the connection
            // still works, so a refusal is not a failure.
            let keepalive = socket2::TcpKeepalive::new().with_time(super::TCP_KEEPALIVE);
            if let Err(e) = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive) {
                tracing::debug!(error = %e, "TCP keep-alive not set on a proxy connection");
            }
            if dst.scheme_str() != Some("https") {
                return Ok(ProxyStream {
                    io: TokioIo::new(stream),
                    absolute_form: true,
                });
            }
            let host = dst
                .host()
                .ok_or_else(|| io::Error::other("target without host"))?;
            let port = dst.port_u16().unwrap_or(443);
            let target = if host.contains(':') && !host.starts_with('[') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            };
            // A CONNECT left unanswered is the proxy's failure: a proxy that
            // cannot reach the target answers 502-504, so silence is more
            // likely a proxy that hangs, which must not take healthy
            // targets out of rotation.
            tokio::time::timeout(
                this.connect_timeout,
                tunnel(&mut stream, &target, this.auth.as_ref()),
            )
            .await
            .unwrap_or_else(|_| {
                let timed_out = io::Error::new(io::ErrorKind::TimedOut, "proxy CONNECT timed out");
                Err(ProxyUnavailable(timed_out).into())
            })?;
            Ok(ProxyStream {
                io: TokioIo::new(stream),
                absolute_form: false,
            })
        })
    }
}

/// An error of the outbound proxy itself, not of the target behind it: the
/// proxy could not be reached, broke the connection or refused the tunnel
/// for its own reasons. Found in the client's error chain, it makes the
/// attempt's failure [`Failure::ProxyFailed`].
#[derive(Debug)]
struct ProxyUnavailable(io::Error);

impl std::fmt::Display for ProxyUnavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("outbound proxy failed")
    }
}

impl std::error::Error for ProxyUnavailable {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

fn proxy_at_fault(err: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(err), |e| e.source()).any(|e| e.is::<ProxyUnavailable>())
}

/// Asks the proxy for a tunnel to `target` and reads its answer head.
async fn tunnel(
    stream: &mut TcpStream,
    target: &str,
    auth: Option<&HeaderValue>,
) -> Result<(), BoxError> {
    let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n").into_bytes();
    if let Some(auth) = auth {
        head.extend_from_slice(b"Proxy-Authorization: ");
        head.extend_from_slice(auth.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    stream.write_all(&head).await.map_err(ProxyUnavailable)?;
    // Read byte-wise up to the blank line: anything after it belongs to
    // the tunnel (the TLS handshake), so nothing may be read past it.
    let mut answer = Vec::with_capacity(256);
    while !answer.ends_with(b"\r\n\r\n") {
        if answer.len() >= MAX_CONNECT_HEAD {
            let too_long = io::Error::other("proxy CONNECT answer too long");
            return Err(ProxyUnavailable(too_long).into());
        }
        let byte = stream.read_u8().await.map_err(ProxyUnavailable)?;
        answer.push(byte);
    }
    let status_line = answer.split(|&b| b == b'\n').next().unwrap_or_default();
    let status = std::str::from_utf8(status_line)
        .ok()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse::<u16>().ok());
    // 502, 503 and 504 are how proxies (Squid, tinyproxy, Envoy) say the
    // target refused, could not be resolved or did not answer: the target
    // is down, not the proxy.
    let target_down =
        |kind, code| io::Error::new(kind, format!("proxy could not reach the target: {code}"));
    let refusal = match status {
        Some(200..=299) => return Ok(()),
        Some(code @ (502 | 503)) => {
            return Err(target_down(io::ErrorKind::ConnectionRefused, code).into())
        }
        Some(code @ 504) => return Err(target_down(io::ErrorKind::TimedOut, code).into()),
        Some(code) => io::Error::other(format!("proxy refused CONNECT with {code}")),
        None => io::Error::other("proxy sent an invalid CONNECT answer"),
    };
    Err(ProxyUnavailable(refusal).into())
}

/// A connection to a proxy: plain (absolute-form requests) or a tunnel.
pub struct ProxyStream {
    io: TokioIo<TcpStream>,
    absolute_form: bool,
}

impl Connection for ProxyStream {
    fn connected(&self) -> Connected {
        // `proxy(true)` makes hyper write absolute-form request targets.
        Connected::new().proxy(self.absolute_form)
    }
}

impl hyper::rt::Read for ProxyStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for ProxyStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_urls_give_address_and_basic_credentials() {
        let (host, port, auth) = parse_proxy_url("http://user:p%40ss@10.0.0.1:3128").unwrap();
        assert_eq!((host.as_str(), port), ("10.0.0.1", 3128));
        // base64("user:p@ss")
        assert_eq!(auth.unwrap(), "Basic dXNlcjpwQHNz");
        // base64("TOKEN:")
        let (_, _, auth) = parse_proxy_url("http://TOKEN@proxy:8012").unwrap();
        assert_eq!(auth.unwrap(), "Basic VE9LRU46");
        let (host, port, auth) = parse_proxy_url("http://proxy.local").unwrap();
        assert_eq!((host.as_str(), port, auth), ("proxy.local", 80, None));
        assert!(parse_proxy_url("socks5://x:1").is_none());
        // The scheme in any case, as `check` let it through.
        let (host, port, _) = parse_proxy_url("HTTP://proxy.local:3128").unwrap();
        assert_eq!((host.as_str(), port), ("proxy.local", 3128));
        assert!(parse_proxy_url("http://:3128").is_none(), "no host");
        for bad_port in [
            "http://proxy:3128x",
            "http://proxy:80800",
            "http://u:p@proxy:0",
        ] {
            assert!(parse_proxy_url(bad_port).is_none(), "{bad_port}");
        }
        let (host, port, _) = parse_proxy_url("http://[::1]:3128").unwrap();
        assert_eq!((host.as_str(), port), ("::1", 3128));
    }
}
