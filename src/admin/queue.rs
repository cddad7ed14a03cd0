//! `GET /queue`, `GET /queue/dead-letters` (the list, newest first, for the
//! queue dashboard) and `POST /queue/dead-letters/{id}/requeue`.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use super::{admin_error, AdminState};
use crate::capture::spool::{SpoolError, SpoolStats};

pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/queue", get(queue_status))
        .route("/queue/dead-letters", get(dead_letters))
        .route("/queue/dead-letters/{id}/requeue", post(requeue))
}

/// The queue as `/queue` and `/metrics` report it.
pub(super) struct QueueSnapshot {
    pub stats: SpoolStats,
    /// Records in the Kafka topic not yet committed by the replay group
    /// (the last read while Kafka does not answer); `None` without Kafka
    /// or before the first read.
    pub kafka_lag: Option<u64>,
}

impl QueueSnapshot {
    /// Everything waiting for delivery: spool, spool-to-Kafka, Kafka backlog.
    pub fn depth(&self) -> u64 {
        self.stats.depth + self.stats.waiting_for_kafka + self.kafka_lag.unwrap_or(0)
    }
}

pub(super) async fn snapshot(state: &AdminState) -> Result<QueueSnapshot, String> {
    let spool = state.spool.clone();
    let stats = tokio::task::spawn_blocking(move || spool.stats())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let kafka_lag = match state.kafka_lag.clone() {
        Some(reader) => tokio::task::spawn_blocking(move || reader.lag())
            .await
            .ok()
            .flatten(),
        None => None,
    };
    Ok(QueueSnapshot { stats, kafka_lag })
}

async fn queue_status(State(state): State<AdminState>) -> Response {
    let snapshot = match snapshot(&state).await {
        Ok(s) => s,
        Err(e) => return admin_error(StatusCode::INTERNAL_SERVER_ERROR, "spool_error", &e),
    };
    let (commits, written) = state.spool.commit_stats();
    Json(json!({
        "depth": snapshot.depth(),
        "oldest_age_s": snapshot.stats.oldest_age_s,
        "dead_letters": snapshot.stats.dead_letters,
        "waiting_for_kafka": snapshot.stats.waiting_for_kafka,
        "kafka_lag": snapshot.kafka_lag,
        "replayed_total": state.replay.delivered(),
        "sink": if state.kafka_lag.is_some() { "kafka" } else { "spool" },
        "spool_commits": commits,
        "spool_records_written": written,
    }))
    .into_response()
}

async fn requeue(State(state): State<AdminState>, Path(id): Path<String>) -> Response {
    match state.spool.requeue(Some(&id)).await {
        Ok(_) => Json(json!({"requeued": id})).into_response(),
        Err(SpoolError::NotFound(_)) => admin_error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("No dead letter {id}"),
        ),
        Err(e) => admin_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "spool_error",
            &e.to_string(),
        ),
    }
}

#[derive(Debug, serde::Deserialize)]
struct ListQuery {
    limit: Option<usize>,
}

/// Dead letters, newest first, with what an operator needs to decide on a
/// requeue: the request line, the last error and when it gave up. Bodies
/// and headers stay out (they may hold credentials).
async fn dead_letters(State(state): State<AdminState>, Query(q): Query<ListQuery>) -> Response {
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let spool = state.spool.clone();
    match tokio::task::spawn_blocking(move || spool.dead_letters(limit)).await {
        Ok(Ok(list)) => {
            let items: Vec<serde_json::Value> = list
                .into_iter()
                .map(|d| {
                    json!({
                        "id": d.id,
                        "route": d.route,
                        "attempts": d.attempts,
                        "error": d.error,
                        "dead_at": crate::stats::recorder::rfc3339(d.dead_at_ms),
                        "captured_at": d.captured_at,
                        "method": d.method,
                        "path": d.path,
                    })
                })
                .collect();
            Json(json!({ "dead_letters": items })).into_response()
        }
        Ok(Err(e)) => admin_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "spool_error",
            &e.to_string(),
        ),
        Err(e) => admin_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "spool_error",
            &e.to_string(),
        ),
    }
}
