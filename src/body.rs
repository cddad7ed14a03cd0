//! Body types of the request path.
//!
//! A request body either streams straight through ([`RequestBody::Left`]) or,
//! on a route that may send it twice (retry) or write it to the capture store,
//! is read whole first ([`BufferedBody`]), bounded by `server.max_body_bytes`.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;

use crate::upstream::ConnBody;

/// A client's request body: hyper's stream, or none for a request read by
/// Backstop's own HTTP/1.1 server side (`server/h1.rs`), which serves only
/// requests that carry no body.
pub type ClientBody = Option<Incoming>;

/// What goes upstream: the client's stream, or a buffered copy.
pub type RequestBody = Either<Incoming, Full<Bytes>>;

/// What goes back to the client: the backend's stream, or a body made here
/// (a proxy-made answer, a cached answer).
pub type ResponseBody = Either<UpstreamBody, Full<Bytes>>;

pin_project_lite::pin_project! {
    /// The backend's answer body, streamed. Its first chunks may already have
    /// been read: the cache reads an answer of unknown length up to its size
    /// bound before it knows whether it can store it, and hands what it read
    /// back here when it cannot.
    pub struct UpstreamBody {
        read: VecDeque<Bytes>,
        #[pin]
        rest: Either<Incoming, ConnBody>,
        stall: StallLimit,
    }
}

/// How long a backend may leave its body waiting between two reads (as
/// nginx's `proxy_read_timeout`): past it the body fails, the client's
/// answer is cut short, and whoever reads the body (the client's
/// connection, the cache, a replay) is let go instead of waiting forever.
/// The timer exists only once the body has had to wait: most answers arrive
/// with their head and never arm it.
#[derive(Default)]
struct StallLimit {
    limit: Option<Duration>,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Whether a frame came since the timer was last set.
    progressed: bool,
    stalled: bool,
}

impl StallLimit {
    /// Called when the body has nothing to give: whether it has waited
    /// too long. The wait is timed from the first time it had nothing after
    /// its last frame, so a timer waking it does not restart the clock.
    fn has_stalled(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(limit) = self.limit else {
            return false;
        };
        match self.timer.as_mut() {
            Some(timer) if !self.progressed => {
                if timer.as_mut().poll(cx).is_pending() {
                    return false;
                }
                tracing::warn!(
                    ?limit,
                    "the backend left its answer's body waiting too long; cutting it"
                );
                self.stalled = true;
                return true;
            }
            Some(timer) => timer.as_mut().reset(tokio::time::Instant::now() + limit),
            None => self.timer = Some(Box::pin(tokio::time::sleep(limit))),
        }
        self.progressed = false;
        // Polled once so it wakes this task; it cannot be due yet.
        if let Some(timer) = self.timer.as_mut() {
            let _ = timer.as_mut().poll(cx);
        }
        false
    }
}

/// An error of a body read from a backend.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

impl UpstreamBody {
    /// Fails the body when the backend sends nothing more of it for
    /// `limit` (the route's per-try `request_timeout`).
    pub fn stall_after(&mut self, limit: Duration) {
        self.stall.limit = Some(limit);
    }

    /// Puts chunks read from this body back in front of it, in order.
    pub fn prepend(mut self, chunks: Vec<Bytes>) -> UpstreamBody {
        for chunk in chunks.into_iter().rev() {
            self.read.push_front(chunk);
        }
        self
    }
}

impl From<Incoming> for UpstreamBody {
    /// A body read by hyper's client (HTTP/2, TLS, outbound proxies, and
    /// request bodies that stream).
    fn from(rest: Incoming) -> Self {
        UpstreamBody {
            read: VecDeque::new(),
            rest: Either::Left(rest),
            stall: StallLimit::default(),
        }
    }
}

impl From<ConnBody> for UpstreamBody {
    /// A body read by Backstop's own HTTP/1.1 exchange.
    fn from(rest: ConnBody) -> Self {
        UpstreamBody {
            read: VecDeque::new(),
            rest: Either::Right(rest),
            stall: StallLimit::default(),
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.project();
        if let Some(chunk) = this.read.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if this.stall.stalled {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = this.rest.poll_frame(cx) {
            this.stall.progressed = true;
            return Poll::Ready(frame);
        }
        if this.stall.has_stalled(cx) {
            let limit = this.stall.limit.unwrap_or_default();
            return Poll::Ready(Some(Err(Box::new(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the backend sent nothing more of the body for {limit:?}"),
            )))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.read.is_empty() && (self.stall.stalled || self.rest.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let read: u64 = self.read.iter().map(|c| c.len() as u64).sum();
        let rest = self.rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + read);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + read);
        }
        hint
    }
}

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
    let declared = crate::headers::content_length(headers);
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
