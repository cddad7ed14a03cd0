//! The HTTP client of the OTLP exporter: the `opentelemetry-http`
//! `HttpClient` trait over the hyper-util pooled client and rustls that
//! Backstop already uses for upstreams, instead of the reqwest client
//! `opentelemetry-otlp` brings by default (a second HTTP and TLS stack).
//! Requests run on Backstop's tokio runtime: the export task calls it there.
//!
//! It sends to the configured endpoint with the configured headers, and
//! only those: the exporter's request supplies the body and its
//! `Content-Type`/`Content-Encoding`, so OTEL_EXPORTER_OTLP_* variables in
//! the environment can neither redirect spans nor add headers (which could
//! carry another service's credentials to this collector).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_ENCODING, CONTENT_TYPE, USER_AGENT};
use http::{HeaderName, HeaderValue, Method, Request, Response, Uri};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use opentelemetry_http::{HttpClient, HttpError};

use crate::config::OtlpConfig;
use crate::upstream::{tls, ErrorChain};

/// A collector's answer is a small protobuf; more is not read.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

pub struct HyperClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    endpoint: Uri,
    /// Sensitive values: never logged (`Debug` prints the names only).
    headers: Vec<(HeaderName, HeaderValue)>,
    timeout: Duration,
}

impl std::fmt::Debug for HyperClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.headers.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("HyperClient")
            .field(
                "endpoint",
                &crate::config::redact_url(&self.endpoint.to_string()),
            )
            .field("headers", &names)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl HyperClient {
    pub fn new(config: &OtlpConfig) -> Result<HyperClient, String> {
        let endpoint: Uri = config
            .endpoint
            .parse()
            .map_err(|e| format!("otlp.endpoint: {e}"))?;
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(config.timeout));
        http.set_nodelay(true);
        http.enforce_http(false);
        let tls = tls::client_config(None, true).map_err(|e| format!("otlp: {e}"))?;
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        let headers = config
            .headers
            .iter()
            .map(|(name, value)| {
                let mut value = value.clone();
                value.set_sensitive(true);
                (name.clone(), value)
            })
            .collect();
        Ok(HyperClient {
            client,
            endpoint,
            headers,
            timeout: config.timeout,
        })
    }

    /// One export request, bounded by `otlp.timeout` from connect to the
    /// last byte of the answer.
    async fn post(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let (parts, body) = request.into_parts();
        let mut outgoing = Request::new(Full::new(body));
        *outgoing.method_mut() = Method::POST;
        *outgoing.uri_mut() = self.endpoint.clone();
        let headers = outgoing.headers_mut();
        for name in [CONTENT_TYPE, CONTENT_ENCODING, USER_AGENT] {
            if let Some(value) = parts.headers.get(&name) {
                headers.insert(name, value.clone());
            }
        }
        for (name, value) in &self.headers {
            headers.insert(name.clone(), value.clone());
        }
        let exchange = async {
            let response = self.client.request(outgoing).await?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_RESPONSE_BYTES)
                .collect()
                .await?
                .to_bytes();
            Ok::<_, HttpError>(Response::from_parts(parts, body))
        };
        let result = match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(format!("no answer within {:?}", self.timeout).into()),
        };
        // The exporter reports a failed send as "network error" only.
        if let Err(e) = &result {
            tracing::debug!(error = %ErrorChain(e.as_ref()), "otlp: export request failed");
        }
        result
    }
}

impl HttpClient for HyperClient {
    // The trait is declared with `async_trait`; this is its expansion, so
    // no macro crate is needed for one method.
    fn send_bytes<'a, 'b>(
        &'a self,
        request: Request<Bytes>,
    ) -> Pin<Box<dyn Future<Output = Result<Response<Bytes>, HttpError>> + Send + 'b>>
    where
        'a: 'b,
        Self: 'b,
    {
        Box::pin(self.post(request))
    }
}
