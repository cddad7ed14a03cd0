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
        // How long the backend may leave the body waiting (as nginx's
        // `proxy_read_timeout`), in milliseconds; 0: no limit. Past it the
        // body fails: the client's answer is cut short, and whoever reads
        // the body (the client's connection, the cache, a replay) is let go
        // instead of waiting forever.
        stall_limit_ms: u32,
        // Made when the body first has to wait: most answers arrive with
        // their head and never need it.
        stall: Option<Pin<Box<Stall>>>,
    }
}

pin_project_lite::pin_project! {
    /// The timer of a body that has had to wait. It is set once and, when
    /// it fires, moved on only if a frame came meanwhile: a stall is noticed
    /// between one and two limits after the last byte, and a body that
    /// keeps flowing costs nothing per frame but a flag.
    struct Stall {
        #[pin]
        timer: tokio::time::Sleep,
        progressed: bool,
        stalled: bool,
    }
}

impl UpstreamBody {
    /// Whether the body has waited too long, called when it has nothing to
    /// give; arms (or moves on) the timer that wakes it to check again.
    fn has_stalled(
        stall: &mut Option<Pin<Box<Stall>>>,
        limit: Duration,
        cx: &mut Context<'_>,
    ) -> bool {
        let stall = stall.get_or_insert_with(|| {
            Box::pin(Stall {
                timer: tokio::time::sleep(limit),
                progressed: false,
                stalled: false,
            })
        });
        let mut stall = stall.as_mut().project();
        while stall.timer.as_mut().poll(cx).is_ready() {
            if !*stall.progressed {
                tracing::warn!(
                    ?limit,
                    "the backend left its answer's body waiting too long; cutting it"
                );
                *stall.stalled = true;
                return true;
            }
            *stall.progressed = false;
            stall
                .timer
                .as_mut()
                .reset(tokio::time::Instant::now() + limit);
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
        self.stall_limit_ms = u32::try_from(limit.as_millis()).unwrap_or(u32::MAX);
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
            stall_limit_ms: 0,
            stall: None,
        }
    }
}

impl From<ConnBody> for UpstreamBody {
    /// A body read by Backstop's own HTTP/1.1 exchange.
    fn from(rest: ConnBody) -> Self {
        UpstreamBody {
            read: VecDeque::new(),
            rest: Either::Right(rest),
            stall_limit_ms: 0,
            stall: None,
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
        if this.stall.as_ref().is_some_and(|s| s.stalled) {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = this.rest.poll_frame(cx) {
            if let Some(stall) = this.stall.as_mut() {
                *stall.as_mut().project().progressed = true;
            }
            return Poll::Ready(frame);
        }
        if *this.stall_limit_ms == 0 {
            return Poll::Pending;
        }
        let limit = Duration::from_millis(u64::from(*this.stall_limit_ms));
        if UpstreamBody::has_stalled(this.stall, limit, cx) {
            return Poll::Ready(Some(Err(Box::new(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the backend sent nothing more of the body for {limit:?}"),
            )))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.read.is_empty()
            && (self.stall.as_ref().is_some_and(|s| s.stalled) || self.rest.is_end_stream())
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
