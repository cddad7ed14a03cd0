//! The pooled HTTP client towards a route's upstreams: keep-alive pools,
//! HTTP/1.1 and HTTP/2 (ALPN for https, prior knowledge with `upstream_h2c`),
//! rustls, connect timeout, per-try timeout, and load balancing.
//!
//! This module never decides *whether* to send: only the pipeline does. It
//! connects only to a route's configured upstream URLs — the client's Host
//! header or path never choose the address.

mod balance;
mod connect_within;
mod dial_target;
mod h1_client;
mod h1_pool;
pub mod proxy_pool;
pub mod tls;

use std::borrow::Cow;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use http::header::{CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::OwnedSemaphorePermit;

pub use balance::{Balancer, Slots, Target};
use connect_within::ConnectWithin;
use dial_target::DialTarget;
pub use h1_client::ConnBody;
use h1_pool::{H1Pool, PoolLimits};
use proxy_pool::{ProxyPool, Via};

use crate::body::{RequestBody, UpstreamBody};
use crate::classify::Failure;
use crate::config::{RouteConfig, ServerConfig};
use crate::headers::{self, ProxySet};
use crate::outgoing::Outgoing;
use crate::upload;

type HttpClient = Client<ConnectWithin<DialTarget<HttpsConnector<HttpConnector>>>, RequestBody>;

/// When TCP starts probing an idle upstream connection.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// Pings an HTTP/2 upstream connection that has requests open but has been
/// quiet this long, and closes it when the pong is this late: every
/// request to a target shares its one connection, so a connection to a
/// dead host would otherwise time out each request sent on it (timeouts
/// do not eject a target) until the kernel gives up on it.
const HTTP2_PING_AFTER: Duration = Duration::from_secs(20);
const HTTP2_PONG_WITHIN: Duration = Duration::from_secs(10);

/// Turns on [`HTTP2_PING_AFTER`] for a client's HTTP/2 connections.
pub(crate) fn ping_http2_connections(builder: &mut hyper_util::client::legacy::Builder) {
    builder
        .http2_keep_alive_interval(HTTP2_PING_AFTER)
        .http2_keep_alive_timeout(HTTP2_PONG_WITHIN)
        .http2_keep_alive_while_idle(false);
}

/// A route's way to its backends: plain `http://` targets over our own
/// HTTP/1.1 pool (unless the route speaks h2c), the rest over hyper-util's
/// clients.
pub struct Upstream {
    h1: Option<H1Pool>,
    /// hyper-util's client of each target (by index) the own pool does not
    /// serve, which dials only that target (see [`DialTarget`]): `https://`
    /// targets speak HTTP/2 or HTTP/1.1 as ALPN chooses, `http://` ones of
    /// an `upstream_h2c` route HTTP/2 with prior knowledge (only theirs:
    /// hyper's `http2_only` skips ALPN, and an HTTP/1.1-only TLS backend
    /// would get the h2 preface).
    clients: Vec<Option<HttpClient>>,
    pub balancer: Balancer,
    /// The outbound proxies, when the route uses them.
    pub proxies: Option<ProxyPool>,
    /// How long an answer's body may wait for its next bytes: the route's
    /// `body_read_timeout`.
    stall_limit: Duration,
}

impl Upstream {
    pub fn build(
        route: &RouteConfig,
        server: &ServerConfig,
        outbound_proxies: &[String],
    ) -> Result<Upstream, String> {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(server.connect_timeout));
        http.set_nodelay(true);
        // A backend host that vanished without a word is found by the
        // kernel's probes, not only after retransmissions give up (~15 min).
        http.set_keepalive(Some(TCP_KEEPALIVE));
        http.enforce_http(false);
        let tls = tls::client_config(route.tls_ca_file.as_deref(), route.tls_verify)?;
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http);
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_idle_timeout(server.upstream_idle_timeout)
            .pool_max_idle_per_host(server.upstream_max_idle)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new());
        ping_http2_connections(&mut builder);
        let mut h2c = builder.clone();
        h2c.http2_only(true);
        let h1 = if route.upstream_h2c {
            None
        } else {
            let limits = PoolLimits {
                connect_timeout: server.connect_timeout,
                idle_timeout: server.upstream_idle_timeout,
                max_idle: server.upstream_max_idle,
                stall_limit: route.body_read_timeout,
            };
            H1Pool::new(&route.upstreams, limits)
        };
        let clients = (route.upstreams.iter().enumerate())
            .map(|(index, target)| {
                if h1.as_ref().is_some_and(|pool| pool.serves(index)) {
                    return None;
                }
                let dial = DialTarget::new(connector.clone(), target.clone());
                let connector = ConnectWithin::new(dial, server.connect_timeout);
                let prior_knowledge = route.upstream_h2c && target.scheme() == Some(&Scheme::HTTP);
                Some(match prior_knowledge {
                    true => h2c.build(connector),
                    false => builder.build(connector),
                })
            })
            .collect();
        Ok(Upstream {
            h1,
            clients,
            balancer: Balancer::new(&route.upstreams, server.upstream_max_conns),
            proxies: ProxyPool::build(outbound_proxies, route, server)?,
            stall_limit: route.body_read_timeout,
        })
    }

    /// Sends one attempt of `outgoing` to target `index`, directly or
    /// through an outbound proxy, with its `set` headers on top of its own.
    /// A buffered body small enough for Backstop's own HTTP/1.1 exchange
    /// goes out borrowed from `outgoing`; the other ways take a `Request`
    /// made from it, which on the `last` attempt takes its headers along.
    /// (A capped target's turn is taken first, by the caller: see
    /// [`take_turn`].)
    pub async fn send_via(
        &self,
        via: Via,
        index: usize,
        outgoing: &mut Outgoing,
        last: bool,
        deadline: Instant,
    ) -> Result<Response<UpstreamBody>, Failure> {
        let base = self.balancer.base(index).ok_or(Failure::ConnectFailed)?;
        if let (Via::Proxy(proxy), Some(pool)) = (via, &self.proxies) {
            let mut request = outgoing.request_for(base, last)?;
            outgoing.set.apply_to(request.headers_mut());
            // Out of line, like hyper's way below: boxed, their futures do
            // not make every request's future larger, and behind `dyn`
            // their code is not inlined into the request's (see
            // `pipeline::out_of_line`).
            let result = pool.send(proxy, request, deadline).boxed().await;
            return result.and_then(|r| from_hyper(r, self.stall_limit));
        }
        let own_exchange = self.h1.as_ref().filter(|pool| pool.serves(index));
        let small_body = outgoing
            .buffered_body()
            .filter(|body| body.len() <= h1_client::MAX_BODY);
        if let (Some(pool), Some(body)) = (own_exchange, small_body) {
            let target = outgoing.upstream_target(base);
            let head = h1_client::Head {
                method: outgoing.method(),
                target: &target,
                headers: outgoing.headers(),
                set: Some(&outgoing.set),
            };
            return pool.exchange(index, &head, body, deadline).await;
        }
        let request = outgoing.request_for(base, last)?;
        self.send(index, request, Some(&outgoing.set), deadline)
            .boxed()
            .await
    }

    /// Sends a request made whole (a replay) to target `index`, through
    /// the outbound proxy `via` names, as a client's request would go.
    pub async fn send_through(
        &self,
        via: Via,
        index: usize,
        request: Request<RequestBody>,
        deadline: Instant,
    ) -> Result<Response<UpstreamBody>, Failure> {
        if let (Via::Proxy(proxy), Some(pool)) = (via, &self.proxies) {
            let result = pool.send(proxy, request, deadline).boxed().await;
            return result.and_then(|r| from_hyper(r, self.stall_limit));
        }
        self.send(index, request, None, deadline).await
    }

    /// After a failed attempt: skip for a while whichever could not be
    /// reached, the outbound proxy it went through or the target.
    pub fn eject(&self, failure: Failure, via: Via, target: usize) {
        match (failure, via, &self.proxies) {
            (Failure::ProxyFailed, Via::Proxy(index), Some(pool)) => pool.eject(index),
            _ if failure.ejects_target() => self.balancer.eject(target),
            _ => {}
        }
    }

    /// Sends one attempt to target `index` (the request's URI is that
    /// target's), with the headers in `set` on top of the request's own,
    /// and waits until `deadline` at most for the response head.
    pub async fn send(
        &self,
        index: usize,
        mut request: Request<RequestBody>,
        set: Option<&ProxySet>,
        deadline: Instant,
    ) -> Result<Response<UpstreamBody>, Failure> {
        if let Some(pool) = self.h1.as_ref().filter(|pool| pool.serves(index)) {
            // The pool keeps the deadline itself (a timer per connection)
            // and writes `set` into the request head.
            return pool.send(index, request, set, deadline).await;
        }
        if let Some(set) = set {
            set.apply_to(request.headers_mut());
        }
        host_as_authority(&mut request);
        let client =
            (self.clients.get(index).and_then(Option::as_ref)).ok_or(Failure::ConnectFailed)?;
        let upload = upload::progress_of(&request);
        match upload::answer_by(client.request(request), deadline, upload.as_deref()).await {
            Some(Ok(response)) => from_hyper(response, self.stall_limit),
            Some(Err(e)) => {
                let failure = upload::blame(upload.as_deref(), Failure::from_client_error(&e));
                tracing::debug!(error = %ErrorChain(&e), ?failure, "upstream attempt failed");
                Err(failure)
            }
            None => Err(Failure::Timeout),
        }
    }
}

