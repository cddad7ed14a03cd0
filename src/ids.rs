//! Random bits for the ids made per request (request ids, trace and span
//! ids): a small fast generator per thread, seeded once from the
//! thread's cryptographic generator.
//!
//! These ids must be unique, not secret: nothing trusts them, so the
//! ChaCha generator behind `rand::random` (a few hundred instructions per
//! request in its buffer refills) is more than they need. Capture ids
//! ([`ordered_uuid`]) are the exception: they go to the backend as an
//! `Idempotency-Key`, so their random part comes from the cryptographic
//! generator (the fast one's state could be worked out from the request
//! ids a client is sent, and a victim's next key sent first).

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};

thread_local! {
    static RNG: RefCell<SmallRng> = RefCell::new(SmallRng::from_rng(&mut rand::rng()));
}

/// Runs `f` with this thread's generator.
pub fn with_rng<T>(f: impl FnOnce(&mut SmallRng) -> T) -> T {
    RNG.with(|rng| f(&mut rng.borrow_mut()))
}

/// Random bytes, filled a word at a time (`random::<[u8; N]>` draws a
/// word for each byte).
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0; N];
    with_rng(|rng| rng.fill_bytes(&mut bytes));
    bytes
}

/// The last ordered id's time and count: milliseconds since the epoch
/// × 4096, plus the count within that millisecond.
static LAST_ORDERED: AtomicU64 = AtomicU64::new(0);

/// A UUIDv7 later than every one made before it in this process, even
/// within one millisecond: its 12 `rand_a` bits count within the
/// millisecond (RFC 9562 §6.2, method 1), and a count past 4095 borrows
/// the next millisecond. Lock-free, its random part from this thread's
/// cryptographic generator (`Uuid::now_v7` takes a lock and asks the
/// kernel, a system call, for every id).
pub fn ordered_uuid() -> uuid::Uuid {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let now = (millis & 0xffff_ffff_ffff) << 12;
    let next = |last: u64| now.max(last.wrapping_add(1));
    let stamp = match LAST_ORDERED.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
        Some(next(last))
    }) {
        Ok(last) | Err(last) => next(last),
    };
    // Milliseconds (48 bits), the version's 4 bits, the count (12 bits),
    // then random bits (the variant's go over the first).
    let (millis, count) = (stamp >> 12, stamp & 0xfff);
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&(millis << 16 | count).to_be_bytes());
    rand::rng().fill_bytes(&mut bytes[8..]);
    uuid::Builder::from_bytes(bytes)
        .with_version(uuid::Version::SortRand)
        .with_variant(uuid::Variant::RFC4122)
        .into_uuid()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordered_uuids_are_version_7_and_in_order() {
        let ids: Vec<uuid::Uuid> = (0..10_000).map(|_| ordered_uuid()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "out of order");
        for id in &ids {
            assert_eq!(id.get_version_num(), 7);
            assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
        }
        let (secs, _) = ids[0].get_timestamp().unwrap().to_unix();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(now.abs_diff(secs) <= 1, "{secs} vs {now}");
    }
}
