//! The build without the `otlp` feature: the same interface as `spans.rs`,
//! on zero-sized types whose methods do nothing and compile away.
//! (`[otlp] enabled = true` is refused by the config checker in this build.)

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Request, Response};

use crate::body::{ClientBody, ResponseBody};
use crate::classify::Failure;
use crate::config::OtlpConfig;
use crate::pipeline::RequestContext;
use crate::routing::Route;
use crate::stats::metrics::Metrics;
use crate::traceparent::TraceContext;

/// No exporter in this build.
pub struct Tracing;

impl Tracing {
    pub fn start(_config: &OtlpConfig, _metrics: &Arc<Metrics>) -> Result<Tracing, String> {
        Ok(Tracing)
    }

    pub fn disabled() -> Tracing {
        Tracing
    }

    #[inline(always)]
    pub fn server_span(
        &self,
        _trace: &mut TraceContext,
        _request: &Request<ClientBody>,
        _client_ip: IpAddr,
    ) -> RequestSpan {
        RequestSpan
    }

    pub async fn shutdown(&self, _timeout: Duration) {}
}

pub struct RequestSpan;

impl RequestSpan {
    #[inline(always)]
    pub fn none() -> RequestSpan {
        RequestSpan
    }

    #[inline(always)]
    pub fn set_route(&self, _route: &Route) {}

    #[inline(always)]
    pub fn attempt(
        &self,
        _attempt: u32,
        _target: &http::Uri,
        _traceparent: &mut HeaderValue,
    ) -> AttemptSpan {
        AttemptSpan
    }

    #[inline(always)]
    pub fn finish(&self, _ctx: &RequestContext<'_>, _response: &Response<ResponseBody>) {}

    #[inline(always)]
    pub fn cancelled(&self, _ctx: &RequestContext<'_>) {}
}

pub struct AttemptSpan;

impl AttemptSpan {
    #[inline(always)]
    pub fn end(self, _result: &Result<Response<crate::body::UpstreamBody>, Failure>) {}
}
