//! The capture record: one JSON document per captured request, versioned
//! (`v`), as DESIGN.md defines it and `schema/capture-record.schema.json`
//! describes it.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::SystemTime;

use base64::Engine;
use http::{HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};

/// The record format this build writes and reads.
pub const RECORD_VERSION: u32 = 1;

/// What replaces a redacted header's value.
pub const REDACTED: &str = "[redacted]";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaptureRecord {
    pub v: u32,
    pub id: String,
    pub captured_at: String,
    pub route: String,
    pub reason: String,
    /// Upstream attempts made before the request was captured.
    pub attempts: u32,
    pub request: CapturedRequest,
    pub client: ClientMeta,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CapturedRequest {
    pub method: String,
    /// The client's original path (before any prefix stripping).
    pub path: String,
    pub query: Option<String>,
    /// In the client's order, repeated names kept.
    pub headers: Vec<(String, String)>,
    /// The bytes of the header values that are not UTF-8 (obs-text, such
    /// as Latin-1), base64, by their index in `headers`, which holds them
    /// with U+FFFD in place of those bytes (for readers that know only
    /// `headers`: an older version, other tools).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub header_bytes_b64: BTreeMap<usize, String>,
    pub body_b64: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientMeta {
    pub addr: String,
    pub request_id: String,
    /// `"http"` or `"https"`: how the client reached Backstop, for the
    /// replay's `X-Forwarded-Proto` (records written before it: `http`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proto: Option<String>,
    /// The host the client asked for, for the replay's `X-Forwarded-Host`
    /// and `Forwarded` (the record's headers leave `Host` out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// Why a stored record cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not a capture record: {0}")]
    Json(#[from] serde_json::Error),
    #[error("unsupported record version {0} (this build reads version {RECORD_VERSION})")]
    Version(u32),
    #[error("invalid body_b64: {0}")]
    Body(#[from] base64::DecodeError),
}

impl CaptureRecord {
    /// A fresh time-ordered id, made as the request comes (its live
    /// attempts carry it as their idempotency key). Ids are ordered even
    /// within one millisecond (`ordered_uuid` counts within it): the spool
    /// replays a route's records in id order, the order their requests
    /// came in.
    pub fn new_id() -> String {
        crate::ids::ordered_uuid().hyphenated().to_string()
    }

    /// A new record of id `id` (from [`CaptureRecord::new_id`]).
    pub fn new(
        id: String,
        route: &str,
        reason: String,
        attempts: u32,
        request: CapturedRequest,
        client: ClientMeta,
    ) -> Self {
        CaptureRecord {
            v: RECORD_VERSION,
            id,
            captured_at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            route: route.to_string(),
            reason,
            attempts,
            request,
            client,
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain strings and numbers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses a stored record, refusing versions this build does not know.
    pub fn from_json(bytes: &[u8]) -> Result<CaptureRecord, DecodeError> {
        #[derive(Deserialize)]
        struct Version {
            v: u32,
        }
        let Version { v } = serde_json::from_slice(bytes)?;
        if v != RECORD_VERSION {
            return Err(DecodeError::Version(v));
        }
        Ok(serde_json::from_slice(bytes)?)
    }

    pub fn body(&self) -> Result<Vec<u8>, DecodeError> {
        Ok(base64::engine::general_purpose::STANDARD.decode(&self.request.body_b64)?)
    }
}

impl CapturedRequest {
    /// Captures a request's parts; values of `redact` headers are replaced.
    pub fn new(
        method: &http::Method,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
        body: &[u8],
        redact: &[HeaderName],
    ) -> Self {
        let base64 = base64::engine::general_purpose::STANDARD;
        let mut header_bytes_b64 = BTreeMap::new();
        let headers = headers
            .iter()
            .enumerate()
            .map(|(index, (name, value))| {
                let value = if redact.contains(name) {
                    REDACTED.to_string()
                } else {
                    let text = String::from_utf8_lossy(value.as_bytes());
                    if let Cow::Owned(_) = text {
                        header_bytes_b64.insert(index, base64.encode(value.as_bytes()));
                    }
                    text.into_owned()
                };
                (name.as_str().to_string(), value)
            })
            .collect();
        CapturedRequest {
            method: method.as_str().to_string(),
            path: path.to_string(),
            query: query.map(str::to_string),
            headers,
            header_bytes_b64,
            body_b64: base64.encode(body),
        }
    }

    /// The stored headers as a map, each value byte for byte as the
    /// client sent it; names or values that are no longer valid are
    /// dropped.
    pub fn header_map(&self) -> HeaderMap {
        let base64 = base64::engine::general_purpose::STANDARD;
        let mut map = HeaderMap::with_capacity(self.headers.len());
        for (index, (name, text)) in self.headers.iter().enumerate() {
            let bytes = self
                .header_bytes_b64
                .get(&index)
                .and_then(|b64| base64.decode(b64).ok());
            let value = match bytes {
                Some(bytes) => HeaderValue::from_bytes(&bytes),
                None => HeaderValue::try_from(text.as_str()),
            };
            if let (Ok(n), Ok(v)) = (HeaderName::try_from(name.as_str()), value) {
                map.append(n, v);
            }
        }
        map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_headers_in_order_and_body_bytes() {
        let mut headers = HeaderMap::new();
        headers.append("x-b", HeaderValue::from_static("1"));
        let latin1 = HeaderValue::from_bytes(b"r\xe9sum\xe9.pdf").unwrap();
        headers.append("x-file", latin1.clone());
        headers.append("x-a", HeaderValue::from_static("2"));
        headers.append("x-b", HeaderValue::from_static("3"));
        headers.append("authorization", HeaderValue::from_static("Bearer secret"));
        let body = [0xff, 0x00, 0xfe, b'a'];
        let req = CapturedRequest::new(
            &http::Method::POST,
            "/api/x",
            Some("a=1"),
            &headers,
            &body,
            &[HeaderName::from_static("authorization")],
        );
        let record = CaptureRecord::new(
            CaptureRecord::new_id(),
            "users",
            "connect_refused".into(),
            1,
            req,
            ClientMeta {
                addr: "127.0.0.1:1".into(),
                request_id: "r".into(),
                proto: None,
                host: None,
            },
        );
        let back = CaptureRecord::from_json(&record.to_json()).unwrap();
        assert_eq!(back, record);
        assert_eq!(back.body().unwrap(), body);
        let map = back.request.header_map();
        let xb: Vec<_> = map.get_all("x-b").iter().collect();
        assert_eq!(xb, ["1", "3"]);
        assert_eq!(map["authorization"], REDACTED);
        assert_eq!(map["x-file"], latin1, "not UTF-8: kept byte for byte");
        let text = back
            .request
            .headers
            .iter()
            .find(|(name, _)| name == "x-file");
        let text = text.map(|(_, value)| value.as_str());
        assert_eq!(text, Some("r\u{fffd}sum\u{fffd}.pdf"), "readable as text");
        assert_eq!(back.request.header_bytes_b64.len(), 1);
    }

    #[test]
    fn ids_made_in_one_millisecond_keep_their_order() {
        // Far more than one millisecond's worth: most share theirs.
        let ids: Vec<String> = (0..2000).map(|_| CaptureRecord::new_id()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids out of order");
    }

    #[test]
    fn unknown_version_is_refused() {
        let err = CaptureRecord::from_json(br#"{"v":2}"#).unwrap_err();
        assert!(matches!(err, DecodeError::Version(2)));
        assert!(CaptureRecord::from_json(b"not json").is_err());
    }
}
