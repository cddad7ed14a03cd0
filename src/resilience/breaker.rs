//! The circuit breaker of one route: closed → open → half-open → closed.
//!
//! - **closed**: every call goes through. In `consecutive` mode the circuit
//!   opens after `failure_threshold` failures in a row; in `failure_rate`
//!   mode when, over the last `window`, at least `minimum_calls` were made and
//!   `failure_rate_threshold` % of them failed.
//! - **open**: no call goes through until `reset_timeout` has passed.
//! - **half-open**: at most `success_threshold` probe calls are in flight at
//!   once (the rest are answered as if open); `success_threshold` successes
//!   close the circuit, one failure opens it again.
//!
//! What counts as a failure is decided by `classify` (transport errors,
//! timeouts, 5xx; never 4xx) plus calls slower than `slow_call_duration`.
//! The state is behind a tiny per-breaker mutex that is never held across an
//! `.await`; there is no lock shared between routes. Configuration is passed
//! in on every call (never stored), so a reload changes thresholds without
//! losing the state. This module never talks to the network.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prometheus_client::metrics::gauge::Gauge;

use super::window::SlidingWindow;
use crate::config::{BreakerConfig, BreakerMode};

/// The three states, with the numbers of `backstop_circuit_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed,
    Open,
    HalfOpen,
}

impl CircuitState {
    pub fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
        }
    }

    fn gauge_value(self) -> i64 {
        match self {
            CircuitState::Closed => 0,
            CircuitState::Open => 1,
            CircuitState::HalfOpen => 2,
        }
    }
}

/// A view of a breaker for `/circuit-status`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Snapshot {
    pub state: CircuitState,
    /// Consecutive failures (closed, `consecutive` mode) or failures in the
    /// window (`failure_rate` mode).
    pub failures: u32,
    /// Successful probes so far (half-open).
    pub successes: u32,
    /// Calls in the window (`failure_rate` mode).
    pub calls: u32,
    /// Until the circuit turns half-open (zero unless open).
    pub time_to_reset: Duration,
}

#[derive(Debug)]
struct Inner {
    state: CircuitState,
    consecutive_failures: u32,
    half_open_successes: u32,
    probes_in_flight: u32,
    open_until: Instant,
    /// Bumped on every transition, so an outcome of a call admitted in an
    /// earlier state (or before a reset) is ignored.
    epoch: u64,
    window: SlidingWindow,
}

/// One route's breaker.
#[derive(Debug)]
pub struct Breaker {
    inner: Mutex<Inner>,
    origin: Instant,
    gauge: Gauge,
}

/// Whether a call may go to the backend.
#[derive(Debug)]
pub enum Admission<'a> {
    Allowed(Permit<'a>),
    /// Open (or half-open with every probe slot taken): answer without
    /// calling the backend; the circuit may admit calls again after this.
    Rejected {
        retry_in: Duration,
    },
}

/// The right to make one call; its outcome must be reported with
/// [`Permit::record`], or left out with [`Permit::abstain`]. A permit
/// dropped unreported (the client went away) frees its half-open probe
/// slot, unless its call, [sent](Permit::sent), had already taken longer
/// than `slow_call_duration`: it then counts as the slow call it was (an
/// HTTP/2 client's deadline shorter than `request_timeout` would otherwise
/// keep a hung backend's circuit closed for ever).
///
/// It borrows its breaker (a request's route outlives its attempts): no
/// shared count to raise and lower on every call.
#[derive(Debug)]
pub struct Permit<'a> {
    breaker: &'a Breaker,
    epoch: u64,
    probe: bool,
    reported: bool,
    /// The call went out then, under this configuration.
    sent: Option<(&'a BreakerConfig, Instant)>,
}

impl<'a> Permit<'a> {
    /// The call goes out now (`sent_at`): from here, a permit dropped
    /// unreported past `slow_call_duration` counts as a slow call.
    pub fn sent(&mut self, config: &'a BreakerConfig, sent_at: Instant) {
        self.sent = Some((config, sent_at));
    }

    /// Reports nothing of this call (it says nothing of the backend).
    pub fn abstain(mut self) {
        self.sent = None;
    }

