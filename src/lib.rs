//! Backstop: a resilient HTTP reverse proxy and API gateway that never loses
//! a request. See ARCHITECTURE.md for the map of this crate.

pub mod admin;
pub mod body;
pub mod buffer_budget;
pub mod cache;
pub mod canonical_path;
pub mod capture;
pub mod classify;
pub mod cli;
pub mod config;
pub mod error;
pub mod headers;
pub mod ids;
pub mod logging;
pub mod otel;
pub mod outgoing;
pub mod pipeline;
pub mod replay;
pub mod resilience;
pub mod routing;
pub mod runtime;
pub mod server;
pub mod stats;
pub mod traceparent;
pub mod trusted_proxies;
pub mod upload;
pub mod upstream;
