//! Header rules of the request path: hop-by-hop removal (both ways), the
//! `forward_headers` filter, `X-Forwarded-*` / `Forwarded`, and the request id.

use std::net::SocketAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::config::ForwardHeaders;

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Headers that describe the body; kept even with `forward_headers = false`
/// because without them the backend cannot read what it is sent.
const REPRESENTATION: [HeaderName; 3] = [
    header::CONTENT_TYPE,
    header::CONTENT_LENGTH,
    header::CONTENT_ENCODING,
];

/// Removes hop-by-hop headers, including those that `Connection` names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// Applies `forward_headers`: which of the client's headers may go upstream.
pub fn filter_forwarded(headers: &mut HeaderMap, rule: &ForwardHeaders) {
    match rule {
        ForwardHeaders::All => {}
        ForwardHeaders::None => headers.keep_only(|name| REPRESENTATION.contains(name)),
        ForwardHeaders::Only(allowed) => {
            headers.keep_only(|name| REPRESENTATION.contains(name) || allowed.contains(name))
        }
    }
}

/// Extension trait: keep only the headers whose name passes `keep`.
trait KeepOnly {
    fn keep_only(&mut self, keep: impl Fn(&HeaderName) -> bool);
}

impl KeepOnly for HeaderMap {
    fn keep_only(&mut self, keep: impl Fn(&HeaderName) -> bool) {
        let drop: Vec<HeaderName> = self.keys().filter(|n| !keep(n)).cloned().collect();
        for name in drop {
            self.remove(name);
        }
    }
}

/// What the proxy knows about the client side of a request.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub addr: SocketAddr,
    /// `"http"` or `"https"`: the scheme the client used to reach Backstop.
    pub proto: &'static str,
}

/// Sets `X-Forwarded-For` (appended), `-Proto`, `-Host` and `Forwarded`.
pub fn set_forwarded(headers: &mut HeaderMap, client: &ClientInfo, original_host: Option<&str>) {
    let ip = client.addr.ip().to_string();
    let xff = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prior) if !prior.trim().is_empty() => format!("{prior}, {ip}"),
        _ => ip.clone(),
    };
    insert_str(headers, X_FORWARDED_FOR, &xff);
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(client.proto));
    let for_node = if client.addr.is_ipv6() {
        format!("\"[{ip}]\"")
    } else {
        ip
    };
    let mut forwarded = format!("for={for_node};proto={}", client.proto);
    if let Some(host) = original_host {
        insert_str(headers, X_FORWARDED_HOST, host);
        if host
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b';')
        {
            forwarded.push_str(";host=");
            forwarded.push_str(host);
        }
    }
    let forwarded = match headers.get(header::FORWARDED).and_then(|v| v.to_str().ok()) {
        Some(prior) => format!("{prior}, {forwarded}"),
        None => forwarded,
    };
    insert_str(headers, header::FORWARDED, &forwarded);
}

fn insert_str(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(name, v);
    }
}

/// The client's `X-Request-Id` when it is reasonable, else a new UUIDv7.
pub fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(&X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_string)
        .unwrap_or_else(new_id)
}

/// A new time-ordered id (UUIDv7). Its random part comes from the
/// thread-local generator: `Uuid::now_v7` would ask the kernel
/// (`getrandom`) once per request, a syscall on the hot path.
pub fn new_id() -> String {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let random: [u8; 10] = rand::random();
    uuid::Builder::from_unix_timestamp_millis(millis, &random)
        .into_uuid()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_ids_are_version_7_and_time_ordered() {
        let a = new_id();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = new_id();
        let parsed = uuid::Uuid::parse_str(&a).unwrap();
        assert_eq!(parsed.get_version_num(), 7);
        assert!(a < b, "{a} < {b}");
    }

    #[test]
    fn connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn forwarded_for_is_appended() {
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        let client = ClientInfo {
            addr: "127.0.0.1:5000".parse().unwrap(),
            proto: "http",
        };
        set_forwarded(&mut h, &client, Some("example.com"));
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.1, 127.0.0.1");
        assert_eq!(h[&X_FORWARDED_HOST], "example.com");
        assert_eq!(
            h[header::FORWARDED],
            "for=127.0.0.1;proto=http;host=example.com"
        );
    }
}
