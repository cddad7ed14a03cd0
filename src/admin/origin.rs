//! Keeps web pages of other sites away from the admin API.
//!
//! The admin listener is usually on loopback without a token, and a browser
//! on the same machine will send requests there for any page it shows. Two
//! ways in are closed here:
//!
//! - **Cross-site requests** (a form on another site that posts to
//!   `/circuits/{route}/reset`): a request that changes state is refused when
//!   the browser says it comes from elsewhere (`Sec-Fetch-Site`) or its
//!   `Origin` is not the admin listener itself. Browsers send these headers
//!   and pages cannot forge them; tools such as `curl` send neither, and pass.
//! - **DNS rebinding** (a site whose name resolves to 127.0.0.1 a moment
//!   later, reading the admin API as its own origin): on a loopback
//!   listener without `admin_token`, a request must name a loopback host
//!   (`localhost`, `127.x`, `[::1]`) in `Host`.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;

use super::{admin_error, AdminState};

pub async fn same_origin_only(
    State(state): State<AdminState>,
    request: Request,
    next: Next,
) -> Response {
    let headers = request.headers();
    // With a token, a rebound page has no way in (it cannot know the
    // token), and the check would refuse a proxy in front that keeps the
    // client's `Host`.
    if state.on_loopback && !state.token_required() && !names_loopback(headers) {
        return admin_error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "The admin API on a loopback address answers only requests for a loopback host",
        );
    }
    if changes_state(request.method()) && !from_own_origin(headers) {
        return admin_error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "Cross-site requests to the admin API are refused",
        );
    }
    next.run(request).await
}

fn changes_state(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Whether `Host` names a loopback host; a request without one (not from a
/// browser, which always sends it) passes.
fn names_loopback(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST) else {
        return true;
    };
    let Some(host) = host
        .to_str()
        .ok()
        .and_then(|h| h.parse::<axum::http::uri::Authority>().ok())
    else {
        return false;
    };
    let name = host.host();
    let name = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name);
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Whether the browser (if it is one) sent the request from a page of the
/// admin listener itself.
fn from_own_origin(headers: &HeaderMap) -> bool {
    let site = headers.get("sec-fetch-site").map(|v| v.as_bytes());
    if site.is_some_and(|s| s != b"same-origin" && s != b"none") {
        return false;
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let authority = origin.to_str().ok().and_then(|o| {
        o.strip_prefix("http://")
            .or_else(|| o.strip_prefix("https://"))
    });
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    matches!((authority, host), (Some(a), Some(h)) if a.eq_ignore_ascii_case(h))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(*name, HeaderValue::from_static(value));
        }
        h
    }

    #[test]
    fn only_loopback_hosts_pass_on_a_loopback_listener() {
        for host in [
            "127.0.0.1:9901",
            "localhost:9901",
            "LocalHost",
            "[::1]:9901",
            "127.8.9.10",
        ] {
            assert!(names_loopback(&headers(&[("host", host)])), "{host}");
        }
        for host in [
            "evil.example:9901",
            "10.0.0.1:9901",
            "[2001:db8::1]",
            "127.0.0.1.evil.example",
            "a b",
        ] {
            assert!(!names_loopback(&headers(&[("host", host)])), "{host}");
        }
        assert!(names_loopback(&HeaderMap::new()));
    }

    #[test]
    fn state_changes_come_from_the_admin_origin_or_no_browser() {
        let host = ("host", "127.0.0.1:9901");
        assert!(from_own_origin(&headers(&[host])), "curl");
        assert!(from_own_origin(&headers(&[
            host,
            ("origin", "http://127.0.0.1:9901")
        ])));
        assert!(from_own_origin(&headers(&[
            host,
            ("sec-fetch-site", "same-origin")
        ])));
        assert!(!from_own_origin(&headers(&[
            host,
            ("origin", "http://evil.example")
        ])));
        assert!(!from_own_origin(&headers(&[
            host,
            ("origin", "http://127.0.0.1:8080")
        ])));
        assert!(!from_own_origin(&headers(&[host, ("origin", "null")])));
        assert!(!from_own_origin(&headers(&[
            host,
            ("sec-fetch-site", "cross-site")
        ])));
        assert!(!from_own_origin(&headers(&[
            host,
            ("sec-fetch-site", "same-site")
        ])));
    }
}
