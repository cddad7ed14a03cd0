//! One HTTP/1.1 exchange on a pooled connection, run inside the request's
//! own future: the request head and its buffered body go out in one write,
//! the response head is parsed (`httparse`, as hyper does) and its body is
//! read by the body that goes back to the client, which returns the
//! connection to its idle list as soon as the last byte is in.
//!
//! Why by hand: hyper's client connection is a task of its own, fed through
//! a channel, with a oneshot back for the answer; every request crossed
//! those twice and woke two tasks, and its head went through a header map
//! twice (once filled by the pipeline, once encoded). This is the one part
//! of the upstream path that profiling showed costing more than the whole of
//! nginx's request handling, and no crate offers a client connection that
//! runs in the caller's future. It is used only where it is simple: plain
//! `http://` targets and request bodies already buffered (or empty) of at
//! most [`MAX_BODY`]. A larger body, or one that streams from the client,
//! goes over hyper's connection, which can take an answer while the body is
//! still being sent (`h1_pool`).

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::{HeaderMap, Method, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_util::io::poll_read_buf;

use crate::classify::Failure;
use crate::headers::{self, field_at, FieldAt, ProxySet};

/// Response header lines accepted at most.
const MAX_HEADERS: usize = 100;
/// Bytes of a response head accepted at most.
const MAX_HEAD_BYTES: usize = 256 * 1024;
/// Room made in the read buffer before reading a response head, at first
/// and at least: it doubles (up to `BODY_READ_MAX`) while reads fill it, so
/// a backend's usual answer comes in one read, and halves again when reads
/// use less than a quarter of it.
const HEAD_READ: usize = 16 * 1024;
/// Room made at most before reading more of a body.
const BODY_READ_MAX: usize = 64 * 1024;
/// The largest request body this exchange sends (copied behind its head,
/// written in one go). A larger one goes over hyper's connection, which
/// reads an early answer (a 413, a 401) while the body is still going out.
pub const MAX_BODY: usize = 16 * 1024;
/// How long before an exchange's deadline its connection's timer may be
/// left set (see `Conn::timer`): when it fires that early, it is moved on.
const TIMER_EARLY: std::time::Duration = std::time::Duration::from_secs(1);
/// A chunk-size line (with extensions) or a trailer line at most.
const MAX_LINE: usize = 8 * 1024;

/// One keep-alive connection to a backend, with what it has read but not
/// used yet. Always boxed (`Conn::new`), one allocation per connection: the
/// answer's body holds it and moves with the answer through every layer of
/// the request path, and the idle list moves it in and out; boxed, each move
/// copies a pointer instead of ~120 bytes (callgrind: 21.3k → 20.6k
/// instructions per proxied request, memcpy 2.15k → 1.84k).
pub struct Conn {
    io: TcpStream,
    read: BytesMut,
    write: Vec<u8>,
    /// Where the last response head's fields are (name and value, as byte
    /// ranges of the head), kept from one exchange to the next so an
    /// answer costs no allocation for them.
    fields: Vec<FieldAt>,
    /// The room to make for the next response head (see `HEAD_READ`).
    head_read: usize,
    /// The first sweep that found it idle (`None` until one has): its idle
    /// time counts from there, so a connection is closed after
    /// `idle_timeout` plus at most one sweep interval, and going idle costs
    /// no clock reading.
    idle_since: Option<Instant>,
    /// The attempt timeout's timer, kept from one exchange to the next:
    /// moving a registered timer's deadline later costs an atomic update,
    /// where a new timer per request is registered with the runtime's timer
    /// wheel and removed again (about 600 instructions per request).
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// A target's idle connections, most recently used last, and how many it
/// keeps.
pub struct IdleConns {
    #[expect(
        clippy::vec_box,
        reason = "a connection is boxed for life (see `Conn`)"
    )]
    conns: Mutex<Vec<Box<Conn>>>,
    max: usize,
}

impl IdleConns {
    pub fn new(max: usize) -> Self {
        IdleConns {
            conns: Mutex::default(),
            max,
        }
    }

    /// The most recently used connection that is still open, dropping
    /// closed ones on the way (expired ones are the sweeper's).
    pub fn checkout(&self) -> Option<Box<Conn>> {
        let mut idle = self.lock();
        while let Some(conn) = idle.pop() {
            if conn.is_open() {
                return Some(conn);
            }
        }
        None
    }

