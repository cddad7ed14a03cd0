//! Token-bucket rate limits of one route, keyed by the route itself, the
//! client's IP or a request header (`routes.rate_limit.key`).
//!
//! Each key has a bucket of `burst` tokens refilled at
//! `requests_per_second`; a request takes one token or is refused. Memory is
//! bounded: at most `max_keys` buckets per route, spread over shards with a
//! mutex each (no lock shared by all requests of a busy per-client route);
//! a full shard first forgets buckets that have refilled (they are the same
//! as new ones), then the least recently used. This module decides; the
//! pipeline renders the answer. It never talks to the network (the shared
//! Redis limit is in `shared_limit`).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;
use ring::digest::{digest, SHA256};

use crate::config::{RateLimitConfig, RateLimitKey};

pub const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
pub const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
pub const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

const SHARDS: usize = 16;

/// The verdict for one request, and what the `RateLimit-*` headers say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The bucket size (`burst`).
    pub limit: u32,
    /// Whole tokens left after this request.
    pub remaining: u32,
    /// Seconds until the bucket is full again.
    pub reset_s: u64,
    /// Seconds until one token is back (for `Retry-After` when refused).
    pub retry_after_s: u64,
}

impl Decision {
    /// Sets `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset`.
    pub fn apply(&self, headers: &mut HeaderMap) {
        headers.insert(RATELIMIT_LIMIT, HeaderValue::from(self.limit));
        headers.insert(RATELIMIT_REMAINING, HeaderValue::from(self.remaining));
        headers.insert(RATELIMIT_RESET, HeaderValue::from(self.reset_s));
    }

    /// The decision for a bucket holding `tokens` (before taking one).
    pub fn from_tokens(config: &RateLimitConfig, tokens: f64) -> Decision {
        let rate = config.requests_per_second;
        let allowed = tokens >= 1.0;
        let left = if allowed { tokens - 1.0 } else { tokens };
        let burst = f64::from(config.burst);
        Decision {
            allowed,
            limit: config.burst,
            remaining: left.floor().max(0.0) as u32,
            reset_s: ceil_secs((burst - left).max(0.0) / rate),
            retry_after_s: ceil_secs((1.0 - left).max(0.0) / rate).max(1),
        }
    }
}

fn ceil_secs(secs: f64) -> u64 {
    if secs.is_finite() {
        secs.ceil() as u64
    } else {
        u64::MAX
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn refilled(&self, config: &RateLimitConfig, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        (self.tokens + elapsed * config.requests_per_second).min(f64::from(config.burst))
    }
}

/// The buckets of one route.
#[derive(Debug)]
pub struct RateLimiter {
    shards: Vec<Mutex<HashMap<String, Bucket>>>,
    hasher: RandomState,
}

impl Default for RateLimiter {
    fn default() -> Self {
        RateLimiter {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
        }
    }
}

impl RateLimiter {
    /// Takes a token for `key` if there is one.
    pub fn check(&self, config: &RateLimitConfig, key: &str) -> Decision {
        self.check_at(config, key, Instant::now())
    }

    fn check_at(&self, config: &RateLimitConfig, key: &str, now: Instant) -> Decision {
        let shard_index = (self.hasher.hash_one(key) % SHARDS as u64) as usize;
        let mut shard = self.shards[shard_index]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let full = f64::from(config.burst);
        let tokens = match shard.get(key) {
            Some(bucket) => bucket.refilled(config, now),
            None => {
                let per_shard = config.max_keys.div_ceil(SHARDS).max(1);
                if shard.len() >= per_shard {
                    evict(&mut shard, config, now);
                }
                full
            }
        };
        let decision = Decision::from_tokens(config, tokens);
        let left = if decision.allowed {
            tokens - 1.0
        } else {
            tokens
        };
        match shard.get_mut(key) {
            Some(bucket) => {
                bucket.tokens = left;
                // `now` was read before the lock: a later reading may have
                // been here first, and its refill must not be paid twice.
                bucket.last = bucket.last.max(now);
            }
            None => {
                shard.insert(
                    key.to_string(),
                    Bucket {
                        tokens: left,
                        last: now,
                    },
                );
            }
        }
        decision
    }

    /// How many keys are tracked (for tests of the memory bound).
    pub fn keys(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map(|m| m.len()).unwrap_or(0))
            .sum()
    }
}