/// Moves a request's `Host` (a route's `headers` set one) into its URI,
/// where hyper-util's client takes it from: as HTTP/2's `:authority`, and
/// as HTTP/1.1's `Host` (written from the URI when the head has none). The
/// target's client still dials the target. A value that is not an
/// authority stays a header.
fn host_as_authority(request: &mut Request<RequestBody>) {
    let Some(host) = request.headers().get(HOST) else {
        return;
    };
    let Ok(authority) = Authority::try_from(host.as_bytes()) else {
        return;
    };
    let mut parts = request.uri().clone().into_parts();
    parts.authority = Some(authority);
    if let Ok(uri) = Uri::from_parts(parts) {
        *request.uri_mut() = uri;
        request.headers_mut().remove(HOST);
    }
}

/// A turn to send to a target whose requests in flight are capped
/// (`upstream_max_conns`): one of its `slots`, waited for in turn until
/// `until` — then `Saturated`, with nothing sent. The answer's body holds
/// the slot (`UpstreamBody::holding`) until the backend has sent it whole.
pub async fn take_turn(slots: &Slots, until: Instant) -> Result<OwnedSemaphorePermit, Failure> {
    if let Some(slot) = slots.try_take() {
        return Ok(slot);
    }
    match tokio::time::timeout_at(until.into(), slots.wait_for_turn()).await {
        Ok(Some(slot)) => Ok(slot),
        _ => Err(Failure::Saturated),
    }
}