    /// Keeps `conn` for reuse, or closes it when `max` are kept already (a
    /// burst's extra connections go at once, not an idle timeout later).
    fn check_in(&self, mut conn: Box<Conn>) {
        conn.idle_since = None;
        let mut idle = self.lock();
        if idle.len() < self.max {
            idle.push(conn);
        }
        // Otherwise `conn` is dropped here, after the lock: closing a
        // socket is a system call.
    }

    /// Closes connections that the backend closed or that were idle too
    /// long, and starts the idle clock of those newly idle. One still idle
    /// a sweep later lets go of its buffers: a burst leaves many
    /// connections idle, each holding what its last answer needed (up to
    /// `BODY_READ_MAX` and more); one taken again makes them anew at the
    /// cost of an allocation. (Freed at the first sweep, a busy target's
    /// connections would lose theirs at every sweep.)
    pub fn sweep(&self, now: Instant, idle_timeout: Duration) {
        self.lock().retain_mut(|c| {
            let Some(since) = c.idle_since else {
                c.idle_since = Some(now);
                return c.is_open();
            };
            c.release_buffers();
            c.is_open() && now.duration_since(since) < idle_timeout
        });
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// The list stays usable after a panic elsewhere: it holds no invariant
    /// a half-done update could break.
    #[expect(
        clippy::vec_box,
        reason = "a connection is boxed for life (see `Conn`)"
    )]
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Box<Conn>>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Conn {
    pub fn new(io: TcpStream) -> Box<Conn> {
        Box::new(Conn {
            io,
            read: BytesMut::new(),
            write: Vec::new(),
            fields: Vec::new(),
            head_read: HEAD_READ,
            idle_since: None,
            timer: None,
        })
    }

    /// Lets go of the read and write buffers (an idle connection has read
    /// nothing ahead: one that had is closed rather than checked in).
    fn release_buffers(&mut self) {
        if self.read.is_empty() && self.read.capacity() > 0 {
            self.read = BytesMut::new();
        }
        if self.write.capacity() > 0 {
            self.write = Vec::new();
        }
        self.head_read = HEAD_READ;
    }

    /// The connection's timer, set to fire by `deadline`: a timer already
    /// set to fire at most [`TIMER_EARLY`] before it is kept as it is (the
    /// exchange moves it on when it fires early). Moving it for every
    /// request cost three locked instructions in tokio's timer entry, each
    /// draining the store buffer; now it moves about once per
    /// `TIMER_EARLY` on a busy connection.
    fn timer(&mut self, deadline: tokio::time::Instant) -> Pin<Box<tokio::time::Sleep>> {
        match self.timer.take() {
            Some(timer)
                if timer.deadline() <= deadline
                    && deadline.duration_since(timer.deadline()) <= TIMER_EARLY =>
            {
                timer
            }
            Some(mut timer) => {
                timer.as_mut().reset(deadline);
                timer
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        }
    }

    /// Open, and nothing unasked-for arrived while idle. The probe reads
    /// only when the reactor has seen the socket readable (a close or stray
    /// bytes); otherwise it costs no system call.
    fn is_open(&self) -> bool {
        self.read.is_empty()
            && matches!(self.io.try_read(&mut [0u8; 1]), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

/// The request line and headers of an exchange; the body is sent with them.
pub struct Head<'a> {
    pub method: &'a Method,
    /// The origin-form target: path and query.
    pub target: &'a str,
    pub headers: &'a HeaderMap,
    /// What the proxy sets on top of `headers` (`None`: they are complete).
    pub set: Option<&'a ProxySet>,
}

/// Why an exchange failed, and whether the connection had answered anything
/// (a reused connection that answered nothing was most likely closed by
/// the backend while it sat idle).
#[derive(Debug)]
pub struct Failed {
    pub failure: Failure,
    pub answered: bool,
}

impl Failed {
    fn before_answer() -> Failed {
        Failed {
            failure: Failure::Reset,
            answered: false,
        }
    }

    /// The backend answered, but not with an answer that can be passed on.
    fn invalid_answer() -> Failed {
        Failed {
            failure: Failure::InvalidResponse,
            answered: true,
        }
    }
}

/// Sends `head` and `body` on `conn` and reads the response head, by
/// `deadline` (the attempt's timeout). `host` is the target's `Host`, sent
/// unless `head.set` (or, without one, `head.headers`) names another. The
/// response's body reads the rest and gives the connection back to `idle`
/// when the answer allows reuse.
pub async fn exchange(
    mut conn: Box<Conn>,
    head: &Head<'_>,
    host: &HeaderValue,
    body: &Bytes,
    idle: &Arc<IdleConns>,
    deadline: tokio::time::Instant,
) -> Result<Response<ConnBody>, Failed> {
    let mut timer = conn.timer(deadline);
    let sent = {
        let io = send_and_read_head(&mut conn, head, host, body);
        let mut io = std::pin::pin!(io);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(result) = io.as_mut().poll(cx) {
                return Poll::Ready(Some(result));
            }
            // The timer may be set before the deadline (see `Conn::timer`).
            while timer.as_mut().poll(cx).is_ready() {
                if timer.deadline() >= deadline {
                    return Poll::Ready(None);
                }
                timer.as_mut().reset(deadline);
            }
            Poll::Pending
        })
        .await
    };
    let Some(sent) = sent else {
        // The connection is dropped: its answer may still come.
        return Err(Failed {
            failure: Failure::Timeout,
            answered: false,
        });
    };
    let (parsed, response_head) = sent?;
    // The timer goes on waking this request's task until it is polled
    // again; the connection outlives the request, so it wakes no one.
    // Unconstrained: a task out of its cooperative budget would get
    // `Pending` before the waker is replaced.
    let mut forget_waker = tokio::task::unconstrained(timer.as_mut());
    let _ = Pin::new(&mut forget_waker).poll(&mut Context::from_waker(std::task::Waker::noop()));
    conn.timer = Some(timer);
    respond(conn, &parsed, &response_head, head.method, idle)
}

/// Writes all of `bytes`. A request nearly always fits the socket's send
/// buffer, so it is first tried without waiting: one `try_write` skips the
/// write future and the runtime's cooperative-budget and readiness
/// bookkeeping that `write_all` pays even when the socket takes it all
/// (about 100 instructions per request, callgrind).
async fn write_all(io: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        match io.try_write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => io.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The exchange's reads and writes: the request out, the response head in
/// (1xx answers skipped).
async fn send_and_read_head(
    conn: &mut Conn,
    head: &Head<'_>,
    host: &HeaderValue,
    body: &Bytes,
) -> Result<(ParsedHead, Bytes), Failed> {
    encode_head(&mut conn.write, head, host, body.len());
    conn.write.extend_from_slice(body);
    let written = write_all(&conn.io, &conn.write).await;
    conn.write.clear();
    written.map_err(|e| {
        tracing::debug!(error = %e, "upstream write failed");
        Failed::before_answer()
    })?;
    // Whether an interim (1xx) answer came: the backend has the request.
    let mut interim = false;
    loop {
        if let Some(parsed) = parse_head(&conn.read, &mut conn.fields)? {
            let response_head = conn.read.split_to(parsed.len).freeze();
            if parsed.status.is_informational() {
                // 100 Continue and the like precede the real answer; 101
                // (an upgrade) is never asked for: upgrades are hop-by-hop
                // headers, removed before a request goes upstream.
                if parsed.status == StatusCode::SWITCHING_PROTOCOLS {
                    return Err(Failed::invalid_answer());
                }
                interim = true;
                continue;
            }
            return Ok((parsed, response_head));
        }
        if conn.read.len() >= MAX_HEAD_BYTES {
            tracing::debug!("upstream response head too large");
            return Err(Failed::invalid_answer());
        }
        conn.read.reserve(conn.head_read);
        let room = conn.read.capacity() - conn.read.len();
        let answered = interim || !conn.read.is_empty();
        match conn.io.read_buf(&mut conn.read).await {
            Ok(0) => {
                return Err(Failed {
                    failure: Failure::Reset,
                    answered,
                })
            }
            Ok(n) if n == room => conn.head_read = (conn.head_read * 2).min(BODY_READ_MAX),
            Ok(n) if n < conn.head_read / 4 => conn.head_read = (conn.head_read / 2).max(HEAD_READ),
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(error = %e, "upstream read failed");
                return Err(Failed {
                    failure: Failure::Reset,
                    answered,
                });
            }
        }
    }
}

/// `METHOD target HTTP/1.1`, the client's headers that the proxy's do not
/// replace, the proxy's (the framing ones replaced by the body's length),
/// `Host`, and the blank line.
fn encode_head(out: &mut Vec<u8>, head: &Head<'_>, host: &HeaderValue, body_len: usize) {
    out.extend_from_slice(head.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(head.target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut host = host;
    for (name, value) in head.headers {
        match head.set {
            Some(set) if set.covers(name) => continue,
            None if name == HOST => host = value,
            _ => write_field(out, name, value),
        }
    }
    if let Some(set) = head.set {
        host = set.host().unwrap_or(host);
        for (name, value) in set.each() {
            write_field(out, name, value);
        }
    }
    write_field(out, &HOST, host);
    // A body, or a method whose meaning implies one: say its length (as
    // hyper does; a GET without a body says nothing).
    if body_len > 0 || matches!(*head.method, Method::POST | Method::PUT | Method::PATCH) {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(itoa::Buffer::new().format(body_len).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// `name: value` and the line end; framing headers are left out (the
/// exchange writes the body's own length).
fn write_field(out: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    if name == CONTENT_LENGTH || name == TRANSFER_ENCODING {
        return;
    }
    headers::write_field(out, name.as_str().as_bytes(), value.as_bytes());
}

/// A parsed response head: its length and status line (its fields are
/// noted in the connection's `fields`).
struct ParsedHead {
    len: usize,
    status: StatusCode,
    version: Version,
}

/// Parses the head at the start of `buf`, noting where its fields are in
/// `fields`: `None` while it is incomplete.
fn parse_head(buf: &[u8], fields: &mut Vec<FieldAt>) -> Result<Option<ParsedHead>, Failed> {
    if buf.is_empty() {
        return Ok(None);
    }
    // Left uninitialised (as hyper does): filling the array first costs
    // more than parsing a small head.
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        buf,
        &mut headers,
    );
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => {
            tracing::debug!(error = %e, "upstream sent an invalid response head");
            return Err(Failed::invalid_answer());
        }
    };
    let status = response
        .code
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or_else(Failed::invalid_answer)?;
    let version = match response.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    fields.clear();
    fields.extend(
        response
            .headers
            .iter()
            .map(|h| field_at(buf, h.name.as_bytes(), h.value)),
    );
    Ok(Some(ParsedHead {
        len,
        status,
        version,
    }))
}

/// The response for a parsed head, with a body framed as the head says.
fn respond(
    conn: Box<Conn>,
    parsed: &ParsedHead,
    head: &Bytes,
    method: &Method,
    idle: &Arc<IdleConns>,
) -> Result<Response<ConnBody>, Failed> {
    // Room for the few the proxy adds (`X-Request-Id`, `X-Cache`, ...)
    // without growing the map.
    let mut headers = HeaderMap::with_capacity(conn.fields.len() + 4);
    // What framing and reuse depend on, noted on the way rather than looked
    // up in the map afterwards.
    let mut length = Length::Absent;
    let mut transfer_encoding: Option<HeaderValue> = None;
    let mut transfer_encoding_lines = 0;
    // More than one `Content-Length` number (`5, 5`, or two lines).
    let mut length_listed = false;
    let mut close = false;
    for &at in &conn.fields {
        let Some((name, value)) = headers::field_in(head, at) else {
            tracing::debug!("upstream sent an invalid header");
            return Err(Failed::invalid_answer());
        };
        if name == CONTENT_LENGTH {
            length_listed |= length != Length::Absent || value.as_bytes().contains(&b',');
            length = length.and(&value);
        } else if name == TRANSFER_ENCODING {
            transfer_encoding_lines += 1;
            transfer_encoding = Some(value.clone());
        } else if name == CONNECTION {
            // As bytes: a value that is not text (one odd byte beside
            // `close`) must not hide the close.
            close |= (value.as_bytes().split(|&b| b == b','))
                .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"));
        }
        headers.append(name, value);
    }
    // HTTP/1.0 has no transfer codings: such a message's framing is
    // faulty (RFC 9112 §6.1), as hyper's client holds too.
    if parsed.version == Version::HTTP_10 && transfer_encoding.is_some() {
        tracing::debug!("upstream sent Transfer-Encoding in an HTTP/1.0 answer");
        return Err(Failed::invalid_answer());
    }
    let framing = framing(
        parsed.status,
        method,
        length,
        transfer_encoding.as_ref(),
        transfer_encoding_lines,
    )?;
    // Both framings at once is how responses get desynchronised (RFC 9112
    // §6.3): the body is read by `Transfer-Encoding`, the connection not reused.
    let ambiguous = transfer_encoding.is_some() && length != Length::Absent;
    if ambiguous {
        // And the length goes: the client is sent the body as decoded, which
        // the stale length would cut short or make it wait for (§6.3: an
        // intermediary removes it).
        headers.remove(CONTENT_LENGTH);
    } else if let (true, Length::Is(n)) = (length_listed, length) {
        // Sent on as the one number (see `headers::one_content_length`).
        headers.insert(CONTENT_LENGTH, HeaderValue::from(n));
    }
    let reusable = parsed.version == Version::HTTP_11
        && !matches!(framing, Framing::UntilClose)
        && !close
        && !ambiguous;
    let mut body = ConnBody {
        conn: Some(conn),
        framing,
        idle: reusable.then(|| Arc::downgrade(idle)),
    };
    if body.framing == Framing::Length(0) {
        body.finish();
    }
    let mut response = Response::new(body);
    *response.status_mut() = parsed.status;
    // The backend's (the pool reads an HTTP/1.0 answer's version); the
    // client's side answers in its own.
    *response.version_mut() = parsed.version;
    *response.headers_mut() = headers;
    Ok(response)
}

/// The `Content-Length` lines of a head so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Length {
    Absent,
    Is(u64),
    /// Not a number, or lines that disagree: the answer cannot be framed.
    Invalid,
}

impl Length {
    /// With one more `Content-Length` line, which may itself list the same
    /// length several times (`5, 5`), as hyper accepts.
    fn and(self, line: &HeaderValue) -> Length {
        line.as_bytes()
            .split(|b| *b == b',')
            .fold(self, |sofar, item| {
                let parsed = headers::decimal(item);
                match (sofar, parsed) {
                    (Length::Absent, Some(n)) => Length::Is(n),
                    (Length::Is(before), Some(n)) if before == n => Length::Is(n),
                    _ => Length::Invalid,
                }
            })
    }
}

/// How the body's end is known (RFC 9112 §6.3).
fn framing(
    status: StatusCode,
    method: &Method,
    length: Length,
    transfer_encoding: Option<&HeaderValue>,
    transfer_encoding_lines: usize,
) -> Result<Framing, Failed> {
    if *method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Length(0));
    }
    if let Some(codings) = transfer_encoding {
        // Only `chunked` (see `headers::only_chunked`); the lines were
        // counted on the way, the last one kept.
        if transfer_encoding_lines > 1 || !headers::only_chunked(std::iter::once(codings)) {
            tracing::debug!(
                ?codings,
                "upstream sent a transfer coding other than chunked"
            );
            return Err(Failed::invalid_answer());
        }
        return Ok(Framing::Chunked(Chunk::Size));
    }
    match length {
        Length::Absent => Ok(Framing::UntilClose),
        Length::Is(n) => Ok(Framing::Length(n)),
        Length::Invalid => Err(Failed::invalid_answer()),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// This many bytes are left.
    Length(u64),
    Chunked(Chunk),
    /// The body ends when the backend closes the connection.
    UntilClose,
    /// All read; the connection went back to its list or was closed.
    Done,
}

/// Where a chunked body's decoder stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until a blank one (dropped).
    Trailers,
}

/// A response body read from its connection as the client takes it.
pub struct ConnBody {
    conn: Option<Box<Conn>>,
    framing: Framing,
    /// Where the connection goes once the body is read, if it may be
    /// reused and the pool is still there: a reload replaces the pools, and
    /// a connection checked into a dropped one's list would stay open,
    /// swept by no one, until the last body of its day ended.
    idle: Option<Weak<IdleConns>>,
}

impl ConnBody {
    /// The body is read: the connection goes back for reuse when nothing
    /// else arrived behind the answer, otherwise it is closed.
    fn finish(&mut self) {
        self.framing = Framing::Done;
        let idle = self.idle.take().and_then(|idle| idle.upgrade());
        if let (Some(conn), Some(idle)) = (self.conn.take(), idle) {
            if conn.read.is_empty() {
                idle.check_in(conn);
            }
        }
    }

    /// The body ends here, cleanly or not: the connection is closed, and
    /// `result` is what the client is given last.
    fn end(&mut self, result: Option<io::Error>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.framing = Framing::Done;
        self.conn = None;
        Poll::Ready(result.map(Err))
    }

    /// The next data from what is already read, or `None` when more must be
    /// read first. Moves the framing on; `finish`es at the end.
    fn next_data(&mut self) -> Result<Option<Frame<Bytes>>, io::Error> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Ok(None);
            };
            let buf = &mut conn.read;
            match self.framing {
                Framing::Done => return Ok(None),
                Framing::Length(left) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    let data = buf.split_to(n).freeze();
                    self.framing = Framing::Length(left - n as u64);
                    if left == n as u64 {
                        self.finish();
                    }
                    return Ok(Some(Frame::data(data)));
                }
                Framing::UntilClose => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    return Ok(Some(Frame::data(buf.split().freeze())));
                }
                Framing::Chunked(Chunk::Size) => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(None);
                    };
                    let size = chunk_size(&line)?;
                    self.framing = Framing::Chunked(if size == 0 {
                        Chunk::Trailers
                    } else {
                        Chunk::Data(size)
                    });
                }
                Framing::Chunked(Chunk::Data(left)) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    let data = buf.split_to(n).freeze();
                    let left = left - n as u64;
                    self.framing = Framing::Chunked(if left == 0 {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left)
                    });
                    return Ok(Some(Frame::data(data)));
                }
                Framing::Chunked(Chunk::DataEnd) => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(None);
                    };
                    if !line.is_empty() {
                        return Err(invalid("chunk data longer than its size"));
                    }
                    self.framing = Framing::Chunked(Chunk::Size);
                }
                Framing::Chunked(Chunk::Trailers) => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(None);
                    };
                    if line.is_empty() {
                        self.finish();
                        return Ok(None);
                    }
                }
            }
        }
    }
}

