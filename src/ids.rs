//! Random bits for the ids made per request (request ids, trace and span
//! ids): a small fast generator per thread, seeded once from the
//! thread's cryptographic generator.
//!
//! These ids must be unique, not secret: nothing trusts them, so the
//! ChaCha generator behind `rand::random` (a few hundred instructions per
//! request in its buffer refills) is more than they need.

use std::cell::RefCell;

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
