//! A stored answer: status, headers, body, when it was stored and how the
//! backend lets it be reused, with the compact binary form it has in Redis.
//!
//! The stored time is wall-clock (Unix milliseconds), not a monotonic
//! instant, because an entry written by one instance is read by another.
//! Decoding never trusts its input: a value that is not a well-formed entry
//! (another program's key, a truncated write) is a miss, never a panic.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use super::vary::Varied;

/// The first byte of an encoded entry; a new layout gets a new number and
/// old values become misses. (1: without the backend's freshness rules;
/// 2: without the `Vary` values; 3: with the backend's `Age` folded into
/// the stored time, which spent it of the route's `ttl` too; 4: the body
/// without its length, so a value cut short was served as a whole answer.)
const FORMAT: u8 = 5;

/// `max_age` in the encoded form when the backend set none.
const NO_MAX_AGE: u64 = u64::MAX;

/// Bytes counted for an entry beyond its headers and body: the entry, its
/// key and moka's bookkeeping. With [`HEADER_OVERHEAD_BYTES`], measured:
/// 200,000 entries in one store took 668 bytes each without headers, 2.5 KB
/// with 8 headers and 100 body bytes, 4.2 KB with 16 (RSS growth; the
/// counts were 160, 697 and 1,198 bytes, so a route's store could hold
/// three times its `max_bytes` of small answers).
const OVERHEAD_BYTES: usize = 640;

/// Bytes counted for each stored header beyond its name and value: its
/// `HeaderMap` bucket and index slots, and the value's own allocation.
const HEADER_OVERHEAD_BYTES: usize = 176;

#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Unix time in milliseconds when it was stored here: the route's `ttl`
    /// counts from then.
    pub stored_at_ms: u64,
    /// How old the answer already was when stored (the backend's `Age`):
    /// spent of `max_age`, not of the route's `ttl`, and part of the `Age`
    /// it is served with (RFC 9111 §4.2.3).
    pub age_at_store: Duration,
    /// The backend's bound on freshness (`s-maxage`, else `max-age`),
    /// counted from the answer's own age; the route's `ttl` bounds it too.
    /// `None`: the route's `ttl` alone.
    pub max_age: Option<Duration>,
    /// `must-revalidate`/`proxy-revalidate`: never served stale.
    pub must_revalidate: bool,
    /// What the stored answer's request sent of the headers it varies on.
    pub vary: Varied,
}

impl Entry {
    /// An entry that owns exactly its bytes: an answer's headers and body
    /// may be slices of a larger read buffer (the upstream exchange reads
    /// into 16–64 KiB buffers), which a long-lived entry would otherwise
    /// keep alive whole, unseen by `weight`.
    pub fn new(status: StatusCode, headers: HeaderMap, body: Bytes) -> Entry {
        let mut owned = HeaderMap::with_capacity(headers.len());
        for (name, value) in &headers {
            let mut copy =
                HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
            copy.set_sensitive(value.is_sensitive());
            owned.append(name.clone(), copy);
        }
        Entry {
            status,
            headers: owned,
            body: Bytes::copy_from_slice(&body),
            stored_at_ms: now_ms(),
            age_at_store: Duration::ZERO,
            max_age: None,
            must_revalidate: false,
            vary: Varied::default(),
        }
    }

    /// How long after it was stored the entry is fresh under the route's
    /// `ttl` (compared with [`Entry::held`]).
    pub fn fresh_for(&self, ttl: Duration) -> Duration {
        fresh_for(ttl, self.max_age, self.age_at_store)
    }

    /// How long past freshness it may be served when the backend fails.
    pub fn stale_for(&self, stale_if_error: Duration) -> Duration {
        if self.must_revalidate {
            Duration::ZERO
        } else {
            stale_if_error
        }
    }