impl Drop for ConnBody {
    /// A body dropped unread (a failure status before a retry, a client
    /// gone) that is already read whole still gives its connection back:
    /// when its length says exactly what is buffered. (A chunked one is
    /// left to close: decoding it here made `next_data` a function of its
    /// own, called, where inlined into `poll_frame` it costs ~75
    /// instructions less per request.)
    fn drop(&mut self) {
        let Framing::Length(left) = self.framing else {
            return;
        };
        let Some(conn) = self.conn.as_mut().filter(|_| self.idle.is_some()) else {
            return;
        };
        if conn.read.len() as u64 == left {
            conn.read.clear();
            self.finish();
        }
    }
}

impl Body for ConnBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        loop {
            match this.next_data() {
                Ok(Some(frame)) => return Poll::Ready(Some(Ok(frame))),
                Ok(None) => {}
                Err(e) => return this.end(Some(e)),
            }
            let want = match this.framing {
                Framing::Length(left) | Framing::Chunked(Chunk::Data(left)) => {
                    usize::try_from(left).unwrap_or(usize::MAX)
                }
                _ => HEAD_READ,
            };
            // Every end (`finish`, `end`) lets go of the connection.
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            conn.read.reserve(want.clamp(HEAD_READ, BODY_READ_MAX));
            match ready!(poll_read_buf(Pin::new(&mut conn.io), cx, &mut conn.read)) {
                Ok(0) if this.framing == Framing::UntilClose => return this.end(None),
                Ok(0) => {
                    return this.end(Some(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the backend closed the connection before the end of the body",
                    )))
                }
                Ok(_) => {}
                Err(e) => return this.end(Some(e)),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.framing, Framing::Done | Framing::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(left) => SizeHint::with_exact(left),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// Takes one line (without its CRLF or LF) off the front of `buf`; `None`
/// while the line is incomplete.
fn take_line(buf: &mut BytesMut) -> Result<Option<BytesMut>, io::Error> {
    let Some(end) = buf.iter().position(|&b| b == b'\n') else {
        if buf.len() > MAX_LINE {
            return Err(invalid("chunk line too long"));
        }
        return Ok(None);
    };
    let mut line = buf.split_to(end + 1);
    line.truncate(end);
    if line.last() == Some(&b'\r') {
        line.truncate(end - 1);
    }
    Ok(Some(line))
}

/// The size on a chunk-size line (hex, then optional `;extensions`).
fn chunk_size(line: &[u8]) -> Result<u64, io::Error> {
    // Hex digits, then optional whitespace before any extensions; nothing
    // else (no sign, no leading space).
    let size = line.split(|&b| b == b';').next().unwrap_or_default();
    let spaces = size
        .iter()
        .rev()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count();
    let digits = &size[..size.len() - spaces];
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_hexdigit) {
        return Err(invalid("invalid chunk size"));
    }
    let significant = &digits[digits.iter().take_while(|&&b| b == b'0').count()..];
    if significant.len() > 15 {
        return Err(invalid("chunk size too large"));
    }
    Ok(significant.iter().fold(0u64, |n, &b| {
        (n << 4) | u64::from((b as char).to_digit(16).unwrap_or(0))
    }))
}