/// An answer of hyper's client as the request path takes it, refused when
/// its transfer coding is more than `chunked` (hyper takes off the chunking
/// alone and would pass on the rest unlabelled; see
/// `headers::only_chunked`), its body failing when it stalls for
/// `stall_limit`.
fn from_hyper(
    response: Response<Incoming>,
    stall_limit: Duration,
) -> Result<Response<UpstreamBody>, Failure> {
    let mut response = response;
    // hyper's client skips 1xx answers but returns a 101 (an upgrade no
    // one asked for: Backstop sends no `Upgrade`), which the client would
    // take as one; Backstop's own exchange refuses it too.
    if response.status().is_informational() {
        tracing::debug!(status = %response.status(), "upstream sent an informational status as its answer");
        return Err(Failure::InvalidResponse);
    }
    let codings = response.headers().get_all(TRANSFER_ENCODING);
    if codings.iter().next().is_some() {
        if !headers::only_chunked(codings.iter()) {
            tracing::debug!("upstream sent a transfer coding other than chunked");
            return Err(Failure::InvalidResponse);
        }
        // hyper reads a chunked body whatever `Content-Length` also says
        // (RFC 9112 §6.3) but leaves that length in the head, where the
        // client's side would frame the answer by it.
        response.headers_mut().remove(CONTENT_LENGTH);
    } else {
        headers::one_content_length(response.headers_mut());
    }
    Ok(response.map(|body| UpstreamBody::hyper(body, stall_limit)))
}

