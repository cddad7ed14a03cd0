//! One replay attempt: the captured request, mapped through the route's
//! *current* configuration (upstreams, prefix stripping, configured headers),
//! with `Idempotency-Key: <id>` and `X-Backstop-Replay-Attempt: n`. A write
//! the backend accepts makes the route's cached reads of its URI stale, as
//! it would have live. A replay worker's attempts go through the route's
//! circuit breaker as clients' requests do: a half-open circuit's probe
//! places bound them, and their outcomes close or open it (a route whose
//! only traffic is replays would otherwise stay half-open for ever).

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use http::header::{HeaderValue, HOST};
use http::{HeaderName, Method, Request, Version};
use http_body_util::BodyExt;

use crate::body::{BufferedBody, UpstreamBody};
use crate::buffer_budget::Hold;
use crate::cache::{Caches, Target};
use crate::capture::record::{CaptureRecord, REDACTED};
use crate::classify::{status_trips_breaker, Failure};
use crate::config::Config;
use crate::headers::{self, ClientInfo, X_REQUEST_ID};
use crate::pipeline::{Active, Proxy};
use crate::resilience::breaker::{Admission, Breaker};
use crate::routing::Route;
use crate::upstream::{deadline_after, proxy_pool, take_turn, upstream_uri};

pub const X_BACKSTOP_REPLAY_ATTEMPT: HeaderName =
    HeaderName::from_static("x-backstop-replay-attempt");

/// What a replay attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// The backend accepted it (2xx/3xx): done.
    Delivered(u16),
    /// Worth trying again later (5xx, 408, 429, transport failures).
    Retry(String),
    /// Never going to work (other 4xx, an unusable record): dead letter.
    Dead(String),
    /// Not sent: every request the target may take at once
    /// (`upstream_max_conns`) stayed in flight. Tried again later without
    /// spending an attempt, as when the circuit is open.
    Busy(String),
}

/// A replay worker's attempt: `record` sent once to its route in `active`,
/// through the route's circuit breaker; a record whose route is not
/// configured is tried again later (a reload may bring it back).
pub async fn deliver_by_worker(
    proxy: &Proxy,
    active: &Active,
    record: &CaptureRecord,
    attempt: u32,
) -> Delivery {
    let Some(route) = active.routes.get(&record.route) else {
        return Delivery::Retry(format!("route {:?} is not configured", record.route));
    };
    let breaker = &route.guards(&proxy.resilience).breaker;
    let config = &active.config;
    deliver(&proxy.caches, config, route, record, attempt, Some(breaker)).await
}

