//! `GET /api-stats`: per-route and per-path statistics as JSON, in the query
//! forms of DESIGN.md:
//!
//! - no query → `{"timestamp","apis":[names]}`;
//! - `?api=NAME&period=all|daily|hourly` → that route's totals, status
//!   codes, latency percentiles (ms), recent errors and a history for
//!   charts; `&paths=1` adds its paths; `&path=P` answers for one path;
//! - `&scope=cluster` (with `[redis]`) → the same answer for every instance
//!   merged (`stats::cluster`); if Redis does not answer in time, this
//!   instance's answer with `cluster_unavailable` saying why.
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
use crate::stats::{cluster, paths};

pub fn routes() -> Router<AdminState> {
    Router::new().route("/api-stats", get(api_stats))
}

#[derive(Debug, Deserialize)]
struct StatsQuery {
    api: Option<String>,
    period: Option<String>,
    paths: Option<String>,
    path: Option<String>,
    scope: Option<String>,
}

async fn api_stats(State(state): State<AdminState>, Query(q): Query<StatsQuery>) -> Response {
    let stats = &state.proxy.stats;
    let config = state.proxy.active.load().config.clone();
    let want_cluster = match q.scope.as_deref() {
        None | Some("local") => false,
        Some("cluster") => true,
        Some(_) => {
            return admin_error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "scope must be local or cluster",
            )
        }
    };
    if want_cluster && config.redis.is_none() {
        return admin_error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "scope=cluster needs a [redis] section: without it instances share no statistics",
        );
    }
    stats.flush().await;
    let configured: Vec<String> = config.routes.iter().map(|r| r.name.clone()).collect();
    let timestamp = recorder::rfc3339(recorder::now_ms());

    let Some(api) = q.api else {
        // `cluster`: whether `scope=cluster` can be asked (for the dashboard).
        let cluster = config.redis.is_some();
        return Json(json!({ "timestamp": timestamp, "apis": configured, "cluster": cluster }))
            .into_response();
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
    if let Some(path) = q.path.as_deref() {
        if !path.starts_with('/') && path != paths::OTHER {
            return admin_error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "path must start with '/' (or be {other})",
            );
        }
    }
    let query = RouteQuery {
        period,
        paths: q.paths.as_deref().is_some_and(|v| v != "0" && v != "false"),
        path: q.path.as_deref(),
    };
    let known = configured.contains(&api) || stats.state().routes.contains_key(&api);
    if !known {
        return admin_error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("No route named {api:?}"),
        );
    }
    // Redis is asked before the statistics are locked: the aggregator must
    // never wait for Redis.
    let remote = match (&config.redis, want_cluster) {
        (Some(redis), true) => Some(stats.cluster.fetch(redis, &api).await),
        _ => None,
    };
    let now = recorder::now_ms();
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
    let body = match &remote {
        Some(Ok(snapshots)) => cluster::merged_json(route_stats, &api, &query, snapshots),
        Some(Err(reason)) => {
            route_json(route_stats, &api, &query).map(|b| cluster::unavailable(b, reason))
        }
        None => route_json(route_stats, &api, &query),
    };
    match body {
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
