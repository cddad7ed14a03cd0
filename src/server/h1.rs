//! Backstop's own HTTP/1.1 server side, for the requests most traffic is
//! made of: an HTTP/1.1 head without a body (`GET`, `HEAD`, `DELETE`, ...).
//! It reads the head (`httparse`, hyper's parser) into a request whose header
//! values share the read buffer, runs the pipeline in the connection's own
//! future and writes the answer: head and first body chunk in one write.
//!
//! Everything else is hyper's: the first request this side does not serve
//! (one with a body, `Expect`, `Upgrade`, a `Connection` header other than
//! `keep-alive`/`close`, HTTP/1.0, `CONNECT`, a head it cannot parse or
//! larger than `max_header_bytes`, the HTTP/2 preface) hands the whole
//! connection, with the bytes read so far, to hyper's server for the rest of
//! its life. So every error answer about bad input, every body and every
//! protocol upgrade is still hyper's work; this side only ever sees heads
//! that parsed cleanly.
//!
//! Why by hand: callgrind put hyper's server side at about 7,000 of the
//! proxy's 24,200 instructions per request (head parsing into its own
//! structures, a dispatcher that polls the service and the body in turn,
//! flushes through a write queue, a clock read per poll for its `Date`
//! cache), where nginx's whole request handling is near 20 µs of CPU. No
//! crate offers an HTTP/1 server connection that serves a request in the
//! caller's future, and the part that must be exact (framing the answer) is
//! small: the rules are hyper's, restated in [`encode_head`].

use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use http::header::{
    HeaderValue, CONNECTION, CONTENT_LENGTH, DATE, EXPECT, TRANSFER_ENCODING, UPGRADE,
};
use http::{HeaderMap, Method, Request, StatusCode, Uri, Version};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::io::poll_read_buf;

use super::reaper::{Closable, ConnState, H2_PREFACE};
use crate::body::ClientBody;
use crate::headers::{
    self, field_at, field_in, has_token, offset_in, write_field, ClientInfo, FieldAt, X_REQUEST_ID,
};
use crate::pipeline::{self, Answer, Proxy};

/// Request header lines served here at most (hyper's limit too).
const MAX_HEADERS: usize = 100;
/// Room made in the read buffer before a read, at least.
const READ_MIN: usize = 512;
/// What a read buffer grows by. Small, because a connection keeps its
/// buffer until the reaper finds it idle: most request heads are well under
/// 2 KiB, a larger one takes a few more reads, and a buffer emptied by the
/// heads taken from it is reused in place, not reallocated.
const READ_GROW: usize = 2 * 1024;
/// A first body chunk up to this size is copied behind the head; a larger
/// one goes out beside it in the same vectored write.
const COPY_MAX: usize = 1024;

/// How the own side ended with a connection.
pub enum Outcome<S> {
    /// The connection is closed (the client left, asked to close, the
    /// answer could not be framed for reuse, or the proxy is closing it).
    Closed(io::Result<()>),
    /// A request this side does not serve: the connection and the bytes
    /// read from it but not used go to hyper, for the protocol they are.
    HandOver(S, Bytes, Protocol),
}

/// What hyper is to speak on a connection handed over: decided here, so
/// that hyper never has to read ahead to tell (a connection still telling
/// would be cancelled, not finished, by a graceful close).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    /// The HTTP/2 preface, as the connection's first bytes (h2c with prior
    /// knowledge, or TLS with ALPN `h2`).
    Http2,
}

impl Protocol {
    fn of(read: &[u8], first: bool) -> Protocol {
        let n = read.len().min(H2_PREFACE.len());
        if first && read[..n] == H2_PREFACE[..n] {
            Protocol::Http2
        } else {
            Protocol::Http1
        }
    }
}

/// What one connection's requests need from the proxy.
pub struct Serving {
    pub proxy: Arc<Proxy>,
    pub client: Arc<ClientInfo>,
    pub state: Arc<ConnState>,
    pub max_head: usize,
}

pin_project_lite::pin_project! {
    /// The own side's loop as a connection the reaper can close: it reads
    /// the connection's close mark itself, between requests.
    pub struct Http1<F> {
        #[pin]
        serving: F,
    }
}

