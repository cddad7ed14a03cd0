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
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Either;

use crate::body::{BodyError, ClientIncoming};

/// Where an upload is, as the attempt's timer reads it.
const SENDING: u8 = 0;
const WAITING_ON_CLIENT: u8 = 1;
const DONE: u8 = 2;

/// An upload's progress, shared between its body (in hyper's connection
/// task) and the attempt waiting for the answer.
#[derive(Debug)]
pub struct UploadProgress {
    started: Instant,
    /// Milliseconds from `started` to the last frame (or the end).
    last_ms: AtomicU64,
    state: AtomicU8,
}

impl UploadProgress {
    fn new() -> UploadProgress {
        UploadProgress {
            started: Instant::now(),
            last_ms: AtomicU64::new(0),
            state: AtomicU8::new(SENDING),
        }
    }

    fn stamp(&self, state: u8) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
        self.state.store(state, Ordering::Relaxed);
    }

    /// When the last frame was taken (or the body ended).
    pub fn last(&self) -> Instant {
        self.started + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    fn waits_on_client(&self) -> bool {
        self.state.load(Ordering::Relaxed) == WAITING_ON_CLIENT
    }
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
        // Set when the body first waits for the client; moved on only if a
        // frame came meanwhile (as `UpstreamBody`'s: a stall is noticed
        // between one and two limits after the last byte).
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
                let ended = !matches!(frame, Some(Ok(_)));
                this.progress.stamp(if ended { DONE } else { SENDING });
                Poll::Ready(frame.map(|f| f.map_err(BodyError::from)))
            }
            Poll::Pending => {
                if !this.progress.waits_on_client() {
                    this.progress.stamp(WAITING_ON_CLIENT);
                }
                let limit = *this.stall_limit;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                while timer.as_mut().poll(cx).is_ready() {
                    if !*this.progressed {
                        return Poll::Ready(Some(Err(Box::new(UploadStalled(limit)))));
                    }
                    *this.progressed = false;
                    timer.as_mut().reset(tokio::time::Instant::now() + limit);
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

/// Waits for `answer` until `deadline`, or with an upload, until the
/// attempt's time (`deadline` from the upload's start) has passed since
/// the upload last moved while it waited for the backend or since it ended;
/// while it waits for the client, its own stall limit applies. `None` once
/// the time is up.
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
        let now = Instant::now();
        deadline = if upload.waits_on_client() {
            // The client's stall limit ends the attempt if it must.
            now + allowed
        } else {
            upload.last() + allowed
        };
        if deadline <= now {
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
