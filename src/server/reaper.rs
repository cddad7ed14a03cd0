//! Closing client connections from one place: keep-alive connections left
//! idle, HTTP/1 clients too slow to send a request head (slowloris),
//! clients that take nothing of an answer for `send_timeout` (nginx's
//! `send_timeout`: a client that stops reading would otherwise hold its
//! answer, and the backend connection behind it, for ever), and every
//! connection at shutdown. It also tells a keep-alive connection
//! that has been idle for a whole tick to let go of its buffers.
//!
//! Why not a timer per connection or per request: hyper's own header-read
//! timeout allocates and registers a timer for every request, and a ticker
//! and a shutdown listener per connection are polled at every wake-up of the
//! connection; together they cost about 2,000 instructions per proxied
//! request (callgrind, 5 % of the proxy's work). Here each connection keeps a
//! few atomic marks that its IO wrapper updates with relaxed stores, and one
//! task per listener reads them all a few times per timeout, on a coarse
//! clock of its own ticks. Connections close between 1 and 1.25 times their
//! timeout after the mark, as with the per-connection ticker before.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

/// Checks per timeout.
const TICKS_PER_TIMEOUT: u32 = 4;
/// Idle ticks after which a connection is asked to let go of its buffers:
/// one whole tick without a byte (2.5–5 s with the default timeouts).
/// Sooner would cost busy connections an allocation per request; an idle
/// one keeps about 2 KiB less (of about 4).
const TRIM_AFTER_TICKS: u32 = 1;

/// What a connection has been asked to do.
const KEEP: u8 = 0;
/// Finish the request in flight, then close (idle, shutdown).
const GRACEFUL: u8 = 1;
/// Close now: nothing is in flight (a request head that never completed).
const ABORT: u8 = 2;
/// Close now, even with a request in flight: the client has taken nothing
/// of its answer for `send_timeout`.
const STALLED: u8 = 3;

/// `head_since` of a head begun between requests, until the reaper's next
/// tick stamps it (the connection does not read the reaper's clock).
const HEAD_UNSTAMPED: u64 = u64::MAX;

/// The connections of one listener and the task that closes them.
#[derive(Clone)]
pub struct Reaper(Arc<Shared>);

struct Shared {
    /// The coarse clock: ticks since the reaper started, from 1.
    clock: AtomicU64,
    period: Duration,
    idle_ticks: u32,
    head_ticks: u64,
    send_ticks: u64,
    registry: Mutex<Registry>,
}

#[derive(Default)]
struct Registry {
    next_id: u64,
    conns: HashMap<u64, Arc<ConnState>>,
    /// Set at shutdown: connections registered afterwards close at once.
    closing: bool,
}

/// One connection's marks, shared by its IO, its requests and the reaper.
#[derive(Default)]
pub struct ConnState {
    /// Activity since the reaper last looked: an HTTP/1 byte moved, a
    /// request ended, a write that had waited for the client went through
    /// (an HTTP/2 connection's own frames are none).
    active: AtomicBool,
    in_flight: AtomicUsize,
    idle_ticks: AtomicU32,
    /// The tick at which the client started sending a request head that is
    /// not complete yet; 0 when none is pending, [`HEAD_UNSTAMPED`] when
    /// one is pending and the reaper is to stamp it on its next tick.
    head_since: AtomicU64,
    /// The tick at which a write to the client first found its socket
    /// full; 0 while writes go through.
    write_blocked_since: AtomicU64,
    close: AtomicU8,
    /// Asked to let go of its buffers (see [`ConnState::take_trim`]). Only
    /// the own HTTP/1 side reads it: a connection handed to hyper is woken
    /// once per idle spell for nothing.
    trim: AtomicBool,
    /// The connection's task, woken (not taken: a task's waker stays the
    /// same) when the reaper asks something of it.
    waker: Mutex<Option<Waker>>,
}