/// `start + timeout`, or a time far ahead when a configured timeout is
/// too long to add (`Instant + Duration` panics on overflow).
pub fn deadline_after(start: Instant, timeout: Duration) -> Instant {
    start
        .checked_add(timeout)
        .or_else(|| start.checked_add(FAR_AHEAD))
        .unwrap_or(start)
}

/// About thirty years: a deadline that never comes.
const FAR_AHEAD: Duration = Duration::from_secs(30 * 365 * 86_400);

/// The upstream URI for a client's request target, with the first `skip`
/// bytes of its path removed (a stripped prefix): as [`upstream_uri`], but
/// when nothing is stripped and the target has no base path (the common
/// case) the client's path and query are reused as they are, without a
/// copy or a second parse.
pub fn upstream_uri_for(base: &Uri, client: &Uri, skip: usize) -> Result<Uri, http::Error> {
    match unchanged_target(base, client, skip) {
        Some(path_and_query) => uri_at(base, path_and_query.clone()),
        None => upstream_uri(base, &client.path()[skip..], client.query()),
    }
}

/// The path and query sent to a target with base URL `base` for a client's
/// request target, with the first `skip` bytes of its path removed: the
/// origin form of [`upstream_uri_for`]'s URI, borrowed from the client's
/// target in the common case.
pub fn upstream_target<'a>(base: &Uri, client: &'a Uri, skip: usize) -> Cow<'a, str> {
    match unchanged_target(base, client, skip) {
        Some(path_and_query) => Cow::Borrowed(path_and_query.as_str()),
        None => Cow::Owned(join_path(base, &client.path()[skip..], client.query())),
    }
}

/// The client's path and query when they go upstream as they are: nothing
/// stripped, an origin-form path, and a target without a base path.
fn unchanged_target<'a>(base: &Uri, client: &'a Uri, skip: usize) -> Option<&'a PathAndQuery> {
    client.path_and_query().filter(|path_and_query| {
        // `http://h?q` has the path `/` but the text `?q`.
        skip == 0
            && path_and_query.as_str().starts_with('/')
            && base.path().trim_end_matches('/').is_empty()
    })
}

/// Whether the port of `host_port` (an authority without credentials), if
/// it names one, is a port number: `http::Uri` takes `host:80800` and
/// `host:8o80`, and a connection would then go to the scheme's default
/// port instead. An empty port (`host:`) is the default, as RFC 3986 has it.
pub fn port_is_valid(host_port: &[u8]) -> bool {
    // Read from the end, as every request's `Host` is checked: the digits
    // there, then what comes before them.
    let digits = host_port
        .iter()
        .rev()
        .take_while(|b| b.is_ascii_digit())
        .count();
    let (rest, port) = host_port.split_at(host_port.len() - digits);
    match rest.last() {
        // `host:PORT` (or `host:`, the default port).
        Some(b':') => {
            port.is_empty()
                || (port.len() <= 5
                    && (1..=65535)
                        .contains(&port.iter().fold(0u32, |n, &d| n * 10 + u32::from(d - b'0'))))
        }
        // All digits (a name or address without a port), or an IPv6
        // literal's end (`]`) without one.
        None | Some(b']') => true,
        // No port, unless a `:` comes before (after any `]`: an IPv6
        // address's colons are inside its brackets).
        Some(_) => !rest
            .iter()
            .rev()
            .take_while(|&&c| c != b']')
            .any(|&c| c == b':'),
    }
}

