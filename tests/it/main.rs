//! Integration tests: a real Backstop process, real backends, real sockets.

mod harness;

mod bad_input;
mod cache;
mod capture;
mod config_check;
mod lifecycle;
mod proxy;
mod tls;
