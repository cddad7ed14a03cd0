//! Retry delays: exponential, capped, with up to 20 % random jitter that only
//! ever lengthens the delay (DESIGN.md), and a backend's `Retry-After`
//! honoured up to the cap.

use std::time::Duration;

use rand::Rng;

/// Jitter adds less than this share of the delay.
const MAX_JITTER: f64 = 0.2;

/// The exponential schedule of one retry policy.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    pub factor: f64,
}

impl Backoff {
    /// The delay before attempt `n + 1`, for `n >= 1`, without jitter:
    /// `min(max, initial × factor^(n−1))`.
    pub fn base_delay(&self, n: u32) -> Duration {
        let exp = self.factor.powi(n.saturating_sub(1).min(1000) as i32);
        let secs = self.initial.as_secs_f64() * exp;
        if !secs.is_finite() || secs >= self.max.as_secs_f64() {
            self.max
        } else {
            Duration::from_secs_f64(secs)
        }
    }

    /// The delay with jitter: `base × (1 + U[0, 0.2))`.
    pub fn delay(&self, n: u32) -> Duration {
        let base = self.base_delay(n);
        base.mul_f64(1.0 + rand::rng().random_range(0.0..MAX_JITTER))
    }

    /// The longest delay any policy capped at `max` gives, jitter included.
    pub fn longest(max: Duration) -> Duration {
        max.mul_f64(1.0 + MAX_JITTER)
    }

    /// The delay when the backend said `Retry-After: retry_after`: the longer
    /// of the two, capped by `max` (a backend cannot park a request forever).
    pub fn delay_with_hint(&self, n: u32, retry_after: Option<Duration>) -> Duration {
        let delay = self.delay(n);
        match retry_after {
            Some(hint) if hint > delay => hint.min(self.max),
            _ => delay,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Backoff = Backoff {
        initial: Duration::from_secs(1),
        max: Duration::from_secs(10),
        factor: 2.0,
    };

    #[test]
    fn schedule_matches_design() {
        let want = [1, 2, 4, 8, 10, 10];
        for (i, secs) in want.iter().enumerate() {
            assert_eq!(POLICY.base_delay(i as u32 + 1), Duration::from_secs(*secs));
        }
    }

    #[test]
    fn jitter_never_shortens_and_stays_under_twenty_percent() {
        for n in 1..6 {
            for _ in 0..200 {
                let d = POLICY.delay(n);
                let base = POLICY.base_delay(n);
                assert!(d >= base && d < base.mul_f64(1.2), "{d:?} vs {base:?}");
            }
        }
    }

    #[test]
    fn retry_after_is_honoured_up_to_max() {
        let hint = POLICY.delay_with_hint(1, Some(Duration::from_secs(5)));
        assert_eq!(hint, Duration::from_secs(5));
        let capped = POLICY.delay_with_hint(1, Some(Duration::from_secs(100)));
        assert_eq!(capped, Duration::from_secs(10));
    }

    proptest::proptest! {
        /// For any policy: the base schedule never shrinks and never passes
        /// `max`; jitter only lengthens, by less than 20 %; a `Retry-After`
        /// hint is honoured but capped by `max`.
        #[test]
        fn policy_invariants(
            initial_ms in 1u64..5_000,
            extra_ms in 0u64..60_000,
            factor in 1.0f64..4.0,
            n in 1u32..40,
            hint_ms in proptest::option::of(0u64..120_000),
        ) {
            let policy = Backoff {
                initial: Duration::from_millis(initial_ms),
                max: Duration::from_millis(initial_ms + extra_ms),
                factor,
            };
            let base = policy.base_delay(n);
            proptest::prop_assert!(base <= policy.max);
            proptest::prop_assert!(base >= policy.initial.min(policy.max));
            proptest::prop_assert!(policy.base_delay(n + 1) >= base);
            let jittered = policy.delay(n);
            proptest::prop_assert!(jittered >= base && jittered <= base.mul_f64(1.2));
            let hint = hint_ms.map(Duration::from_millis);
            let with_hint = policy.delay_with_hint(n, hint);
            proptest::prop_assert!(with_hint >= base.min(policy.max));
            proptest::prop_assert!(with_hint <= policy.max.max(base.mul_f64(1.2)));
            proptest::prop_assert!(with_hint <= Backoff::longest(policy.max));
            if let Some(h) = hint {
                proptest::prop_assert!(with_hint >= h.min(policy.max));
            }
        }
    }
}
