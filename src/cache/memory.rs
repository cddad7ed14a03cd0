//! The in-process store of one route: a moka cache bounded by bytes.
//!
//! moka weighs every entry (headers + body + a fixed overhead) and evicts
//! by TinyLFU once the route's `max_bytes` is reached, without a global lock
//! on reads. Each entry lives, from storing, for as long as it was fresh
//! (`ttl`, or what was left of the backend's `max-age` if shorter) plus
//! `stale_if_error`, as they were when it was stored; whether it is still
//! fresh is decided by the reader from the route's current `ttl`. A write
//! to its URI removes it sooner.
//!
//! This store never decides what is cacheable; it holds what it is given.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::future::Cache;
use moka::Expiry;

use super::cache_key::CacheKey;
use super::entry::Entry;

#[derive(Clone)]
struct Stored {
    entry: Arc<Entry>,
    keep_for: Duration,
}

/// Each entry expires `keep_for` after it was written (a rewrite restarts it).
struct KeepFor;

impl Expiry<CacheKey, Stored> for KeepFor {
    fn expire_after_create(&self, _: &CacheKey, value: &Stored, _: Instant) -> Option<Duration> {
        Some(value.keep_for)
    }

    fn expire_after_update(
        &self,
        _: &CacheKey,
        value: &Stored,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.keep_for)
    }
}

pub struct MemoryStore {
    cache: Cache<CacheKey, Stored>,
    pub max_bytes: u64,
}

impl MemoryStore {
    pub fn new(max_bytes: u64) -> MemoryStore {
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_: &CacheKey, v: &Stored| u32::try_from(v.entry.weight()).unwrap_or(u32::MAX))
            .expire_after(KeepFor)
            .build();
        MemoryStore { cache, max_bytes }
    }

    pub async fn get(&self, key: &CacheKey) -> Option<Arc<Entry>> {
        self.cache.get(key).await.map(|s| s.entry)
    }

    pub async fn put(&self, key: CacheKey, entry: Arc<Entry>, keep_for: Duration) {
        self.cache.insert(key, Stored { entry, keep_for }).await;
    }

    pub async fn remove(&self, keys: &[CacheKey]) {
        for key in keys {
            self.cache.invalidate(key).await;
        }
    }

    /// Drops every entry; returns how many there were.
    pub fn purge(&self) -> u64 {
        let count = self.cache.entry_count();
        self.cache.invalidate_all();
        count
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::cache_key::{KeyHead, KeyInput};
    use bytes::Bytes;
    use http::{HeaderMap, Method, StatusCode};

    fn key(n: usize) -> CacheKey {
        KeyHead::new(&KeyInput {
            route: "r",
            scheme: "http",
            host: None,
            method: &Method::GET,
            path: &format!("/{n}"),
            query: None,
            headers: &HeaderMap::new(),
            strategy: crate::config::HeaderStrategy::None,
            listed: &[],
        })
        .finish(&HeaderMap::new(), b"")
    }

    #[tokio::test]
    async fn stays_within_its_byte_bound() {
        let store = MemoryStore::new(100_000);
        let body = Bytes::from(vec![b'x'; 10_000]);
        for n in 0..50 {
            let entry = Arc::new(Entry::new(StatusCode::OK, HeaderMap::new(), body.clone()));
            store.put(key(n), entry, Duration::from_secs(60)).await;
        }
        store.cache.run_pending_tasks().await;
        assert!(store.cache.weighted_size() <= 100_000);
        let mut kept = 0;
        for n in 0..50 {
            kept += usize::from(store.get(&key(n)).await.is_some());
        }
        assert!((1..=10).contains(&kept), "kept {kept} entries of 10 kB");
    }
}