    /// Reports the outcome of the call made at `sent_at`: `failed` as
    /// classified by `classify`; its duration counts slow calls. (Inlined
    /// into its callers, as it was before `Drop` had work of its own.)
    #[inline(always)]
    pub fn record(self, config: &BreakerConfig, failed: bool, sent_at: Instant) {
        let now = Instant::now();
        let slow = is_slow(config, sent_at, now);
        self.report(config, failed || slow, now);
    }

    /// Reports the outcome as of `now`.
    #[inline(always)]
    fn report(mut self, config: &BreakerConfig, failed: bool, now: Instant) {
        self.reported = true;
        self.breaker
            .record_at(self.epoch, self.probe, config, failed, now);
    }
}

/// Whether a call sent at `sent_at` is slow by `now`; the duration is
/// worked out only when slow calls count.
fn is_slow(config: &BreakerConfig, sent_at: Instant, now: Instant) -> bool {
    !config.slow_call_duration.is_zero()
        && now.saturating_duration_since(sent_at) > config.slow_call_duration
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.reported {
            self.dropped_unreported();
        }
    }
}

impl Permit<'_> {
    /// Out of the way of every reported call (most are): counting this
    /// rare one here kept `record_at` from being inlined where it is hot.
    #[cold]
    #[inline(never)]
    fn dropped_unreported(&mut self) {
        if let Some((config, sent_at)) = self.sent {
            let now = Instant::now();
            if is_slow(config, sent_at, now) {
                self.reported = true;
                self.breaker
                    .record_at(self.epoch, self.probe, config, true, now);
                return;
            }
        }
        if self.probe {
            let mut inner = self.breaker.lock();
            if inner.epoch == self.epoch && inner.state == CircuitState::HalfOpen {
                inner.probes_in_flight = inner.probes_in_flight.saturating_sub(1);
            }
        }
    }
}

impl Breaker {
    /// A closed breaker; `gauge` is its `backstop_circuit_state` series.
    pub fn new(gauge: Gauge) -> Breaker {
        gauge.set(0);
        let now = Instant::now();
        Breaker {
            inner: Mutex::new(Inner {
                state: CircuitState::Closed,
                consecutive_failures: 0,
                half_open_successes: 0,
                probes_in_flight: 0,
                open_until: now,
                epoch: 0,
                window: SlidingWindow::new(Duration::from_secs(60)),
            }),
            origin: now,
            gauge,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the counters in a
        // state worse than stale, so a poisoned lock is still used.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks to make one call now.
    pub fn admit(&self, config: &BreakerConfig) -> Admission<'_> {
        self.admit_with(config, Instant::now)
    }

    #[cfg(test)]
    fn admit_at(&self, config: &BreakerConfig, now: Instant) -> Admission<'_> {
        self.admit_with(config, || now)
    }

    /// The time until the circuit admits calls again, if it is open now
    /// (used by the replay worker, which must not call an open backend).
    pub fn open_for(&self) -> Option<Duration> {
        let inner = self.lock();
        let now = Instant::now();
        (inner.state == CircuitState::Open && inner.open_until > now)
            .then(|| inner.open_until - now)
    }

