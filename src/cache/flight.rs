//! Request coalescing: concurrent misses for one key make one upstream call.
//!
//! The first miss becomes the *leader* and goes upstream; later misses for
//! the same key become *waiters* and receive what the leader got. A leader
//! that finishes without an answer to share (not storable, too large, or its
//! task dropped because the client went away) releases its waiters, who then
//! go upstream themselves — a waiter never hangs on a leader that is gone.
//! Nor on one that is slow: the cache phase waits at most the route's
//! `lock_timeout`, then goes upstream on its own.
//! A write accepted on the URI forgets its flights: later misses lead
//! fetches of their own, and the old leader (whose answer may predate the
//! write) shares nothing with the waiters it has: it tells them to join
//! again ([`Shared::Retry`]), so that they make one new fetch between
//! them (or take the one a later miss leads), not one each.
//!
//! The map is locked only on misses, briefly, and never across an await.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::cache_key::CacheKey;
use super::entry::Entry;

/// What a leader hands to its waiters.
#[derive(Debug, Clone)]
pub enum Shared {
    Pending,
    /// A fresh answer, stored in the cache.
    Fresh(Arc<Entry>),
    /// The upstream failed and a stale entry was served.
    Stale(Arc<Entry>),
    /// Nothing to share: each waiter goes upstream on its own.
    Nothing,
    /// The leader's answer may predate a write: join the key's flight
    /// again (the leader has left it), as leader or waiter of a new fetch.
    Retry,
}

type Map = HashMap<CacheKey, watch::Receiver<Shared>>;

#[derive(Default, Clone)]
pub struct Flights(Arc<Mutex<Map>>);

pub enum Joined {
    Leader(Leader),
    Waiter(watch::Receiver<Shared>),
}

impl Flights {
    pub fn join(&self, key: CacheKey) -> Joined {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(rx) = map.get(&key) {
            return Joined::Waiter(rx.clone());
        }
        let (tx, rx) = watch::channel(Shared::Pending);
        map.insert(key, rx);
        Joined::Leader(Leader {
            flights: self.clone(),
            key,
            tx,
        })
    }

    /// Forgets the flights of `keys` (a write made their answers suspect):
    /// later misses lead fetches of their own. A forgotten leader still
    /// releases the waiters it has.
    pub fn forget(&self, keys: &[CacheKey]) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for key in keys {
            map.remove(key);
        }
    }
}

/// The one request in flight upstream for a key. Dropping it without
/// [`Leader::finish`] releases the waiters with [`Shared::Nothing`].
pub struct Leader {
    flights: Flights,
    key: CacheKey,
    tx: watch::Sender<Shared>,
}

impl Leader {
    /// Leaves the flight, then hands `shared` to the waiters: a waiter
    /// that joins again on [`Shared::Retry`] finds a new flight (or none),
    /// never this one. Later requests find the stored entry.
    pub fn finish(self, shared: Shared) {
        self.leave();
        self.tx.send_replace(shared);
    }

    fn leave(&self) {
        let mut map = self.flights.0.lock().unwrap_or_else(|e| e.into_inner());
        if map
            .get(&self.key)
            .is_some_and(|rx| rx.same_channel(&self.tx.subscribe()))
        {
            map.remove(&self.key);
        }
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        self.leave();
        if matches!(*self.tx.borrow(), Shared::Pending) {
            self.tx.send_replace(Shared::Nothing);
        }
    }
}

/// Waits for the leader's result.
pub async fn wait(mut rx: watch::Receiver<Shared>) -> Shared {
    loop {
        let current = rx.borrow_and_update().clone();
        if !matches!(current, Shared::Pending) {
            return current;
        }
        if rx.changed().await.is_err() {
            // The sender is gone: whatever it left is final.
            return match rx.borrow().clone() {
                Shared::Pending => Shared::Nothing,
                other => other,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::cache_key::{KeyHead, KeyInput};
    use bytes::Bytes;
    use http::{HeaderMap, Method, StatusCode};

    fn key() -> CacheKey {
        KeyHead::new(&KeyInput {
            route: "r",
            scheme: "http",
            host: None,
            method: &Method::GET,
            path: "/",
            query: None,
            headers: &HeaderMap::new(),
            strategy: crate::config::HeaderStrategy::None,
            listed: &[],
        })
        .finish(&HeaderMap::new(), b"")
    }

    #[tokio::test]
    async fn waiters_get_the_leaders_answer() {
        let flights = Flights::default();
        let Joined::Leader(leader) = flights.join(key()) else {
            panic!("first is the leader")
        };
        let waiters: Vec<_> = (0..10)
            .map(|_| match flights.join(key()) {
                Joined::Waiter(rx) => tokio::spawn(wait(rx)),
                Joined::Leader(_) => panic!("only one leader"),
            })
            .collect();
        let entry = Arc::new(Entry::new(StatusCode::OK, HeaderMap::new(), Bytes::new()));
        leader.finish(Shared::Fresh(entry));
        for w in waiters {
            assert!(matches!(w.await.unwrap(), Shared::Fresh(_)));
        }
        assert!(
            matches!(flights.join(key()), Joined::Leader(_)),
            "flight removed"
        );
    }

    #[tokio::test]
    async fn a_dropped_leader_releases_its_waiters() {
        let flights = Flights::default();
        let leader = flights.join(key());
        let Joined::Waiter(rx) = flights.join(key()) else {
            panic!("second waits")
        };
        let waiter = tokio::spawn(wait(rx));
        // The leader's task is cancelled (client went away).
        drop(leader);
        let shared = tokio::time::timeout(std::time::Duration::from_secs(1), waiter)
            .await
            .expect("waiter released")
            .unwrap();
        assert!(matches!(shared, Shared::Nothing));
        assert!(matches!(flights.join(key()), Joined::Leader(_)));
    }
}
