//! `DELETE /cache/{route}`: purges a route's cached answers from the memory
//! store and from Redis.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::delete;
use axum::{Json, Router};
use serde_json::json;

use super::{admin_error, AdminState};
use crate::config::CacheStore;

pub fn routes() -> Router<AdminState> {
    Router::new().route("/cache/{route}", delete(purge))
}

async fn purge(State(state): State<AdminState>, Path(route): Path<String>) -> Response {
    let active = state.proxy.active.load_full();
    let Some(found) = active.routes.get(&route) else {
        return admin_error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("No route {route}"),
        );
    };
    let purged = state.proxy.caches.purge(&active.config, &route).await;
    let redis = match &purged.redis {
        None => json!(null),
        Some(Ok(n)) => json!(n),
        // A route that caches in memory holds Redis entries only from an
        // earlier configuration: its purge is done whatever Redis says.
        Some(Err(e)) if found.config.cache.store == CacheStore::Memory => {
            tracing::warn!(route, error = %e, "cache purge: old redis entries not removed");
            json!(null)
        }
        Some(Err(e)) => {
            tracing::warn!(route, error = %e, "cache purge in redis failed");
            return admin_error(
                StatusCode::BAD_GATEWAY,
                "redis_error",
                &format!("Purged {} memory entries; redis: {e}", purged.memory),
            );
        }
    };
    Json(json!({"route": route, "purged": {"memory": purged.memory, "redis": redis}}))
        .into_response()
}
