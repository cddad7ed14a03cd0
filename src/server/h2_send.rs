//! `send_timeout` for each HTTP/2 stream.
//!
//! The reaper's send timeout watches the socket. An HTTP/2 client can keep
//! reading its socket and yet grant one stream no flow-control window: hyper
//! then waits for window without polling the answer's body again, for ever,
//! and the stream holds its answer, the backend connection behind it and
//! its turn (`upstream_max_conns`). So hyper spawns each stream's task
//! through [`StreamExecutor`], which runs it inside [`Watched`]: the answer's
//! body notes in the stream's [`Progress`] when it handed hyper a frame and
//! when hyper came back for the next one, and a stream whose frame has
//! waited `send_timeout` for that is dropped. Dropping it resets the stream
//! (`RST_STREAM` with `CANCEL`) and frees what it held; the connection's
//! other streams go on.
//!
//! Only HTTP/2 streams pay for this (hyper's HTTP/1 side and the own one
//! spawn nothing): an `Arc` per stream, two relaxed atomics per frame, and a
//! timer only while a frame waits.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::time::Sleep;

tokio::task_local! {
    /// The progress of the HTTP/2 stream whose task is running.
    static STREAM: Arc<Progress>;
}

/// When an HTTP/2 stream's answer last handed hyper a frame that hyper has
/// not come back after.
pub struct Progress {
    started: Instant,
    /// Milliseconds since `started`, plus one; 0 = no frame waiting.
    handed_at: AtomicU64,
}

impl Progress {
    /// hyper asks the body for its next frame.
    fn polled(&self) {
        if self.handed_at.load(Ordering::Relaxed) != 0 {
            self.handed_at.store(0, Ordering::Relaxed);
        }
    }

    /// The body handed hyper a frame.
    fn handed(&self) {
        let now = self.started.elapsed().as_millis() as u64 + 1;
        self.handed_at.store(now, Ordering::Relaxed);
    }

    /// How long the frame handed last has waited, if one waits.
    fn waiting_for(&self) -> Option<Duration> {
        let handed_at = self.handed_at.load(Ordering::Relaxed).checked_sub(1)?;
        let now = self.started.elapsed().as_millis() as u64;
        Some(Duration::from_millis(now.saturating_sub(handed_at)))
    }
}

/// hyper's executor for HTTP/2 streams: each one's task runs [`Watched`].
#[derive(Clone, Copy)]
pub struct StreamExecutor {
    pub send_timeout: Duration,
}

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, stream: F) {
        tokio::spawn(Watched::new(stream, self.send_timeout));
    }
}

pin_project_lite::pin_project! {
    /// A stream's task, ended once a frame of its answer has waited
    /// `send_timeout` for hyper to come back.
    pub struct Watched<F> {
        #[pin]
        stream: F,
        progress: Arc<Progress>,
        send_timeout: Duration,
        // Made when a frame first waits, then moved on only when it fires:
        // a stream that sends steadily resets no timer per frame.
        check: Option<Pin<Box<Sleep>>>,
    }
}

impl<F> Watched<F> {
    fn new(stream: F, send_timeout: Duration) -> Self {
        Watched {
            stream,
            progress: Arc::new(Progress {
                started: Instant::now(),
                handed_at: AtomicU64::new(0),
            }),
            send_timeout,
            check: None,
        }
    }
}

impl<F: Future<Output = ()>> Future for Watched<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        let progress = this.progress.clone();
        if STREAM
            .sync_scope(progress, || this.stream.poll(cx))
            .is_ready()
        {
            return Poll::Ready(());
        }
        while let Some(waited) = this.progress.waiting_for() {
            let Some(left) = this
                .send_timeout
                .checked_sub(waited)
                .filter(|d| !d.is_zero())
            else {
                tracing::info!(
                    "an HTTP/2 client granted its stream no window for send_timeout; stream reset"
                );
                return Poll::Ready(());
            };
            let due = tokio::time::Instant::now() + left;
            let check = this
                .check
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
            if check.is_elapsed() {
                check.as_mut().reset(due);
            }
            if check.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        Poll::Pending
    }
}

pin_project_lite::pin_project! {
    /// An answer's body on hyper's side, noting its frames in its HTTP/2
    /// stream's [`Progress`] (none on HTTP/1).
    pub struct NotedBody<B> {
        #[pin]
        inner: B,
        stream: Option<Arc<Progress>>,
    }
}

impl<B> NotedBody<B> {
    /// `inner`, noted when it answers an HTTP/2 stream: built inside the
    /// stream's task.
    pub fn new(inner: B) -> Self {
        NotedBody {
            inner,
            stream: STREAM.try_with(Arc::clone).ok(),
        }
    }
}

impl<B: http_body::Body> http_body::Body for NotedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let Some(stream) = this.stream else {
            return this.inner.poll_frame(cx);
        };
        stream.polled();
        let frame = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = frame {
            stream.handed();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEND_TIMEOUT: Duration = Duration::from_millis(50);

    fn note(what: fn(&Progress)) {
        STREAM.with(|progress| what(progress));
    }

    #[tokio::test]
    async fn a_stream_ends_only_when_a_frame_waits_send_timeout() {
        // Waiting for its answer, no frame handed: never ended.
        let waiting = Watched::new(std::future::pending::<()>(), SEND_TIMEOUT);
        let waited = tokio::time::timeout(Duration::from_millis(300), waiting).await;
        assert!(waited.is_err(), "ended while waiting for its answer");

        // Frames handed and come back for in time: not ended. (A timeout
        // of its own, fifty times the gap between frames: a loaded machine
        // can stall a 20 ms sleep by tens of milliseconds.)
        let steady = Watched::new(
            async {
                loop {
                    note(Progress::polled);
                    note(Progress::handed);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            Duration::from_secs(1),
        );
        let sent = tokio::time::timeout(Duration::from_millis(300), steady).await;
        assert!(sent.is_err(), "ended while sending steadily");

        // A frame handed and never come back for: ended after the timeout.
        let starved = Watched::new(
            async {
                note(Progress::handed);
                std::future::pending::<()>().await
            },
            SEND_TIMEOUT,
        );
        let started = Instant::now();
        let ended = tokio::time::timeout(Duration::from_secs(5), starved).await;
        assert!(ended.is_ok(), "a starved stream was not ended");
        // Up to a millisecond early: both ends of the wait are whole ones.
        assert!(started.elapsed() >= SEND_TIMEOUT - Duration::from_millis(2));
    }
}