impl Reaper {
    /// A reaper for connections that close after `idle` without traffic,
    /// `header_read` after the first byte of a request head that does not
    /// complete, or `send` after a write to the client began to wait on a
    /// full socket.
    pub fn new(timeouts: ConnTimeouts) -> Reaper {
        let shortest = timeouts.idle.min(timeouts.header_read).min(timeouts.send);
        let period = (shortest / TICKS_PER_TIMEOUT).max(Duration::from_millis(1));
        // Rounded up, so that a timeout is never cut short.
        let ticks =
            |timeout: Duration| timeout.as_nanos().div_ceil(period.as_nanos()).max(1) as u64;
        Reaper(Arc::new(Shared {
            clock: AtomicU64::new(1),
            period,
            idle_ticks: ticks(timeouts.idle).min(u64::from(u32::MAX)) as u32,
            head_ticks: ticks(timeouts.header_read),
            send_ticks: ticks(timeouts.send),
            registry: Mutex::default(),
        }))
    }

    /// Ticks until `shutdown`, then asks every connection to close and goes
    /// on ticking while they drain (a client still sending its first request
    /// head is not cut short by a graceful close, only by the head timeout);
    /// run it as a task.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(self.0.period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticker.tick() => self.tick(),
            }
        }
        self.shut_down();
        while !self.registry().conns.is_empty() {
            ticker.tick().await;
            self.tick();
        }
    }

    /// One look at every connection.
    fn tick(&self) {
        let now = self.0.clock.fetch_add(1, Ordering::Relaxed) + 1;
        let registry = self.registry();
        for conn in registry.conns.values() {
            // A graceful close does not end a connection whose first request
            // head is still coming (hyper waits for it), so the head timeout
            // applies to those too.
            conn.stamp_head(now);
            match conn.close.load(Ordering::Relaxed) {
                ABORT | STALLED => {}
                _ if conn.head_overdue(now, self.0.head_ticks) => conn.ask(ABORT),
                _ if conn.write_overdue(now, self.0.send_ticks) => conn.ask(STALLED),
                KEEP => match conn.idle_tick() {
                    n if n >= self.0.idle_ticks => conn.ask_graceful(),
                    TRIM_AFTER_TICKS => conn.ask_trim(),
                    _ => {}
                },
                // A graceful close that nothing in flight holds up ends at
                // once, except HTTP/2's: it waits for the client's answer
                // to a ping, which a client that has vanished never sends.
                // After `header_read_timeout` without a byte it is cut.
                GRACEFUL if u64::from(conn.idle_tick()) >= self.0.head_ticks => conn.ask(ABORT),
                _ => {}
            }
        }
    }

    /// Asks every connection, present and future, to finish its request in
    /// flight and close.
    fn shut_down(&self) {
        let mut registry = self.registry();
        registry.closing = true;
        for conn in registry.conns.values() {
            conn.ask_graceful();
        }
    }

    /// Registers a new connection; dropping the handle unregisters it.
    pub fn register(&self) -> Registration {
        let state = Arc::new(ConnState::default());
        let mut registry = self.registry();
        if registry.closing {
            state.close.store(GRACEFUL, Ordering::Relaxed);
        }
        let id = registry.next_id;
        registry.next_id += 1;
        registry.conns.insert(id, state.clone());
        Registration {
            reaper: self.clone(),
            id,
            state,
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.registry().conns.len()
    }

    /// A poisoned lock still holds a valid map (nothing panics while
    /// holding it), so it is used as is.
    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.0.registry.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The client connection timeouts the reaper keeps (`[server]`).
#[derive(Debug, Clone, Copy)]
pub struct ConnTimeouts {
    pub idle: Duration,
    pub header_read: Duration,
    pub send: Duration,
}

/// A connection's place in its reaper.
pub struct Registration {
    reaper: Reaper,
    id: u64,
    state: Arc<ConnState>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.reaper.registry().conns.remove(&self.id);
    }
}

impl Registration {
    /// Wraps the connection's IO so that it marks its activity.
    pub fn io<S>(&self, inner: S) -> ActivityIo<S> {
        ActivityIo {
            inner,
            state: self.state.clone(),
            reaper: self.reaper.clone(),
            preface: Preface::Undecided(0),
        }
    }

    /// The marks that the connection's requests update.
    pub fn state(&self) -> &Arc<ConnState> {
        &self.state
    }

    /// Serves `conn` until it ends, closing it gracefully or at once when
    /// the reaper asks. Returns how it ended.
    pub async fn serve<C>(&self, conn: Pin<&mut C>) -> Ended<C::Output>
    where
        C: Future + Closable,
    {
        Serve {
            conn,
            state: &self.state,
            graceful_sent: false,
            polled: false,
            registered: None,
        }
        .await
    }
}

