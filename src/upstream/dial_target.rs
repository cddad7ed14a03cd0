//! A connector that always dials one target, whatever authority the
//! request's URI names.
//!
//! hyper-util's client takes a request's authority from its URI, for the
//! address it connects to and, on HTTP/2, for the `:authority` it sends. A
//! route that sets `Host` (its `headers`) must reach an HTTP/2 backend with
//! that name as `:authority` (RFC 9113 §8.3.1: a `host` field beside it
//! must not differ), so the request's URI carries the route's `Host`, and
//! this connector, one per target, still connects to the target: never to
//! the name in `Host` (DESIGN.md: only configured upstreams are reachable).
//! TLS verifies and names (SNI) the target, as nginx's `proxy_ssl_name`
//! does by default.

use http::Uri;

/// `inner`, always called with `target`'s URI.
#[derive(Clone)]
pub struct DialTarget<C> {
    inner: C,
    target: Uri,
}

impl<C> DialTarget<C> {
    pub fn new(inner: C, target: Uri) -> Self {
        DialTarget { inner, target }
    }
}

impl<C> tower_service::Service<Uri> for DialTarget<C>
where
    C: tower_service::Service<Uri>,
{
    type Response = C::Response;
    type Error = C::Error;
    type Future = C::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, _named: Uri) -> Self::Future {
        self.inner.call(self.target.clone())
    }
}
