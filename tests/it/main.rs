//! Integration tests: a real Backstop process, real backends, real sockets.

mod browser;
mod harness;

mod bad_input;
mod capture;
mod config_check;
mod dashboards;
mod lifecycle;
mod proxy;
mod stats;
mod tls;
