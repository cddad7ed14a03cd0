//! Active health checks (`routes.health_check`): every `interval`, a `GET
//! path` to each of the route's targets. `unhealthy_threshold` failures in a
//! row (no answer within `timeout`, or a status other than 2xx/3xx) take a
//! target out of the balancer's rotation; `healthy_threshold` successes in
//! a row bring it back.
//!
//! The verdicts are kept here by (route, target URL), not in the `Route`, so
//! they survive a reload: each round applies them to the routes in force.
//! Checks go straight to the targets (never through outbound proxies) and
//! never carry client data.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use http::{Method, Request, Version};
use tokio_util::sync::CancellationToken;

use crate::body::BufferedBody;
use crate::config::HealthCheckConfig;
use crate::pipeline::Proxy;
use crate::routing::Route;
use crate::upstream::upstream_uri;

/// How often the checker looks for due checks.
const TICK: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy)]
struct TargetHealth {
    healthy: bool,
    /// Consecutive results that disagree with `healthy`.
    streak: u32,
    next_check: Instant,
    /// A check of this target is running: no second one starts beside it.
    checking: bool,
    /// The last tick that found the target checked in the route table.
    seen_at: u64,
}

/// A finished check: which target, and whether it passed.
struct Checked {
    key: (String, String),
    route: Arc<Route>,
    index: usize,
    check: HealthCheckConfig,
    ok: bool,
}

/// Runs the checks of every route that has them, until `shutdown`. Checks
/// run side by side and are counted as each ends: a target that takes its
/// whole `timeout` holds up no other target's checks, nor the verdicts
/// applied each tick.
pub async fn run(proxy: Arc<Proxy>, shutdown: CancellationToken) {
    let mut health: HashMap<(String, String), TargetHealth> = HashMap::new();
    let mut running = FuturesUnordered::new();
    let mut ticker = tokio::time::interval(TICK);
    let mut tick: u64 = 0;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            Some(checked) = running.next() => {
                record(&mut health, checked);
                continue;
            }
            _ = ticker.tick() => {}
        }
        tick += 1;
        let active = proxy.active.load_full();
        let now = Instant::now();
        for route in active.routes.iter() {
            let Some(check) = &route.config.health_check else {
                continue;
            };
            for (index, target) in route.upstream.balancer.targets().iter().enumerate() {
                let key = (route.name().to_string(), target.base.to_string());
                let state = health.entry(key.clone()).or_insert(TargetHealth {
                    healthy: true,
                    streak: 0,
                    next_check: now,
                    checking: false,
                    seen_at: tick,
                });
                state.seen_at = tick;
                // Applied every tick: a reload builds new balancers.
                route.upstream.balancer.set_healthy(index, state.healthy);
                // A reload that shortens `interval` does not wait out the
                // old one.
                state.next_check = state.next_check.min(now + check.interval);
                if state.next_check <= now && !state.checking {
                    state.next_check = now + check.interval;
                    state.checking = true;
                    let (route, check) = (route.clone(), check.clone());
                    running.push(async move {
                        let ok = probe(&route, index, &check).await;
                        Checked {
                            key,
                            route,
                            index,
                            check,
                            ok,
                        }
                    });
                }
            }
        }
        // A target a reload removed (or whose route stopped checking) is
        // forgotten: back one day, it starts healthy rather than out of
        // rotation on a verdict of the past (and the table stays bounded).
        health.retain(|_, state| state.seen_at == tick);
    }
}

/// Counts a check's result; enough in a row change the target's verdict.
fn record(health: &mut HashMap<(String, String), TargetHealth>, checked: Checked) {
    let Checked {
        key,
        route,
        index,
        check,
        ok,
    } = checked;
    let Some(state) = health.get_mut(&key) else {
        return;
    };
    state.checking = false;
    if ok == state.healthy {
        state.streak = 0;
        return;
    }
    state.streak += 1;
    let needed = if ok {
        check.healthy_threshold
    } else {
        check.unhealthy_threshold
    };
    if state.streak >= needed {
        state.healthy = ok;
        state.streak = 0;
        route.upstream.balancer.set_healthy(index, ok);
        let (route_name, target) = &key;
        if ok {
            tracing::info!(route = %route_name, %target, "target healthy again");
        } else {
            tracing::warn!(route = %route_name, %target, "target unhealthy: out of rotation");
        }
    }
}

/// One check: whether the target answered 2xx/3xx in time.
async fn probe(route: &Route, index: usize, check: &HealthCheckConfig) -> bool {
    let Some(target) = route.upstream.balancer.targets().get(index) else {
        return false;
    };
    let Ok(uri) = upstream_uri(&target.base, &check.path, None) else {
        return false;
    };
    let mut request = Request::new(BufferedBody::default().to_request_body());
    *request.method_mut() = Method::GET;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    // The route's own headers, as on every request to its backend: an API
    // key, or the `Host` of a virtual host reached by address.
    let headers = request.headers_mut();
    for (name, value) in route.config.headers.iter() {
        headers.insert(name.clone(), value.clone());
    }
    let deadline = crate::upstream::deadline_after(std::time::Instant::now(), check.timeout);
    match route.upstream.send(index, request, None, deadline).await {
        Ok(response) => {
            let ok = response.status().is_success() || response.status().is_redirection();
            // Drain the body so the pooled connection can be reused, but
            // only until the check's deadline: a body that trickles (cut
            // only after `body_read_timeout`) would hold this target's next
            // check back.
            let drain = http_body_util::BodyExt::collect(response.into_body());
            let _ = tokio::time::timeout_at(deadline.into(), drain).await;
            ok
        }
        Err(_) => false,
    }
}
