//! The request path, read top to bottom as its phases:
//!
//! 0. A target or `Host` that HTTP/1.1 does not allow → 400 (`unroutable`).
//! 1. **route** — match the path prefix (and host); unknown path → 404.
//! 2. **rate limit** — over the route's limit → 429.
//! 3. **read body** — buffer the body when the route may retry, capture or
//!    cache-key it (413 above `max_body_bytes`); otherwise it streams.
//! 4. **cache** — a fresh stored answer is served (`X-Cache: HIT`); a miss
//!    goes on, coalesced with its concurrent twins.
//! 5. **prepare** — clean and set the upstream headers, map the path.
//! 6. **circuit breaker** — open → the backend is not called: a stale cache
//!    entry, a capture, or 503 `circuit_open`.
//! 7. **forward** — pick a target, send with a per-try timeout, retry with
//!    backoff while the policy, the deadline, the retry budget and the
//!    breaker allow.
//! 8. **capture** — a backend failure is answered from a stale cache entry
//!    (stale-if-error) or, on a capturable request, written durably and
//!    answered with its capture id.
//! 9. **respond** — stream the backend's answer back without hop-by-hop
//!    headers, storing it in the cache if it may be (or, for a write the
//!    backend accepted, first removing the cached reads of its URI); count
//!    and log the outcome once.
//!
//! Per-request state lives in [`RequestContext`]; state that outlives a
//! reload (breakers, limits, caches, statistics) lives in registries keyed
//! by route name, held by [`Proxy`]. With the `otlp` feature, the request
//! and each upstream attempt are also spans (`otel`): a handful of calls
//! below, which do nothing when exporting is off.

use std::borrow::Cow;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use futures_util::future::BoxFuture;
use http::header::{HeaderValue, HOST, RETRY_AFTER};
use http::{HeaderMap, HeaderName, Method, Request, Response, StatusCode, Version};
use http_body::Body as _;
use http_body_util::Either;

use crate::body::{self, BufferError, BufferedBody, ClientBody, ResponseBody, UpstreamBody};
use crate::buffer_budget::{BufferBudget, Taking};
use crate::cache::{self, CacheState, Caches, Lookup};
use crate::canonical_path;
use crate::capture::record::CaptureRecord;
use crate::capture::{CaptureOutcome, Capturer};
use crate::classify::{is_idempotent, status_failure, status_trips_breaker, Failure};
use crate::config::{Config, RateLimitConfig, ServerConfig};
use crate::error::{ErrorCode, ProxyError};
use crate::headers::{self, ClientInfo, Forwarding, ProxySet, RequestNames, X_REQUEST_ID};
use crate::otel;
use crate::outgoing::{Capturable, Outgoing, OutgoingBody, Streamed};
use crate::resilience::backoff::Backoff;
use crate::resilience::breaker::{self, Admission, Permit};
use crate::resilience::rate_limit::{self, Decision};
use crate::resilience::{Registry, RouteGuards};
use crate::routing::{Route, RouteTable};
use crate::stats::metrics::Metrics;
use crate::stats::{Event, Stats};
use crate::traceparent::TraceContext;
use crate::upstream::proxy_pool::{self, Via};
use crate::upstream::{deadline_after, take_turn, Slots};

/// The configuration in force: swapped whole on reload, read lock-free.
pub struct Active {
    pub config: Arc<Config>,
    pub routes: RouteTable,
}

/// Everything the request path needs, shared by all connections.
pub struct Proxy {
    pub active: ArcSwap<Active>,
    pub capturer: Option<Arc<Capturer>>,
    pub metrics: Arc<Metrics>,
    /// Breakers, retry budgets and rate-limit buckets, by route name.
    pub resilience: Arc<Registry>,
    /// Per-route statistics, keyed by route name: they outlive reloads.
    pub stats: Arc<Stats>,
    /// Cache stores and in-flight misses, by route name (kept across reloads).
    pub caches: Caches,
    /// The OTLP trace exporter (settings fixed at start; a no-op when off).
    pub otel: otel::Tracing,
    /// Bytes of request bodies buffered now (`server.max_buffered_bytes`).
    pub buffers: Arc<BufferBudget>,
}

/// Per-request state carried through the phases, logged once at the end.
pub struct RequestContext<'a> {
    /// The request id as the header value sent upstream and back; as text
    /// from [`RequestContext::request_id`].
    request_id: HeaderValue,
    pub client: &'a ClientInfo,
    /// The client's address: the peer's, or behind a trusted proxy the
    /// one it names (rate limits by `client_ip`, the access log, spans).
    pub client_ip: IpAddr,
    /// Whether the request says anything of its client
    /// (`headers::is_client_claim`): as the client sent it, and once an
    /// untrusted peer's claims are removed, whether a trusted proxy's are
    /// there.
    carries_claims: bool,
    pub method: Method,
    pub started: Instant,
    /// The W3C trace context sent upstream (the client's, or a new one).
    pub trace: TraceContext,
    pub route: Option<Arc<Route>>,
    pub attempts: u32,
    pub failure: Option<Failure>,
    /// The cache phase's verdict: `hit`, `miss`, `bypass` or `stale`.
    pub cache: Option<&'static str>,
    /// The capture id when the request was captured.
    pub capture_id: Option<String>,
    /// The rate-limit verdict, echoed in `RateLimit-*` headers.
    pub rate_limit: Option<Decision>,
    /// The code of the proxy-made answer, when the answer is one.
    pub error: Option<ErrorCode>,
    /// The request's SERVER span, when it is exported.
    pub span: otel::RequestSpan,
}

impl RequestContext<'_> {
    fn route_name(&self) -> Option<&str> {
        self.route.as_deref().map(Route::name)
    }

    pub fn request_id(&self) -> &str {
        headers::request_id_text(&self.request_id)
    }
}

