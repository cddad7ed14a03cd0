//! Two counters over a sliding time window, cut into ten slices: the
//! failure-rate breaker counts (calls, failures), the retry budget
//! (requests, retries). Plain data: the owner provides the lock and the
//! clock (time since its own origin), which keeps it testable.

use std::time::Duration;

/// Number of slices the window is cut into: the window slides by a tenth.
const SLICES: usize = 10;

#[derive(Debug, Clone)]
pub struct SlidingWindow {
    width: Duration,
    /// (slice number since the owner's origin, first counter, second counter)
    slices: [(u64, u32, u32); SLICES],
}

impl SlidingWindow {
    pub fn new(window: Duration) -> Self {
        SlidingWindow {
            width: (window / SLICES as u32).max(Duration::from_millis(1)),
            slices: [(u64::MAX, 0, 0); SLICES],
        }
    }

    /// Whether this window was made for `window` (a reload may change it).
    pub fn spans(&self, window: Duration) -> bool {
        self.width == (window / SLICES as u32).max(Duration::from_millis(1))
    }

    fn slice(&self, since_origin: Duration) -> u64 {
        (since_origin.as_nanos() / self.width.as_nanos()) as u64
    }

    pub fn add(&mut self, since_origin: Duration, first: u32, second: u32) {
        let slice = self.slice(since_origin);
        let entry = &mut self.slices[(slice % SLICES as u64) as usize];
        if entry.0 != slice {
            *entry = (slice, 0, 0);
        }
        entry.1 = entry.1.saturating_add(first);
        entry.2 = entry.2.saturating_add(second);
    }

    /// Both counters summed over the window ending at `since_origin`.
    pub fn totals(&self, since_origin: Duration) -> (u32, u32) {
        let now = self.slice(since_origin);
        self.slices
            .iter()
            .filter(|s| s.0 <= now && now - s.0 < SLICES as u64)
            .fold((0u32, 0u32), |(a, b), s| {
                (a.saturating_add(s.1), b.saturating_add(s.2))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_slide_out_after_the_window() {
        let mut w = SlidingWindow::new(Duration::from_secs(10));
        w.add(Duration::from_millis(500), 1, 1);
        w.add(Duration::from_millis(5_500), 2, 0);
        assert_eq!(w.totals(Duration::from_millis(5_600)), (3, 1));
        assert_eq!(w.totals(Duration::from_millis(10_100)), (2, 0));
        assert_eq!(w.totals(Duration::from_millis(16_000)), (0, 0));
    }
}