/// A connection that can be told to finish and close.
pub trait Closable {
    fn close_gracefully(self: Pin<&mut Self>);
}

/// How a served connection ended.
pub enum Ended<T> {
    /// It ended by itself or after a graceful close.
    Done(T),
    /// The reaper closed it: a request head took too long, or a graceful
    /// close did (an HTTP/2 client that never answers the closing ping).
    HeadTimeout,
    /// The reaper closed it: the client took nothing of an answer for
    /// `send_timeout`.
    SendTimeout,
}

struct Serve<'a, C> {
    conn: Pin<&'a mut C>,
    state: &'a ConnState,
    graceful_sent: bool,
    /// The connection has been polled once. A graceful close waits for
    /// that: hyper's HTTP/1 connection closes at once, unanswered, when it
    /// is asked to before it has read a byte, and a connection handed over
    /// by the own side holds a request that it has not read yet.
    polled: bool,
    /// The waker last put in the connection's marks.
    registered: Option<Waker>,
}

impl<C: Future + Closable> Future for Serve<'_, C> {
    type Output = Ended<C::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        // Registered before the flag is read, so a request made after the
        // read wakes this task. Only when the waker is new: a task's stays
        // the same, and registering it at every poll (an `AtomicWaker`,
        // which the reaper's wake empties) cost two locked instructions per
        // poll, each draining the store buffer.
        if !this
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            let waker = cx.waker().clone();
            *this.state.waker_slot() = Some(waker.clone());
            this.registered = Some(waker);
        }
        match this.state.close.load(Ordering::Acquire) {
            // Dropped here, the connection drops its answer and with it
            // the backend's connection.
            STALLED => return Poll::Ready(Ended::SendTimeout),
            // A head that completed just as the reaper looked: its request
            // runs, so the close is graceful after all.
            ABORT if this.state.in_flight.load(Ordering::Relaxed) == 0 => {
                return Poll::Ready(Ended::HeadTimeout)
            }
            ABORT | GRACEFUL if !this.graceful_sent => {
                if this.polled {
                    this.graceful_sent = true;
                    this.conn.as_mut().close_gracefully();
                } else {
                    // Asked again right after this first poll.
                    cx.waker().wake_by_ref();
                }
            }
            _ => {}
        }
        this.polled = true;
        this.conn.as_mut().poll(cx).map(Ended::Done)
    }
}

