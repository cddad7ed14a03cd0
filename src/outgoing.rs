//! The request as it goes upstream, kept across a request's attempts (and
//! for its capture): the client's method, target and cleaned headers, what
//! the proxy sets on top of them, and the body, buffered or streaming.
//!
//! It is lent to each attempt rather than turned into a `Request`: Backstop's
//! own HTTP/1.1 exchange writes it out from here, so the usual request is
//! never built, cloned or moved through the upstream layers; the other ways
//! (hyper's connections, hyper-util's client, outbound proxies) get a
//! `Request` made from it (`request_for`).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Uri, Version};
use http_body_util::Either;

use crate::body::{BufferedBody, ClientBody, ClientIncoming, RequestBody};
use crate::classify::Failure;
use crate::headers::ProxySet;
use crate::upload::{Upload, UploadProgress};
use crate::upstream::{upstream_target, upstream_uri_for};

/// A request ready to be sent to any of the route's targets, once or more.
pub struct Outgoing {
    /// The client's request with its body taken out (`body` below) and its
    /// headers cleaned (hop-by-hop and filtered ones gone); its target's
    /// path and query go into capture records as they came. Kept in the
    /// box it came in: taken apart and moved through the request path's
    /// futures, its head (224 bytes) was copied about seven times on the
    /// way, some 340 instructions a request (callgrind).
    pub(crate) client: Box<Request<ClientBody>>,
    /// Where the path sent upstream starts in the client's path (after the
    /// route's prefix when `strip_prefix` is on).
    pub(crate) upstream_path_start: usize,
    /// What the proxy sets on top of them.
    pub set: ProxySet,
    /// What the request's capture record needs, kept only when the route
    /// captures its method.
    pub capturable: Option<Capturable>,
    pub body: OutgoingBody,
}

/// What a request that may be captured keeps for its record.
pub struct Capturable {
    /// The record's id, made before the first attempt: the attempts carry
    /// it as their idempotency key (unless the client sent its own), the
    /// key its replays will carry, so a backend that applied a request
    /// whose answer never came back (a timeout, a reset) can tell the
    /// replay for the duplicate it is.
    pub id: String,
    /// The client's own headers: the record holds what the client sent,
    /// not what Backstop added.
    pub client_headers: HeaderMap,
}

pub enum OutgoingBody {
    /// The client's body streams through; it can be sent only once.
    Streaming(Streamed),
    Buffered(BufferedBody),
}

/// A body that streams from the client, until an attempt takes it.
pub struct Streamed {
    incoming: Option<ClientIncoming>,
    /// The route's `body_read_timeout`: how long the client may leave it
    /// waiting.
    stall_limit: Duration,
    /// The upload's progress once an attempt has taken the body.
    progress: Option<Arc<UploadProgress>>,
}

impl Streamed {
    pub fn new(incoming: ClientIncoming, stall_limit: Duration) -> Streamed {
        Streamed {
            incoming: Some(incoming),
            stall_limit,
            progress: None,
        }
    }
}

impl Outgoing {
    pub fn method(&self) -> &Method {
        self.client.method()
    }

    /// The client's headers, cleaned.
    pub fn headers(&self) -> &HeaderMap {
        self.client.headers()
    }

    /// The client's path, as it came.
    pub fn original_path(&self) -> &str {
        self.client.uri().path()
    }

    /// The client's query string, as it came.
    pub fn original_query(&self) -> Option<&str> {
        self.client.uri().query()
    }

    /// The body when it was read whole (or is empty).
    pub fn buffered_body(&self) -> Option<&Bytes> {
        match &self.body {
            OutgoingBody::Buffered(body) => Some(&body.0),
            OutgoingBody::Streaming(_) => None,
        }
    }

    /// How far the client's streamed body has gone upstream, once sent.
    pub fn upload(&self) -> Option<&UploadProgress> {
        match &self.body {
            OutgoingBody::Streaming(streamed) => streamed.progress.as_deref(),
            OutgoingBody::Buffered(_) => None,
        }
    }

    /// The path and query to send to a target with base URL `base`.
    pub fn upstream_target(&self, base: &Uri) -> Cow<'_, str> {
        upstream_target(base, self.client.uri(), self.upstream_path_start)
    }

    /// The request for one attempt at `base`, for the ways that take a
    /// `Request`. `last` lets the final attempt move the headers instead of
    /// copying them. Neither error happens in practice, and both count as a
    /// failure before sending: a streaming body has a single attempt (asked
    /// for twice, there is nothing to send), and the joined path of a valid
    /// base URL and a parsed client target is itself valid.
    pub fn request_for(&mut self, base: &Uri, last: bool) -> Result<Request<RequestBody>, Failure> {
        let uri = upstream_uri_for(base, self.client.uri(), self.upstream_path_start)
            .map_err(|_| Failure::ConnectFailed)?;
        // (A GET's or HEAD's body of unknown length is never streamed: see
        // `pipeline::read_body`.)
        let body = match &mut self.body {
            OutgoingBody::Buffered(b) => b.to_request_body(),
            OutgoingBody::Streaming(streamed) => {
                let incoming = streamed.incoming.take().ok_or(Failure::ConnectFailed)?;
                let upload = Upload::new(incoming, streamed.stall_limit);
                streamed.progress = Some(upload.progress().clone());
                Either::Left(upload)
            }
        };
        let mut request = Request::new(body);
        *request.method_mut() = self.client.method().clone();
        *request.uri_mut() = uri;
        *request.version_mut() = Version::HTTP_11;
        *request.headers_mut() = if last {
            std::mem::take(self.client.headers_mut())
        } else {
            self.client.headers().clone()
        };
        Ok(request)
    }
}
