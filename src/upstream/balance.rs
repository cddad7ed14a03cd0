//! Round-robin load balancing over a route's upstreams, skipping a target
//! that just failed to connect (passive ejection for a short while) or that
//! active health checks found unhealthy. Each target also holds the slots
//! of `upstream_max_conns`, when the route caps its requests in flight.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Uri;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How long a target that refused a connection is skipped.
const EJECT_FOR: Duration = Duration::from_secs(5);

/// One upstream base URL and when it may be used again.
#[derive(Debug)]
pub struct Target {
    pub base: Uri,
    /// Milliseconds since the balancer's epoch before which the target is
    /// skipped; 0 = healthy.
    ejected_until_ms: AtomicU64,
    /// Set by active health checks (`routes.health_check`); true otherwise.
    healthy: AtomicBool,
    /// The turns of `upstream_max_conns`; `None` when there is no cap.
    slots: Option<Slots>,
}

/// The turns of a target whose requests in flight are capped: one permit
/// per request that may be in flight, and how many wait for one (both read
/// by `/metrics`).
#[derive(Debug)]
pub struct Slots {
    permits: Arc<Semaphore>,
    cap: usize,
    waiting: AtomicUsize,
}

impl Slots {
    fn new(cap: usize) -> Self {
        Slots {
            permits: Arc::new(Semaphore::new(cap)),
            cap,
            waiting: AtomicUsize::new(0),
        }
    }

    /// A turn free now, if there is one. The semaphore is fair: a freed
    /// permit goes to the longest waiter, so this never jumps the queue.
    pub fn try_take(&self) -> Option<OwnedSemaphorePermit> {
        self.permits.clone().try_acquire_owned().ok()
    }

    /// Waits for a turn, first come, first served, counted in `waiting`
    /// while it waits (also when the wait is given up). `None` only if the
    /// semaphore were closed, which it never is.
    pub async fn wait_for_turn(&self) -> Option<OwnedSemaphorePermit> {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let _counted = Waiting(&self.waiting);
        self.permits.clone().acquire_owned().await.ok()
    }

    /// Requests in flight to the target now.
    pub fn in_flight(&self) -> usize {
        self.cap.saturating_sub(self.permits.available_permits())
    }

    /// Requests waiting for a turn now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }
}

/// Uncounts a waiter when its wait ends, however it ends.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Target {
    /// Healthy (by the health checks) and not ejected.
    fn usable(&self, now_ms: u64) -> bool {
        self.healthy.load(Ordering::Relaxed)
            && self.ejected_until_ms.load(Ordering::Relaxed) <= now_ms
    }

    /// The target's turns, when its route caps its requests in flight.
    pub fn slots(&self) -> Option<&Slots> {
        self.slots.as_ref()
    }

    /// A turn is free now, or the target's requests in flight are not
    /// capped.
    fn has_turn(&self) -> bool {
        self.slots
            .as_ref()
            .is_none_or(|slots| slots.permits.available_permits() > 0)
    }
}

/// Turn `start` of round robin over `n` entries of which `takes` says
/// which may take a turn now: entry `start % n` if it may, else one of
/// those that may, the next of them at each round (`start / n`). Handing
/// a skipped entry's turn to the next one in the list instead would give
/// that neighbour a double share (A, B, C with B down: A, C, C); picking
/// by `start` alone would too when the counts share a factor (four with
/// the second and fourth down: both their turns to the third).
pub(crate) fn fair_turn(n: usize, start: usize, takes: impl Fn(usize) -> bool) -> Option<usize> {
    let own = start % n;
    if takes(own) {
        return Some(own);
    }
    let count = (0..n).filter(|&i| takes(i)).count();
    if count == 0 {
        return None;
    }
    // `None` only if one stopped taking turns between the two passes (a
    // turn taken meanwhile): the caller's fallback then waits for one.
    (0..n).filter(|&i| takes(i)).nth((start / n) % count)
}

#[derive(Debug)]
pub struct Balancer {
    targets: Vec<Target>,
    next: AtomicUsize,
    epoch: Instant,
}