/// A request's answer and the id the request went by, which the server
/// side returns as `X-Request-Id` when it writes the answer: the own
/// HTTP/1 side writes it straight into the head rather than first into the
/// answer's header map (about 190 instructions a request, callgrind).
pub struct Answer {
    pub response: Response<ResponseBody>,
    pub request_id: HeaderValue,
}

impl Answer {
    /// The answer with its `X-Request-Id` set (replacing the backend's).
    pub fn into_response(self) -> Response<ResponseBody> {
        let mut response = self.response;
        response.headers_mut().insert(X_REQUEST_ID, self.request_id);
        response
    }
}

/// Handles one request from a client; never fails: every problem becomes a
/// proxy-made answer.
pub async fn handle(proxy: &Proxy, req: Box<Request<ClientBody>>, client: &ClientInfo) -> Answer {
    let names = RequestNames::find(req.headers());
    // A health check is answered whatever its Host: checkers often send none.
    let refused = unroutable(&req, &names).filter(|_| !is_health_check(&req));
    let mut ctx = RequestContext {
        request_id: headers::request_id(names.request_id),
        client,
        client_ip: client.addr.ip(),
        carries_claims: names.claims,
        method: req.method().clone(),
        started: Instant::now(),
        trace: TraceContext::from_client(&names, req.headers()),
        route: None,
        attempts: 0,
        failure: None,
        cache: None,
        capture_id: None,
        rate_limit: None,
        error: None,
        span: otel::RequestSpan::none(),
    };
    let mut req = req;
    let active = proxy.active.load_full();
    // What the request says of its client is believed only from a trusted
    // proxy; anyone else's claims go before anything reads the headers. A
    // request refused here is logged with the client a trusted proxy names.
    let trusted = &active.config.server.trusted_proxies;
    if trusted.trusts(ctx.client_ip) {
        ctx.client_ip = trusted.client_behind(req.headers(), ctx.client_ip);
    } else if ctx.carries_claims {
        headers::strip_client_claims(req.headers_mut());
        ctx.carries_claims = false;
    }
    let path_rules = active.config.server.path_rules();
    let refused = refused
        .map(Cow::Borrowed)
        .or_else(|| make_path_canonical(&mut req, path_rules));
    // After the path is made canonical: `//health` may be `/health`.
    let health_check = refused.is_none() && is_health_check(&req);
    let (log, stats) = (&active.config.log, &active.config.stats);
    // The path outlives the request only for the log and the statistics.
    let path = (log.access_log || stats.enabled).then(|| req.uri().path().to_string());
    let outcome = match refused {
        Some(reason) => Err(ProxyError::new(ErrorCode::BadRequest, reason)),
        None if health_check => Ok(health()),
        None => {
            let mut watch = Unanswered {
                proxy,
                active: &active,
                path: path.as_deref(),
                ctx: &mut ctx,
                answered: false,
            };
            let outcome = proxy_request(proxy, &active, req, watch.ctx).await;
            watch.answered = true;
            outcome
        }
    };
    let mut response = match outcome {
        Ok(response) => response,
        Err(error) => {
            ctx.error = Some(error.code);
            error.into_response(ctx.route_name(), ctx.request_id())
        }
    };
    if let Some(decision) = &ctx.rate_limit {
        decision.apply(response.headers_mut());
    }
    ctx.span.finish(&ctx, &response);
    if let Some(path) = path {
        if log.access_log {
            log_access(&ctx, &path, response.status());
        }
        // A load balancer's health checks are not traffic.
        if stats.enabled && !health_check {
            let error_code = ctx.error.map(ErrorCode::as_str);
            record_metrics(
                &proxy.stats,
                stats.max_paths_per_route,
                &mut ctx,
                path,
                response.status().as_u16(),
                error_code,
            );
        }
    }
    Answer {
        response,
        request_id: ctx.request_id,
    }
}

async fn proxy_request(
    proxy: &Proxy,
    active: &Active,
    mut req: Box<Request<ClientBody>>,
    ctx: &mut RequestContext<'_>,
) -> Result<Response<ResponseBody>, ProxyError> {
    ctx.span = proxy.otel.server_span(&mut ctx.trace, &req, ctx.client_ip);
    let route = route_phase(&active.routes, &req)?;
    ctx.span.set_route(route);
    // The request's one count on its route, for the statistics' event;
    // the phases borrow the table's (`active` outlives the request).
    ctx.route = Some(route.clone());
    let guards = route.guards(&proxy.resilience);
    // Phases a route may not use are polled out of line (see `out_of_line`).
    if let Some(limit) = &route.config.rate_limit {
        let phase = rate_limit_phase(proxy, active, route, limit, guards, &req, ctx);
        out_of_line(phase).await?;
    }
    let body = read_body(route, &mut req, &active.config.server, &proxy.buffers).await?;
    // What `Connection` names never reaches the backend, so from here on
    // nothing sees it: not the cache key (a client's `X-Tenant: 2` named
    // away would store the backend's answer without it as tenant 2's), nor
    // a capture.
    headers::strip_hop_by_hop_but_trailers(req.headers_mut(), route.carries_trailers());
    let mut cache = if route.config.cache.enabled {
        match out_of_line(cache_phase(proxy, active, route, &req, &body, ctx)).await {
            Lookup::Answer(response, _) => return Ok(response),
            Lookup::Forward(state) => {
                if state.validators().is_some() {
                    cache::conditional::strip_validators(req.headers_mut());
                }
                state
            }
        }
    } else {
        CacheState::off()
    };
    let idempotency_header = &active.config.replay.idempotency_header;
    let mut outgoing = prepare(route, req, body, idempotency_header, ctx);
    let permit = match breaker_phase(route, guards) {
        Ok(permit) => permit,
        Err(retry_in) => {
            let open = circuit_open(proxy, route, outgoing, &mut cache, ctx, retry_in);
            return out_of_line(open).await;
        }
    };
    // From here a write may change the backend, whatever becomes of its
    // answer (or of its client): its invalidation runs.
    cache.sending();
    match forward(route, guards, permit, &mut outgoing, ctx).await {
        Forwarded::Answer(response) => {
            let response = respond(response);
            if cache.verdict().is_none() {
                // Nothing to store or mark.
                return Ok(response);
            }
            if ctx.attempts > 1 {
                cache.retried();
            }
            let answer = out_of_line(cache.finish(&route.config, response)).await;
            ctx.cache = cache.verdict().map(|v| v.as_str());
            answer
        }
        Forwarded::CircuitOpened { retry_in } => {
            out_of_line(circuit_open(
                proxy, route, outgoing, &mut cache, ctx, retry_in,
            ))
            .await
        }
        Forwarded::Failed {
            failure,
            mut response,
        } => {
            ctx.failure = Some(failure);
            // A 500 or 429 (a retry refused after it) is the backend's word
            // on this request, which no stale entry stands in for.
            let answered = matches!(failure, Failure::Status(_)) && !failure.is_capturable();
            if !answered {
                if let Some(stale) = stale_phase(route, &mut cache, ctx) {
                    return Ok(stale);
                }
            }
            if let Some(response) = &mut response {
                cache.mark_failure(response.headers_mut());
            }
            out_of_line(capture_phase(
                proxy, route, outgoing, failure, response, ctx,
            ))
            .await
        }
    }
}