impl<F: Future> Future for Http1<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().serving.poll(cx)
    }
}

impl<F> Closable for Http1<F> {
    fn close_gracefully(self: Pin<&mut Self>) {}
}

/// Serves requests on `io` until it closes or a request goes to hyper.
pub fn serve<S>(io: S, serving: Serving) -> Http1<impl Future<Output = Outcome<S>>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    Http1 {
        serving: serve_loop(io, serving),
    }
}

async fn serve_loop<S>(mut io: S, serving: Serving) -> Outcome<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut read = BytesMut::new();
    let mut out = Vec::new();
    // Where a head's fields are, kept from one request to the next.
    let mut fields = Vec::new();
    let mut first = true;
    loop {
        let head = loop {
            match parse_request(&mut read, &mut fields, serving.max_head) {
                Ok(Some(head)) => break head,
                Ok(None) => {}
                Err(HandOver) => {
                    let protocol = Protocol::of(&read, first);
                    return Outcome::HandOver(io, read.freeze(), protocol);
                }
            }
            let state = &serving.state;
            if !read.is_empty() {
                state.head_begun();
            }
            // Between requests a close asked for (idle, shutdown) ends the
            // connection; a head already begun is read on (the reaper
            // aborts it if it takes too long). A connection the reaper
            // found idle lets go of its buffers until its next bytes come.
            let got = poll_fn(|cx| {
                // A connection accepted as the shutdown began may already
                // have sent its request: it is read once, and served if so.
                let mut closing_now = false;
                if read.is_empty() {
                    if state.closing() {
                        if !first {
                            return Poll::Ready(Ok(0));
                        }
                        closing_now = true;
                    } else if state.take_trim() {
                        read = BytesMut::new();
                        out = Vec::new();
                        fields = Vec::new();
                    }
                }
                let polled = if read.capacity() == 0 {
                    poll_read_unbuffered(&mut io, cx, &mut read)
                } else {
                    if read.capacity() - read.len() < READ_MIN {
                        read.reserve(READ_GROW);
                    }
                    poll_read_buf(Pin::new(&mut io), cx, &mut read)
                };
                match polled {
                    Poll::Pending if closing_now => Poll::Ready(Ok(0)),
                    polled => polled,
                }
            })
            .await;
            match got {
                Ok(0) => return Outcome::Closed(io.shutdown().await),
                Ok(_) => {}
                Err(e) => return Outcome::Closed(Err(e)),
            }
        };
        first = false;
        let (written, closing) = answer(&mut io, &mut out, &serving, head).await;
        match written {
            Ok(true) if !closing => {}
            Ok(_) => return Outcome::Closed(io.shutdown().await),
            Err(e) => return Outcome::Closed(Err(e)),
        }
    }
}

/// Reads into a buffer on the stack, for a connection that holds none (new,
/// or idle and trimmed), and keeps what came in a new one: an idle
/// connection waits for its next request without a buffer of its own.
fn poll_read_unbuffered<S: AsyncRead + Unpin>(
    io: &mut S,
    cx: &mut Context<'_>,
    read: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    let mut stack = [MaybeUninit::<u8>::uninit(); READ_GROW];
    let mut buf = ReadBuf::uninit(&mut stack);
    std::task::ready!(Pin::new(io).poll_read(cx, &mut buf))?;
    let got = buf.filled();
    if !got.is_empty() {
        read.reserve(READ_GROW);
        read.extend_from_slice(got);
    }
    Poll::Ready(Ok(got.len()))
}

/// One request, from its head to its answer's last byte, as one boxed
/// future: a connection keeps room for every future it awaits, idle or
/// not, and the pipeline's (≈ 5.9 KiB) and the writing of its answer
/// (≈ 1 KiB) inline would cost that much per idle keep-alive connection.
/// One allocation per request, written straight into its box
/// (`Box::write`: `Box::pin(f)` builds the future aside and copies it).
/// Gives the write's outcome and whether the connection is to close. (Not
/// one generic boxing helper shared with `server::handling`: with it the
/// future was built on the stack and copied, +700 instructions per request.)
fn answer<'a, S>(
    io: &'a mut S,
    out: &'a mut Vec<u8>,
    serving: &'a Serving,
    head: Head,
) -> Pin<Box<impl Future<Output = (io::Result<bool>, bool)> + 'a>>
where
    S: AsyncWrite + Unpin,
{
    Box::into_pin(Box::write(
        Box::new_uninit(),
        respond(io, out, serving, head),
    ))
}