impl Balancer {
    /// A balancer over `upstreams`, each taking at most `max_conns`
    /// requests at once when set.
    pub fn new(upstreams: &[Uri], max_conns: Option<usize>) -> Self {
        Balancer {
            targets: upstreams
                .iter()
                .map(|base| Target {
                    base: base.clone(),
                    ejected_until_ms: AtomicU64::new(0),
                    healthy: AtomicBool::new(true),
                    slots: max_conns.map(Slots::new),
                })
                .collect(),
            next: AtomicUsize::new(0),
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Target `index`'s base URL.
    pub fn base(&self, index: usize) -> Option<&Uri> {
        self.targets.get(index).map(|target| &target.base)
    }

    /// The next target in turn that is healthy, not ejected and (when
    /// capped) has a turn free; else the next usable one, to wait for a
    /// turn there rather than go to one known to be down; when none is
    /// usable, the next one anyway (better to try than to refuse).
    pub fn pick(&self) -> (usize, &Target) {
        self.pick_after(None)
    }

    /// [`Balancer::pick`] for a retry: the target whose attempt just
    /// failed (`failed`) is passed over while another is usable, as
    /// nginx's `proxy_next_upstream` moves on (with concurrent requests
    /// the shared turn would often hand a retry back to the target that
    /// just timed out).
    pub fn pick_after(&self, failed: Option<usize>) -> (usize, &Target) {
        let n = self.targets.len();
        if n == 1 {
            // No turn to take: the counter's locked add would cost a
            // drained store buffer per request for nothing.
            return (0, &self.targets[0]);
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let now = self.now_ms();
        let usable = |i: usize| Some(i) != failed && self.targets[i].usable(now);
        if let Some(i) = fair_turn(n, start, |i| usable(i) && self.targets[i].has_turn()) {
            return (i, &self.targets[i]);
        }
        // None with a turn free: the next usable one, to wait there.
        let first_usable = (0..n).map(|o| (start + o) % n).find(|&i| usable(i));
        // None usable but the failed one: it again. None at all: the next
        // in turn that did not just fail (it may have come back).
        let i = first_usable
            .or(failed.filter(|&f| f < n && self.targets[f].usable(now)))
            .or_else(|| (0..n).map(|o| (start + o) % n).find(|&i| Some(i) != failed))
            .unwrap_or(start % n);
        (i, &self.targets[i])
    }

    /// Marks a target that could not be connected to.
    pub fn eject(&self, index: usize) {
        if let Some(t) = self.targets.get(index) {
            let until = self.now_ms() + EJECT_FOR.as_millis() as u64;
            t.ejected_until_ms.store(until, Ordering::Relaxed);
        }
    }

    /// Records the verdict of the active health checks for a target.
    pub fn set_healthy(&self, index: usize, healthy: bool) {
        if let Some(t) = self.targets.get(index) {
            t.healthy.store(healthy, Ordering::Relaxed);
        }
    }

    /// Target `index`'s slots, when the route caps its requests in flight.
    pub fn slots(&self, index: usize) -> Option<&Slots> {
        self.targets.get(index)?.slots()
    }

    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// Clears the mark after a successful exchange.
    pub fn restore(&self, index: usize) {
        if let Some(t) = self.targets.get(index) {
            if t.ejected_until_ms.load(Ordering::Relaxed) != 0 {
                t.ejected_until_ms.store(0, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uris(list: &[&str]) -> Vec<Uri> {
        list.iter().map(|u| u.parse().unwrap()).collect()
    }

    #[test]
    fn round_robin_skips_ejected_targets() {
        let b = Balancer::new(&uris(&["http://a", "http://b", "http://c"]), None);
        let seq: Vec<usize> = (0..3).map(|_| b.pick().0).collect();
        assert_eq!(seq, [0, 1, 2]);
        b.eject(1);
        let seq: Vec<usize> = (0..4).map(|_| b.pick().0).collect();
        assert!(!seq.contains(&1), "{seq:?}");
        b.restore(1);
        let seq: Vec<usize> = (0..3).map(|_| b.pick().0).collect();
        assert!(seq.contains(&1));
    }

    #[test]
    fn a_skipped_targets_turns_are_shared_evenly() {
        let b = Balancer::new(&uris(&["http://a", "http://b", "http://c"]), None);
        b.eject(1);
        let mut share = [0; 3];
        for _ in 0..600 {
            share[b.pick().0] += 1;
        }
        assert_eq!(
            share,
            [300, 0, 300],
            "not the skipped one's neighbour twice"
        );
        let mut share = [0; 3];
        b.restore(1);
        for _ in 0..600 {
            share[b.pick_after(Some(0)).0] += 1;
        }
        assert_eq!(share, [0, 300, 300]);
        let b = Balancer::new(
            &uris(&["http://a", "http://b", "http://c", "http://d"]),
            None,
        );
        b.eject(1);
        b.eject(3);
        let mut share = [0; 4];
        for _ in 0..800 {
            share[b.pick().0] += 1;
        }
        assert_eq!(share, [400, 0, 400, 0]);
    }

    #[test]
    fn a_target_without_a_free_turn_is_skipped_while_another_has_one() {
        let b = Balancer::new(&uris(&["http://a", "http://b"]), Some(1));
        let taken = b.slots(0).unwrap().try_take().unwrap();
        let seq: Vec<usize> = (0..4).map(|_| b.pick().0).collect();
        assert_eq!(seq, [1, 1, 1, 1]);
        let _also_taken = b.slots(1).unwrap().try_take().unwrap();
        let seq: Vec<usize> = (0..2).map(|_| b.pick().0).collect();
        assert!(seq.contains(&0), "all full: picked in turn anyway, {seq:?}");
        drop(taken);
        assert_eq!(b.pick().0, 0);
    }

    #[test]
    fn a_full_healthy_target_is_picked_over_an_ejected_one() {
        let b = Balancer::new(&uris(&["http://a", "http://b"]), Some(1));
        let _taken = b.slots(0).unwrap().try_take().unwrap();
        b.eject(1);
        let seq: Vec<usize> = (0..4).map(|_| b.pick().0).collect();
        assert_eq!(seq, [0, 0, 0, 0], "wait at the full one, not the dead one");
    }

    #[test]
    fn a_retry_passes_over_the_target_that_just_failed_while_another_is_usable() {
        let b = Balancer::new(&uris(&["http://a", "http://b", "http://c"]), None);
        let seq: Vec<usize> = (0..6).map(|_| b.pick_after(Some(1)).0).collect();
        assert!(!seq.contains(&1), "{seq:?}");
        b.eject(0);
        b.eject(2);
        assert_eq!(b.pick_after(Some(1)).0, 1, "the only usable one");
    }

    #[test]
    fn all_ejected_still_picks() {
        let b = Balancer::new(&uris(&["http://a", "http://b"]), None);
        b.eject(0);
        b.eject(1);
        let _ = b.pick();
    }
}