/// A phase that a plain proxied request skips (rate limit, cache, capture,
/// a buffered body), polled out of line: boxed, its future does not make
/// every request's future larger (3.6 → 2.9 KiB for `handle`'s), and behind
/// `dyn` its code is not inlined into `proxy_request`'s (116 → 37 KB of
/// machine code). A plain request ran about 90 instructions less
/// (callgrind); its instruction-cache misses in callgrind's model stayed
/// the same.
fn out_of_line<'a, T>(phase: impl Future<Output = T> + Send + 'a) -> BoxFuture<'a, T> {
    Box::pin(phase)
}

/// `GET /health`, which the proxy answers itself on every listener.
fn is_health_check(req: &Request<ClientBody>) -> bool {
    req.uri().path() == "/health" && req.method() == Method::GET
}

/// Phase 1: which route serves this request.
fn route_phase<'t>(
    table: &'t RouteTable,
    req: &Request<ClientBody>,
) -> Result<&'t Arc<Route>, ProxyError> {
    let host = if table.matches_hosts() {
        let host = request_host(req.uri(), req.headers());
        // A port that is not a number (`api.example.com:1,evil.com`) would
        // match the route bound to the name before it, and go on whole in
        // `X-Forwarded-Host`. Checked only here, where a route is bound to
        // a host (+100 instructions a request).
        if host.is_some_and(|h| !crate::upstream::port_is_valid(h.as_bytes())) {
            return Err(ProxyError::new(
                ErrorCode::BadRequest,
                "The host asked for has a port that is not a number",
            ));
        }
        host.map(strip_port)
    } else {
        None
    };
    table.find(host, req.uri().path()).ok_or_else(|| {
        ProxyError::new(
            ErrorCode::NoRoute,
            format!("No route for path {}", req.uri().path()),
        )
    })
}

/// Phase 2, for a route with a `limit`: take a token from the route's
/// bucket for this request's key (route, client IP or header), in this
/// process or, with `shared`, in Redis. Over the limit → 429
/// `rate_limited` with `Retry-After`; the `RateLimit-*` headers go on every
/// answer. When Redis cannot answer, this instance's own bucket judges the
/// request (as without `shared`), and it is counted: an outage of Redis
/// loosens the limit to the limit per instance, it does not lift it.
async fn rate_limit_phase(
    proxy: &Proxy,
    active: &Active,
    route: &Route,
    limit: &RateLimitConfig,
    guards: &RouteGuards,
    req: &Request<ClientBody>,
    ctx: &mut RequestContext<'_>,
) -> Result<(), ProxyError> {
    let key = rate_limit::bucket_key(&limit.key, req.headers(), ctx.client_ip);
    let decision = match (&active.config.redis, limit.shared) {
        (Some(redis), true) => {
            let shared = &proxy.resilience.shared;
            match shared.check(redis, route.name(), &key, limit).await {
                Some(decision) => decision,
                None => {
                    proxy
                        .metrics
                        .rate_limit_local_fallback
                        .get_or_create(&crate::stats::metrics::route(route.name()))
                        .inc();
                    guards.limiter.check(limit, &key)
                }
            }
        }
        _ => guards.limiter.check(limit, &key),
    };
    ctx.rate_limit = Some(decision);
    if decision.allowed {
        return Ok(());
    }
    Err(ProxyError::new(
        ErrorCode::RateLimited,
        format!(
            "Too many requests. Please try again in {} seconds",
            decision.retry_after_s
        ),
    )
    .with_retry_after(decision.retry_after_s))
}

/// Phase 6: ask the route's circuit breaker for the first attempt. `Err`
/// holds the time until the circuit may admit calls again: the backend is
/// not called, the request is captured if it can be, else answered 503.
fn breaker_phase<'g>(route: &Route, guards: &'g RouteGuards) -> Result<Permit<'g>, Duration> {
    match guards.breaker.admit(&route.config.circuit_breaker) {
        Admission::Allowed(permit) => Ok(permit),
        Admission::Rejected { retry_in } => Err(retry_in),
    }
}

/// A request its route's open circuit keeps from the backend: a stale cache
/// entry if there is one, else captured if it can be, else `503
/// circuit_open` with `Retry-After` (`retry_in`).
async fn circuit_open(
    proxy: &Proxy,
    route: &Route,
    outgoing: Outgoing,
    cache: &mut CacheState,
    ctx: &mut RequestContext<'_>,
    retry_in: Duration,
) -> Result<Response<ResponseBody>, ProxyError> {
    ctx.failure = Some(Failure::CircuitOpen);
    if let Some(stale) = stale_phase(route, cache, ctx) {
        return Ok(stale);
    }
    if capturable(proxy, route, &outgoing, Failure::CircuitOpen) {
        return capture_phase(proxy, route, outgoing, Failure::CircuitOpen, None, ctx).await;
    }
    Err(circuit_open_error(retry_in))
}