fn invalid(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::headers::{ClientInfo, Forwarding};

    #[tokio::test]
    async fn a_connection_found_idle_by_a_sweep_lets_go_of_its_buffers() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let io = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let _accepted = listener.accept().await.unwrap();
        let mut conn = Conn::new(io);
        conn.read.reserve(BODY_READ_MAX);
        conn.write.reserve(MAX_BODY);
        conn.head_read = BODY_READ_MAX;
        let idle = IdleConns::new(8);
        idle.check_in(conn);
        let now = Instant::now();
        idle.sweep(now, Duration::from_secs(60));
        let conn = idle.checkout().expect("open");
        assert!(
            conn.read.capacity() >= BODY_READ_MAX,
            "kept over one sweep: it may be busy"
        );
        idle.check_in(conn);
        idle.sweep(now, Duration::from_secs(60));
        idle.sweep(now + Duration::from_secs(1), Duration::from_secs(60));
        let conn = idle.checkout().expect("still open and not idle too long");
        assert_eq!(conn.read.capacity(), 0);
        assert_eq!(conn.write.capacity(), 0);
        assert_eq!(conn.head_read, HEAD_READ);
    }

    #[tokio::test]
    async fn a_connection_coming_back_to_a_full_idle_list_is_closed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let idle = IdleConns::new(1);
        let mut accepted = Vec::new();
        for _ in 0..2 {
            let io = TcpStream::connect(addr).await.unwrap();
            accepted.push(listener.accept().await.unwrap().0);
            idle.check_in(Conn::new(io));
        }
        assert_eq!(idle.len(), 1);
        // The backend sees the second connection closed.
        let mut byte = [0u8; 1];
        let read = tokio::io::AsyncReadExt::read(&mut accepted[1], &mut byte);
        let eof = tokio::time::timeout(Duration::from_secs(5), read).await;
        assert_eq!(eof.unwrap().unwrap(), 0);
    }

    /// The headers of a written head, lowercased, sorted.
    fn written_fields(head: &Head<'_>, host: &HeaderValue) -> Vec<(String, String)> {
        let mut out = Vec::new();
        encode_head(&mut out, head, host, 0);
        let text = String::from_utf8(out).unwrap();
        let mut fields: Vec<(String, String)> = text
            .split("\r\n")
            .skip(1)
            .filter(|line| !line.is_empty())
            .map(|line| {
                let (name, value) = line.split_once(": ").unwrap();
                (name.to_ascii_lowercase(), value.to_string())
            })
            .collect();
        fields.sort();
        fields
    }

    /// The headers `apply_to` leaves in the map, with the Host the map
    /// ways send (the map's, else the target's), sorted.
    fn applied_fields(
        set: &ProxySet,
        client: &HeaderMap,
        target: &HeaderValue,
    ) -> Vec<(String, String)> {
        let mut map = client.clone();
        set.apply_to(&mut map);
        map.entry(HOST).or_insert_with(|| target.clone());
        let mut fields: Vec<(String, String)> = map
            .iter()
            .map(|(n, v)| (n.as_str().to_string(), v.to_str().unwrap().to_string()))
            .collect();
        fields.sort();
        fields
    }

    #[test]
    fn the_head_carries_what_the_map_ways_send() {
        let mut client = HeaderMap::new();
        for (name, value) in [
            ("host", "shop.example"),
            ("accept", "*/*"),
            ("x-forwarded-for", "10.0.0.1"),
            ("forwarded", "for=10.0.0.1"),
            ("x-request-id", "from-client"),
            ("tracestate", "orphan=1"),
            ("x-kept", "1"),
            ("x-kept", "2"),
        ] {
            client.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        let info = ClientInfo::new("127.0.0.1:5000".parse().unwrap(), "http");
        let host = HeaderValue::from_static("shop.example");
        let target = HeaderValue::from_static("10.1.1.1:8080");
        let route_sets: [&[(&'static str, &'static str)]; 4] = [
            // No host asked for: no `X-Forwarded-Host` on either way (the
            // client's does not pass for the proxy's).
            &[("x-no-host", "1")],
            &[],
            // The route's values win over the forwarding ones, and lose to
            // the request id and trace context; its Host is sent.
            &[
                ("x-forwarded-proto", "https"),
                ("x-request-id", "from-route"),
                ("host", "internal.example"),
                ("x-extra", "yes"),
            ],
            &[("traceparent", "nope"), ("x-forwarded-for", "hidden")],
        ];
        client.insert(
            HeaderName::from_static("x-forwarded-host"),
            HeaderValue::from_static("client.example"),
        );
        // From a peer that is not trusted, its claims stripped on arrival.
        let mut untrusted = client.clone();
        crate::headers::strip_client_claims(&mut untrusted);
        for (trusted, route) in [false, true]
            .into_iter()
            .flat_map(|t| route_sets.map(|r| (t, r)))
        {
            let client = if trusted { &client } else { &untrusted };
            let asked = (route.first() != Some(&("x-no-host", "1"))).then_some(&host);
            let set = ProxySet {
                forwarding: Forwarding::new(&info, asked).after_the_proxys(client),
                route: route
                    .iter()
                    .map(|(n, v)| (HeaderName::from_static(n), HeaderValue::from_static(v)))
                    .collect(),
                request_id: HeaderValue::from_static("rid-1"),
                traceparent: HeaderValue::from_static(
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                ),
                tracestate: None,
            };
            let head = Head {
                method: &Method::GET,
                target: "/",
                headers: client,
                set: Some(&set),
            };
            let written = written_fields(&head, &target);
            assert_eq!(
                written,
                applied_fields(&set, client, &target),
                "route {route:?}"
            );
            let get = |name: &str| -> Vec<&str> {
                written
                    .iter()
                    .filter(|(n, _)| n == name)
                    .map(|(_, v)| v.as_str())
                    .collect()
            };
            assert_eq!(get("x-request-id"), ["rid-1"]);
            assert!(
                get("tracestate").is_empty(),
                "a trace Backstop started drops it"
            );
            assert_eq!(get("x-kept"), ["1", "2"]);
            // A trusted peer's `X-Forwarded-Host` passes; anyone else's
            // never does, nor when no host was asked for.
            let forwarded_host: &[&str] = match (trusted, asked) {
                (true, _) => &["client.example"],
                (false, Some(_)) => &["shop.example"],
                (false, None) => &[],
            };
            assert_eq!(get("x-forwarded-host"), forwarded_host, "{trusted}");
            if route.is_empty() {
                assert_eq!(get("host"), ["10.1.1.1:8080"]);
                let (forwarded_for, forwarded) = if trusted {
                    (
                        "10.0.0.1, 127.0.0.1",
                        "for=10.0.0.1, for=127.0.0.1;proto=http;host=shop.example",
                    )
                } else {
                    ("127.0.0.1", "for=127.0.0.1;proto=http;host=shop.example")
                };
                assert_eq!(get("x-forwarded-for"), [forwarded_for]);
                assert_eq!(get("forwarded"), [forwarded]);
            }
        }
    }

    #[test]
    fn chunk_sizes_are_hex_digits_and_nothing_else() {
        let good: [(&[u8], u64); 6] = [
            (b"0", 0),
            (b"a", 10),
            (b"1F", 31),
            (b"5;name=value", 5),
            (b"5 ;ext", 5),
            (b"0000000000000000000010", 16),
        ];
        for (line, want) in good {
            assert_eq!(
                chunk_size(line).unwrap(),
                want,
                "{}",
                String::from_utf8_lossy(line)
            );
        }
        let bad: [&[u8]; 7] = [b"", b"+5", b" 5", b"5\r", b"x", b"-1", b"1000000000000000"];
        for line in bad {
            assert!(
                chunk_size(line).is_err(),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn chunked_is_the_only_transfer_coding_taken() {
        let of = |codings: &'static str| {
            let codings = HeaderValue::from_static(codings);
            framing(
                StatusCode::OK,
                &Method::GET,
                Length::Absent,
                Some(&codings),
                1,
            )
            .ok()
        };
        for taken in ["chunked", "Chunked", " chunked "] {
            assert_eq!(of(taken), Some(Framing::Chunked(Chunk::Size)), "{taken:?}");
        }
        for refused in ["gzip, chunked", "gzip", "chunked, chunked", "identity", ""] {
            assert_eq!(of(refused), None, "{refused:?}");
        }
        let chunked = HeaderValue::from_static("chunked");
        let twice = framing(
            StatusCode::OK,
            &Method::GET,
            Length::Absent,
            Some(&chunked),
            2,
        );
        assert!(twice.is_err(), "two lines are a list");
        let head = framing(
            StatusCode::OK,
            &Method::HEAD,
            Length::Absent,
            Some(&chunked),
            2,
        );
        assert_eq!(head.ok(), Some(Framing::Length(0)), "no body to frame");
    }

    #[test]
    fn content_lengths_must_agree() {
        let of = |lines: &[&'static str]| {
            lines.iter().fold(Length::Absent, |sofar, line| {
                sofar.and(&HeaderValue::from_static(line))
            })
        };
        assert_eq!(of(&["5"]), Length::Is(5));
        assert_eq!(of(&["5, 5"]), Length::Is(5));
        assert_eq!(of(&["5", "5"]), Length::Is(5));
        assert_eq!(of(&["5", "6"]), Length::Invalid);
        assert_eq!(of(&["5, 6"]), Length::Invalid);
        assert_eq!(of(&["-1"]), Length::Invalid);
        assert_eq!(of(&[""]), Length::Invalid);
        assert_eq!(of(&["+5"]), Length::Invalid);
    }
}