/// The upstream URI for a target: its scheme and authority, its base path,
/// then the (possibly stripped) request path and the query.
pub fn upstream_uri(base: &Uri, path: &str, query: Option<&str>) -> Result<Uri, http::Error> {
    uri_at(base, PathAndQuery::try_from(join_path(base, path, query))?)
}

/// `path_and_query` at the base's scheme and authority.
fn uri_at(base: &Uri, path_and_query: PathAndQuery) -> Result<Uri, http::Error> {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(base.scheme().cloned().unwrap_or(Scheme::HTTP));
    parts.authority = base.authority().cloned();
    parts.path_and_query = Some(path_and_query);
    Ok(Uri::from_parts(parts)?)
}

/// The base's path (without its trailing `/`), then `path` (`/` when both
/// are empty), then `?query`. `OPTIONS *` asks about the server as a
/// whole, whatever its base path.
fn join_path(base: &Uri, path: &str, query: Option<&str>) -> String {
    if path == "*" {
        return path.to_string();
    }
    let base_path = base.path().trim_end_matches('/');
    let mut path_and_query = String::with_capacity(base_path.len() + path.len() + 16);
    path_and_query.push_str(base_path);
    path_and_query.push_str(path);
    if path_and_query.is_empty() {
        path_and_query.push('/');
    }
    if let Some(q) = query {
        path_and_query.push('?');
        path_and_query.push_str(q);
    }
    path_and_query
}

/// Displays an error with its sources: "a: b: c".
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_numbers_from_1_to_65535() {
        let cases = [
            ("example.com", true),
            ("example.com:8080", true),
            ("127.0.0.1:19200", true),
            ("1.2.3.4", true),
            ("1234567", true),
            ("h:", true),
            ("h:65535", true),
            ("[::1]", true),
            ("[2001:db8::1]:443", true),
            ("h:0", false),
            ("h:65536", false),
            ("h:123456", false),
            ("h:8o80", false),
            ("h:+80", false),
            ("a.example:1,evil.example", false),
            ("[2001:db8::1]:80x", false),
            ("[::1]x", true),
        ];
        for (host_port, valid) in cases {
            assert_eq!(port_is_valid(host_port.as_bytes()), valid, "{host_port}");
        }
    }

    #[test]
    fn uri_joins_base_path_and_request_path() {
        let cases = [
            ("http://h:1", "/a/b", None, "http://h:1/a/b"),
            ("http://h:1/", "/a", Some("x=1&y=2"), "http://h:1/a?x=1&y=2"),
            (
                "https://api.example.com/v1",
                "/users",
                None,
                "https://api.example.com/v1/users",
            ),
            (
                "https://api.example.com/v1/",
                "/",
                None,
                "https://api.example.com/v1/",
            ),
            ("http://h", "", None, "http://h/"),
        ];
        for (base, path, query, want) in cases {
            let got = upstream_uri(&base.parse().unwrap(), path, query).unwrap();
            assert_eq!(got.to_string(), want, "{base} + {path}");
        }
    }

    #[test]
    fn uri_and_origin_form_for_a_client_target_match_the_general_join() {
        let bases = ["http://h:1", "http://h:1/", "https://api.example.com/v1/"];
        // A client's target and the length of a route prefix it matches.
        let targets = [
            ("/a/b", 0),
            ("/a/b", 2),
            ("/a/b?x=1&y=%20", 0),
            ("/a/b?x=1&y=%20", 2),
            ("/", 0),
            ("/api?q", 4),
            ("/api/users?q", 4),
        ];
        for base in bases {
            let base: Uri = base.parse().unwrap();
            for (target, skip) in targets {
                let client: Uri = target.parse().unwrap();
                let want = upstream_uri(&base, &client.path()[skip..], client.query()).unwrap();
                let got = upstream_uri_for(&base, &client, skip).unwrap();
                assert_eq!(got, want, "{base} + {target} skipping {skip}");
                let origin_form = upstream_target(&base, &client, skip);
                assert_eq!(
                    Some(&*origin_form),
                    want.path_and_query().map(|p| p.as_str()),
                    "{base} + {target} skipping {skip}"
                );
            }
        }
    }
}