/// The answer while a circuit is open, in the reference setup's words.
fn circuit_open_error(retry_in: Duration) -> ProxyError {
    let secs = breaker::retry_after_secs(retry_in);
    ProxyError::new(
        ErrorCode::CircuitOpen,
        format!("Service temporarily unavailable. Please try again in {secs} seconds"),
    )
    .with_retry_after(secs)
}

/// Phase 3: read the body whole when the route may send it twice (retry),
/// capture it or key the cache on it, or when it is a GET's or HEAD's of
/// unknown length; otherwise it streams through. The body is taken out of
/// the request, which stays in its box.
async fn read_body(
    route: &Route,
    req: &mut Request<ClientBody>,
    server: &ServerConfig,
    buffers: &Arc<BufferBudget>,
) -> Result<OutgoingBody, ProxyError> {
    let max_body_bytes = server.max_body_bytes;
    let incoming = match req.body_mut().take() {
        Some(incoming) if !incoming.is_end_stream() => incoming,
        _ => return Ok(OutgoingBody::Buffered(BufferedBody::default())),
    };
    // A GET or HEAD body of no given length (chunked, or HTTP/2 DATA
    // frames without `content-length`) is read whole, so that its length
    // goes upstream: hyper's HTTP/1 client sends those methods' bodies of
    // unknown length not at all, and the empty DATA frame an HTTP/2 client
    // may end a GET with would become an empty chunked GET, which some
    // servers refuse. (A search API's body is small.)
    let unknown_length_read = matches!(*req.method(), Method::GET | Method::HEAD)
        && incoming.size_hint().exact().is_none();
    if !route.config.buffers_body(req.method()) && !unknown_length_read {
        let stall_limit = route.config.body_read_timeout;
        return Ok(OutgoingBody::Streaming(Streamed::new(
            incoming,
            stall_limit,
        )));
    }
    let stall = route.config.body_read_timeout;
    let budget = Taking::new(buffers.clone(), server.max_buffered_bytes);
    let read = body::buffer(req.headers(), incoming, max_body_bytes, stall, budget);
    match out_of_line(read).await {
        Ok(buffered) => Ok(OutgoingBody::Buffered(buffered)),
        Err(BufferError::TooLarge { limit }) => Err(ProxyError::new(
            ErrorCode::BodyTooLarge,
            format!("Request body is larger than {limit} bytes"),
        )),
        Err(BufferError::Overloaded { limit }) => Err(ProxyError::new(
            ErrorCode::Overloaded,
            format!(
                "Too many request bodies are being buffered (at most {limit} bytes at once); try again shortly"
            ),
        )
        .with_retry_after(1)),
        Err(BufferError::Stalled { stall }) => Err(ProxyError::new(
            ErrorCode::RequestTimeout,
            format!("The request body stopped coming for {stall:?}"),
        )),
        Err(BufferError::Read(e)) => Err(ProxyError::new(
            ErrorCode::BadRequest,
            format!("Could not read the request body: {e}"),
        )),
    }
}

/// Phase 5: the upstream request's headers and path. The client's headers
/// are cleaned in place; what the proxy sets is kept apart (`ProxySet`).
fn prepare(
    route: &Route,
    mut client: Box<Request<ClientBody>>,
    body: OutgoingBody,
    idempotency_header: &HeaderName,
    ctx: &RequestContext<'_>,
) -> Outgoing {
    // The Host header's value is shared, not copied (as `request_host`'s
    // text would be). Found by walking the headers, not by a hashed lookup:
    // clients send it first, so the walk ends at once (~90 instructions
    // less a request, callgrind).
    let original_host = match client.uri().authority() {
        Some(authority) => HeaderValue::from_str(authority.as_str()).ok(),
        None => client
            .headers()
            .iter()
            .find_map(|(name, value)| (name == HOST).then_some(value))
            .filter(|h| h.to_str().is_ok())
            .cloned(),
    };
    if client.version() == Version::HTTP_2 {
        headers::join_cookies(client.headers_mut());
    }
    let capture = &route.config.capture;
    let capturable = (capture.enabled && capture.methods.contains(client.method())).then(|| {
        let mut client_headers = client.headers().clone();
        client_headers.remove(HOST);
        Capturable {
            id: CaptureRecord::new_id(),
            client_headers,
        }
    });
    headers::filter_forwarded(client.headers_mut(), &route.config.forward_headers);
    if let Some(capturable) = &capturable {
        // The key the replays will carry: the client's own (unless the
        // record redacts it), else the capture id; whatever
        // `forward_headers` says, as on a replay.
        let redacted = capture.redact_headers.contains(idempotency_header);
        let own = capturable
            .client_headers
            .get(idempotency_header)
            .filter(|_| !redacted);
        let key = own
            .cloned()
            .or_else(|| HeaderValue::from_str(&capturable.id).ok());
        if let Some(key) = key {
            client.headers_mut().insert(idempotency_header.clone(), key);
        }
    }
    let mut forwarding = Forwarding::new(ctx.client, original_host.as_ref());
    if ctx.carries_claims {
        forwarding = forwarding.after_the_proxys(client.headers());
    }
    let set = ProxySet {
        forwarding,
        route: route.config.headers.clone(),
        request_id: ctx.request_id.clone(),
        traceparent: ctx.trace.traceparent().clone(),
        tracestate: ctx.trace.tracestate().cloned(),
    };
    let path = client.uri().path();
    Outgoing {
        // The request was routed here: its path is under the prefix.
        upstream_path_start: route
            .upstream_path(path)
            .map_or(0, |p| path.len() - p.len()),
        client,
        set,
        capturable,
        body,
    }
}