/// Makes room in a full shard: refilled buckets go first (forgetting them
/// changes nothing), else the least recently used one.
fn evict(shard: &mut HashMap<String, Bucket>, config: &RateLimitConfig, now: Instant) {
    let full = f64::from(config.burst);
    let before = shard.len();
    shard.retain(|_, b| b.refilled(config, now) < full);
    if shard.len() < before {
        return;
    }
    let oldest = shard
        .iter()
        .min_by_key(|(_, b)| b.last)
        .map(|(k, _)| k.clone());
    if let Some(key) = oldest {
        shard.remove(&key);
    }
}

/// The bucket a request draws from under `key`.
///
/// - `client_ip`: an IPv4 address as it is; an IPv6 client by its /64, since
///   one host usually holds a whole /64 and could otherwise take a fresh
///   address (and a fresh bucket) for every request. An IPv4 client seen
///   through a dual-stack socket (`::ffff:a.b.c.d`) counts as its IPv4.
/// - `header:<name>`: a SHA-256 digest of the value (hex, 128 bits), never
///   the value: it is often a credential (an API key), and the key ends up
///   in Redis for a shared limit; a digest also keeps a long value from
///   making a long key. Requests without the header share one bucket.
pub fn bucket_key(key: &RateLimitKey, headers: &HeaderMap, client_ip: IpAddr) -> String {
    match key {
        RateLimitKey::Route => String::new(),
        RateLimitKey::ClientIp => match client_ip.to_canonical() {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
        RateLimitKey::Header(name) => match headers.get(name) {
            Some(value) => {
                let sum = digest(&SHA256, value.as_bytes());
                let mut hex = String::with_capacity(32);
                for b in &sum.as_ref()[..16] {
                    let _ = write!(hex, "{b:02x}");
                }
                hex
            }
            None => String::new(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_keys_group_ipv6_by_64_and_never_hold_a_header_value() {
        let none = HeaderMap::new();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let by_ip = |s: &str| bucket_key(&RateLimitKey::ClientIp, &none, ip(s));
        assert_eq!(by_ip("192.0.2.7"), "192.0.2.7");
        assert_eq!(by_ip("::ffff:192.0.2.7"), "192.0.2.7");
        assert_eq!(by_ip("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64");
        assert_eq!(by_ip("2001:db8:1:2:aaaa::1"), by_ip("2001:db8:1:2::9"));
        assert_ne!(by_ip("2001:db8:1:2::1"), by_ip("2001:db8:1:3::1"));

        let by_header = RateLimitKey::Header(HeaderName::from_static("x-api-key"));
        let mut headers = HeaderMap::new();
        headers.insert("x-api-key", HeaderValue::from_static("secret-token-1"));
        let one = bucket_key(&by_header, &headers, ip("192.0.2.7"));
        assert_eq!(one.len(), 32);
        assert!(!one.contains("secret"), "{one}");
        headers.insert("x-api-key", HeaderValue::from_static("secret-token-2"));
        assert_ne!(one, bucket_key(&by_header, &headers, ip("192.0.2.7")));
        assert_eq!(bucket_key(&by_header, &none, ip("192.0.2.7")), "");
    }

    fn config(rps: f64, burst: u32, max_keys: usize) -> RateLimitConfig {
        RateLimitConfig {
            requests_per_second: rps,
            burst,
            key: RateLimitKey::ClientIp,
            max_keys,
            shared: false,
        }
    }

    #[test]
    fn burst_then_refill() {
        let c = config(2.0, 3, 100);
        let l = RateLimiter::default();
        let t = Instant::now();
        let got: Vec<(bool, u32)> = (0..4)
            .map(|_| l.check_at(&c, "a", t))
            .map(|d| (d.allowed, d.remaining))
            .collect();
        assert_eq!(got, [(true, 2), (true, 1), (true, 0), (false, 0)]);
        let refused = l.check_at(&c, "a", t);
        assert_eq!(refused.retry_after_s, 1);
        assert_eq!(refused.reset_s, 2, "3 tokens at 2/s");
        assert!(l.check_at(&c, "a", t + Duration::from_millis(500)).allowed);
        assert!(l.check_at(&c, "b", t).allowed, "keys are independent");
    }

    #[test]
    fn memory_is_bounded() {
        let c = config(1.0, 1, 64);
        let l = RateLimiter::default();
        let t = Instant::now();
        for i in 0..10_000 {
            l.check_at(&c, &format!("client-{i}"), t);
        }
        assert!(l.keys() <= 64, "{} keys", l.keys());
    }
}
