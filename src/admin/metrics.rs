//! `GET /metrics`: Prometheus text format. Queue gauges are read from the
//! spool at scrape time, so they are exact whoever changed the queue (the
//! worker, the CLI, another process).

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::{admin_error, AdminState};

pub fn routes() -> Router<AdminState> {
    Router::new().route("/metrics", get(metrics))
}

async fn metrics(State(state): State<AdminState>) -> Response {
    // Request metrics are applied by the stats aggregator: let it catch up
    // so a scrape counts every request that finished before it.
    state.proxy.stats.flush().await;
    match super::queue::snapshot(&state).await {
        Ok(snapshot) => {
            let m = &state.proxy.metrics;
            m.queue_depth.set(snapshot.depth() as i64);
            m.dead_letters.set(snapshot.stats.dead_letters as i64);
            m.queue_oldest_age_seconds.set(snapshot.stats.oldest_age_s);
        }
        Err(e) => return admin_error(StatusCode::INTERNAL_SERVER_ERROR, "spool_error", &e),
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.proxy.metrics.encode(),
    )
        .into_response()
}