/// Phase 4: the cache lookup, on the client's request as it came (the body
/// is part of the key), before anything is prepared for the upstream. May
/// answer from a fresh entry (`HIT`), or from the answer a concurrent
/// identical request got upstream; otherwise returns the state that stores
/// the upstream answer and knows the stale entry (for a write: the keys
/// its success invalidates).
async fn cache_phase(
    proxy: &Proxy,
    active: &Active,
    route: &Route,
    request: &Request<ClientBody>,
    body: &OutgoingBody,
    ctx: &mut RequestContext<'_>,
) -> Lookup {
    let body = match body {
        OutgoingBody::Buffered(b) => Some(&b.0[..]),
        OutgoingBody::Streaming(_) => None,
    };
    let lookup = proxy
        .caches
        .lookup(&active.config, route, request, ctx.client.proto, body)
        .await;
    ctx.cache = match &lookup {
        Lookup::Answer(_, verdict) => Some(verdict.as_str()),
        Lookup::Forward(state) => state.verdict().map(|v| v.as_str()),
    };
    lookup
}

/// Stale-if-error: when the backend failed (or, for the circuit-breaker
/// phase, the circuit is open), a stale entry within `stale_if_error` is
/// served with `X-Cache: STALE` instead of an error or a capture.
fn stale_phase(
    route: &Route,
    cache: &mut CacheState,
    ctx: &mut RequestContext,
) -> Option<Response<ResponseBody>> {
    let stale = cache.stale_response(&route.config.cache)?;
    ctx.cache = Some(cache::Verdict::Stale.as_str());
    Some(stale)
}

/// How many attempts a request may have at most: one when its body
/// streams (it can be sent only once).
fn max_attempts(route: &Route, outgoing: &Outgoing) -> u32 {
    match outgoing.body {
        OutgoingBody::Streaming(_) => 1,
        OutgoingBody::Buffered(_) => route.config.retry.max_attempts,
    }
}

/// What forwarding came to.
enum Forwarded {
    /// The backend's answer, to pass on (possibly an error status that is
    /// not a capturable failure, or the last retryable one).
    Answer(Response<UpstreamBody>),
    /// The backend failed: unreachable, timed out, or a failure status.
    Failed {
        failure: Failure,
        response: Option<Response<UpstreamBody>>,
    },
    /// The breaker refused a retry after its backoff (other requests'
    /// failures opened the circuit meanwhile, or it is half-open with every
    /// probe place taken): answered as an open circuit is (phase 6).
    CircuitOpened { retry_in: Duration },
}