impl ConnState {
    /// Held while a request is being handled: its head is complete.
    pub fn request_started(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.head_since.store(0, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// [`ConnState::request_started`] for Backstop's own HTTP/1 side,
    /// which serves one request at a time and meanwhile is the only one to
    /// count (a connection goes to hyper only after the own side's last
    /// request): plain stores, where a shared count and an `Arc` raised and
    /// lowered were four locked instructions per request, each draining the
    /// store buffer.
    pub fn own_request_started(&self) -> OwnInFlight<'_> {
        self.in_flight.store(1, Ordering::Relaxed);
        self.head_since.store(0, Ordering::Relaxed);
        OwnInFlight(self)
    }

    fn waker_slot(&self) -> MutexGuard<'_, Option<Waker>> {
        // Only a waker is kept under this lock: it is never left half-set.
        self.waker.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes the connection's task (once it has been polled).
    fn wake(&self) {
        if let Some(waker) = self.waker_slot().as_ref() {
            waker.wake_by_ref();
        }
    }

    /// The connection has been asked to close (idle, shutdown, a head
    /// overdue): Backstop's own HTTP/1 side reads this between requests.
    pub fn closing(&self) -> bool {
        self.close.load(Ordering::Acquire) != KEEP
    }

    /// Between requests: whether the reaper has asked the connection to
    /// let go of its buffers since the last time this said yes.
    pub fn take_trim(&self) -> bool {
        // Read first: the swap (a locked write) only when asked.
        self.trim.load(Ordering::Relaxed) && self.trim.swap(false, Ordering::Relaxed)
    }

    fn ask(&self, what: u8) {
        self.close.store(what, Ordering::Release);
        self.wake();
    }

    /// Asks for a graceful close, which has from now on its own spell of
    /// idleness before it is cut.
    fn ask_graceful(&self) {
        self.idle_ticks.store(0, Ordering::Relaxed);
        self.ask(GRACEFUL);
    }

    fn ask_trim(&self) {
        self.trim.store(true, Ordering::Relaxed);
        self.wake();
    }

    /// Between requests, with part of the next request's head already
    /// read (it came with the last request's bytes, or a stray line
    /// ending did): the head timeout runs from now, though no new byte
    /// came to start it. Without this a client could send one byte past
    /// its request and hold the connection open for ever, since a graceful
    /// close waits for a head that has begun.
    pub fn head_begun(&self) {
        if self.head_since.load(Ordering::Relaxed) == 0 {
            self.head_since.store(HEAD_UNSTAMPED, Ordering::Relaxed);
        }
    }

    /// Gives a head begun between requests the reaper's current tick.
    fn stamp_head(&self, now: u64) {
        // Exchanged, not stored: the request may complete (and clear the
        // mark) between a load and a store.
        if self.head_since.load(Ordering::Relaxed) == HEAD_UNSTAMPED {
            let _ = self.head_since.compare_exchange(
                HEAD_UNSTAMPED,
                now,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    fn head_overdue(&self, now: u64, limit: u64) -> bool {
        let since = self.head_since.load(Ordering::Relaxed);
        // `>`: the first byte came some time during tick `since`, so only
        // from `since + limit + 1` on has a whole `limit` surely passed.
        since != 0
            && now.saturating_sub(since) > limit
            && self.in_flight.load(Ordering::Relaxed) == 0
    }

    /// Whether a write has waited on the client for more than `limit`
    /// whole ticks.
    fn write_overdue(&self, now: u64, limit: u64) -> bool {
        let since = self.write_blocked_since.load(Ordering::Relaxed);
        since != 0 && now.saturating_sub(since) > limit
    }

    /// One tick more: for how many whole ticks the connection has now been
    /// idle (0 when a byte moved or a request is in flight).
    fn idle_tick(&self) -> u32 {
        let was_active = self.active.swap(false, Ordering::Relaxed);
        if was_active || self.in_flight.load(Ordering::Relaxed) > 0 {
            self.idle_ticks.store(0, Ordering::Relaxed);
            return 0;
        }
        self.idle_ticks.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// Held while a request is being handled, until its answer's body is sent
/// (see [`InFlightBody`]).
pub struct InFlight(Arc<ConnState>);

pin_project_lite::pin_project! {
    /// An answer's body that keeps its request counted as in flight until
    /// the body is sent whole (or dropped): a streaming answer is neither
    /// idle nor followed by a request head while it lasts.
    pub struct InFlightBody<B> {
        #[pin]
        inner: B,
        in_flight: InFlight,
    }
}

impl<B> InFlightBody<B> {
    pub fn new(inner: B, in_flight: InFlight) -> Self {
        InFlightBody { inner, in_flight }
    }
}

impl<B: http_body::Body> http_body::Body for InFlightBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A request of the own HTTP/1 side in flight (see
/// [`ConnState::own_request_started`]).
pub struct OwnInFlight<'a>(&'a ConnState);

impl Drop for OwnInFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.store(0, Ordering::Relaxed);
        self.0.active.store(true, Ordering::Relaxed);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.active.store(true, Ordering::Relaxed);
    }
}

/// The HTTP/2 connection preface. A connection that starts with it is
/// HTTP/2: its frames between requests (pings, settings) are not a request
/// head, so the head timeout does not apply (as with hyper's, HTTP/1 only).
pub(super) const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Clone, Copy, PartialEq, Debug)]
enum Preface {
    /// The bytes so far (this many) are a prefix of the HTTP/2 preface.
    Undecided(usize),
    Http1,
    Http2,
}

impl Preface {
    fn after(self, bytes: &[u8]) -> Preface {
        let Preface::Undecided(seen) = self else {
            return self;
        };
        let want = &H2_PREFACE[seen..];
        let n = want.len().min(bytes.len());
        if bytes[..n] != want[..n] {
            Preface::Http1
        } else if seen + n == H2_PREFACE.len() {
            Preface::Http2
        } else {
            Preface::Undecided(seen + n)
        }
    }
}

pin_project_lite::pin_project! {
    /// A connection's IO that marks its [`ConnState`]: on HTTP/1 any byte
    /// moved is activity (on HTTP/2 only its streams are); a byte read while
    /// no request is in flight starts a request head (HTTP/1); a byte
    /// written ends it (the answer to a request is going out, and what was
    /// read may be the next request, pipelined).
    pub struct ActivityIo<S> {
        #[pin]
        inner: S,
        state: Arc<ConnState>,
        reaper: Reaper,
        preface: Preface,
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
        let read = &buf.filled()[before..];
        if !read.is_empty() {
            let state = &**this.state;
            *this.preface = this.preface.after(read);
            if *this.preface == Preface::Http2 {
                // HTTP/2's own frames (PING, SETTINGS, a HEADERS frame
                // trickled byte by byte) are no activity: only streams are
                // (`request_started`, `InFlight`'s drop), so a connection
                // without one closes after `idle_timeout` whatever it sends.
                state.head_since.store(0, Ordering::Relaxed);
            } else if state.in_flight.load(Ordering::Relaxed) == 0
                && state.head_since.load(Ordering::Relaxed) == 0
            {
                let now = this.reaper.0.clock.load(Ordering::Relaxed);
                state.head_since.store(now, Ordering::Relaxed);
            }
            if *this.preface != Preface::Http2 {
                state.active.store(true, Ordering::Relaxed);
            }
        }
        result
    }
}

impl<S> ActivityIo<S> {
    fn wrote(state: &ConnState, preface: Preface) {
        // An HTTP/2 connection's writes (a PONG, a SETTINGS ack) are no
        // activity either; its streams' answers are counted by the stream.
        if preface != Preface::Http2 {
            state.active.store(true, Ordering::Relaxed);
        }
        if state.head_since.load(Ordering::Relaxed) != 0 {
            state.head_since.store(0, Ordering::Relaxed);
        }
    }

    /// Notes when a write (or a flush or shutdown, which TLS may hold)
    /// first found the client's socket full, and that one went through.
    fn write_polled<T>(state: &ConnState, reaper: &Reaper, result: &Poll<T>) {
        let blocked_since = state.write_blocked_since.load(Ordering::Relaxed);
        match result {
            Poll::Pending if blocked_since == 0 => {
                let now = reaper.0.clock.load(Ordering::Relaxed);
                state.write_blocked_since.store(now, Ordering::Relaxed);
            }
            Poll::Ready(_) if blocked_since != 0 => {
                state.write_blocked_since.store(0, Ordering::Relaxed);
                // A client taking what had to wait for it is activity, also
                // on HTTP/2 (an answer still in hyper's buffers after its
                // stream ended, going to a slow reader); a PONG to a reading
                // client never waits.
                state.active.store(true, Ordering::Relaxed);
            }
            _ => {}
        }
    }
}

impl<S: AsyncWrite> AsyncWrite for ActivityIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        Self::wrote(this.state, *this.preface);
        let result = this.inner.poll_write(cx, data);
        Self::write_polled(this.state, this.reaper, &result);
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        Self::wrote(this.state, *this.preface);
        let result = this.inner.poll_write_vectored(cx, bufs);
        Self::write_polled(this.state, this.reaper, &result);
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let result = this.inner.poll_flush(cx);
        Self::write_polled(this.state, this.reaper, &result);
        result
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // TLS's close_notify may wait on a full socket too.
        let this = self.project();
        let result = this.inner.poll_shutdown(cx);
        Self::write_polled(this.state, this.reaper, &result);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_http2_preface_is_recognised_across_reads() {
        let p = Preface::Undecided(0).after(b"PRI * HT");
        assert_eq!(p, Preface::Undecided(8));
        assert_eq!(p.after(b"TP/2.0\r\n\r\nSM\r\n\r\n\0\0"), Preface::Http2);
        assert_eq!(Preface::Undecided(0).after(b"P"), Preface::Undecided(1));
        assert_eq!(
            Preface::Undecided(1).after(b"OST / HTTP/1.1"),
            Preface::Http1
        );
        assert_eq!(
            Preface::Undecided(0).after(b"GET / HTTP/1.1"),
            Preface::Http1
        );
        assert_eq!(Preface::Http1.after(H2_PREFACE), Preface::Http1);
    }

    fn timeouts(idle: u64, header_read: u64, send: u64) -> ConnTimeouts {
        ConnTimeouts {
            idle: Duration::from_secs(idle),
            header_read: Duration::from_secs(header_read),
            send: Duration::from_secs(send),
        }
    }

    #[test]
    fn ticks_follow_the_shortest_timeout() {
        let reaper = Reaper::new(timeouts(60, 10, 60));
        assert_eq!(reaper.0.period, Duration::from_millis(2500));
        assert_eq!(reaper.0.head_ticks, 4);
        assert_eq!(reaper.0.idle_ticks, 24);
        assert_eq!(reaper.0.send_ticks, 24);
        let reaper = Reaper::new(timeouts(60, 10, 2));
        assert_eq!(reaper.0.period, Duration::from_millis(500));
        assert_eq!(reaper.0.send_ticks, 4);
    }

    #[test]
    fn a_write_blocked_for_send_timeout_closes_even_with_a_request_in_flight() {
        // One tick a second; a blocked write may wait 4 ticks.
        let reaper = Reaper::new(timeouts(8, 8, 4));
        let stuck = reaper.register();
        let flowing = reaper.register();
        let _request = stuck.state().request_started();
        let _other = flowing.state().request_started();
        ActivityIo::<()>::write_polled(&stuck.state, &reaper, &Poll::<()>::Pending);
        ActivityIo::<()>::write_polled(&flowing.state, &reaper, &Poll::<()>::Pending);
        for _ in 0..4 {
            reaper.tick();
        }
        ActivityIo::<()>::write_polled(&flowing.state, &reaper, &Poll::Ready(()));
        assert_eq!(stuck.state.close.load(Ordering::Relaxed), KEEP);
        reaper.tick();
        assert_eq!(stuck.state.close.load(Ordering::Relaxed), STALLED);
        assert_eq!(
            flowing.state.close.load(Ordering::Relaxed),
            KEEP,
            "its write went through: the clock starts again"
        );
    }

    #[test]
    fn a_pending_head_is_aborted_and_an_idle_connection_closed_gracefully() {
        // One tick a second; the head may take 4 ticks, idleness 8.
        let reaper = Reaper::new(timeouts(8, 4, 60));
        let slow = reaper.register();
        let idle = reaper.register();
        let busy = reaper.register();
        slow.state.head_since.store(1, Ordering::Relaxed);
        let _request = busy.state().request_started();
        for _ in 0..4 {
            reaper.tick();
        }
        assert_eq!(
            slow.state.close.load(Ordering::Relaxed),
            KEEP,
            "the first byte may have come just before tick 2: 4 ticks are not a sure 4 s"
        );
        reaper.tick();
        assert_eq!(slow.state.close.load(Ordering::Relaxed), ABORT);
        assert_eq!(idle.state.close.load(Ordering::Relaxed), KEEP);
        assert!(
            idle.state.take_trim(),
            "idle for whole ticks: asked to trim"
        );
        assert!(!idle.state.take_trim(), "asked once per idle spell");
        assert!(!busy.state.take_trim(), "a request in flight: not asked");
        for _ in 0..3 {
            reaper.tick();
        }
        assert_eq!(idle.state.close.load(Ordering::Relaxed), GRACEFUL);
        assert_eq!(busy.state.close.load(Ordering::Relaxed), KEEP);
        drop(slow);
        assert_eq!(reaper.len(), 2);

        // Shutting down: graceful for all, and a head still coming is
        // aborted when its time is up all the same.
        let late = reaper.register();
        let now = reaper.0.clock.load(Ordering::Relaxed);
        late.state.head_since.store(now, Ordering::Relaxed);
        reaper.shut_down();
        assert_eq!(busy.state.close.load(Ordering::Relaxed), GRACEFUL);
        assert_eq!(late.state.close.load(Ordering::Relaxed), GRACEFUL);
        for _ in 0..3 {
            reaper.tick();
        }
        assert_eq!(
            idle.state.close.load(Ordering::Relaxed),
            GRACEFUL,
            "a graceful close has its own spell"
        );
        for _ in 0..2 {
            reaper.tick();
        }
        assert_eq!(late.state.close.load(Ordering::Relaxed), ABORT);
        assert_eq!(
            idle.state.close.load(Ordering::Relaxed),
            ABORT,
            "a graceful close that does not end (an HTTP/2 client that never answers the closing ping) is cut"
        );
        assert_eq!(busy.state.close.load(Ordering::Relaxed), GRACEFUL);
        assert_eq!(
            reaper.register().state.close.load(Ordering::Relaxed),
            GRACEFUL,
            "a connection that arrives while shutting down closes at once"
        );
    }
}
