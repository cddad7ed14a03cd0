//! `GET /api-stats`: per-route and per-path statistics as JSON, in the query
//! forms of DESIGN.md:
//!
//! - no query → `{"timestamp","apis":[names]}`;
//! - `?api=NAME&period=all|daily|hourly` → that route's totals, status
//!   codes, latency percentiles (ms), recent errors and a history for
//!   charts; `&paths=1` adds its paths; `&path=P` answers for one path.
//!
//! Reads wait for the aggregator to catch up first, so an answer includes
//! every request that finished before it was asked. Never changes state.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::{admin_error, AdminState};
use crate::stats::recorder::{self, route_json, RouteQuery, RouteStats};
use crate::stats::Period;

pub fn routes() -> Router<AdminState> {
    Router::new().route("/api-stats", get(api_stats))
}

#[derive(Debug, Deserialize)]
struct StatsQuery {
    api: Option<String>,
    period: Option<String>,
    paths: Option<String>,
    path: Option<String>,
}

async fn api_stats(State(state): State<AdminState>, Query(q): Query<StatsQuery>) -> Response {
    let stats = &state.proxy.stats;
    stats.flush().await;
    let now = recorder::now_ms();
    let configured: Vec<String> = state
        .proxy
        .active
        .load()
        .config
        .routes
        .iter()
        .map(|r| r.name.clone())
        .collect();
    let timestamp = recorder::rfc3339(now);

    let Some(api) = q.api else {
        return Json(json!({ "timestamp": timestamp, "apis": configured })).into_response();
    };
    let period = match q.period.as_deref().map(Period::parse) {
        None => Period::All,
        Some(Some(p)) => p,
        Some(None) => {
            return admin_error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "period must be all, daily or hourly",
            )
        }
    };
    let query = RouteQuery {
        period,
        paths: q.paths.as_deref().is_some_and(|v| v != "0" && v != "false"),
        path: q.path.as_deref(),
    };
    let mut guard = stats.state();
    let empty;
    let route_stats = match guard.routes.get_mut(&api) {
        Some(s) => {
            s.roll(now);
            &*s
        }
        None if configured.contains(&api) => {
            empty = RouteStats::new(now);
            &empty
        }
        None => {
            return admin_error(
                StatusCode::NOT_FOUND,
                "not_found",
                &format!("No route named {api:?}"),
            )
        }
    };
    match route_json(route_stats, &api, &query) {
        Some(mut body) => {
            if let Some(obj) = body.as_object_mut() {
                obj.insert("timestamp".into(), json!(timestamp));
            }
            Json(body).into_response()
        }
        None => admin_error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("No statistics for path {:?} of route {api:?}", q.path),
        ),
    }
}