/// Phase 7: send to a target (directly or through an outbound proxy, as the
/// route's proxy strategy says); retry while the policy allows. POST and PATCH
/// are retried only when the request provably never reached the backend,
/// unless the route sets `retry_non_idempotent`. Every attempt's outcome is
/// reported to the breaker; a retry also needs time left before
/// `retry.deadline`, a token of the retry budget and the breaker's consent
/// (an open circuit stops a retry loop). Without them the last failure is
/// the outcome.
async fn forward(
    route: &Route,
    guards: &RouteGuards,
    first_permit: Permit<'_>,
    outgoing: &mut Outgoing,
    ctx: &mut RequestContext<'_>,
) -> Forwarded {
    let retry = &route.config.retry;
    let breaker_config = &route.config.circuit_breaker;
    let timeout = breaker_config.request_timeout;
    let backoff = Backoff {
        initial: retry.initial_delay,
        max: retry.max_delay,
        factor: retry.backoff_factor,
    };
    let max_attempts = max_attempts(route, outgoing);
    let idempotent = is_idempotent(outgoing.method()) || retry.retry_non_idempotent;
    // When this attempt went out; the clock is read once for all three.
    let mut sent_at = Instant::now();
    let deadline = (!retry.deadline.is_zero()).then(|| deadline_after(sent_at, retry.deadline));
    // A route that never retries has no retry budget to earn.
    if retry.max_attempts > 1 {
        guards.budget.on_request_at(retry, sent_at);
    }
    let mut permit = first_permit;
    let mut saw_429 = false;
    // The target of the attempt that failed: a retry goes elsewhere if it can.
    let mut failed_target = None;
    loop {
        ctx.attempts += 1;
        let attempt = ctx.attempts;
        let (index, target) = route.upstream.balancer.pick_after(failed_target);
        let proxies = route.upstream.proxies.as_ref();
        let via = proxy_pool::choose(proxies, &route.config.proxy, saw_429);
        let span = ctx
            .span
            .attempt(attempt, &target.base, &mut outgoing.set.traceparent);
        let last = attempt >= max_attempts;
        // A streamed upload's time is the client's (see `timed_from`): one
        // that goes away mid-upload says nothing of the backend's speed.
        // (Known before the attempt by its body: its upload's progress is
        // set up only as it is sent.)
        let timed = !matches!(outgoing.body, OutgoingBody::Streaming(_));
        let result = match route.upstream.balancer.slots(index) {
            None => {
                if timed {
                    permit.sent(breaker_config, sent_at);
                }
                let try_deadline = try_deadline(sent_at, timeout, deadline);
                route
                    .upstream
                    .send_via(via, index, outgoing, last, try_deadline)
                    .await
            }
            Some(slots) => {
                let to = (via, index);
                let timed = timed.then_some(&mut permit);
                out_of_line(send_in_turn(
                    route,
                    slots,
                    to,
                    outgoing,
                    last,
                    (&mut sent_at, timed),
                    deadline,
                ))
                .await
            }
        };
        span.end(&result);
        let verdict = match &result {
            Ok(response) => Some(status_trips_breaker(response.status().as_u16())),
            // A retry that started with little of `retry.deadline` left
            // says nothing of the backend by timing out (connecting has
            // its own `connect_timeout`; one cut short ends as `Timeout`).
            Err(Failure::Timeout) if attempt > 1 && cut_short(sent_at, timeout, deadline) => None,
            Err(failure) => failure.breaker_verdict(),
        };
        // A streamed upload's time is the client's: a slow call is timed
        // from its last progress.
        let timed_from = outgoing
            .upload()
            .map_or(sent_at, |u| u.backend_clock().max(sent_at));
        match verdict {
            Some(failed) => permit.record(breaker_config, failed, timed_from),
            // Unreported, the permit gives back a half-open probe's place.
            None => permit.abstain(),
        }
        let (failure, response) = match result {
            Ok(response) => match status_failure(response.status().as_u16(), retry) {
                None => {
                    route.upstream.balancer.restore(index);
                    return Forwarded::Answer(response);
                }
                Some(failure) => (failure, Some(response)),
            },
            Err(failure) => {
                route.upstream.eject(failure, via, index);
                (failure, None)
            }
        };
        saw_429 |= failure == Failure::Status(429);
        // A proxy that failed says nothing of the target: the retry may
        // take it again (through the next proxy).
        failed_target = (failure != Failure::ProxyFailed).then_some(index);
        let give_up = |failure: Failure, response: Option<Response<UpstreamBody>>| match response {
            Some(response) if !failure.is_capturable() => Forwarded::Answer(response),
            response => Forwarded::Failed { failure, response },
        };
        let may_retry = attempt < max_attempts
            && failure.is_retryable(retry)
            && (idempotent || failure.before_send());
        if !may_retry {
            return give_up(failure, response);
        }
        let hint = response.as_ref().and_then(|r| retry_after(r.headers()));
        let delay = backoff.delay_with_hint(attempt, hint);
        if failure == Failure::ProxyFailed && proxies.is_some_and(|p| !p.any_usable_after(delay)) {
            tracing::debug!(route = %route.name(), attempt, "no retry: every outbound proxy is being skipped");
            return give_up(failure, response);
        }
        if deadline.is_some_and(|d| Instant::now() + delay >= d) {
            tracing::debug!(route = %route.name(), attempt, "no retry: the deadline is too close");
            return give_up(failure, response);
        }
        if guards.breaker.open_for().is_some() {
            tracing::debug!(route = %route.name(), attempt, "no retry: the circuit is open");
            return give_up(failure, response);
        }
        if !guards.budget.try_retry(retry) {
            tracing::debug!(route = %route.name(), attempt, "no retry: the retry budget is spent");
            return give_up(failure, response);
        }
        tracing::debug!(route = %route.name(), attempt, ?failure, ?delay, "retrying");
        let wake = tokio::time::Instant::now() + delay;
        // The failed answer's connection is not held through the backoff.
        // The backend's own word on this request (a 429 and its
        // `Retry-After`, a 500 it may have applied) is what the client gets
        // if the circuit refuses the retry, so a short one that is all but
        // there is read whole first; any other is let go at once.
        let kept = match response {
            Some(response) if !failure.is_capturable() => {
                read_whole(response, delay.min(KEPT_ANSWER_WAIT)).await
            }
            _ => None,
        };
        tokio::time::sleep_until(wake).await;
        // Admitted after the backoff, not before: a half-open circuit's
        // probe place is not held through it (other requests would be
        // refused meanwhile), and other requests' failures may have opened
        // the circuit while this one waited, which stops this retry too.
        permit = match guards.breaker.admit(breaker_config) {
            Admission::Allowed(next) => next,
            Admission::Rejected { retry_in } => {
                tracing::debug!(route = %route.name(), attempt, "no retry: the circuit refused it after the backoff");
                // The backend's own answer about this request (a 500,
                // which it may have applied; a 429) is not turned into an
                // open circuit's, which would capture it for a second go:
                // the client gets it (or, if it was too long to keep
                // through the backoff, an error that says what it was).
                if !failure.is_capturable() {
                    return give_up(failure, kept);
                }
                return Forwarded::CircuitOpened { retry_in };
            }
        };
        sent_at = Instant::now();
    }
}

/// The most of a failed answer's body kept through a retry's backoff.
const KEPT_ANSWER_BYTES: usize = 64 * 1024;
/// The longest a retry waits for the rest of a failed answer's body (which
/// holds its connection, and its turn on a capped target, meanwhile).
const KEPT_ANSWER_WAIT: Duration = Duration::from_millis(100);

/// `response` with its body read whole, if the body ends within
/// [`KEPT_ANSWER_BYTES`] and `within`; else `None`, the answer let go.
async fn read_whole(
    response: Response<UpstreamBody>,
    within: Duration,
) -> Option<Response<UpstreamBody>> {
    if response.body().size_hint().lower() > KEPT_ANSWER_BYTES as u64 {
        return None;
    }
    let (head, body) = response.into_parts();
    let read = tokio::time::timeout(within, body.read_whole(KEPT_ANSWER_BYTES));
    let body = read.await.ok()??;
    Some(Response::from_parts(head, body))
}

/// An attempt's deadline: its `request_timeout` from `sent_at`, cut short
/// by the request's deadline.
fn try_deadline(sent_at: Instant, timeout: Duration, deadline: Option<Instant>) -> Instant {
    let try_deadline = deadline_after(sent_at, timeout);
    deadline.map_or(try_deadline, |d| d.min(try_deadline))
}

/// Whether an attempt had less than its `request_timeout` because the
/// request's deadline comes first. For a retry, its timeout then says
/// nothing of the backend, so the breaker is not told of it (else a retry
/// with milliseconds left would count as a failure of a healthy, merely
/// slow backend). A first attempt's timeout always counts: a deadline
/// shorter than `request_timeout` is the route's real timeout.
fn cut_short(sent_at: Instant, timeout: Duration, deadline: Option<Instant>) -> bool {
    deadline.is_some_and(|d| d < deadline_after(sent_at, timeout))
}

