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

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use tokio::sync::OwnedSemaphorePermit;

use crate::buffer_budget::{Hold, Taking};
use crate::server::InFlight;
use crate::upload::Upload;
use crate::upstream::ConnBody;

/// A client's request body: hyper's stream, or none for a request read by
/// Backstop's own HTTP/1.1 server side (`server/h1.rs`), which serves only
/// requests that carry no body.
pub type ClientBody = Option<ClientIncoming>;

/// How long a body dropped unread is drained at most, and how long each of
/// its waits may be (nginx's `lingering_time` and `lingering_timeout`).
const LINGER_TIME: Duration = Duration::from_secs(30);
const LINGER_WAIT: Duration = Duration::from_secs(5);

/// The client's body as hyper's server reads it. An HTTP/1 body dropped
/// before its end — the request was answered without it (404, 413, 429, an
/// upstream failure) — is drained for a while in a task of its own, as
/// nginx's lingering close: hyper closes such a connection, and a socket
/// closed with unread bytes makes the kernel send a reset, which destroys
/// the answer before a client that writes its whole body first (Python's
/// `http.client`, for one) can read it. HTTP/2 needs none: a stream is
/// reset on its own, the connection goes on.
///
/// But not a body the client was asked to wait with (`Expect:
/// 100-continue`) and that was never read: hyper sends `100 Continue` only
/// when the body is first read, and once the answer has gone out without
/// it, the client sends no body, and its next request's bytes would be
/// drained as this one's. hyper closes such a connection itself.
pub struct ClientIncoming {
    inner: Option<Incoming>,
    /// For an HTTP/1 body: the connection counts as busy while the body
    /// lives, and while it is drained (the reaper would otherwise take the
    /// drained bytes for a slow next request head and cut the connection).
    linger: Option<InFlight>,
    /// Whether the body was read to its end (or failed): a chunked body's
    /// `is_end_stream` stays false after its last chunk.
    ended: bool,
    /// The client waits for `100 Continue` before it sends the body, and
    /// the body has not been read (which would have sent it).
    awaits_continue: bool,
}

impl ClientIncoming {
    /// `expects_continue`: the request carried `Expect: 100-continue`.
    pub fn new(inner: Incoming, linger: Option<InFlight>, expects_continue: bool) -> Self {
        ClientIncoming {
            inner: Some(inner),
            linger,
            ended: false,
            awaits_continue: expects_continue,
        }
    }
}

impl Body for ClientIncoming {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        self.awaits_continue = false;
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = Pin::new(inner).poll_frame(cx);
        if let Poll::Ready(None | Some(Err(_))) = frame {
            self.ended = true;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Incoming::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Incoming::size_hint)
    }
}

impl Drop for ClientIncoming {
    fn drop(&mut self) {
        let (Some(inner), Some(busy)) = (self.inner.take(), self.linger.take()) else {
            return;
        };
        if self.ended || self.awaits_continue || inner.is_end_stream() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(drain(inner, busy));
        }
    }
}

/// Reads and forgets the rest of a body, for at most `LINGER_TIME`, giving
/// up on a wait longer than `LINGER_WAIT` or on an error (the client left).
/// The connection is busy until then.
async fn drain(mut body: Incoming, _busy: InFlight) {
    let until = tokio::time::Instant::now() + LINGER_TIME;
    loop {
        let wait = until
            .saturating_duration_since(tokio::time::Instant::now())
            .min(LINGER_WAIT);
        match tokio::time::timeout(wait, body.frame()).await {
            Ok(Some(Ok(_))) => {}
            _ => return,
        }
    }
}

/// What goes upstream: the client's stream, or a buffered copy.
pub type RequestBody = Either<Upload, Full<Bytes>>;

/// What goes back to the client: the backend's stream, or a body made here
/// (a proxy-made answer, a cached answer).
pub type ResponseBody = Either<UpstreamBody, Full<Bytes>>;

pin_project_lite::pin_project! {
    /// The backend's answer body, streamed. Its first chunks may already have
    /// been read: the cache reads an answer of unknown length up to its size
    /// bound before it knows whether it can store it, and hands what it read
    /// back here when it cannot.
    pub struct UpstreamBody {
        #[pin]
        rest: Either<Incoming, ConnBody>,
        // What few answers need, made when first needed (the answer moves
        // through every layer of the request path, so it is kept small):
        // chunks read ahead, and the timer of a body that has had to wait.
        extra: Option<Pin<Box<Extra>>>,
        // How long the backend may leave the body waiting (as nginx's
        // `proxy_read_timeout`), in milliseconds, at least 1. Past it the
        // body fails: the client's answer is cut short, and whoever reads
        // the body (the client's connection, the cache, a replay) is let go
        // instead of waiting forever.
        stall_limit_ms: u32,
    }
}

