//! What Backstop counts: per-route and per-path statistics (`recorder`,
//! `window`, `paths`), their cluster view through Redis (`cluster`) and the
//! Prometheus metrics (`metrics`).
//!
//! Statistics are recorded once per request, at its end, from the request
//! context; the request path never waits for them.

pub mod cluster;
pub mod metrics;
pub mod paths;
pub mod recorder;
pub mod window;

pub use recorder::{Event, Period, Stats};
