//! The admin listener: health, the capture queue, circuits, the cache,
//! metrics, statistics and the dashboards. Each area is a small router
//! merged here; a bearer token guards everything but `/health` and the
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
        .layer(middleware::map_response(in_the_error_shape))
}

/// The answers axum makes itself (an unknown path, a method not allowed, a
/// query or path segment it cannot read) in the JSON error shape too.
async fn in_the_error_shape(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error())
        || response.headers().contains_key("x-backstop-error")
    {
        return response;
    }
    let allow = response.headers().get(header::ALLOW).cloned();
    let (code, message) = match status {
        StatusCode::NOT_FOUND => ("not_found", "No such admin endpoint".to_string()),
        StatusCode::METHOD_NOT_ALLOWED => (
            "method_not_allowed",
            "This admin endpoint does not take this method".to_string(),
        ),
        _ => {
            // axum's own explanation (say, which query parameter is wrong).
            let body = axum::body::to_bytes(response.into_body(), 4096).await;
            let text = body.map(|b| String::from_utf8_lossy(&b).into_owned());
            let code = if status.is_client_error() {
                "bad_request"
            } else {
                "internal_error"
            };
            (code, text.unwrap_or_default())
        }
    };
    let mut answer = admin_error(status, code, &message);
    if let Some(allow) = allow {
        answer.headers_mut().insert(header::ALLOW, allow);
    }
    answer
}

impl AdminState {
    /// Whether the running configuration sets `admin_token`: read on every
    /// request, so a reload that sets or rotates the token applies at once.
    pub fn token_required(&self) -> bool {
        self.proxy.active.load().config.server.admin_token.is_some()
    }

    /// Whether `request` may pass: no token is configured, or it presents
    /// the configured one.
    fn authorized(&self, request: &Request) -> bool {
        let active = self.proxy.active.load();
        let Some(token) = active.config.server.admin_token.as_deref() else {
            return true;
        };
        request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_credentials)
            .is_some_and(|p| constant_time_eq(p.as_bytes(), token.as_bytes()))
    }
}

/// The token of an `Authorization: Bearer TOKEN` value; the scheme's name
/// is case-insensitive (RFC 9110 §11.1), and spaces may follow it.
fn bearer_credentials(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start_matches(' '))
}

async fn require_token(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    if state.authorized(&request) {
        next.run(request).await
    } else {
        let mut refusal = admin_error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "A valid bearer token is required",
        );
        // A 401 names the scheme it wants (RFC 9110 §11.6.1).
        refusal.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        refusal
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