/// Sends `record` to `route`'s backend once; `config` is the one `route`
/// belongs to, `caches` those whose entries an accepted write makes stale,
/// `breaker` the route's circuit (none for an operator's replay by hand).
pub async fn deliver(
    caches: &Caches,
    config: &Config,
    route: &Route,
    record: &CaptureRecord,
    attempt: u32,
    breaker: Option<&Breaker>,
) -> Delivery {
    let (target, request) = match build_request(config, route, record, attempt) {
        Ok(r) => r,
        Err(reason) => return Delivery::Dead(reason),
    };
    let timeout = route.config.circuit_breaker.request_timeout;
    // On a capped target a replay waits its turn as clients' requests do,
    // and holds it until the answer is read; the wait is not the attempt's
    // time, and a replay that got no turn was not sent: no attempt spent.
    let _turn = match route.upstream.balancer.slots(target) {
        Some(slots) => match take_turn(slots, deadline_after(Instant::now(), timeout)).await {
            Ok(turn) => Some(turn),
            Err(failure) => return Delivery::Busy(describe(failure)),
        },
        None => None,
    };
    let breaker_config = &route.config.circuit_breaker;
    let permit = match breaker.map(|b| b.admit(breaker_config)) {
        None => None,
        Some(Admission::Allowed(permit)) => Some(permit),
        // Opened since the worker looked, or half-open with every probe
        // place taken: not sent, no attempt spent.
        Some(Admission::Rejected { .. }) => {
            return Delivery::Busy("the circuit admits no call now".to_string())
        }
    };
    let sent_at = Instant::now();
    let deadline = deadline_after(sent_at, timeout);
    // Through the route's outbound proxies, as its clients' requests go
    // (a backend may be reachable, or allow this caller, only that way);
    // on an `on_rate_limit` route from the second attempt on (a replay does
    // not keep why its last attempt failed: a 429 is as likely as any).
    let retried = attempt > 1;
    let via = proxy_pool::choose(
        route.upstream.proxies.as_ref(),
        &route.config.proxy,
        retried,
    );
    let result = route
        .upstream
        .send_through(via, target, request, deadline)
        .await;
    // What a replay finds down is skipped by clients' requests too, as
    // theirs is by replays.
    if let Err(failure) = &result {
        route.upstream.eject(*failure, via, target);
    }
    if let Some(permit) = permit {
        let verdict = match &result {
            Ok(response) => Some(status_trips_breaker(response.status().as_u16())),
            Err(failure) => failure.breaker_verdict(),
        };
        match verdict {
            Some(failed) => permit.record(breaker_config, failed, sent_at),
            None => permit.abstain(),
        }
    }
    match result {
        Ok(response) => {
            let status = response.status().as_u16();
            let _ = tokio::time::timeout_at(deadline.into(), drain(response.into_body())).await;
            let delivery = classify_status(status);
            if let Delivery::Delivered(_) = delivery {
                invalidate_cached_reads(caches, config, route, record).await;
            }
            delivery
        }
        // The backend had the request: sent again, it would apply it twice.
        Err(Failure::InvalidResponse) => Delivery::Dead(describe(Failure::InvalidResponse)),
        Err(failure) => Delivery::Retry(describe(failure)),
    }
}

/// The most of an answer's body a replay reads (and forgets) so that its
/// connection can be reused; past it the connection is dropped instead.
const DRAIN_BYTES: usize = 1024 * 1024;

/// Reads and forgets an answer's body to its end, up to [`DRAIN_BYTES`]:
/// the status is all a replay needs. Nothing is kept (a backend answering
/// a replayed write with a large or endless body cannot grow the process),
/// and the caller bounds the time (a body that stalls, cut only after the
/// route's `body_read_timeout`, must not hold up the queue behind it).
async fn drain(mut body: UpstreamBody) {
    let mut read = 0usize;
    while let Some(Ok(frame)) = body.frame().await {
        read = read.saturating_add(frame.data_ref().map_or(0, Bytes::len));
        if read > DRAIN_BYTES {
            return;
        }
    }
}

/// The cache's side of a delivered write: keyed as the client's request
/// was (its scheme, host, path, query and headers, as recorded), so that
/// it names the entries the live write would have.
async fn invalidate_cached_reads(
    caches: &Caches,
    config: &Config,
    route: &Route,
    record: &CaptureRecord,
) {
    if !route.config.cache.enabled {
        return;
    }
    let req = &record.request;
    let Ok(method) = Method::from_bytes(req.method.as_bytes()) else {
        return;
    };
    let headers = req.header_map();
    // Records written before the client's host was kept: the recorded Host.
    let host = match &record.client.host {
        Some(host) => Some(host.as_bytes()),
        None => headers.get(HOST).map(HeaderValue::as_bytes),
    };
    let target = Target {
        scheme: scheme(record),
        host,
        path: &req.path,
        query: req.query.as_deref(),
        headers: &headers,
    };
    caches.written(config, route, &method, &target).await;
}

/// How the client reached Backstop (records written before it: `http`).
fn scheme(record: &CaptureRecord) -> &'static str {
    match record.client.proto.as_deref() {
        Some("https") => "https",
        _ => "http",
    }
}

