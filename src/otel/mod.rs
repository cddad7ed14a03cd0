//! OpenTelemetry traces: one SERVER span per proxied request and one CLIENT
//! span per upstream attempt, exported to a collector over OTLP/HTTP
//! (protobuf). Built only with the `otlp` cargo feature.
//!
//! The request path calls this module a few times per request
//! (`Tracing::server_span`, `RequestSpan::set_route`, `RequestSpan::attempt`,
//! `AttemptSpan::end`, `RequestSpan::finish`). Without the feature those are
//! the empty inline functions of `noop.rs` on zero-sized types; with it but
//! `[otlp] enabled = false`, or for a request that is not sampled, each is
//! one branch on an empty `Option`.
//!
//! - `spans.rs`: the spans, their attributes, and the `traceparent` sent
//!   upstream (the attempt span's id, so a backend's spans nest under it).
//! - `export.rs`: the SDK tracer provider, the bounded queue (2048 spans,
//!   dropped and counted when full) and the export task on Backstop's
//!   runtime, the counters, the flush on shutdown.
//! - `client.rs`: the `opentelemetry-http` client over hyper-util + rustls.
//!
//! What this module must never do: block or fail a request. A span is
//! handed over with a `try_send`; a slow or dead collector costs spans
//! (counted), never latency.

#[cfg(feature = "otlp")]
mod client;
#[cfg(feature = "otlp")]
mod export;
#[cfg(not(feature = "otlp"))]
mod noop;
#[cfg(feature = "otlp")]
mod spans;

#[cfg(not(feature = "otlp"))]
pub use noop::{AttemptSpan, RequestSpan, Tracing};
#[cfg(feature = "otlp")]
pub use spans::{AttemptSpan, RequestSpan, Tracing};