    /// How long it has been held here (zero if clocks disagree).
    pub fn held(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.stored_at_ms))
    }

    /// How old the answer is now: the backend's age plus the time held here
    /// (RFC 9111 §4.2.3), for the `Age` it is served with.
    pub fn age(&self) -> Duration {
        self.age_at_store.saturating_add(self.held())
    }

    /// What the entry costs in memory, approximately.
    pub fn weight(&self) -> usize {
        OVERHEAD_BYTES + self.bytes(HEADER_OVERHEAD_BYTES)
    }

    /// Its headers' names and values, each header counted `per_header`
    /// bytes more, its `Vary` names and its body.
    fn bytes(&self, per_header: usize) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + per_header)
            .sum();
        headers + self.vary.weight() + self.body.len()
    }

    /// `[5][status u16][stored_at u64][age_at_store ms u64][max_age ms u64, MAX for none]
    /// [must_revalidate u8]
    /// [v u16]([name len u16][name])*v[digest 32 if v > 0]
    /// [n u16]([name len u16][name][value len u32][value])*n[body len u64][body]`, all big-endian;
    /// the `v` names are those `Vary` names, the digest that of their values.
    /// Small and copy-free to decode, unlike JSON + base64.
    pub fn encode(&self) -> Vec<u8> {
        // The fixed fields, then each header's two lengths.
        let mut out = Vec::with_capacity(64 + self.bytes(6));
        out.put_u8(FORMAT);
        out.put_u16(self.status.as_u16());
        out.put_u64(self.stored_at_ms);
        out.put_u64(u64::try_from(self.age_at_store.as_millis()).unwrap_or(u64::MAX));
        out.put_u64(self.max_age.map_or(NO_MAX_AGE, |d| {
            u64::try_from(d.as_millis()).unwrap_or(NO_MAX_AGE - 1)
        }));
        out.put_u8(u8::from(self.must_revalidate));
        let (names, digest) = self.vary.parts();
        // At most `vary::MAX_NAMES`: an answer with more is not stored.
        out.put_u16(names.len() as u16);
        for name in names {
            out.put_u16(name.as_str().len() as u16);
            out.put_slice(name.as_str().as_bytes());
        }
        if !names.is_empty() {
            out.put_slice(digest);
        }
        out.put_u16(u16::try_from(self.headers.len()).unwrap_or(u16::MAX));
        for (name, value) in self.headers.iter().take(usize::from(u16::MAX)) {
            out.put_u16(name.as_str().len() as u16);
            out.put_slice(name.as_str().as_bytes());
            out.put_u32(value.len() as u32);
            out.put_slice(value.as_bytes());
        }
        out.put_u64(self.body.len() as u64);
        out.put_slice(&self.body);
        out
    }

    pub fn decode(bytes: Bytes) -> Option<Entry> {
        let mut buf = bytes;
        if take_u8(&mut buf)? != FORMAT {
            return None;
        }
        let status = StatusCode::from_u16(take_u16(&mut buf)?).ok()?;
        let stored_at_ms = take_u64(&mut buf)?;
        let age_at_store = Duration::from_millis(take_u64(&mut buf)?);
        let max_age = match take_u64(&mut buf)? {
            NO_MAX_AGE => None,
            ms => Some(Duration::from_millis(ms)),
        };
        let must_revalidate = match take_u8(&mut buf)? {
            0 => false,
            1 => true,
            _ => return None,
        };
        let varied = take_u16(&mut buf)?;
        let mut names = Vec::with_capacity(usize::from(varied).min(64));
        for _ in 0..varied {
            let name_len = usize::from(take_u16(&mut buf)?);
            names.push(HeaderName::from_bytes(take(&mut buf, name_len)?.as_ref()).ok()?);
        }
        let mut digest = [0u8; 32];
        if !names.is_empty() {
            digest.copy_from_slice(&take(&mut buf, 32)?);
        }
        let count = take_u16(&mut buf)?;
        // A count read from Redis sizes nothing before its headers are
        // there, and a map that cannot grow ends the decoding, not the task.
        let mut headers = HeaderMap::try_with_capacity(usize::from(count).min(64)).ok()?;
        for _ in 0..count {
            let name_len = usize::from(take_u16(&mut buf)?);
            let name = HeaderName::from_bytes(take(&mut buf, name_len)?.as_ref()).ok()?;
            let value_len = take_u32(&mut buf)? as usize;
            let value = HeaderValue::from_maybe_shared(take(&mut buf, value_len)?).ok()?;
            headers.try_append(name, value).ok()?;
        }
        let body_len = usize::try_from(take_u64(&mut buf)?).ok()?;
        let body = take(&mut buf, body_len)?;
        if buf.has_remaining() {
            return None;
        }
        Some(Entry {
            status,
            headers,
            body,
            stored_at_ms,
            age_at_store,
            max_age,
            must_revalidate,
            vary: Varied::from_parts(names, digest),
        })
    }
}

