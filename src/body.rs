//! Body types of the request path.
//!
//! A request body either streams straight through ([`RequestBody::Left`]) or,
//! on a route that may send it twice (retry) or write it to the capture store,
//! is read whole first ([`BufferedBody`]), bounded by `server.max_body_bytes`.

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;

/// What goes upstream: the client's stream, or a buffered copy.
pub type RequestBody = Either<Incoming, Full<Bytes>>;

/// What goes back to the client: the backend's stream, or a proxy-made body.
pub type ResponseBody = Either<Incoming, Full<Bytes>>;

/// A request body read whole, so it can be sent again or captured.
#[derive(Debug, Clone, Default)]
pub struct BufferedBody(pub Bytes);

impl BufferedBody {
    pub fn to_request_body(&self) -> RequestBody {
        Either::Right(Full::new(self.0.clone()))
    }
}

/// Why a body could not be buffered.
#[derive(Debug)]
pub enum BufferError {
    TooLarge {
        limit: u64,
    },
    /// The client went away or sent a malformed body.
    Read(String),
}

/// Reads the whole body, refusing it as soon as it passes `limit` bytes (and
/// before reading anything when `Content-Length` already says so).
pub async fn buffer(
    headers: &HeaderMap,
    body: Incoming,
    limit: u64,
) -> Result<BufferedBody, BufferError> {
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(BufferError::TooLarge { limit });
    }
    let limit_usize = usize::try_from(limit).unwrap_or(usize::MAX);
    match Limited::new(body, limit_usize).collect().await {
        Ok(collected) => Ok(BufferedBody(collected.to_bytes())),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(BufferError::TooLarge { limit })
        }
        Err(e) => Err(BufferError::Read(e.to_string())),
    }
}
