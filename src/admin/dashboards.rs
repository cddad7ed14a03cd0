//! `GET /stats-dashboard`, `/cb-dashboard`, `/queue-dashboard`: HTML pages
//! built into the binary (`include_str!`), each one self-contained: the
//! shared CSS and JS are inlined at first use, and a Content-Security-Policy
//! forbids loading anything from elsewhere.
//!
//! The pages hold no data, so they are served without the bearer token; the
//! data comes from the guarded JSON endpoints, with the token the operator
//! gives the page (`#token=...` in the URL, or a form on a 401). A page must
//! never embed a secret or fetch from another origin.

use std::sync::OnceLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::AdminState;

const COMMON_CSS: &str = include_str!("dashboard/common.css");
const COMMON_JS: &str = include_str!("dashboard/common.js");
const STATS: &str = include_str!("dashboard/stats.html");
const CIRCUITS: &str = include_str!("dashboard/cb.html");
const QUEUE: &str = include_str!("dashboard/queue.html");

/// Inline scripts and styles only; requests only to this admin listener.
const CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                   img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
                   frame-ancestors 'none'";

pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/stats-dashboard", get(|| page(&STATS_PAGE, STATS)))
        .route("/cb-dashboard", get(|| page(&CIRCUITS_PAGE, CIRCUITS)))
        .route("/queue-dashboard", get(|| page(&QUEUE_PAGE, QUEUE)))
}

static STATS_PAGE: OnceLock<String> = OnceLock::new();
static CIRCUITS_PAGE: OnceLock<String> = OnceLock::new();
static QUEUE_PAGE: OnceLock<String> = OnceLock::new();

async fn page(cell: &'static OnceLock<String>, template: &'static str) -> Response {
    let html = cell.get_or_init(|| {
        template
            .replace("/*COMMON_CSS*/", COMMON_CSS)
            .replace("/*COMMON_JS*/", COMMON_JS)
    });
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        html.as_str(),
    )
        .into_response()
}
