//! The admin listener: health, the capture queue, metrics, statistics and
//! the dashboards (and, as later parts land, circuits). Each area is a small
//! router merged here; a bearer token guards everything but `/health` and the
//! dashboard pages (which hold no data) when `server.admin_token` is set, and
//! `origin` keeps other sites' pages out (cross-site requests, DNS rebinding).

mod cache;
mod circuits;
mod dashboards;
mod metrics;
mod origin;
pub(crate) mod queue;
mod stats;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::capture::spool::Spool;
use crate::pipeline::Proxy;
use crate::replay::kafka_lag::KafkaLag;
use crate::replay::ReplayCounters;

/// What admin handlers may read and act on.
#[derive(Clone)]
pub struct AdminState {
    pub proxy: Arc<Proxy>,
    pub spool: Arc<Spool>,
    pub replay: Arc<ReplayCounters>,
    /// With `[kafka]`: reads the replay group's backlog.
    pub kafka_lag: Option<Arc<KafkaLag>>,
    pub token: Option<Arc<str>>,
    /// Whether the admin listener is bound to a loopback address (as bound:
    /// a reload does not move it).
    pub on_loopback: bool,
}

pub fn router(state: AdminState) -> Router {
    let guarded = Router::new()
        .merge(queue::routes())
        .merge(cache::routes())
        .merge(metrics::routes())
        .merge(circuits::routes())
        .merge(stats::routes())
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            origin::same_origin_only,
        ));
    Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .merge(dashboards::routes())
        .merge(guarded)
        .with_state(state)
}

async fn require_token(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    let Some(token) = &state.token else {
        return next.run(request).await;
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if presented.is_some_and(|p| constant_time_eq(p.as_bytes(), token.as_bytes())) {
        next.run(request).await
    } else {
        admin_error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "A valid bearer token is required",
        )
    }
}

/// Compares without an early exit, so response timing does not reveal how
/// much of a guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The admin API's error answer, in the proxy's JSON error shape.
pub fn admin_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        [("x-backstop-error", code.to_string())],
        Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}
