//! `GET /circuit-status` and `POST /circuits/{route}/reset`: every
//! configured route's breaker, its state and its configuration. Only
//! breaker settings are shown (never upstream or proxy credentials).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::{admin_error, AdminState};
use crate::config::{BreakerConfig, BreakerMode};

pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/circuit-status", get(circuit_status))
        .route("/circuits/{route}/reset", post(reset))
}

async fn circuit_status(State(state): State<AdminState>) -> Json<Value> {
    let active = state.proxy.active.load_full();
    let circuits: Vec<Value> = active
        .config
        .routes
        .iter()
        .map(|route| {
            let config = &route.circuit_breaker;
            let breaker = &state.proxy.resilience.route(&route.name).breaker;
            let snap = breaker.snapshot(config);
            json!({
                "route": route.name,
                "state": snap.state.as_str(),
                "failures": snap.failures,
                "successes": snap.successes,
                "calls": snap.calls,
                "time_to_reset": snap.time_to_reset.as_secs_f64(),
                "config": config_json(config),
            })
        })
        .collect();
    Json(json!({ "circuits": circuits }))
}

fn config_json(config: &BreakerConfig) -> Value {
    let mut out = json!({
        "mode": match config.mode {
            BreakerMode::Consecutive => "consecutive",
            BreakerMode::FailureRate => "failure_rate",
        },
        "failure_threshold": config.failure_threshold,
        "reset_timeout": config.reset_timeout.as_secs_f64(),
        "request_timeout": config.request_timeout.as_millis() as u64,
        "success_threshold": config.success_threshold,
    });
    if config.mode == BreakerMode::FailureRate {
        out["failure_rate_threshold"] = config.failure_rate_threshold.into();
        out["minimum_calls"] = config.minimum_calls.into();
        out["window"] = config.window.as_secs_f64().into();
    }
    if !config.slow_call_duration.is_zero() {
        out["slow_call_duration"] = config.slow_call_duration.as_secs_f64().into();
    }
    out
}

async fn reset(State(state): State<AdminState>, Path(route): Path<String>) -> Response {
    let active = state.proxy.active.load_full();
    let Some(config) = active.config.routes.iter().find(|r| r.name == route) else {
        return admin_error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("No route named {route:?}"),
        );
    };
    let breaker = &state.proxy.resilience.route(&route).breaker;
    breaker.reset(&config.circuit_breaker);
    tracing::info!(route = %route, "circuit reset by the admin API");
    Json(json!({"route": route, "state": "closed"})).into_response()
}
