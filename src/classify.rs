//! The one outcome classifier of an upstream attempt.
//!
//! Retry, capture, statistics, the circuit breaker (and later the cache)
//! all ask this module what an attempt's result means, so they can never
//! disagree about what counts as a failure.

use std::error::Error as StdError;
use std::io;

use crate::config::{RetryConfig, RetryableError};

/// Why an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The connection was refused: nothing reached the backend.
    ConnectRefused,
    /// Connecting took longer than `connect_timeout`: nothing reached it.
    ConnectTimeout,
    /// The upstream host name did not resolve: nothing reached it.
    Dns,
    /// Any other error before the request was written (TLS handshake, ...).
    ConnectFailed,
    /// The connection broke after the request may have been sent.
    Reset,
    /// No response head within `request_timeout`.
    Timeout,
    /// The backend answered something that is no HTTP answer Backstop can
    /// pass on: a malformed or oversized head (more than 100 header lines,
    /// 256 KiB), a body that cannot be framed, a transfer coding other than
    /// chunked. The backend had the request and is up: the answer is not
    /// retried, not captured (a replay would apply it twice) and tells the
    /// breaker nothing either way (nginx's `invalid_header`, off by default
    /// in `proxy_next_upstream`, is treated alike).
    InvalidResponse,
    /// The backend answered with a status listed as a failure.
    Status(u16),
    /// The client's request body failed while it streamed upstream (a
    /// malformed chunk, the client gone mid-body): the client's fault, not
    /// the backend's. Answered 400, not retried, not captured (the body
    /// is incomplete), and tells the breaker nothing.
    ClientBody,
    /// The client stopped sending its streamed body for the route's
    /// `body_read_timeout`: as `ClientBody`, but answered 408
    /// `request_timeout`; its reason (metrics, logs) is
    /// `client_body_timeout`, nginx's name for the limit.
    ClientStalled,
    /// The outbound proxy the attempt went through could not be reached,
    /// or refused the request or its tunnel for a reason of its own (its
    /// credentials, its own error): the target was never tried. The proxy
    /// is skipped for a while, not the target; retried as a refused
    /// connection (another proxy may do), captured, and nothing for the
    /// breaker, which guards the backend. A proxy that says the target is
    /// down (a `CONNECT` answered 502, 503 or 504) is the target's failure.
    ProxyFailed,
    /// The route's circuit is open: the backend was not called.
    CircuitOpen,
    /// Every connection the route may have open to the target
    /// (`upstream_max_conns`) stayed busy until the attempt's deadline:
    /// the request waited and was never sent. Backstop's own limit, not
    /// the backend's failure: it tells the breaker nothing, does not eject
    /// the target and is not retried (the wait was the attempt's time).
    Saturated,
}

impl Failure {
    /// Classifies an error of the upstream client.
    pub fn from_client_error(err: &hyper_util::client::legacy::Error) -> Failure {
        if err.is_connect() {
            return Failure::from_connect_error(err);
        }
        Failure::from_exchange_error(err)
    }

