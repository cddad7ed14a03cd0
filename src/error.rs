//! Proxy-made answers: every response that Backstop makes itself (not the
//! backend) is built here, in the one JSON shape of DESIGN.md, and carries
//! `X-Backstop-Error: <code>`. No other module builds an error response.

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderName, Response, StatusCode};
use http_body_util::Full;
use serde_json::{json, Map, Value};

use crate::body::ResponseBody;
use crate::headers::X_REQUEST_ID;

pub const X_BACKSTOP_ERROR: HeaderName = HeaderName::from_static("x-backstop-error");

/// The stable error codes of the product interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    NoRoute,
    RateLimited,
    CircuitOpen,
    UpstreamTimeout,
    UpstreamUnreachable,
    UpstreamInvalidResponse,
    UpstreamBusy,
    /// A request body would take those buffered past `server.max_buffered_bytes`.
    Overloaded,
    BodyTooLarge,
    RequestTimeout,
    Captured,
    CaptureFailed,
    BadRequest,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NoRoute => "no_route",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::CircuitOpen => "circuit_open",
            ErrorCode::UpstreamTimeout => "upstream_timeout",
            ErrorCode::UpstreamUnreachable => "upstream_unreachable",
            ErrorCode::UpstreamInvalidResponse => "upstream_invalid_response",
            ErrorCode::UpstreamBusy => "upstream_busy",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::BodyTooLarge => "body_too_large",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::Captured => "captured",
            ErrorCode::CaptureFailed => "capture_failed",
            ErrorCode::BadRequest => "bad_request",
        }
    }

    fn default_status(self) -> StatusCode {
        match self {
            ErrorCode::NoRoute => StatusCode::NOT_FOUND,
            ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::CircuitOpen
            | ErrorCode::Captured
            | ErrorCode::CaptureFailed
            | ErrorCode::UpstreamBusy
            | ErrorCode::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorCode::UpstreamUnreachable | ErrorCode::UpstreamInvalidResponse => {
                StatusCode::BAD_GATEWAY
            }
            ErrorCode::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
        }
    }
}

/// An answer Backstop makes itself, before it is rendered.
#[derive(Debug)]
pub struct ProxyError {
    pub code: ErrorCode,
    pub status: StatusCode,
    pub message: String,
    pub retry_after_s: Option<u64>,
    /// Extra fields of the `error` object (e.g. `capture_id`, `captured`).
    pub fields: Map<String, Value>,
    /// Extra response headers (e.g. `X-Backstop-Capture-Id`).
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl ProxyError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ProxyError {
            code,
            status: code.default_status(),
            message: message.into(),
            retry_after_s: None,
            fields: Map::new(),
            headers: Vec::new(),
        }
    }

    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after_s = Some(seconds);
        self
    }

    pub fn with_field(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.fields.insert(key.to_string(), value.into());
        self
    }

    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    /// Renders the JSON answer for a request (`route` is absent when no
    /// route matched).
    pub fn into_response(self, route: Option<&str>, request_id: &str) -> Response<ResponseBody> {
        let mut error = Map::new();
        error.insert("code".into(), self.code.as_str().into());
        error.insert("message".into(), self.message.into());
        error.insert("route".into(), route.map_or(Value::Null, Value::from));
        error.insert("request_id".into(), request_id.into());
        if let Some(s) = self.retry_after_s {
            error.insert("retry_after_s".into(), s.into());
        }
        error.extend(self.fields);
        let body = json!({ "error": error }).to_string();

        let mut response = Response::new(ResponseBody::Right(Full::new(Bytes::from(body))));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(
            X_BACKSTOP_ERROR,
            HeaderValue::from_static(self.code.as_str()),
        );
        if let Ok(id) = HeaderValue::from_str(request_id) {
            headers.insert(X_REQUEST_ID, id);
        }
        if let Some(s) = self.retry_after_s {
            headers.insert(RETRY_AFTER, HeaderValue::from(s));
        }
        for (name, value) in self.headers {
            headers.insert(name, value);
        }
        response
    }
}