/// An attempt to a target whose requests in flight are capped
/// (`upstream_max_conns`): its turn first, waited for until the attempt's
/// deadline, then the attempt with its whole `request_timeout` (as far as
/// the request's deadline leaves it), timed from the turn (`sent_at` moves
/// there): the wait is Backstop's queue, not the backend's time, so it
/// neither eats the backend's timeout nor makes the breaker count a slow
/// call. The answer's body holds the turn. The attempt's permit, when its
/// time is the backend's, is told when it went out.
async fn send_in_turn<'r>(
    route: &'r Route,
    slots: &Slots,
    (via, index): (Via, usize),
    outgoing: &mut Outgoing,
    last: bool,
    (sent_at, permit): (&mut Instant, Option<&mut Permit<'r>>),
    deadline: Option<Instant>,
) -> Result<Response<UpstreamBody>, Failure> {
    let breaker_config = &route.config.circuit_breaker;
    let timeout = breaker_config.request_timeout;
    let slot = take_turn(slots, try_deadline(*sent_at, timeout, deadline)).await?;
    *sent_at = Instant::now();
    if let Some(permit) = permit {
        permit.sent(breaker_config, *sent_at);
    }
    let until = try_deadline(*sent_at, timeout, deadline);
    let response = route
        .upstream
        .send_via(via, index, outgoing, last, until)
        .await?;
    Ok(response.map(|body| body.holding(slot)))
}

/// Whether a failed request can be captured: capture is on for its method,
/// the failure says the backend is down, and the body was kept.
fn capturable(proxy: &Proxy, route: &Route, outgoing: &Outgoing, failure: Failure) -> bool {
    let capture = &route.config.capture;
    proxy.capturer.is_some()
        && capture.enabled
        && capture.methods.contains(outgoing.method())
        && failure.is_capturable()
        && matches!(outgoing.body, OutgoingBody::Buffered(_))
}

/// Phase 8: capture a failed capturable request, or explain the failure.
async fn capture_phase(
    proxy: &Proxy,
    route: &Route,
    outgoing: Outgoing,
    failure: Failure,
    response: Option<Response<UpstreamBody>>,
    ctx: &mut RequestContext<'_>,
) -> Result<Response<ResponseBody>, ProxyError> {
    let capturable = capturable(proxy, route, &outgoing, failure);
    if let (true, Some(capturer)) = (capturable, proxy.capturer.as_ref()) {
        // Not passed on: its connection (and its turn, on a capped target)
        // is let go before the capture's write, which may wait on Kafka.
        drop(response);
        return Err(
            match capturer.capture(route, outgoing, failure, ctx).await {
                CaptureOutcome::Captured { id, answer } => {
                    ctx.capture_id = Some(id);
                    answer
                }
                CaptureOutcome::Failed(answer) => answer,
            },
        );
    }
    if let Some(response) = response {
        return Ok(respond(response));
    }
    Err(failure_error(failure, route.name()))
}

/// The answer for a backend that could not be reached or did not answer.
pub fn failure_error(failure: Failure, route: &str) -> ProxyError {
    match failure {
        Failure::Timeout | Failure::ConnectTimeout => ProxyError::new(
            ErrorCode::UpstreamTimeout,
            format!("The backend of route {route} did not answer in time"),
        ),
        Failure::Status(code) => ProxyError::new(
            ErrorCode::UpstreamUnreachable,
            format!("The backend of route {route} answered {code}"),
        ),
        Failure::Saturated => ProxyError::new(
            ErrorCode::UpstreamBusy,
            format!("Every connection to the backend of route {route} stayed busy until the request's time ran out"),
        ),
        Failure::ClientBody => ProxyError::new(
            ErrorCode::BadRequest,
            "The request body could not be read to its end",
        ),
        Failure::ClientStalled => ProxyError::new(
            ErrorCode::RequestTimeout,
            "The request body stopped coming",
        ),
        Failure::InvalidResponse => ProxyError::new(
            ErrorCode::UpstreamInvalidResponse,
            format!("The backend of route {route} sent an answer that is not valid HTTP or is too large"),
        ),
        // The backend was never tried: the proxy's failure, not its.
        Failure::ProxyFailed => ProxyError::new(
            ErrorCode::UpstreamUnreachable,
            format!("No outbound proxy of route {route} could take the request (proxy_failed)"),
        ),
        _ => ProxyError::new(
            ErrorCode::UpstreamUnreachable,
            format!(
                "The backend of route {route} could not be reached ({})",
                failure.reason()
            ),
        ),
    }
}

/// Phase 9: the backend's answer, streamed back without hop-by-hop headers.
fn respond(response: Response<UpstreamBody>) -> Response<ResponseBody> {
    let (mut parts, body) = response.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    parts.version = Version::HTTP_11;
    Response::from_parts(parts, Either::Left(body))
}

fn health() -> Response<ResponseBody> {
    let mut response = Response::new(Either::Right(http_body_util::Full::new(
        bytes::Bytes::from_static(br#"{"status":"ok"}"#),
    )));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Counts the request once, at the end, from its context: answered with
/// `status`, with `error_code` when the answer is Backstop's own. The event
/// goes to the stats aggregator (`stats::recorder`); nothing here locks or
/// waits. The route and capture id are taken, not cloned: nothing reads
/// them after this.
fn record_metrics(
    stats: &Stats,
    max_paths: usize,
    ctx: &mut RequestContext<'_>,
    path: String,
    status: u16,
    error_code: Option<&'static str>,
) {
    stats.record(Event {
        route: ctx.route.take(),
        path,
        status,
        duration: ctx.started.elapsed(),
        attempts: ctx.attempts,
        cache: ctx.cache,
        capture_id: ctx.capture_id.take(),
        failure: ctx.failure,
        error_code,
        max_paths,
    });
}

/// The status a request is counted and logged with when its client went
/// away before its answer was ready (nginx's, for the same).
const CLIENT_CLOSED: u16 = 499;

/// A request on its way through the pipeline. Dropped before it is
/// answered — an HTTP/2 client's `RST_STREAM` (or a closed connection)
/// cancels `handle` — it is still logged and counted, as `499` with error
/// `client_closed` (its span ended so too): the requests a slow backend
/// loses to its clients' deadlines are what the statistics must show.
struct Unanswered<'a, 'c> {
    proxy: &'a Proxy,
    active: &'a Active,
    path: Option<&'a str>,
    ctx: &'a mut RequestContext<'c>,
    answered: bool,
}

impl Drop for Unanswered<'_, '_> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        let ctx = &mut *self.ctx;
        ctx.span.cancelled(ctx);
        let Some(path) = self.path else {
            return;
        };
        let (log, stats) = (&self.active.config.log, &self.active.config.stats);
        if log.access_log {
            let status = StatusCode::from_u16(CLIENT_CLOSED).unwrap_or(StatusCode::BAD_REQUEST);
            log_access(ctx, path, status);
        }
        if stats.enabled {
            let (stats_of, max_paths) = (&self.proxy.stats, stats.max_paths_per_route);
            let path = path.to_string();
            record_metrics(
                stats_of,
                max_paths,
                ctx,
                path,
                CLIENT_CLOSED,
                Some("client_closed"),
            );
        }
    }
}

