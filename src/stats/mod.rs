//! What Backstop counts: Prometheus metrics (and, later, per-route and
//! per-path statistics).

pub mod metrics;