/// The pipeline's answer to `head`, written to the client.
async fn respond<S: AsyncWrite + Unpin>(
    io: &mut S,
    out: &mut Vec<u8>,
    serving: &Serving,
    head: Head,
) -> (io::Result<bool>, bool) {
    let in_flight = serving.state.own_request_started();
    let answer = pipeline::handle(&serving.proxy, head.request, &serving.client).await;
    let closing = head.close || serving.state.closing();
    let written = write_response(io, out, answer, head.is_head, closing).await;
    drop(in_flight);
    (written, closing)
}

/// A request head read whole.
struct Head {
    /// Boxed where it is parsed: it moves through the server and the
    /// pipeline's first phases, a pointer instead of ~240 bytes each time.
    request: Box<Request<ClientBody>>,
    /// The client asked to close after this answer.
    close: bool,
    is_head: bool,
}

/// A request head this side does not serve: hyper's.
#[derive(Debug)]
struct HandOver;

/// Reads the request head at the start of `read`, taking its bytes when it
/// is complete (`None` while it is not); a head this side does not serve is
/// left where it is. `fields` is room for noting where the fields are, the
/// connection's own so a request costs no allocation for it.
fn parse_request(
    read: &mut BytesMut,
    fields: &mut Vec<FieldAt>,
    max_head: usize,
) -> Result<Option<Head>, HandOver> {
    if read.is_empty() {
        return Ok(None);
    }
    // Left uninitialised (as hyper does): filling the array first costs
    // more than parsing a small head.
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut request,
        read,
        &mut headers,
    ) {
        Ok(httparse::Status::Complete(len)) if len <= max_head => len,
        Ok(httparse::Status::Partial) if read.len() < max_head => return Ok(None),
        // Too large, too many headers, malformed: hyper answers those.
        _ => return Err(HandOver),
    };
    let (Some(method), Some(target), Some(1)) = (request.method, request.path, request.version)
    else {
        return Err(HandOver);
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Err(HandOver);
    };
    if method == Method::CONNECT {
        return Err(HandOver);
    }
    let mut close = false;
    // Noted as places, to be cut from the head once it is split off.
    fields.clear();
    for header in request.headers.iter() {
        let name = header.name.as_bytes();
        let value = header.value;
        if name.eq_ignore_ascii_case(b"content-length") {
            // `Content-Length: 0` is no body; any other is hyper's.
            if value != b"0" {
                return Err(HandOver);
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            if value.eq_ignore_ascii_case(b"close") {
                close = true;
            } else if !value.eq_ignore_ascii_case(b"keep-alive") {
                return Err(HandOver);
            }
        } else if [TRANSFER_ENCODING, UPGRADE, EXPECT]
            .iter()
            .any(|h| name.eq_ignore_ascii_case(h.as_str().as_bytes()))
        {
            return Err(HandOver);
        }
        fields.push(field_at(read, name, value));
    }
    let target_at = offset_in(read, target.as_bytes());
    let target_end = target_at + target.len();
    let is_head = method == Method::HEAD;
    // From here on the head's bytes are shared by the request's values.
    let head = read.split_to(len).freeze();
    let Some(request) = build_request(method, &head, target_at..target_end, fields) else {
        // Not a URI or header name the `http` crate takes: back as it was.
        let mut all = BytesMut::with_capacity(head.len() + read.len());
        all.extend_from_slice(&head);
        all.extend_from_slice(read);
        *read = all;
        return Err(HandOver);
    };
    Ok(Some(Head {
        request,
        close,
        is_head,
    }))
}