fn log_access(ctx: &RequestContext<'_>, path: &str, status: StatusCode) {
    tracing::info!(
        target: "backstop::access",
        request_id = ctx.request_id(),
        client = %ctx.client.addr,
        client_ip = %ctx.client_ip,
        method = %ctx.method,
        path,
        route = ctx.route_name().unwrap_or("-"),
        status = status.as_u16(),
        attempts = ctx.attempts,
        failure = ctx.failure.map(|f| f.reason()).unwrap_or_default(),
        cache = ctx.cache.unwrap_or_default(),
        capture_id = ctx.capture_id.as_deref().unwrap_or_default(),
        trace_id = ctx.trace.trace_id(),
        duration_ms = ctx.started.elapsed().as_secs_f64() * 1000.0,
        "request"
    );
}

/// `Retry-After` in seconds (the HTTP-date form is rare from APIs and ignored).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let secs: u64 = headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs))
}

/// Why a request cannot be routed, if it cannot (RFC 9112 §3.2): a
/// `CONNECT` (Backstop is no tunnel), a target in authority form (only for
/// `CONNECT`) or asterisk form other than `OPTIONS *`, user info in an
/// absolute-form target, and for HTTP/1.1 a `Host` missing, repeated or
/// not a host.
fn unroutable(req: &Request<ClientBody>, names: &RequestNames<'_>) -> Option<&'static str> {
    let uri = req.uri();
    if req.method() == Method::CONNECT {
        return Some("CONNECT is not supported: Backstop is a reverse proxy, not a tunnel");
    }
    if let Some(authority) = uri.authority() {
        if uri.scheme().is_none() {
            return Some("A request target in authority form is only for CONNECT");
        }
        if authority.as_str().contains('@') {
            return Some("A request target must not carry user info");
        }
    }
    if uri.path() == "*" && req.method() != Method::OPTIONS {
        return Some("The request target * is only for OPTIONS");
    }
    match (names.host, names.host_lines) {
        // HTTP/1.0 may leave `Host` out; HTTP/2 names the host in
        // `:authority`. One they do send is checked as any other.
        (None, _) if req.version() != Version::HTTP_11 => None,
        (None, _) => Some("An HTTP/1.1 request must carry a Host header"),
        (_, 2..) => Some("A request must carry one Host header, not several"),
        (Some(host), _) if !host.as_bytes().iter().all(|&b| HOST_BYTES[usize::from(b)]) => {
            Some("The Host header is not a host and port")
        }
        _ => None,
    }
}

/// Makes the request's path canonical before it is routed (see
/// `canonical_path`); the reason to refuse it when it has none.
fn make_path_canonical(
    req: &mut Request<ClientBody>,
    rules: canonical_path::PathRules,
) -> Option<Cow<'static, str>> {
    let resolved = match canonical_path::resolve(req.uri().path(), rules) {
        canonical_path::Resolved::Unchanged => return None,
        canonical_path::Resolved::Refused(refusal) => {
            return Some(format!("The request path {}", refusal.reason()).into())
        }
        canonical_path::Resolved::Changed(path) => path,
    };
    let target = match req.uri().query() {
        Some(query) => format!("{resolved}?{query}"),
        None => resolved,
    };
    // Refused, not routed as it came, should the canonical path not make
    // a URI: it is ASCII, but escaping bytes beyond ASCII can take it past
    // the longest URI `http` takes (64 KiB).
    let unusable = Some("The request path cannot be made canonical".into());
    let mut parts = req.uri().clone().into_parts();
    let Ok(path_and_query) = http::uri::PathAndQuery::try_from(target) else {
        return unusable;
    };
    parts.path_and_query = Some(path_and_query);
    match http::Uri::from_parts(parts) {
        Ok(uri) => *req.uri_mut() = uri,
        Err(_) => return unusable,
    }
    None
}

/// The bytes of `uri-host [ ":" port ]` (RFC 3986), as a `Host` value may
/// have them: a registered name's, an IP literal's brackets and a port's
/// colon; nothing that would read as a path, query, user info or space. A
/// table, as every request's host is checked: looking each byte up in the
/// list cost about 40 instructions per dot or colon.
static HOST_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = (b as u8).is_ascii_alphanumeric();
        b += 1;
    }
    let others = b"-._~%!$&'()*+,;=:[]";
    let mut i = 0;
    while i < others.len() {
        table[others[i] as usize] = true;
        i += 1;
    }
    table
};

/// The host the client asked for: the URI's authority (HTTP/2, absolute
/// form), else the Host header.
fn request_host<'a>(uri: &'a http::Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    uri.authority()
        .map(|a| a.as_str())
        .or_else(|| headers.get(HOST).and_then(|h| h.to_str().ok()))
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split(']').next().map_or(host, |h| &h[1..]);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}
