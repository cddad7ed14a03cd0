//! The spans of one request, built with the OpenTelemetry SDK.
//!
//! - The SERVER span starts once the request is past the `/health` check
//!   and ends when the answer's head is ready (the body streams after, as
//!   `backstop_request_duration_seconds` measures). Its parent is the
//!   client's `traceparent` when there is one; otherwise it is a root span,
//!   and the request's trace context takes the SDK's trace id (so the access
//!   log's `trace_id` finds the trace).
//! - Each upstream attempt is a CLIENT span, child of the SERVER span, and
//!   the attempt's `traceparent` names it as the parent, so the backend's
//!   spans nest under the attempt that reached it.
//!
//! Sampling is decided once, at the SERVER span (parent-based: the caller's
//! sampled flag, else `sample_ratio`). An unsampled request keeps no span
//! at all; a caller's `traceparent` goes upstream exactly as without the
//! exporter, one Backstop starts with its sampled flag clear.

use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderValue;
use http::{Request, Response};
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceId,
    TraceState, Tracer as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{SdkTracer, Span};

use super::export::{self, Exporter};
use crate::body::{ClientBody, ResponseBody};
use crate::classify::Failure;
use crate::config::{redact_url, OtlpConfig};
use crate::error::X_BACKSTOP_ERROR;
use crate::pipeline::RequestContext;
use crate::routing::Route;
use crate::stats::metrics::Metrics;
use crate::traceparent::{self, TraceContext, TraceIds};

/// The exporter, or nothing when `[otlp] enabled = false`.
pub struct Tracing {
    active: Option<Arc<Active>>,
}

struct Active {
    tracer: SdkTracer,
    exporter: Exporter,
}

impl Tracing {
    /// Starts the exporter when the configuration enables it. Must run on
    /// Backstop's runtime: the export task is spawned there.
    pub fn start(config: &OtlpConfig, metrics: &Arc<Metrics>) -> Result<Tracing, String> {
        if !config.enabled {
            return Ok(Tracing::disabled());
        }
        let (tracer, exporter) = export::start(config, metrics.clone())?;
        tracing::info!(
            endpoint = %redact_url(&config.endpoint),
            service_name = %config.service_name,
            sample_ratio = config.sample_ratio,
            "exporting traces over OTLP/HTTP"
        );
        Ok(Tracing {
            active: Some(Arc::new(Active { tracer, exporter })),
        })
    }

    pub fn disabled() -> Tracing {
        Tracing { active: None }
    }

    /// The SERVER span of a request (nothing when exporting is off or the
    /// trace is not sampled).
    pub fn server_span(
        &self,
        trace: &mut TraceContext,
        request: &Request<ClientBody>,
        client_ip: IpAddr,
    ) -> RequestSpan {
        let Some(active) = &self.active else {
            return RequestSpan(None);
        };
        let method = Known::of(request.method());
        let builder = active
            .tracer
            .span_builder(method.span_name())
            .with_kind(SpanKind::Server);
        let parent = if trace.is_incoming() {
            remote_parent(trace)
        } else {
            Context::new()
        };
        let mut span = active.tracer.build_with_context(builder, &parent);
        let context = span.span_context();
        if !trace.is_incoming() {
            // A root: the SDK chose the trace id, which the log and the
            // upstream requests must carry, and whether it is sampled,
            // which backends that sample by their parent must follow (else
            // they would export the traces `sample_ratio` left out).
            *trace = TraceContext::started(ids_of(context));
        }
        if !context.is_sampled() {
            return RequestSpan(None);
        }
        span.set_attributes([
            KeyValue::new("http.request.method", method.attribute()),
            KeyValue::new("url.path", request.uri().path().to_string()),
            KeyValue::new("client.address", client_ip.to_string()),
        ]);
        if method.0.is_none() {
            let original = request.method().as_str().to_string();
            span.set_attribute(KeyValue::new("http.request.method_original", original));
        }
        RequestSpan(Some(Recording {
            cx: Context::new().with_span(span),
            active: active.clone(),
            method,
        }))
    }