/// A replay's outcome by the backend's status. Besides 408 and 429, a 409
/// is tried again: it is what a backend that keeps idempotency keys (the
/// IETF draft, Stripe) answers while the request under the same key is
/// still being processed, as the live attempt that timed out may be when
/// its replay comes; and a 425 asks for the request to be sent again.
/// Other 4xx say the request itself is wrong and go to the dead letters.
fn classify_status(status: u16) -> Delivery {
    match status {
        200..=399 => Delivery::Delivered(status),
        408 | 409 | 425 | 429 => Delivery::Retry(format!("backend answered {status}")),
        400..=499 => Delivery::Dead(format!("backend answered {status}")),
        _ => Delivery::Retry(format!("backend answered {status}")),
    }
}

fn describe(failure: Failure) -> String {
    match failure {
        Failure::Status(code) => format!("backend answered {code}"),
        other => other.reason(),
    }
}

fn build_request(
    config: &Config,
    route: &Route,
    record: &CaptureRecord,
    attempt: u32,
) -> Result<(usize, Request<crate::body::RequestBody>), String> {
    let idempotency_header = &config.replay.idempotency_header;
    let req = &record.request;
    let method = Method::from_bytes(req.method.as_bytes())
        .map_err(|_| format!("invalid method {:?}", req.method))?;
    let body = record.body().map_err(|e| e.to_string())?;
    let (index, target) = route.upstream.balancer.pick();
    let path = route.upstream_path(&req.path).ok_or_else(|| {
        format!(
            "path {:?} is no longer under the route's path_prefix (changed since the capture)",
            req.path
        )
    })?;
    let uri = upstream_uri(&target.base, path, req.query.as_deref())
        .map_err(|e| format!("invalid path {:?}: {e}", req.path))?;

    let mut headers = req.header_map();
    // The key the live attempts carried: the client's own, else (none, or
    // redacted in the record) the capture id; see `outgoing::Capturable`.
    let key = match headers.get(idempotency_header) {
        Some(own) if own != REDACTED => own.clone(),
        _ => {
            HeaderValue::from_str(&record.id).map_err(|_| format!("invalid id {:?}", record.id))?
        }
    };
    headers::strip_hop_by_hop_but_trailers(&mut headers, route.carries_trailers());
    // Whether the peer is trusted is asked again of today's setting (a
    // record made before it changed, or before Backstop dropped the
    // claims of untrusted peers when capturing, may hold them).
    let peer = record.client.addr.parse::<SocketAddr>().ok();
    let peer_trusted = peer.is_some_and(|p| config.server.trusted_proxies.trusts(p.ip()));
    if !peer_trusted {
        headers::strip_client_claims(&mut headers);
    }
    headers::filter_forwarded(&mut headers, &route.config.forward_headers);
    let recorded_host = headers.remove(HOST);
    let original_host = match &record.client.host {
        Some(host) => HeaderValue::from_str(host).ok(),
        None => recorded_host,
    };
    let proto = scheme(record);
    if let Some(peer) = peer {
        let client = ClientInfo::new(peer, proto);
        headers::set_forwarded(&mut headers, &client, original_host.as_ref());
    }
    for (name, value) in route.config.headers.iter() {
        headers.insert(name.clone(), value.clone());
    }
    headers.insert(idempotency_header.clone(), key);
    headers.insert(X_BACKSTOP_REPLAY_ATTEMPT, HeaderValue::from(attempt));
    if let Ok(rid) = HeaderValue::from_str(&record.client.request_id) {
        headers.insert(X_REQUEST_ID, rid);
    }

    let mut request = Request::new(BufferedBody(body.into(), Hold::default()).to_request_body());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    Ok((index, request))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_outcomes() {
        let cases = [
            (200, "delivered"),
            (204, "delivered"),
            (302, "delivered"),
            (400, "dead"),
            (404, "dead"),
            (408, "retry"),
            (409, "retry"),
            (410, "dead"),
            (425, "retry"),
            (429, "retry"),
            (500, "retry"),
            (503, "retry"),
        ];
        for (status, want) in cases {
            let got = match classify_status(status) {
                Delivery::Delivered(_) => "delivered",
                Delivery::Retry(_) => "retry",
                Delivery::Dead(_) => "dead",
                Delivery::Busy(_) => "busy",
            };
            assert_eq!(got, want, "{status}");
        }
    }
}
