//! `GET /metrics`: OpenMetrics text (which Prometheus scrapes). Queue
//! gauges are read from the spool at scrape time, so they are exact whoever
//! changed the queue (the worker, the CLI, another process), and keep their
//! last values when it cannot be read; the turn gauges of capped targets
//! from the route table, so the request path counts nothing for them; the
//! circuit states as a caller would find them now; the bytes of request
//! bodies buffered, from the budget they are taken from.

use std::collections::HashMap;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::AdminState;
use crate::stats::metrics::{label_value, RouteUpstream};

pub fn routes() -> Router<AdminState> {
    Router::new().route("/metrics", get(metrics))
}

async fn metrics(State(state): State<AdminState>) -> Response {
    // Request metrics are applied by the stats aggregator: let it catch up
    // so a scrape counts every request that finished before it.
    state.proxy.stats.flush().await;
    let m = &state.proxy.metrics;
    match super::queue::snapshot(&state).await {
        Ok(snapshot) => {
            m.queue_depth.set(snapshot.depth() as i64);
            m.dead_letters.set(snapshot.stats.dead_letters as i64);
            m.queue_oldest_age_seconds.set(snapshot.stats.oldest_age_s);
            m.spool_up.set(1);
        }
        // The other series are what an operator needs most when the spool
        // fails: the queue gauges keep their last values, `spool_up` says
        // they are stale, and the log says why.
        Err(e) => {
            m.spool_up.set(0);
            tracing::warn!(error = %e, "metrics: cannot read the spool; queue gauges not updated");
        }
    }
    let buffered = state.proxy.buffers.held();
    m.buffered_request_bytes
        .set(i64::try_from(buffered).unwrap_or(i64::MAX));
    record_turns(&state);
    publish_circuits(&state);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.proxy.metrics.encode(),
    )
        .into_response()
}

/// `backstop_circuit_state` of every configured route, as
/// `/circuit-status` reads it: one with no traffic yet has its series (0),
/// and one whose reset timeout passed reads half-open (2), not open.
fn publish_circuits(state: &AdminState) {
    let active = state.proxy.active.load();
    for route in active.routes.iter() {
        state
            .proxy
            .resilience
            .route(route.name())
            .breaker
            .publish_state();
    }
}

/// `backstop_upstream_in_flight` and `_waiting` of every target of a route
/// with `upstream_max_conns`. A URL listed twice in a route is one series,
/// the sum of both targets.
fn record_turns(state: &AdminState) {
    let mut turns: HashMap<RouteUpstream, (i64, i64)> = HashMap::new();
    let active = state.proxy.active.load();
    for route in active.routes.iter() {
        for target in route.upstream.balancer.targets() {
            let Some(slots) = target.slots() else {
                continue;
            };
            let labels = RouteUpstream {
                route: route.name().to_string(),
                upstream: label_value(&target.base.to_string()),
            };
            let sums = turns.entry(labels).or_default();
            sums.0 += slots.in_flight() as i64;
            sums.1 += slots.waiting() as i64;
        }
    }
    state.proxy.metrics.set_turns(turns);
}