    /// Exports what is queued and stops the export task (at shutdown,
    /// after the last request finished).
    pub async fn shutdown(&self, timeout: Duration) {
        if let Some(active) = &self.active {
            active.exporter.shutdown(timeout).await;
        }
    }
}

/// A request's SERVER span, when it is recorded.
pub struct RequestSpan(Option<Recording>);

struct Recording {
    /// Holds the SDK span (a context is how the SDK takes a local parent).
    cx: Context,
    active: Arc<Active>,
    method: Known,
}

/// A request's method as spans name it: one of HTTP's own, or `None` for
/// any other (the semantic conventions' `_OTHER`, in a span named `HTTP`):
/// a client's made-up methods would otherwise each name spans of their
/// own in the trace store.
#[derive(Clone, Copy)]
struct Known(Option<&'static str>);

impl Known {
    fn of(method: &http::Method) -> Known {
        const HTTP_METHODS: [&str; 9] = [
            "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
        ];
        Known(HTTP_METHODS.into_iter().find(|own| *own == method.as_str()))
    }

    fn span_name(self) -> &'static str {
        self.0.unwrap_or("HTTP")
    }

    fn attribute(self) -> &'static str {
        self.0.unwrap_or("_OTHER")
    }
}

impl RequestSpan {
    /// No span (before the request is past `/health`, or not recorded).
    pub fn none() -> RequestSpan {
        RequestSpan(None)
    }

    /// Names the span after the route (`GET /api`), once it is known.
    pub fn set_route(&self, route: &Route) {
        let Some(rec) = &self.0 else { return };
        let span = rec.cx.span();
        let prefix = &route.config.path_prefix;
        span.update_name(format!("{} {prefix}", rec.method.span_name()));
        span.set_attribute(KeyValue::new("http.route", prefix.clone()));
        span.set_attribute(KeyValue::new("backstop.route", route.name().to_string()));
    }

    /// Starts the CLIENT span of one upstream attempt (1 for the first) to
    /// the target with base URL `target` and makes it the parent in the
    /// attempt's `traceparent`.
    pub fn attempt(
        &self,
        attempt: u32,
        target: &http::Uri,
        sent_traceparent: &mut HeaderValue,
    ) -> AttemptSpan {
        let Some(rec) = &self.0 else {
            return AttemptSpan(None);
        };
        let port = target.port_u16().unwrap_or(match target.scheme_str() {
            Some("https") => 443,
            _ => 80,
        });
        let mut attributes = vec![
            KeyValue::new("http.request.method", rec.method.attribute()),
            KeyValue::new("server.address", target.host().unwrap_or("").to_string()),
            KeyValue::new("server.port", i64::from(port)),
            KeyValue::new("backstop.attempt", i64::from(attempt)),
        ];
        if attempt > 1 {
            // Semantic conventions: set on retries only.
            attributes.push(KeyValue::new(
                "http.request.resend_count",
                i64::from(attempt - 1),
            ));
        }
        let builder = rec
            .active
            .tracer
            .span_builder(rec.method.span_name())
            .with_kind(SpanKind::Client)
            .with_attributes(attributes);
        let span = rec.active.tracer.build_with_context(builder, &rec.cx);
        let context = span.span_context();
        if context.is_sampled() {
            *sent_traceparent = traceparent::encode(ids_of(context));
        }
        AttemptSpan(Some(span))
    }

    /// Ends the span with what the client was answered.
    pub fn finish(&self, ctx: &RequestContext<'_>, response: &Response<ResponseBody>) {
        let Some(rec) = &self.0 else { return };
        let span = rec.cx.span();
        let status = response.status().as_u16();
        let error = response
            .headers()
            .get(X_BACKSTOP_ERROR)
            .and_then(|v| v.to_str().ok());
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        self.describe(ctx);
        // A proxy-made answer names its reason; otherwise a 5xx is an error
        // of the server span (semantic conventions), a 4xx is not.
        match error {
            Some(code) => {
                span.set_attribute(KeyValue::new("error.type", code.to_string()));
                span.set_status(Status::error(code.to_string()));
            }
            None if status >= 500 => {
                span.set_attribute(KeyValue::new("error.type", status.to_string()));
                span.set_status(Status::error(""));
            }
            None => {}
        }
        span.end();
    }