    /// The clock (`now`) is read only when the circuit is open: a closed
    /// or half-open one admits without it.
    fn admit_with(&self, config: &BreakerConfig, now: impl FnOnce() -> Instant) -> Admission<'_> {
        let mut inner = self.lock();
        if inner.state == CircuitState::Open {
            let now = now();
            if now < inner.open_until {
                return Admission::Rejected {
                    retry_in: inner.open_until - now,
                };
            }
            self.transition(&mut inner, CircuitState::HalfOpen, now, config);
        }
        let probe = inner.state == CircuitState::HalfOpen;
        if probe {
            if inner.probes_in_flight >= config.success_threshold {
                // Every probe slot is taken: wait for their verdict.
                return Admission::Rejected {
                    retry_in: Duration::from_secs(1),
                };
            }
            inner.probes_in_flight += 1;
        }
        Admission::Allowed(Permit {
            breaker: self,
            epoch: inner.epoch,
            probe,
            reported: false,
            sent: None,
        })
    }

    /// Counts the outcome of a call admitted in `epoch` (as a half-open
    /// `probe` or not). Inlined into [`Permit::record`], where every call's
    /// outcome is counted (with a second caller, the compiler kept it a
    /// call: +70 instructions a request).
    #[inline(always)]
    fn record_at(
        &self,
        epoch: u64,
        probe: bool,
        config: &BreakerConfig,
        failed: bool,
        now: Instant,
    ) {
        let mut inner = self.lock();
        if inner.epoch != epoch {
            return;
        }
        match inner.state {
            CircuitState::Closed => {
                if !inner.window.spans(config.window) {
                    inner.window = SlidingWindow::new(config.window);
                }
                let since = now.saturating_duration_since(self.origin);
                inner.window.add(since, 1, u32::from(failed));
                if failed {
                    inner.consecutive_failures += 1;
                } else {
                    inner.consecutive_failures = 0;
                }
                let trip = match config.mode {
                    BreakerMode::Consecutive => {
                        inner.consecutive_failures >= config.failure_threshold
                    }
                    BreakerMode::FailureRate => {
                        let (calls, failures) = inner.window.totals(since);
                        failed
                            && calls >= config.minimum_calls
                            && f64::from(failures) * 100.0
                                >= config.failure_rate_threshold * f64::from(calls)
                    }
                };
                if trip {
                    self.transition(&mut inner, CircuitState::Open, now, config);
                }
            }
            CircuitState::HalfOpen if probe => {
                inner.probes_in_flight = inner.probes_in_flight.saturating_sub(1);
                if failed {
                    self.transition(&mut inner, CircuitState::Open, now, config);
                } else {
                    inner.half_open_successes += 1;
                    if inner.half_open_successes >= config.success_threshold {
                        self.transition(&mut inner, CircuitState::Closed, now, config);
                    }
                }
            }
            _ => {}
        }
    }

    fn transition(
        &self,
        inner: &mut Inner,
        to: CircuitState,
        now: Instant,
        config: &BreakerConfig,
    ) {
        inner.state = to;
        inner.epoch += 1;
        inner.consecutive_failures = 0;
        inner.half_open_successes = 0;
        inner.probes_in_flight = 0;
        if to == CircuitState::Open {
            inner.open_until = now + config.reset_timeout;
        }
        if to == CircuitState::Closed {
            inner.window = SlidingWindow::new(config.window);
        }
        self.gauge.set(to.gauge_value());
    }

    /// Closes the circuit now (`POST /circuits/{route}/reset`).
    pub fn reset(&self, config: &BreakerConfig) {
        let mut inner = self.lock();
        self.transition(&mut inner, CircuitState::Closed, Instant::now(), config);
    }

    /// Sets `backstop_circuit_state` to the state a caller would find now
    /// (a scrape's view, as `snapshot`'s): an open circuit past its reset
    /// timeout turns half-open only on its next call, and a route with no
    /// traffic would show open for ever.
    pub fn publish_state(&self) {
        let inner = self.lock();
        let state = match inner.state {
            CircuitState::Open if Instant::now() >= inner.open_until => CircuitState::HalfOpen,
            other => other,
        };
        self.gauge.set(state.gauge_value());
    }

    pub fn snapshot(&self, config: &BreakerConfig) -> Snapshot {
        self.snapshot_at(config, Instant::now())
    }

    /// The state as a caller would find it now: an open circuit whose reset
    /// timeout has passed reads as half-open (it turns so on the next call).
    pub fn snapshot_at(&self, config: &BreakerConfig, now: Instant) -> Snapshot {
        let inner = self.lock();
        let (calls, window_failures) = inner
            .window
            .totals(now.saturating_duration_since(self.origin));
        let (state, time_to_reset) = match inner.state {
            CircuitState::Open if now >= inner.open_until => {
                (CircuitState::HalfOpen, Duration::ZERO)
            }
            CircuitState::Open => (CircuitState::Open, inner.open_until - now),
            other => (other, Duration::ZERO),
        };
        let failures = match (inner.state, config.mode) {
            (CircuitState::Closed, BreakerMode::FailureRate) => window_failures,
            _ => inner.consecutive_failures,
        };
        Snapshot {
            state,
            failures,
            successes: inner.half_open_successes,
            calls,
            time_to_reset,
        }
    }
}

