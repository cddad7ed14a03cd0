//! Closing idle keep-alive connections.
//!
//! hyper has no idle timeout between requests, so each connection counts its
//! own activity: the IO wrapper marks every read and write with one relaxed
//! atomic store (cheap on the hot path), and a ticker checks the mark
//! `TICKS` times per `idle_timeout`. A connection with no request in flight
//! and no byte moved for `TICKS` consecutive ticks is closed gracefully.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Checks per idle timeout: a connection closes between 1 and 1.25 times
/// `idle_timeout` after its last activity.
pub const TICKS: u32 = 4;

#[derive(Clone, Default)]
pub struct IdleWatch(Arc<State>);

#[derive(Default)]
struct State {
    active: AtomicBool,
    in_flight: AtomicUsize,
    idle_ticks: AtomicU32,
}

/// Held while a request is being handled.
pub struct InFlight(IdleWatch);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0 .0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0 .0.active.store(true, Ordering::Relaxed);
    }
}

impl IdleWatch {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn request_started(&self) -> InFlight {
        self.0.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    fn touch(&self) {
        self.0.active.store(true, Ordering::Relaxed);
    }

    /// Called by the ticker; true when the connection has been idle long
    /// enough to close.
    pub fn idle_tick(&self) -> bool {
        let was_active = self.0.active.swap(false, Ordering::Relaxed);
        if was_active || self.0.in_flight.load(Ordering::Relaxed) > 0 {
            self.0.idle_ticks.store(0, Ordering::Relaxed);
            return false;
        }
        self.0.idle_ticks.fetch_add(1, Ordering::Relaxed) + 1 >= TICKS
    }
}

pin_project_lite::pin_project! {
    /// An IO stream that marks its [`IdleWatch`] on every read and write.
    pub struct ActivityIo<S> {
        #[pin]
        inner: S,
        watch: IdleWatch,
    }
}

impl<S> ActivityIo<S> {
    pub fn new(inner: S, watch: IdleWatch) -> Self {
        ActivityIo { inner, watch }
    }
}

impl<S: AsyncRead> AsyncRead for ActivityIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let result = this.inner.poll_read(cx, buf);
        if buf.filled().len() > before {
            this.watch.touch();
        }
        result
    }
}

impl<S: AsyncWrite> AsyncWrite for ActivityIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        this.watch.touch();
        this.inner.poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        this.watch.touch();
        this.inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}
