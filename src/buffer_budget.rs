//! The process's budget for buffered request bodies
//! (`server.max_buffered_bytes`).
//!
//! `max_body_bytes` bounds one body; without a bound on all of them, a few
//! clients could buffer thousands at once (HTTP/2 lets one connection send
//! 200 bodies side by side, and buffering hands its flow-control window back
//! as it reads) and run the process out of memory, losing every request in
//! flight. A body takes its declared length before it is read (one of
//! unknown length takes its bytes as they come) and gives them back when the
//! request is done with it; one that would pass the limit is refused with
//! `503 overloaded`, which its client can retry.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The bytes of request bodies buffered now, across every connection.
#[derive(Debug, Default)]
pub struct BufferBudget {
    held: AtomicU64,
}

impl BufferBudget {
    /// Bytes held by buffered bodies now.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }
}

/// What one body holds of the budget, while it is being read.
#[derive(Debug)]
pub struct Taking {
    budget: Arc<BufferBudget>,
    limit: u64,
    bytes: u64,
}

impl Taking {
    pub fn new(budget: Arc<BufferBudget>, limit: u64) -> Taking {
        Taking {
            budget,
            limit,
            bytes: 0,
        }
    }

    /// Takes `n` more bytes; `false`, taking nothing, if that would pass the
    /// limit.
    pub fn take(&mut self, n: u64) -> bool {
        // Added only if it fits: a refused take never shows in `held`, where
        // it could make another body's take that fits fail.
        let fits = |held: u64| held.checked_add(n).filter(|&after| after <= self.limit);
        let taken = self
            .budget
            .held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, fits)
            .is_ok();
        if taken {
            self.bytes += n;
        }
        taken
    }

    /// The budget's limit.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Held until the last clone of the body's [`Hold`] goes.
    pub fn hold(self) -> Hold {
        Hold {
            _taking: Some(Arc::new(self)),
        }
    }
}

impl Drop for Taking {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// A buffered body's share of the budget; none for a body that was not
/// read from a client (a replay's).
#[derive(Debug, Clone, Default)]
pub struct Hold {
    _taking: Option<Arc<Taking>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_share_the_limit_and_give_back_what_they_held() {
        let budget = Arc::new(BufferBudget::default());
        let mut first = Taking::new(budget.clone(), 100);
        assert!(first.take(60));
        let mut second = Taking::new(budget.clone(), 100);
        assert!(!second.take(50), "60 + 50 passes 100");
        assert!(second.take(40));
        assert_eq!(budget.held(), 100);
        let held = first.hold();
        let copy = held.clone();
        drop(held);
        assert_eq!(budget.held(), 100, "a clone still holds it");
        drop(copy);
        drop(second);
        assert_eq!(budget.held(), 0);
    }
}
