//! `GET /queue` and `POST /queue/dead-letters/{id}/requeue`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use super::{admin_error, AdminState};
use crate::capture::spool::SpoolError;

pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/queue", get(queue_status))
        .route("/queue/dead-letters/{id}/requeue", post(requeue))
}

async fn queue_status(State(state): State<AdminState>) -> Response {
    let spool = state.spool.clone();
    match tokio::task::spawn_blocking(move || spool.stats()).await {
        Ok(Ok(stats)) => {
            let kafka = state.proxy.active.load().config.kafka.is_some();
            let (commits, written) = state.spool.commit_stats();
            Json(json!({
                "depth": stats.depth + stats.waiting_for_kafka,
                "oldest_age_s": stats.oldest_age_s,
                "dead_letters": stats.dead_letters,
                "waiting_for_kafka": stats.waiting_for_kafka,
                "replayed_total": state.replay.delivered(),
                "sink": if kafka { "kafka" } else { "spool" },
                "spool_commits": commits,
                "spool_records_written": written,
            }))
            .into_response()
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