    /// Classifies an error of an HTTP exchange on an open connection
    /// (hyper's, directly or inside its client's error).
    pub fn from_exchange_error(err: &(dyn StdError + 'static)) -> Failure {
        // The client's own hyper error comes first in the chain; the body's
        // error (the client's connection's, which may be a parse error of
        // its chunks) behind it.
        let first = chain(err).find_map(|e| e.downcast_ref::<hyper::Error>());
        if first.is_some_and(hyper::Error::is_user) {
            if chain(err).any(|e| e.is::<crate::upload::UploadStalled>()) {
                return Failure::ClientStalled;
            }
            return Failure::ClientBody;
        }
        let unparsable = chain(err)
            .filter_map(|e| e.downcast_ref::<hyper::Error>())
            .any(|e| e.is_parse() || e.is_parse_status() || e.is_parse_too_large());
        if unparsable {
            Failure::InvalidResponse
        } else {
            Failure::Reset
        }
    }

    /// Classifies an error of connecting (hyper-util's `HttpConnector`,
    /// directly or inside its client).
    pub fn from_connect_error(err: &(dyn StdError + 'static)) -> Failure {
        if chain_mentions(err, "dns error") {
            return Failure::Dns;
        }
        match io_error_kind(err) {
            Some(io::ErrorKind::ConnectionRefused) => Failure::ConnectRefused,
            Some(io::ErrorKind::TimedOut) => Failure::ConnectTimeout,
            _ if chain_mentions(err, "timed out") => Failure::ConnectTimeout,
            _ => Failure::ConnectFailed,
        }
    }

    /// True when the request provably never reached the backend, so that even
    /// a non-idempotent request may be sent again.
    pub fn before_send(self) -> bool {
        matches!(
            self,
            Failure::ConnectRefused
                | Failure::ConnectTimeout
                | Failure::Dns
                | Failure::ConnectFailed
                | Failure::ProxyFailed
                | Failure::CircuitOpen
                | Failure::Saturated
        )
    }

    /// Whether the target itself failed to take a connection, so that it
    /// is skipped for a while.
    pub fn ejects_target(self) -> bool {
        self.before_send()
            && !matches!(
                self,
                Failure::CircuitOpen | Failure::Saturated | Failure::ProxyFailed
            )
    }

    /// Whether the route's retry policy retries this failure.
    pub fn is_retryable(self, retry: &RetryConfig) -> bool {
        let kind = match self {
            Failure::Status(code) => return retry.retry_on_status.contains(&code),
            Failure::ConnectRefused | Failure::ConnectFailed | Failure::ProxyFailed => {
                RetryableError::ConnectionRefused
            }
            Failure::ConnectTimeout | Failure::Timeout => RetryableError::Timeout,
            Failure::Dns => RetryableError::Dns,
            Failure::Reset => RetryableError::ConnectionReset,
            // Saturated: the attempt already waited its time in the queue;
            // another would only queue again.
            Failure::CircuitOpen
            | Failure::InvalidResponse
            | Failure::Saturated
            | Failure::ClientBody
            | Failure::ClientStalled => return false,
        };
        retry.retry_on_errors.contains(&kind)
    }

    /// Whether this failure means the backend is down, so a request may be
    /// captured for later delivery (502/503/504 and transport failures; not
    /// 500, which is the backend's answer about this request).
    pub fn is_capturable(self) -> bool {
        match self {
            Failure::Status(code) => matches!(code, 502..=504),
            Failure::InvalidResponse | Failure::ClientBody | Failure::ClientStalled => false,
            _ => true,
        }
    }

    /// What this failure tells the circuit breaker: `Some(true)`, a failure
    /// (transport failures, timeouts, 5xx statuses); `Some(false)`, the
    /// backend is fine (other statuses: a 429 is the backend protecting
    /// itself); `None`, nothing either way — an answer Backstop cannot pass
    /// on neither opens the circuit nor closes a half-open one.
    pub fn breaker_verdict(self) -> Option<bool> {
        match self {
            Failure::Status(code) => Some(status_trips_breaker(code)),
            Failure::CircuitOpen
            | Failure::InvalidResponse
            | Failure::Saturated
            | Failure::ProxyFailed
            | Failure::ClientBody
            | Failure::ClientStalled => None,
            _ => Some(true),
        }
    }

    /// The `reason` of a capture record and the label of metrics.
    pub fn reason(self) -> String {
        match self {
            Failure::ConnectRefused => "connect_refused".into(),
            Failure::ConnectTimeout => "connect_timeout".into(),
            Failure::Dns => "dns".into(),
            Failure::ConnectFailed => "connect_failed".into(),
            Failure::ProxyFailed => "proxy_failed".into(),
            Failure::Reset => "connection_reset".into(),
            Failure::Timeout => "timeout".into(),
            Failure::InvalidResponse => "invalid_response".into(),
            Failure::Status(code) => format!("upstream_{code}"),
            Failure::CircuitOpen => "circuit_open".into(),
            Failure::Saturated => "saturated".into(),
            Failure::ClientBody => "client_body".into(),
            Failure::ClientStalled => "client_body_timeout".into(),
        }
    }
}

/// Methods that may be sent twice without changing their effect (RFC 9110
/// §9.2.2): the ones retried after the request may have reached the backend.
pub fn is_idempotent(method: &http::Method) -> bool {
    use http::Method;
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// A backend answer that counts as a failure (for retries and capture): the
/// route's retryable statuses and the gateway errors.
pub fn status_failure(status: u16, retry: &RetryConfig) -> Option<Failure> {
    (retry.retry_on_status.contains(&status) || matches!(status, 502..=504))
        .then_some(Failure::Status(status))
}

/// `err` and the errors behind it, outermost first.
fn chain<'a>(
    err: &'a (dyn StdError + 'static),
) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    std::iter::successors(Some(err), |&e| e.source())
}

fn io_error_kind(err: &(dyn StdError + 'static)) -> Option<io::ErrorKind> {
    chain(err).find_map(|e| e.downcast_ref::<io::Error>().map(io::Error::kind))
}

/// hyper-util reports DNS failures only as a message ("dns error"), so the
/// error chain's text is the one place that tells them apart.
fn chain_mentions(err: &(dyn StdError + 'static), needle: &str) -> bool {
    chain(err).any(|e| e.to_string().contains(needle))
}

/// Whether an answer with this status counts against the circuit breaker:
/// 5xx say the backend is in trouble; 4xx are about the request.
pub fn status_trips_breaker(status: u16) -> bool {
    status >= 500
}