fn build_request(
    method: Method,
    head: &Bytes,
    target: std::ops::Range<usize>,
    fields: &[FieldAt],
) -> Option<Box<Request<ClientBody>>> {
    let mut request = Box::new(Request::new(None));
    *request.method_mut() = method;
    *request.uri_mut() = Uri::from_maybe_shared(head.slice(target)).ok()?;
    *request.version_mut() = Version::HTTP_11;
    // Filled in place (not built aside and moved in over an empty map),
    // with room for the few the proxy may add without growing.
    let headers = request.headers_mut();
    headers.reserve(fields.len() + 2);
    for &at in fields {
        let (name, value) = field_in(head, at)?;
        headers.append(name, value);
    }
    Some(request)
}

/// How an answer's body goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body at all (`HEAD`, 1xx, 204, 304).
    None,
    Length(u64),
    Chunked,
}

/// What an answer's head is written from.
#[derive(Clone, Copy)]
struct AnswerHead<'a> {
    status: StatusCode,
    headers: &'a HeaderMap,
    /// Sent as `X-Request-Id`, in place of any in `headers`.
    request_id: Option<&'a HeaderValue>,
}

/// Writes the status line and headers of an answer into `out` and returns
/// how its body is framed, and whether the connection may stay open. Hyper's
/// rules: a `HEAD` answer, 204 and 304 carry no body (a `HEAD` answer keeps
/// the `Content-Length` it has, or is given the body's known length; 204 and
/// 304 go without one); otherwise the body's known length becomes
/// `Content-Length`, a length header is used when the body's length is not
/// known, else the body is chunked; `Transfer-Encoding` is this side's to
/// write; `Date` is added when missing; `closing` says `Connection: close`;
/// the request id, when there is one, replaces any `X-Request-Id`.
fn encode_head(
    out: &mut Vec<u8>,
    head: AnswerHead<'_>,
    is_head: bool,
    known: Option<u64>,
    closing: bool,
) -> (Framing, bool) {
    let AnswerHead {
        status,
        headers,
        request_id,
    } = head;
    let bodiless = is_head || matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let (mut declared, mut has_length, mut has_date, mut close, mut has_connection) =
        (None, false, false, false, false);
    for (name, value) in headers {
        if name == TRANSFER_ENCODING || (request_id.is_some() && name == X_REQUEST_ID) {
            continue;
        }
        if name == CONTENT_LENGTH {
            has_length = true;
            if !bodiless {
                // Written below, from the body.
                declared = declared.or_else(|| headers::decimal(value.as_bytes()));
                continue;
            }
            if !is_head {
                // 204 and 304 go without one, as with hyper.
                continue;
            }
        } else if name == DATE {
            has_date = true;
        } else if name == CONNECTION {
            if closing {
                // Replaced by `close` below.
                continue;
            }
            has_connection = true;
            close |= has_token(value, "close");
        }
        write_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    let framing = if bodiless {
        let may_say_length = is_head && !has_length;
        if let Some(n) = known.filter(|&n| may_say_length && n > 0) {
            write_length(out, n);
        }
        Framing::None
    } else {
        match known.or(declared) {
            Some(n) => {
                write_length(out, n);
                Framing::Length(n)
            }
            None => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                Framing::Chunked
            }
        }
    };
    if closing && !has_connection {
        out.extend_from_slice(b"connection: close\r\n");
    }
    if !has_date {
        write_date(out);
    }
    if let Some(id) = request_id {
        write_field(out, X_REQUEST_ID.as_str().as_bytes(), id.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    (framing, !close)
}

fn write_length(out: &mut Vec<u8>, n: u64) {
    write_field(
        out,
        b"content-length",
        itoa::Buffer::new().format(n).as_bytes(),
    );
}

std::thread_local! {
    /// The `Date` value of the current second, formatted once per second.
    static DATE_NOW: std::cell::RefCell<(u64, String)> = const {
        std::cell::RefCell::new((0, String::new()))
    };
}

fn write_date(out: &mut Vec<u8>) {
    let now = SystemTime::now();
    let second = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE_NOW.with_borrow_mut(|(at, text)| {
        if *at != second || text.is_empty() {
            *at = second;
            *text = httpdate::fmt_http_date(now);
        }
        write_field(out, b"date", text.as_bytes());
    });
}

/// Writes an answer; `Ok(true)` when the connection may carry another
/// request (the body went out whole, framed, and nobody asked to close).
async fn write_response<S: AsyncWrite + Unpin>(
    io: &mut S,
    out: &mut Vec<u8>,
    answer: Answer,
    is_head: bool,
    closing: bool,
) -> io::Result<bool> {
    let (mut parts, body) = answer.response.into_parts();
    let request_id = Some(&answer.request_id);
    let mut body = pin!(body);
    if parts.status.is_informational() {
        // Not a final answer (the upstream exchange never passes one on):
        // as hyper does, the client gets a 500 rather than a head that
        // would leave it waiting or switching protocols.
        tracing::warn!(status = %parts.status, "a 1xx status as a final answer; sent as 500");
        parts.status = StatusCode::INTERNAL_SERVER_ERROR;
        parts.headers.clear();
        out.clear();
        let head = AnswerHead {
            status: parts.status,
            headers: &parts.headers,
            request_id,
        };
        encode_head(out, head, is_head, Some(0), true);
        io.write_all(out).await?;
        io.flush().await?;
        return Ok(false);
    }
    out.clear();
    let head = AnswerHead {
        status: parts.status,
        headers: &parts.headers,
        request_id,
    };
    let (framing, keep) = encode_head(out, head, is_head, body.size_hint().exact(), closing);
    drop(parts);
    let mut left = match framing {
        Framing::None => {
            io.write_all(out).await?;
            io.flush().await?;
            return Ok(keep);
        }
        Framing::Length(n) => n,
        Framing::Chunked => u64::MAX,
    };
    let chunked = framing == Framing::Chunked;
    loop {
        // The head waits for the first chunk when that is ready now, so both
        // go out in one write. A body that is not ready lets what is written
        // so far go first, flushed (TLS holds records back until then): a
        // stream's events reach the client as they come.
        let frame = match poll_fn(|cx| Poll::Ready(poll_now(body.as_mut(), cx))).await {
            Some(frame) => frame,
            None => {
                write_out(io, out, &[], false).await?;
                io.flush().await?;
                poll_fn(|cx| body.as_mut().poll_frame(cx)).await
            }
        };
        let data = match frame {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                // Trailers are not passed on.
                Err(_) => continue,
            },
            // The backend's body failed: the client sees the answer cut
            // short (no last chunk, or fewer bytes than said) and a close.
            Some(Err(e)) => {
                tracing::debug!(error = %e, "answer body failed; closing the connection");
                write_out(io, out, &[], false).await?;
                return Ok(false);
            }
            None => break,
        };
        if data.is_empty() {
            continue;
        }
        let len = data.len() as u64;
        if !chunked && len > left {
            tracing::debug!("answer body longer than its length; closing the connection");
            let fits = data.slice(..left as usize);
            write_out(io, out, &fits, false).await?;
            return Ok(false);
        }
        left -= if chunked { 0 } else { len };
        if chunked {
            out.extend_from_slice(format!("{len:X}\r\n").as_bytes());
        }
        let last = !chunked && left == 0;
        write_out(io, out, &data, chunked).await?;
        if last {
            io.flush().await?;
            return Ok(keep);
        }
    }
    if chunked {
        out.extend_from_slice(b"0\r\n\r\n");
        write_out(io, out, &[], false).await?;
        io.flush().await?;
        return Ok(keep);
    }
    write_out(io, out, &[], false).await?;
    io.flush().await?;
    // Fewer bytes than the length said: the client cannot tell where this
    // answer ends unless the connection does.
    Ok(left == 0 && keep)
}

/// What a body's `poll_frame` gives when ready.
type NextFrame<B> = Option<Result<http_body::Frame<<B as Body>::Data>, <B as Body>::Error>>;

/// The body's next frame if it is ready now, without waiting.
fn poll_now<B: Body + ?Sized>(body: Pin<&mut B>, cx: &mut Context<'_>) -> Option<NextFrame<B>> {
    match body.poll_frame(cx) {
        Poll::Ready(frame) => Some(frame),
        Poll::Pending => None,
    }
}

/// Writes what is pending in `out`, then `data` (and a chunk's line end),
/// in as few writes as the socket takes; `out` is left empty.
async fn write_out<S: AsyncWrite + Unpin>(
    io: &mut S,
    out: &mut Vec<u8>,
    data: &[u8],
    chunk_end: bool,
) -> io::Result<()> {
    let end: &[u8] = if chunk_end { b"\r\n" } else { b"" };
    if data.len() <= COPY_MAX {
        out.extend_from_slice(data);
        out.extend_from_slice(end);
        io.write_all(out).await?;
    } else {
        let mut slices = [IoSlice::new(out), IoSlice::new(data), IoSlice::new(end)];
        let mut slices = &mut slices[..];
        IoSlice::advance_slices(&mut slices, 0);
        while !slices.is_empty() {
            let n = io.write_vectored(slices).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut slices, n);
        }
    }
    out.clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Option<Head>, HandOver> {
        parse_request(&mut BytesMut::from(text), &mut Vec::new(), 64 * 1024)
    }

    fn head_of(
        status: StatusCode,
        headers: &[(&str, &str)],
        is_head: bool,
        known: Option<u64>,
    ) -> (String, Framing) {
        let mut map = HeaderMap::new();
        for (n, v) in headers {
            map.append(
                http::header::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let mut out = Vec::new();
        let head = AnswerHead {
            status,
            headers: &map,
            request_id: None,
        };
        let (framing, _) = encode_head(&mut out, head, is_head, known, false);
        let text = String::from_utf8(out).unwrap();
        // The date changes; its presence is what matters.
        assert!(text.contains("\r\ndate: "), "{text}");
        let text = text
            .lines()
            .filter(|l| !l.starts_with("date: "))
            .collect::<Vec<_>>()
            .join("\n");
        (text, framing)
    }

    #[test]
    fn a_plain_get_is_served_here_with_its_headers_in_order() {
        let Ok(Some(head)) = parse(
            "GET /a/b?x=1 HTTP/1.1\r\nHost: h\r\nX-A: 1\r\nx-a: 2\r\nConnection: keep-alive\r\n\r\n",
        ) else {
            panic!("not served here")
        };
        let r = head.request;
        assert_eq!(r.method(), Method::GET);
        assert_eq!(r.uri().path(), "/a/b");
        assert_eq!(r.uri().query(), Some("x=1"));
        let xa: Vec<_> = r.headers().get_all("x-a").iter().collect();
        assert_eq!(xa, ["1", "2"]);
        assert!(!head.close);
        assert!(r.body().is_none());
    }

    #[test]
    fn what_this_side_does_not_serve_goes_to_hyper_untouched() {
        for text in [
            "POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.0\r\n\r\n",
            "GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "GET / HTTP/1.1\r\nUpgrade: h2c\r\n\r\n",
            "PUT / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            "CONNECT h:443 HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "GET /\x7f HTTP/1.1\r\n\r\n",
        ] {
            let mut read = BytesMut::from(text);
            assert!(
                parse_request(&mut read, &mut Vec::new(), 64 * 1024).is_err(),
                "{text:?} should go to hyper"
            );
            assert_eq!(
                &read[..],
                text.as_bytes(),
                "{text:?} must be left as it was"
            );
        }
    }

    #[test]
    fn a_head_over_the_limit_goes_to_hyper_and_a_short_one_waits() {
        let mut read = BytesMut::from(&b"GET / HTTP/1.1\r\nX: "[..]);
        assert!(matches!(
            parse_request(&mut read, &mut Vec::new(), 64),
            Ok(None)
        ));
        read.extend_from_slice(&[b'a'; 64]);
        assert!(parse_request(&mut read, &mut Vec::new(), 64).is_err());
    }

    #[test]
    fn pipelined_requests_are_read_one_at_a_time() {
        let mut read = BytesMut::from(
            &b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\nConnection: close\r\n\r\nGET"[..],
        );
        let Ok(Some(first)) = parse_request(&mut read, &mut Vec::new(), 1024) else {
            panic!()
        };
        assert_eq!(first.request.uri().path(), "/1");
        let Ok(Some(second)) = parse_request(&mut read, &mut Vec::new(), 1024) else {
            panic!()
        };
        assert_eq!(second.request.uri().path(), "/2");
        assert!(second.close);
        assert!(matches!(
            parse_request(&mut read, &mut Vec::new(), 1024),
            Ok(None)
        ));
        assert_eq!(&read[..], b"GET");
    }

    #[test]
    fn only_a_first_request_can_be_the_http2_preface() {
        assert_eq!(Protocol::of(b"PRI * HTTP/2", true), Protocol::Http2);
        assert_eq!(Protocol::of(H2_PREFACE, true), Protocol::Http2);
        assert_eq!(Protocol::of(H2_PREFACE, false), Protocol::Http1);
        assert_eq!(Protocol::of(b"POST / HTTP/1.1\r\n", true), Protocol::Http1);
    }

    #[test]
    fn a_closing_connection_says_close_in_place_of_its_own_connection_header() {
        let mut map = HeaderMap::new();
        map.insert(CONNECTION, HeaderValue::from_static("keep-alive"));
        map.insert(CONTENT_LENGTH, HeaderValue::from_static("7"));
        let mut out = Vec::new();
        let head = AnswerHead {
            status: StatusCode::NO_CONTENT,
            headers: &map,
            request_id: None,
        };
        let (framing, keep) = encode_head(&mut out, head, false, None, true);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 204 No Content\r\nconnection: close\r\ndate: "));
        assert!(!text.contains("keep-alive") && !text.contains("content-length"));
        assert_eq!(framing, Framing::None);
        assert!(keep, "the answer itself did not ask to close");
    }

    #[test]
    fn the_request_id_is_written_in_place_of_the_backends() {
        let mut map = HeaderMap::new();
        map.insert(X_REQUEST_ID, HeaderValue::from_static("from-the-backend"));
        map.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain"),
        );
        let id = HeaderValue::from_static("01234");
        let mut out = Vec::new();
        let head = AnswerHead {
            status: StatusCode::OK,
            headers: &map,
            request_id: Some(&id),
        };
        encode_head(&mut out, head, false, Some(2), false);
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains("from-the-backend"), "{text}");
        assert_eq!(text.matches("x-request-id: 01234\r\n").count(), 1, "{text}");
        assert!(text.starts_with("HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n"));
    }

    #[test]
    fn answers_are_framed_as_hyper_frames_them() {
        let (text, framing) = head_of(StatusCode::OK, &[("x-a", "1")], false, Some(13));
        assert_eq!(text, "HTTP/1.1 200 OK\nx-a: 1\ncontent-length: 13\n");
        assert_eq!(framing, Framing::Length(13));

        // The body's own length wins over a header; framing headers are ours.
        let (text, framing) = head_of(
            StatusCode::OK,
            &[("content-length", "99"), ("transfer-encoding", "chunked")],
            false,
            Some(5),
        );
        assert_eq!(text, "HTTP/1.1 200 OK\ncontent-length: 5\n");
        assert_eq!(framing, Framing::Length(5));

        // Unknown length: the header's, else chunked.
        let (_, framing) = head_of(StatusCode::OK, &[("content-length", "7")], false, None);
        assert_eq!(framing, Framing::Length(7));
        let (text, framing) = head_of(StatusCode::BAD_GATEWAY, &[], false, None);
        assert_eq!(
            text,
            "HTTP/1.1 502 Bad Gateway\ntransfer-encoding: chunked\n"
        );
        assert_eq!(framing, Framing::Chunked);

        // HEAD keeps the backend's length and sends no body.
        let (text, framing) = head_of(StatusCode::OK, &[("content-length", "42")], true, Some(0));
        assert_eq!(text, "HTTP/1.1 200 OK\ncontent-length: 42\n");
        assert_eq!(framing, Framing::None);
        let (text, _) = head_of(StatusCode::NOT_FOUND, &[], true, Some(30));
        assert_eq!(text, "HTTP/1.1 404 Not Found\ncontent-length: 30\n");
        let (text, framing) = head_of(StatusCode::NO_CONTENT, &[], false, Some(0));
        assert_eq!(text, "HTTP/1.1 204 No Content\n");
        assert_eq!(framing, Framing::None);
        let (text, framing) = head_of(StatusCode::NOT_MODIFIED, &[("etag", "\"e\"")], false, None);
        assert_eq!(text, "HTTP/1.1 304 Not Modified\netag: \"e\"\n");
        assert_eq!(framing, Framing::None);
    }
}