pin_project_lite::pin_project! {
    /// Chunks read ahead, the stall timer, and the request's turn at a
    /// capped target. The timer is set when the body first has to wait
    /// and, when it fires, moved on only if a frame came meanwhile: a stall
    /// is noticed between one and two limits after the last byte, and a
    /// body that keeps flowing costs a flag per frame, not a clock reading
    /// and a timer update.
    struct Extra {
        read: VecDeque<Bytes>,
        #[pin]
        timer: tokio::time::Sleep,
        progressed: bool,
        stalled: bool,
        // The turn of `upstream_max_conns` this answer's request took: its
        // connection is busy until the body is done (or dropped).
        slot: Option<OwnedSemaphorePermit>,
    }
}

impl Extra {
    /// Made when the body first has to wait, is handed back by the cache
    /// (both times its last read), or takes its slot with the answer's
    /// head: the stall is timed from now.
    fn new(limit: Duration) -> Pin<Box<Extra>> {
        Box::pin(Extra {
            read: VecDeque::new(),
            timer: tokio::time::sleep(limit),
            progressed: false,
            stalled: false,
            slot: None,
        })
    }

    /// Whether the body has waited too long, called when it has nothing to
    /// give; moves the timer on (when a frame came since it was set) and
    /// leaves it to wake the body to check again.
    fn has_stalled(self: Pin<&mut Self>, limit: Duration, cx: &mut Context<'_>) -> bool {
        let this = self.project();
        if !stalled(this.timer, this.progressed, limit, cx) {
            return false;
        }
        tracing::warn!(
            ?limit,
            "the backend left its answer's body waiting too long; cutting it"
        );
        *this.stalled = true;
        // Its connection is to be dropped: no turn to hold.
        *this.slot = None;
        true
    }
}

/// The stall rule of a body that waits (the backend's answer, a client's
/// upload): called when the body has nothing to give, with the `timer` set
/// one `limit` after it first had to wait. When the timer fires, the body
/// has stalled if no frame came since (`progressed`); else the timer moves
/// on a `limit` and `progressed` is cleared. A body that keeps flowing thus
/// costs a flag per frame, not a clock reading and a timer update, and a
/// stall is noticed between one and two limits after the last byte.
pub(crate) fn stalled(
    mut timer: Pin<&mut tokio::time::Sleep>,
    progressed: &mut bool,
    limit: Duration,
    cx: &mut Context<'_>,
) -> bool {
    while timer.as_mut().poll(cx).is_ready() {
        if !*progressed {
            return true;
        }
        *progressed = false;
        timer.as_mut().reset(tokio::time::Instant::now() + limit);
    }
    false
}

/// An error of a body read from a backend.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

impl UpstreamBody {
    /// A body read by hyper's client (HTTP/2, TLS, outbound proxies, and
    /// request bodies that stream), failing when the backend sends nothing
    /// more of it for `stall_limit` (the route's `body_read_timeout`).
    pub fn hyper(body: Incoming, stall_limit: Duration) -> UpstreamBody {
        UpstreamBody::new(Either::Left(body), stall_limit)
    }

    /// A body read by Backstop's own HTTP/1.1 exchange, failing as
    /// [`UpstreamBody::hyper`]'s.
    pub fn own(body: ConnBody, stall_limit: Duration) -> UpstreamBody {
        UpstreamBody::new(Either::Right(body), stall_limit)
    }

    fn new(rest: Either<Incoming, ConnBody>, stall_limit: Duration) -> UpstreamBody {
        UpstreamBody {
            rest,
            extra: None,
            // At least 1 ms: a sub-millisecond limit would cut every body
            // that has to wait at all.
            stall_limit_ms: u32::try_from(stall_limit.as_millis())
                .unwrap_or(u32::MAX)
                .max(1),
        }
    }

    /// How long the backend may leave the body waiting.
    fn stall_limit(&self) -> Duration {
        Duration::from_millis(u64::from(self.stall_limit_ms))
    }

    /// The body, holding `slot` until the backend has sent all of it (or
    /// failed), or the body is dropped.
    pub fn holding(mut self, slot: OwnedSemaphorePermit) -> UpstreamBody {
        let limit = self.stall_limit();
        let extra = self.extra.get_or_insert_with(|| Extra::new(limit));
        *extra.as_mut().project().slot = Some(slot);
        self
    }

    /// This body read to its end and held here, if it ends within `limit`
    /// bytes and has no trailers; else `None` (the body let go).
    pub async fn read_whole(mut self, limit: usize) -> Option<UpstreamBody> {
        let mut chunks = Vec::new();
        let mut total = 0usize;
        while let Some(frame) = self.frame().await {
            let chunk = frame.ok()?.into_data().ok()?;
            total = total.saturating_add(chunk.len());
            if total > limit {
                return None;
            }
            chunks.push(chunk);
        }
        Some(self.prepend(chunks))
    }

