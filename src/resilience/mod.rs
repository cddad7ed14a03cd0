//! Policies that protect backends and their callers: the circuit breaker,
//! retry backoff and budget, rate limits and active health checks.
//!
//! Their state must outlive a reload (a reload rebuilds every `Route`), so it
//! lives in the [`Registry`], keyed by route name and held by the `Proxy`.
//! Looking a route up is a lock-free map read; only the first request of a
//! route that is new since start takes a lock, to add it.

pub mod backoff;
pub mod breaker;
pub mod budget;
pub mod health;
pub mod rate_limit;
pub mod shared_limit;
mod window;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use foldhash::HashMap;

use crate::config::RouteConfig;
use crate::stats::metrics::{self, Metrics};
use breaker::{Breaker, CircuitState};
use budget::RetryBudget;
use rate_limit::RateLimiter;
use shared_limit::SharedLimiter;

/// The run-time state of one route's policies.
#[derive(Debug)]
pub struct RouteGuards {
    pub breaker: Arc<Breaker>,
    pub budget: RetryBudget,
    pub limiter: RateLimiter,
}

/// Every route's policy state, by route name.
pub struct Registry {
    routes: ArcSwap<HashMap<String, Arc<RouteGuards>>>,
    adding: Mutex<()>,
    metrics: Arc<Metrics>,
    /// The rate limits shared across instances through Redis.
    pub shared: SharedLimiter,
}

/// A route's upstreams as a set, each as its URI reads: scheme, host,
/// port and base path (`http://a` and `http://A:80/` are one target).
fn targets(upstreams: &[http::Uri]) -> Vec<(String, String, u16, String)> {
    let mut set: Vec<_> = (upstreams.iter())
        .map(|uri| {
            let scheme = uri.scheme_str().unwrap_or("").to_string();
            let port = uri
                .port_u16()
                .unwrap_or(if scheme == "https" { 443 } else { 80 });
            let host = uri.host().unwrap_or("").to_ascii_lowercase();
            let base = uri.path().trim_end_matches('/').to_string();
            (scheme, host, port, base)
        })
        .collect();
    set.sort();
    set.dedup();
    set
}

impl Registry {
    pub fn new(metrics: Arc<Metrics>) -> Registry {
        Registry {
            routes: ArcSwap::from_pointee(HashMap::default()),
            adding: Mutex::new(()),
            metrics,
            shared: SharedLimiter::default(),
        }
    }

    /// How long route `name`'s circuit stays open, if it is open. Creates
    /// nothing: the replay workers ask for names read from records (a
    /// Kafka topic's keys may be anything, or routes removed by a reload),
    /// and a route with no state yet has a closed circuit.
    pub fn open_for(&self, name: &str) -> Option<Duration> {
        self.routes.load().get(name)?.breaker.open_for()
    }

    /// The state of route `name`, created (closed breaker, full buckets) on
    /// first use.
    pub fn route(&self, name: &str) -> Arc<RouteGuards> {
        if let Some(guards) = self.routes.load().get(name) {
            return guards.clone();
        }
        let _adding = self.adding.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.routes.load_full();
        if let Some(guards) = current.get(name) {
            return guards.clone();
        }
        let gauge = self
            .metrics
            .circuit_state
            .get_or_create(&metrics::route(name))
            .clone();
        let guards = Arc::new(RouteGuards {
            breaker: Arc::new(Breaker::new(gauge)),
            budget: RetryBudget::default(),
            limiter: RateLimiter::default(),
        });
        let mut next = HashMap::clone(&current);
        next.insert(name.to_string(), guards.clone());
        self.routes.store(Arc::new(next));
        guards
    }

    /// Resets the circuit of each route a reload gave other upstreams (not
    /// the same ones in another order or spelling): its failures said how
    /// the old ones were, not the new (an operator who moves a route off a
    /// dead backend wants it used now, not after `reset_timeout`). Creates
    /// nothing; returns the routes whose circuit was not closed.
    pub fn close_moved_routes(&self, before: &[RouteConfig], now: &[RouteConfig]) -> Vec<String> {
        let routes = self.routes.load();
        let mut closed = Vec::new();
        for route in now {
            let moved = before.iter().any(|old| {
                old.name == route.name && targets(&old.upstreams) != targets(&route.upstreams)
            });
            if let Some(guards) = routes.get(&route.name).filter(|_| moved) {
                let state = guards.breaker.snapshot(&route.circuit_breaker).state;
                guards.breaker.reset(&route.circuit_breaker);
                if state != CircuitState::Closed {
                    closed.push(route.name.clone());
                }
            }
        }
        closed
    }

    /// Forgets the routes a reload removed: their breakers (which an
    /// operator could no longer reset) and their `backstop_circuit_state`
    /// series (an open one would alert forever). Requests still in flight
    /// keep what they hold; a route added back starts closed.
    pub fn forget_all_but(&self, kept: &[RouteConfig]) {
        let _adding = self.adding.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.routes.load_full();
        let is_kept = |name: &str| kept.iter().any(|r| r.name == name);
        if current.keys().all(|name| is_kept(name)) {
            return;
        }
        let mut next = HashMap::clone(&current);
        next.retain(|name, _| {
            let keep = is_kept(name);
            if !keep {
                self.metrics.circuit_state.remove(&metrics::route(name));
            }
            keep
        });
        self.routes.store(Arc::new(next));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstreams_in_another_order_or_spelling_are_the_same_targets() {
        let uris =
            |list: &[&str]| -> Vec<http::Uri> { list.iter().map(|u| u.parse().unwrap()).collect() };
        let same = |a: &[&str], b: &[&str]| targets(&uris(a)) == targets(&uris(b));
        assert!(same(
            &["http://a", "https://b/base/"],
            &["https://B:443/base", "http://a:80/"]
        ));
        assert!(!same(&["http://a"], &["http://a:8080"]));
        assert!(!same(&["http://a"], &["https://a"]));
        assert!(!same(&["http://a/v1"], &["http://a/v2"]));
        assert!(!same(&["http://a"], &["http://a", "http://b"]));
    }
}
