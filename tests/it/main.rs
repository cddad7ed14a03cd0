//! Integration tests: a real Backstop process, real backends, real sockets.

mod browser;
mod harness;

mod bad_input;
mod cache;
mod capture;
mod config_check;
mod dashboards;
mod forward_proxy;
mod http1;
mod kafka;
mod lifecycle;
#[cfg(feature = "otlp")]
mod otlp;
mod proxy;
mod resilience;
mod stats;
mod stats_cluster;
mod tls;
mod upstream_answers;