/// Whole seconds until a reset, as `Retry-After` says them: rounded up, at
/// least 1 (0 would invite an immediate retry into an open circuit).
pub fn retry_after_secs(d: Duration) -> u64 {
    let whole = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    whole.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn config(mode: BreakerMode) -> BreakerConfig {
        BreakerConfig {
            failure_threshold: 3,
            reset_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(1),
            success_threshold: 2,
            mode,
            failure_rate_threshold: 50.0,
            minimum_calls: 4,
            window: Duration::from_secs(10),
            slow_call_duration: Duration::ZERO,
        }
    }

    fn breaker() -> Breaker {
        Breaker::new(Gauge::default())
    }

    fn call(b: &Breaker, c: &BreakerConfig, now: Instant, failed: bool) -> bool {
        match b.admit_at(c, now) {
            Admission::Allowed(p) => {
                p.report(c, failed, now);
                true
            }
            Admission::Rejected { .. } => false,
        }
    }

    #[test]
    fn opens_after_consecutive_failures_and_recovers_through_half_open() {
        let c = config(BreakerMode::Consecutive);
        let b = breaker();
        let t0 = b.origin;
        assert!(call(&b, &c, t0, true));
        assert!(call(&b, &c, t0, false), "a success resets the count");
        for _ in 0..3 {
            assert!(call(&b, &c, t0, true));
        }
        assert_eq!(b.snapshot_at(&c, t0).state, CircuitState::Open);
        assert!(!call(&b, &c, t0 + Duration::from_secs(9), false));
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(b.snapshot_at(&c, t1).state, CircuitState::HalfOpen);
        assert!(call(&b, &c, t1, false));
        assert_eq!(b.snapshot_at(&c, t1).state, CircuitState::HalfOpen);
        assert!(call(&b, &c, t1, false));
        assert_eq!(b.snapshot_at(&c, t1).state, CircuitState::Closed);
    }

    #[test]
    fn half_open_admits_a_limited_number_of_probes() {
        let c = config(BreakerMode::Consecutive);
        let b = breaker();
        let t0 = b.origin;
        for _ in 0..3 {
            call(&b, &c, t0, true);
        }
        let t1 = t0 + Duration::from_secs(11);
        let first = b.admit_at(&c, t1);
        let second = b.admit_at(&c, t1);
        assert!(matches!(first, Admission::Allowed(_)));
        assert!(matches!(second, Admission::Allowed(_)));
        assert!(matches!(b.admit_at(&c, t1), Admission::Rejected { .. }));
        drop(first);
        assert!(
            matches!(b.admit_at(&c, t1), Admission::Allowed(_)),
            "a dropped probe frees its slot"
        );
    }

    #[test]
    fn a_permit_dropped_after_a_slow_send_counts_as_a_failure_unless_it_abstains() {
        let c = BreakerConfig {
            failure_threshold: 1,
            slow_call_duration: Duration::from_millis(1),
            ..config(BreakerMode::Consecutive)
        };
        let long_ago = Instant::now() - Duration::from_secs(1);
        let b = breaker();
        let Admission::Allowed(mut abstaining) = b.admit(&c) else {
            panic!("a closed breaker admits");
        };
        abstaining.sent(&c, long_ago);
        abstaining.abstain();
        let Admission::Allowed(fresh) = b.admit(&c) else {
            panic!("a closed breaker admits");
        };
        drop(fresh);
        assert_eq!(
            b.snapshot(&c).state,
            CircuitState::Closed,
            "neither counted"
        );
        let Admission::Allowed(mut cancelled) = b.admit(&c) else {
            panic!("a closed breaker admits");
        };
        cancelled.sent(&c, long_ago);
        drop(cancelled);
        assert_eq!(b.snapshot(&c).state, CircuitState::Open);
    }

    #[test]
    fn failure_rate_mode_needs_minimum_calls() {
        let c = config(BreakerMode::FailureRate);
        let b = breaker();
        let t0 = b.origin;
        for failed in [true, false, true] {
            call(&b, &c, t0, failed);
        }
        assert_eq!(b.snapshot_at(&c, t0).state, CircuitState::Closed);
        call(&b, &c, t0, true);
        assert_eq!(b.snapshot_at(&c, t0).state, CircuitState::Open);
    }

    #[test]
    fn failure_rate_window_forgets_old_calls() {
        let c = config(BreakerMode::FailureRate);
        let b = breaker();
        let t0 = b.origin;
        for _ in 0..3 {
            call(&b, &c, t0, true);
        }
        let later = t0 + Duration::from_secs(30);
        for _ in 0..3 {
            call(&b, &c, later, false);
        }
        call(&b, &c, later, true);
        assert_eq!(b.snapshot_at(&c, later).state, CircuitState::Closed);
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::from_millis(100)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(29_001)), 30);
        assert_eq!(retry_after_secs(Duration::from_secs(30)), 30);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }

    #[derive(Debug, Clone)]
    enum Step {
        Call { failed: bool },
        Advance { ms: u64 },
        Reset,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => any::<bool>().prop_map(|failed| Step::Call { failed }),
            2 => (0u64..15_000).prop_map(|ms| Step::Advance { ms }),
            1 => Just(Step::Reset),
        ]
    }

    proptest! {
        /// A reference model of the consecutive-mode state machine, checked
        /// against the breaker step by step.
        #[test]
        fn consecutive_mode_matches_the_model(steps in prop::collection::vec(step(), 1..200)) {
            let c = config(BreakerMode::Consecutive);
            let b = breaker();
            let mut now = b.origin;
            // Model: (state, consecutive failures, half-open successes, open until).
            let mut state = CircuitState::Closed;
            let (mut fails, mut succ, mut until) = (0u32, 0u32, now);
            for s in steps {
                match s {
                    Step::Advance { ms } => now += Duration::from_millis(ms),
                    Step::Reset => {
                        b.reset(&c);
                        state = CircuitState::Closed;
                        fails = 0;
                        succ = 0;
                    }
                    Step::Call { failed } => {
                        if state == CircuitState::Open && now >= until {
                            state = CircuitState::HalfOpen;
                            succ = 0;
                        }
                        let expect_admit = state != CircuitState::Open;
                        prop_assert_eq!(call(&b, &c, now, failed), expect_admit);
                        match (state, failed) {
                            (CircuitState::Closed, true) => {
                                fails += 1;
                                if fails >= c.failure_threshold {
                                    state = CircuitState::Open;
                                    until = now + c.reset_timeout;
                                    fails = 0;
                                }
                            }
                            (CircuitState::Closed, false) => fails = 0,
                            (CircuitState::HalfOpen, true) => {
                                state = CircuitState::Open;
                                until = now + c.reset_timeout;
                            }
                            (CircuitState::HalfOpen, false) => {
                                succ += 1;
                                if succ >= c.success_threshold {
                                    state = CircuitState::Closed;
                                    fails = 0;
                                }
                            }
                            (CircuitState::Open, _) => {}
                        }
                    }
                }
                let snap = b.snapshot_at(&c, now);
                let model_view = if state == CircuitState::Open && now >= until {
                    CircuitState::HalfOpen
                } else {
                    state
                };
                prop_assert_eq!(snap.state, model_view);
                if state == CircuitState::Open && now < until {
                    prop_assert_eq!(snap.time_to_reset, until - now);
                }
            }
        }

        /// Whatever happens, half-open never has more probes in flight than
        /// `success_threshold`, and an open circuit admits nothing.
        #[test]
        fn probes_are_bounded(steps in prop::collection::vec(step(), 1..200), hold in 0usize..4) {
            let c = config(BreakerMode::Consecutive);
            let b = breaker();
            let mut now = b.origin;
            let mut held = Vec::new();
            for s in steps {
                match s {
                    Step::Advance { ms } => now += Duration::from_millis(ms),
                    Step::Reset => b.reset(&c),
                    Step::Call { failed } => {
                        let before = b.snapshot_at(&c, now).state;
                        match b.admit_at(&c, now) {
                            Admission::Allowed(p) => {
                                prop_assert_ne!(before, CircuitState::Open);
                                if held.len() < hold && failed {
                                    held.push(p);
                                } else {
                                    p.report(&c, failed, now);
                                }
                            }
                            Admission::Rejected { .. } => {
                                prop_assert_ne!(before, CircuitState::Closed);
                            }
                        }
                    }
                }
                prop_assert!(b.lock().probes_in_flight <= c.success_threshold);
            }
        }
    }
}
