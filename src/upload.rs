//! A client's request body streamed upstream (a route that neither retries
//! nor captures), and how its time is shared between client and backend.
//!
//! An upload takes as long as the client takes to send it: a 100 MiB file
//! over a slow link is minutes, and must not run into the attempt's
//! `request_timeout` (which would answer 504 and count a failure against a
//! backend that did nothing wrong). So, as nginx separates
//! `client_body_timeout`, `proxy_send_timeout` and `proxy_read_timeout`:
//!
//! - while the upload waits for the **client**, the route's
//!   `body_read_timeout` limits each wait (past it the body fails, the
//!   attempt ends as [`UploadStalled`]: 408, nothing for the breaker);
//! - while it waits for the **backend** to take more, and once it is sent
//!   whole, the attempt's `request_timeout` runs from the last progress
//!   ([`answer_by`]).

use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Either;

use crate::body::{BodyError, ClientIncoming};
use crate::classify::Failure;
use crate::headers;

/// Where an upload is, as the attempt's timer reads it.
const SENDING: u64 = 0;
const WAITING_ON_CLIENT: u64 = 1;
const DONE: u64 = 2;
/// The client's side failed: it stalled for `body_read_timeout`, or its
/// body broke (a malformed chunk, the client gone).
const STALLED: u64 = 3;
const BROKEN: u64 = 4;

/// An upload's progress, shared between its body (in hyper's connection
/// task) and the attempt waiting for the answer.
#[derive(Debug)]
pub struct UploadProgress {
    started: Instant,
    /// The state in the low three bits and, above them, the milliseconds
    /// from `started` to when it began: one word, so that the two are
    /// always read as a pair.
    state: AtomicU64,
}

const STATE_BITS: u32 = 3;

impl UploadProgress {
    fn new() -> UploadProgress {
        UploadProgress {
            started: Instant::now(),
            state: AtomicU64::new(SENDING),
        }
    }

    fn stamp(&self, state: u64) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.state
            .store(ms << STATE_BITS | state, Ordering::Relaxed);
    }

    /// The state, and when it began: the last frame taken, the start of
    /// the current wait for the client, or the end.
    fn read(&self) -> (u64, Instant) {
        let word = self.state.load(Ordering::Relaxed);
        let since = Duration::from_millis(word >> STATE_BITS);
        (word & ((1 << STATE_BITS) - 1), self.started + since)
    }

    /// From when the backend is to be timed: the last progress, or now
    /// while the upload waits for the client (whose time it is).
    pub fn backend_clock(&self) -> Instant {
        match self.read() {
            (WAITING_ON_CLIENT, _) => Instant::now(),
            (_, since) => since,
        }
    }

    /// What an attempt that failed while this upload ran failed of, when
    /// the client's side failed first: over HTTP/2 hyper resets the stream
    /// and reports the reset, not the body's error.
    pub fn blame(&self, failure: Failure) -> Failure {
        match self.read().0 {
            STALLED => Failure::ClientStalled,
            BROKEN => Failure::ClientBody,
            _ => failure,
        }
    }
}

/// [`UploadProgress::blame`] for an attempt that may have had an upload.
pub fn blame(upload: Option<&UploadProgress>, failure: Failure) -> Failure {
    upload.map_or(failure, |u| u.blame(failure))
}

/// The client stopped sending its body for the route's `body_read_timeout`.
#[derive(Debug)]
pub struct UploadStalled(Duration);

impl std::fmt::Display for UploadStalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the client sent nothing more of the body for {:?}",
            self.0
        )
    }
}

impl std::error::Error for UploadStalled {}

pin_project_lite::pin_project! {
    /// The client's body on its way upstream.
    pub struct Upload {
        #[pin]
        incoming: ClientIncoming,
        progress: Arc<UploadProgress>,
        stall_limit: Duration,
        // Set when the body first waits for the client; see
        // `body::stalled`.
        timer: Option<Pin<Box<tokio::time::Sleep>>>,
        progressed: bool,
    }
}

impl Upload {
    /// Starts the upload's clock: call as the attempt sends it.
    pub fn new(incoming: ClientIncoming, stall_limit: Duration) -> Upload {
        Upload {
            incoming,
            progress: Arc::new(UploadProgress::new()),
            stall_limit,
            timer: None,
            progressed: false,
        }
    }

    pub fn progress(&self) -> &Arc<UploadProgress> {
        &self.progress
    }
}

impl Body for Upload {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.project();
        match this.incoming.poll_frame(cx) {
            Poll::Ready(frame) => {
                *this.progressed = true;
                this.progress.stamp(match &frame {
                    Some(Ok(_)) => SENDING,
                    Some(Err(_)) => BROKEN,
                    None => DONE,
                });
                Poll::Ready(frame.map(|f| f.map(without_refused_trailers).map_err(BodyError::from)))
            }
            Poll::Pending => {
                if this.progress.read().0 != WAITING_ON_CLIENT {
                    this.progress.stamp(WAITING_ON_CLIENT);
                }
                let limit = *this.stall_limit;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                if crate::body::stalled(timer.as_mut(), this.progressed, limit, cx) {
                    this.progress.stamp(STALLED);
                    return Poll::Ready(Some(Err(Box::new(UploadStalled(limit)))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.size_hint()
    }
}

/// Waits for `answer` until `deadline`; with an upload, `deadline` is
/// moved on: the time it allowed from the upload's start (the attempt's
/// `request_timeout`, or less when `retry.deadline` cut it) is allowed
/// again from the upload's last progress while the backend is slow to take
/// more, and from its end once sent. While the upload waits for the
/// client, the client's stall limit (`body_read_timeout`) applies instead
/// and fails the body. `None` once the time is up.
pub async fn answer_by<F: Future>(
    answer: F,
    deadline: Instant,
    upload: Option<&UploadProgress>,
) -> Option<F::Output> {
    let Some(upload) = upload else {
        return tokio::time::timeout_at(deadline.into(), answer).await.ok();
    };
    let allowed = deadline.saturating_duration_since(upload.started);
    let mut answer = pin!(answer);
    let mut deadline = deadline;
    loop {
        if let Ok(output) = tokio::time::timeout_at(deadline.into(), answer.as_mut()).await {
            return Some(output);
        }
        deadline = upload.backend_clock() + allowed;
        if deadline <= Instant::now() {
            return None;
        }
    }
}

/// The progress of `request`'s body if it streams from the client.
pub fn progress_of<B>(request: &http::Request<Either<Upload, B>>) -> Option<Arc<UploadProgress>> {
    match request.body() {
        Either::Left(upload) => Some(upload.progress().clone()),
        Either::Right(_) => None,
    }
}

/// A trailers frame without the fields no request trailer may bring in
/// ([`headers::strip_from_request_trailers`]); a data frame as it is.
fn without_refused_trailers(mut frame: Frame<Bytes>) -> Frame<Bytes> {
    if let Some(trailers) = frame.trailers_mut() {
        headers::strip_from_request_trailers(trailers);
    }
    frame
}
