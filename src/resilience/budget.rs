//! The retry budget of one route, as Envoy and Linkerd have it: over the last
//! `budget_window`, retries may add at most `budget_percent` % to the
//! requests, plus `budget_min_per_second` retries per second that are always
//! allowed (so a quiet route can still retry). When a backend fails for
//! everyone, this keeps retries from multiplying the load on it.
//!
//! A tiny per-route mutex, never held across an `.await`; the configuration
//! is passed in on every call, so a reload keeps the counts.

use std::sync::Mutex;
use std::time::Instant;

use super::window::SlidingWindow;
use crate::config::RetryConfig;

#[derive(Debug)]
pub struct RetryBudget {
    /// (requests, retries) over the window.
    window: Mutex<SlidingWindow>,
    origin: Instant,
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget {
            window: Mutex::new(SlidingWindow::new(std::time::Duration::from_secs(10))),
            origin: Instant::now(),
        }
    }
}

impl RetryBudget {
    /// Takes one retry from the budget if there is one left.
    pub fn try_retry(&self, config: &RetryConfig) -> bool {
        self.try_retry_at(config, Instant::now())
    }

    fn with_window<T>(&self, config: &RetryConfig, f: impl FnOnce(&mut SlidingWindow) -> T) -> T {
        let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if !window.spans(config.budget_window) {
            *window = SlidingWindow::new(config.budget_window);
        }
        f(&mut window)
    }

    /// Counts one request (its first attempt, at `now`): it earns the
    /// budget.
    pub fn on_request_at(&self, config: &RetryConfig, now: Instant) {
        let since = now.saturating_duration_since(self.origin);
        self.with_window(config, |w| w.add(since, 1, 0));
    }

    fn try_retry_at(&self, config: &RetryConfig, now: Instant) -> bool {
        let since = now.saturating_duration_since(self.origin);
        self.with_window(config, |w| {
            let (requests, retries) = w.totals(since);
            let allowed = config.budget_min_per_second * config.budget_window.as_secs_f64()
                + config.budget_percent / 100.0 * f64::from(requests);
            let ok = f64::from(retries) + 1.0 <= allowed;
            if ok {
                w.add(since, 0, 1);
            }
            ok
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn config(percent: f64, min_per_second: f64) -> RetryConfig {
        RetryConfig {
            max_attempts: 3,
            initial_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(100),
            backoff_factor: 2.0,
            retry_on_status: vec![503],
            retry_on_errors: Vec::new(),
            retry_non_idempotent: false,
            deadline: Duration::ZERO,
            budget_percent: percent,
            budget_min_per_second: min_per_second,
            budget_window: Duration::from_secs(10),
        }
    }

    #[test]
    fn retries_are_a_share_of_requests() {
        let c = config(20.0, 0.0);
        let b = RetryBudget::default();
        let t = b.origin;
        for _ in 0..100 {
            b.on_request_at(&c, t);
        }
        let granted = (0..100).filter(|_| b.try_retry_at(&c, t)).count();
        assert_eq!(granted, 20);
    }

    #[test]
    fn minimum_rate_allows_retries_on_a_quiet_route() {
        let c = config(20.0, 1.0);
        let b = RetryBudget::default();
        let t = b.origin;
        b.on_request_at(&c, t);
        let granted = (0..100).filter(|_| b.try_retry_at(&c, t)).count();
        assert_eq!(
            granted, 10,
            "1/s over a 10 s window, plus 0.2 of one request"
        );
    }

    #[test]
    fn budget_refills_as_the_window_slides() {
        let c = config(0.0, 1.0);
        let b = RetryBudget::default();
        let t = b.origin;
        assert_eq!((0..20).filter(|_| b.try_retry_at(&c, t)).count(), 10);
        let later = t + Duration::from_secs(11);
        assert!(b.try_retry_at(&c, later));
    }
}