/// How long after storing an answer `age` old is fresh: the route's `ttl`
/// is how long Backstop keeps it, counted from storing; the backend's
/// `max_age` counts from the answer's own age, so its `Age` is spent of
/// that alone (RFC 9111 §4.2.1, §4.2.3).
pub fn fresh_for(ttl: Duration, max_age: Option<Duration>, age: Duration) -> Duration {
    max_age.map_or(ttl, |max_age| max_age.saturating_sub(age).min(ttl))
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn take(buf: &mut Bytes, n: usize) -> Option<Bytes> {
    (buf.remaining() >= n).then(|| buf.split_to(n))
}

fn take_u8(buf: &mut Bytes) -> Option<u8> {
    (buf.remaining() >= 1).then(|| buf.get_u8())
}

fn take_u64(buf: &mut Bytes) -> Option<u64> {
    (buf.remaining() >= 8).then(|| buf.get_u64())
}

fn take_u16(buf: &mut Bytes) -> Option<u16> {
    (buf.remaining() >= 2).then(|| buf.get_u16())
}

fn take_u32(buf: &mut Bytes) -> Option<u32> {
    (buf.remaining() >= 4).then(|| buf.get_u32())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Entry {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("x-multi", HeaderValue::from_static("one"));
        headers.append("x-multi", HeaderValue::from_static("two"));
        Entry::new(StatusCode::OK, headers, Bytes::from_static(b"{\"a\":1}"))
    }

    #[test]
    fn entries_survive_encoding_byte_for_byte() {
        let entry = sample();
        assert_eq!(Entry::decode(Bytes::from(entry.encode())), Some(entry));
        let empty = Entry::new(StatusCode::NO_CONTENT, HeaderMap::new(), Bytes::new());
        assert_eq!(Entry::decode(Bytes::from(empty.encode())), Some(empty));
        let names = [
            HeaderName::from_static("accept-encoding"),
            HeaderName::from_static("cookie"),
            HeaderName::from_static("accept"),
        ];
        let mut request = HeaderMap::new();
        request.insert("accept-encoding", HeaderValue::from_static("gzip"));
        request.insert("accept", HeaderValue::from_static(""));
        let ruled = Entry {
            age_at_store: Duration::from_millis(120_250),
            max_age: Some(Duration::from_millis(30_500)),
            must_revalidate: true,
            vary: Varied::record(&names, &request),
            ..sample()
        };
        assert_eq!(Entry::decode(Bytes::from(ruled.encode())), Some(ruled));
    }

    #[test]
    fn the_backends_bound_shortens_the_routes() {
        let ttl = Duration::from_secs(60);
        let mut entry = sample();
        assert_eq!(entry.fresh_for(ttl), ttl);
        entry.max_age = Some(Duration::from_secs(5));
        assert_eq!(entry.fresh_for(ttl), Duration::from_secs(5));
        entry.max_age = Some(Duration::from_secs(600));
        assert_eq!(entry.fresh_for(ttl), ttl, "the route's ttl bounds it");
        assert_eq!(entry.stale_for(ttl), ttl);
        entry.must_revalidate = true;
        assert_eq!(entry.stale_for(ttl), Duration::ZERO);
    }

    #[test]
    fn the_backends_age_is_spent_of_its_max_age_not_of_the_ttl() {
        let ttl = Duration::from_secs(60);
        let secs = Duration::from_secs;
        // (max_age, age at store, fresh for after storing)
        let cases = [
            (None, secs(0), secs(60)),
            (None, secs(600), secs(60)),
            (Some(secs(3600)), secs(120), secs(60)),
            (Some(secs(100)), secs(70), secs(30)),
            (Some(secs(100)), secs(100), secs(0)),
            (Some(secs(100)), secs(500), secs(0)),
        ];
        for (max_age, age, want) in cases {
            let entry = Entry {
                max_age,
                age_at_store: age,
                ..sample()
            };
            assert_eq!(entry.fresh_for(ttl), want, "{max_age:?} {age:?}");
        }
    }

    #[test]
    fn the_served_age_is_the_backends_plus_the_time_held() {
        let entry = Entry {
            age_at_store: Duration::from_secs(30),
            ..sample()
        };
        assert!(entry.held() < Duration::from_secs(1));
        // Shared through Redis, it is as old to every reader.
        let read = Entry::decode(Bytes::from(entry.encode())).unwrap();
        let age = read.age();
        assert!(
            (Duration::from_secs(30)..Duration::from_secs(31)).contains(&age),
            "{age:?}"
        );
    }

    #[test]
    fn malformed_values_are_misses() {
        let good = sample().encode();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", vec![]),
            ("other format", [&[9u8][..], &good[1..]].concat()),
            ("format 1", [&[1u8][..], &good[1..]].concat()),
            ("format 2", [&[2u8][..], &good[1..]].concat()),
            // Stored before the backend's Age was kept apart.
            ("format 3", [&[3u8][..], &good[1..]].concat()),
            ("bad flag", [&good[..27], &[7u8][..], &good[28..]].concat()),
            // Stored without the body's length.
            ("format 4", [&[4u8][..], &good[1..]].concat()),
            ("truncated head", good[..18].to_vec()),
            ("truncated header", good[..28].to_vec()),
            ("body cut short", good[..good.len() - 1].to_vec()),
            ("bytes after the body", [&good[..], b"x"].concat()),
            // More headers than a map can hold: a miss, not a panic.
            ("header count", [&good[..30], &[0xff, 0xff][..]].concat()),
            ("not ours", b"hello world, this is a string".to_vec()),
        ];
        for (why, bytes) in cases {
            assert_eq!(Entry::decode(Bytes::from(bytes)), None, "{why}");
        }
    }
}
