//! Policies that protect backends and their callers.

pub mod backoff;