    /// Puts chunks read from this body back in front of it, in order.
    pub fn prepend(mut self, chunks: Vec<Bytes>) -> UpstreamBody {
        let limit = self.stall_limit();
        let extra = self.extra.get_or_insert_with(|| Extra::new(limit));
        let read = extra.as_mut().project().read;
        for chunk in chunks.into_iter().rev() {
            read.push_front(chunk);
        }
        self
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let mut this = self.project();
        if let Some(extra) = this.extra.as_mut() {
            let extra = extra.as_mut().project();
            if let Some(chunk) = extra.read.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
            if *extra.stalled {
                return Poll::Ready(None);
            }
        }
        if let Poll::Ready(frame) = this.rest.as_mut().poll_frame(cx) {
            if let Some(extra) = this.extra.as_mut() {
                let extra = extra.as_mut().project();
                *extra.progressed = true;
                if !matches!(frame, Some(Ok(_))) || this.rest.is_end_stream() {
                    // The backend is done with this answer (all of it, or
                    // a failure): the turn goes to the next request now,
                    // not when the client has taken the rest.
                    *extra.slot = None;
                }
            }
            return Poll::Ready(frame.map(|f| f.map(without_refused_trailers)));
        }
        let limit = Duration::from_millis(u64::from(*this.stall_limit_ms));
        let extra = this.extra.get_or_insert_with(|| Extra::new(limit));
        if extra.as_mut().has_stalled(limit, cx) {
            return Poll::Ready(Some(Err(Box::new(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the backend sent nothing more of the body for {limit:?}"),
            )))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        match &self.extra {
            None => self.rest.is_end_stream(),
            Some(extra) => extra.read.is_empty() && (extra.stalled || self.rest.is_end_stream()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        let read: u64 = self
            .extra
            .as_ref()
            .map_or(0, |e| e.read.iter().map(|c| c.len() as u64).sum());
        let rest = self.rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + read);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + read);
        }
        hint
    }
}

/// A trailers frame without the fields no answer's trailer may bring in
/// ([`crate::headers::strip_from_response_trailers`]); a data frame as it
/// is.
fn without_refused_trailers(mut frame: Frame<Bytes>) -> Frame<Bytes> {
    if let Some(trailers) = frame.trailers_mut() {
        crate::headers::strip_from_response_trailers(trailers);
    }
    frame
}

/// A request body read whole, so it can be sent again or captured, with
/// what it holds of the buffered-bodies budget while it lives.
#[derive(Debug, Clone, Default)]
pub struct BufferedBody(pub Bytes, pub Hold);

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
    /// The body would take the bodies buffered in the process past
    /// `server.max_buffered_bytes`.
    Overloaded {
        limit: u64,
    },
    /// No byte came for `stall` (as nginx's `client_body_timeout`).
    Stalled {
        stall: Duration,
    },
    /// The client went away or sent a malformed body.
    Read(String),
}

/// Reads the whole body, refusing it as soon as it passes `limit` bytes (and
/// before reading anything when `Content-Length` already says so), or once
/// the client has left it waiting for `stall`: a client that stops sending
/// must not hold its connection and what it sent so far for ever.
pub async fn buffer(
    headers: &HeaderMap,
    mut body: ClientIncoming,
    limit: u64,
    stall: Duration,
    mut budget: Taking,
) -> Result<BufferedBody, BufferError> {
    let declared = crate::headers::content_length(headers);
    if declared.is_some_and(|n| n > limit) {
        return Err(BufferError::TooLarge { limit });
    }
    // A declared length is taken whole before a byte is read (the buffer
    // is sized by it below); a body of unknown length takes as it comes.
    let overloaded = |budget: &Taking| BufferError::Overloaded {
        limit: budget.limit(),
    };
    if declared.is_some_and(|n| !budget.take(n)) {
        return Err(overloaded(&budget));
    }
    // A body of one frame is kept as it came; one of more is copied into
    // one buffer. Kept as frames, a body sent in 1-byte chunks (or HTTP/2
    // DATA frames) would cost a slice handle per byte and keep the receive
    // buffers they were cut from: 50 times its size, under the limit.
    let mut first: Option<Bytes> = None;
    let mut joined = BytesMut::new();
    let mut total: u64 = 0;
    loop {
        let frame = match tokio::time::timeout(stall, body.frame()).await {
            Err(_) => return Err(BufferError::Stalled { stall }),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(BufferError::Read(e.to_string())),
            Ok(Some(Ok(frame))) => frame,
        };
        // Trailers are not kept, as in `collect().to_bytes()`.
        let Ok(data) = frame.into_data() else {
            continue;
        };
        total = total.saturating_add(data.len() as u64);
        if total > limit {
            return Err(BufferError::TooLarge { limit });
        }
        if declared.is_none() && !budget.take(data.len() as u64) {
            return Err(overloaded(&budget));
        }
        match first.take() {
            None if joined.is_empty() => first = Some(data),
            earlier => {
                if let Some(earlier) = earlier {
                    // A declared length (within the limit) is the size to
                    // come: one allocation, not a doubling one.
                    let expected = declared.map_or(0, |n| usize::try_from(n).unwrap_or(0));
                    joined.reserve(expected.max(earlier.len() + data.len()));
                    joined.extend_from_slice(&earlier);
                }
                joined.extend_from_slice(&data);
            }
        }
    }
    Ok(BufferedBody(
        first.unwrap_or_else(|| joined.freeze()),
        budget.hold(),
    ))
}