    /// Ends the span of a request whose client left before its answer (a
    /// reset, a closed connection, a drain's end), as the access log and
    /// the statistics count it: 499, `client_closed`, an error. (Dropped
    /// unended, the SDK would export it with no status at all.)
    pub fn cancelled(&self, ctx: &RequestContext<'_>) {
        let Some(rec) = &self.0 else { return };
        let span = rec.cx.span();
        span.set_attribute(KeyValue::new("http.response.status_code", 499));
        self.describe(ctx);
        span.set_attribute(KeyValue::new("error.type", "client_closed"));
        span.set_status(Status::error("client_closed"));
        span.end();
    }

    /// What the request's context says of it, for [`RequestSpan::finish`]
    /// and [`RequestSpan::cancelled`].
    fn describe(&self, ctx: &RequestContext<'_>) {
        let Some(rec) = &self.0 else { return };
        let span = rec.cx.span();
        span.set_attribute(KeyValue::new(
            "backstop.request_id",
            ctx.request_id().to_owned(),
        ));
        span.set_attribute(KeyValue::new("backstop.attempts", i64::from(ctx.attempts)));
        if let Some(failure) = ctx.failure {
            span.set_attribute(KeyValue::new("backstop.failure", failure.reason()));
        }
        if let Some(cache) = ctx.cache {
            span.set_attribute(KeyValue::new("backstop.cache", cache));
        }
        span.set_attribute(KeyValue::new("backstop.captured", ctx.capture_id.is_some()));
        if let Some(id) = &ctx.capture_id {
            span.set_attribute(KeyValue::new("backstop.capture_id", id.clone()));
        }
    }
}

/// A span's ids as the parent of a `traceparent`.
fn ids_of(context: &SpanContext) -> TraceIds {
    TraceIds {
        trace_id: u128::from_be_bytes(context.trace_id().to_bytes()),
        parent_id: u64::from_be_bytes(context.span_id().to_bytes()),
        flags: context.trace_flags().to_u8(),
    }
}

/// The client's context as the SERVER span's remote parent.
fn remote_parent(trace: &TraceContext) -> Context {
    let ids = trace.ids();
    let state = trace
        .tracestate()
        .and_then(|v: &HeaderValue| v.to_str().ok())
        .and_then(|s| TraceState::from_str(s).ok())
        .unwrap_or_default();
    Context::new().with_remote_span_context(SpanContext::new(
        TraceId::from_bytes(ids.trace_id.to_be_bytes()),
        SpanId::from_bytes(ids.parent_id.to_be_bytes()),
        TraceFlags::new(ids.flags),
        true,
        state,
    ))
}

/// One upstream attempt's CLIENT span.
pub struct AttemptSpan(Option<Span>);

impl AttemptSpan {
    /// Ends the span with the attempt's outcome: the backend's status, or
    /// why there was none.
    pub fn end(mut self, result: &Result<Response<crate::body::UpstreamBody>, Failure>) {
        let Some(mut span) = self.0.take() else {
            return;
        };
        match result {
            Ok(response) => {
                let status = response.status().as_u16();
                span.set_attribute(KeyValue::new(
                    "http.response.status_code",
                    i64::from(status),
                ));
                if status >= 400 {
                    // Client spans: 4xx and 5xx are errors.
                    span.set_attribute(KeyValue::new("error.type", status.to_string()));
                    span.set_status(Status::error(""));
                }
            }
            Err(failure) => {
                let reason = failure.reason();
                span.set_attribute(KeyValue::new("error.type", reason.clone()));
                span.set_status(Status::error(reason));
            }
        }
        span.end();
    }
}

/// An attempt dropped before its end (its request was: the client left):
/// ended as cancelled, not exported with no status at all.
impl Drop for AttemptSpan {
    fn drop(&mut self) {
        if let Some(mut span) = self.0.take() {
            span.set_attribute(KeyValue::new("error.type", "cancelled"));
            span.set_status(Status::error("cancelled"));
            span.end();
        }
    }
}
