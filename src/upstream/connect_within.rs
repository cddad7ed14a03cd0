//! A time limit on a whole connection set-up: DNS, TCP, the outbound
//! proxy's tunnel and the TLS handshake. hyper-util's `HttpConnector`
//! bounds only the TCP connect, so a host that accepts the connection but
//! never finishes the handshake would hold each attempt for the whole
//! `request_timeout` and end it as a plain timeout: not retried (a POST
//! that provably never left) and never ejecting the target.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A connector whose connections must be ready within `limit`; one that is
/// not fails as a connect timeout (an `io::ErrorKind::TimedOut`, which
/// `classify` reads as `connect_timeout`).
#[derive(Clone)]
pub struct ConnectWithin<C> {
    inner: C,
    limit: Duration,
}

impl<C> ConnectWithin<C> {
    pub fn new(inner: C, limit: Duration) -> Self {
        ConnectWithin { inner, limit }
    }
}

impl<C> tower_service::Service<Uri> for ConnectWithin<C>
where
    C: tower_service::Service<Uri>,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<C::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, target: Uri) -> Self::Future {
        let connecting = self.inner.call(target);
        let limit = self.limit;
        Box::pin(async move {
            match tokio::time::timeout(limit, connecting).await {
                Ok(connected) => connected.map_err(Into::into),
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connection not set up within {limit:?}"),
                )
                .into()),
            }
        })
    }
}
