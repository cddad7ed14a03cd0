//! Listeners and connections: accept, optional TLS, HTTP/1.1 and HTTP/2
//! (h2c and ALPN), header limits and timeouts, idle keep-alive close, and
//! graceful shutdown (stop accepting, let in-flight requests finish).

mod h1;
mod h2_send;
mod reaper;
pub(crate) use reaper::InFlight;
mod rewind;
pub mod tls;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http_body::Body as _;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::body::{ClientBody, ClientIncoming, ResponseBody};
use crate::config::ServerConfig;
use crate::headers::ClientInfo;
use crate::pipeline::{self, Proxy};
use h2_send::{NotedBody, StreamExecutor};
pub use reaper::ConnTimeouts;
use reaper::{Closable, Ended, InFlightBody, Reaper, Registration};
use rewind::Rewind;

/// Connection settings taken from `[server]` at start.
#[derive(Clone)]
pub struct ConnSettings {
    pub max_header_bytes: usize,
    pub timeouts: ConnTimeouts,
}

impl ConnSettings {
    pub fn from_config(server: &ServerConfig) -> Self {
        ConnSettings {
            max_header_bytes: server.max_header_bytes,
            timeouts: ConnTimeouts {
                idle: server.idle_timeout,
                header_read: server.header_read_timeout,
                send: server.send_timeout,
            },
        }
    }
}

/// Accepts connections until `shutdown` is cancelled. Connections are
/// tracked by `tracker` so the caller can wait for them to drain.
/// Failed accepts in a row (out of file descriptors, as nginx meets them:
/// `accept4() failed (24: Too many open files)`): each waits twice as long
/// as the last, from 10 ms up to 500 ms (nginx stops accepting for 500 ms),
/// and a spell of them is logged once every 5 s, not 20 times a second.
#[derive(Default)]
struct AcceptFailures {
    in_a_row: u32,
    logged: Option<std::time::Instant>,
}

impl AcceptFailures {
    fn failed(&mut self, error: &std::io::Error) -> Duration {
        self.in_a_row = self.in_a_row.saturating_add(1);
        if self
            .logged
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(5))
        {
            self.logged = Some(std::time::Instant::now());
            tracing::warn!(%error, in_a_row = self.in_a_row, "accept failed (out of file descriptors? raise LimitNOFILE / ulimit -n); logged every 5 s at most");
        }
        let exponent = self.in_a_row.min(7) - 1;
        Duration::from_millis(10 << exponent).min(Duration::from_millis(500))
    }

    /// An accept worked. The log's 5 s stay: at the limit, every freed
    /// descriptor lets one accept through before the next fails.
    fn ended(&mut self) {
        if self.in_a_row > 0 {
            tracing::debug!(failed = self.in_a_row, "accepting connections again");
            self.in_a_row = 0;
        }
    }
}

pub async fn serve_proxy(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    settings: ConnSettings,
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let builders = Arc::new(Builders::new(&settings));
    let reaper = Reaper::new(settings.timeouts);
    tokio::spawn(reaper.clone().run(shutdown.clone()));
    let mut accept_failures = AcceptFailures::default();
    loop {
        let (stream, addr) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => {
                    accept_failures.ended();
                    a
                }
                // A connection the client gave up before it was accepted.
                Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset) => continue,
                Err(e) => {
                    // Out of file descriptors and the like: wait, don't spin.
                    let pause = accept_failures.failed(&e);
                    tokio::time::sleep(pause).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let conn = Connection {
            proxy: proxy.clone(),
            builders: builders.clone(),
            reaper: reaper.clone(),
            addr,
            max_head: settings.max_header_bytes,
        };
        let tls = tls.clone();
        let handshake_timeout = settings.timeouts.header_read;
        tracker.spawn(async move {
            match tls {
                None => conn.serve(stream, "http").await,
                // Boxed: a TLS connection's state (the handshake, then
                // rustls's) inline would make every connection's task that
                // much larger, plain ones included.
                Some(acceptor) => {
                    Box::pin(serve_tls(conn, stream, acceptor, handshake_timeout)).await
                }
            }
        });
    }
}

/// A connection on the TLS listener: the handshake, by `timeout`, then HTTP.
async fn serve_tls(
    conn: Connection,
    stream: tokio::net::TcpStream,
    acceptor: TlsAcceptor,
    timeout: Duration,
) {
    let addr = conn.addr;
    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls_stream)) => conn.serve(tls_stream, "https").await,
        Ok(Err(e)) => tracing::debug!(client = %addr, error = %e, "TLS handshake failed"),
        Err(_) => tracing::debug!(client = %addr, "TLS handshake timed out"),
    }
}

/// hyper's server for connections that the own HTTP/1 side hands over, one
/// builder per protocol: the own side has already told which it is.
struct Builders {
    http1: auto::Builder<StreamExecutor>,
    http2: auto::Builder<StreamExecutor>,
}

impl Builders {
    fn new(settings: &ConnSettings) -> Builders {
        let both = http_builder(settings);
        Builders {
            http1: both.clone().http1_only(),
            http2: both.http2_only(),
        }
    }
}

fn http_builder(settings: &ConnSettings) -> auto::Builder<StreamExecutor> {
    let mut builder = auto::Builder::new(StreamExecutor {
        send_timeout: settings.timeouts.send,
    });
    builder
        .http1()
        .timer(TokioTimer::new())
        // The reaper enforces `header_read_timeout` (see server/reaper.rs):
        // hyper's would arm a timer for every request.
        .header_read_timeout(None::<Duration>)
        .max_buf_size(settings.max_header_bytes)
        // An HTTP/1 client that closes its side while its request is in
        // flight does not cancel the request: it runs its course upstream
        // (a request the proxy took is not dropped halfway; HAProxy's
        // default too), and a half-closed client still gets its answer.
        // (An HTTP/2 client's RST_STREAM still cancels its request.) Without
        // it hyper also watches for that close during every request, and
        // to do so takes a new read buffer (8 KiB) per request while the
        // request still holds the old one: about 950 instructions per
        // request (callgrind).
        .half_close(true)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(settings.max_header_bytes as u32)
        .keep_alive_interval(Some(h2_ping_interval(settings.timeouts.idle)));
    builder
}

/// How long an HTTP/2 client may be silent before hyper pings it (and closes
/// the connection if no answer comes): only a silent connection with a
/// request in flight is pinged (the reaper closes one without streams after
/// `idle_timeout`, whatever frames it exchanges).
fn h2_ping_interval(idle_timeout: Duration) -> Duration {
    (idle_timeout * 2).max(Duration::from_secs(30))
}

struct Connection {
    proxy: Arc<Proxy>,
    builders: Arc<Builders>,
    reaper: Reaper,
    addr: SocketAddr,
    max_head: usize,
}

impl Connection {
    async fn serve<S>(self, stream: S, proto: &'static str)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        // Registered once the connection is ready for HTTP (after any TLS
        // handshake, which has its own limit), so the handshake's time does
        // not count as idle.
        let registration = self.reaper.register();
        let io = registration.io(stream);
        let client = Arc::new(ClientInfo::new(self.addr, proto));
        // HTTP/1.1 requests without a body are served by Backstop's own
        // side (server/h1.rs) until the first request that is not. In a
        // block, so its state is gone (and its room reused) when hyper's
        // begins.
        let (io, read, protocol) = {
            // Pinned where it is built (`tokio::pin!` would move it into a
            // second slot of the task, as large).
            let own = std::pin::pin!(h1::serve(
                io,
                h1::Serving {
                    proxy: self.proxy.clone(),
                    client: client.clone(),
                    state: registration.state().clone(),
                    max_head: self.max_head,
                },
            ));
            match registration.serve(own).await {
                Ended::Done(h1::Outcome::HandOver(io, read, protocol)) => (io, read, protocol),
                Ended::Done(h1::Outcome::Closed(result)) => {
                    if let Err(e) = result {
                        tracing::debug!(client = %self.addr, error = %e, "connection ended with an error");
                    }
                    return;
                }
                Ended::HeadTimeout => {
                    tracing::debug!(client = %self.addr, "request head not complete in time; closed");
                    return;
                }
                Ended::SendTimeout => {
                    send_timed_out(self.addr);
                    return;
                }
            }
        };
        // Boxed: hyper's connection (a request with a body, HTTP/2) is the
        // rarer way, and its state inline made every connection's task
        // about 9.6 KiB, kept for as long as the connection is open.
        Box::pin(self.serve_hyper(
            registration,
            TokioIo::new(Rewind::new(io, read)),
            protocol,
            client,
        ))
        .await;
    }

    /// The rest of a connection handed over to hyper's server.
    async fn serve_hyper<I>(
        self,
        registration: Registration,
        io: TokioIo<I>,
        protocol: h1::Protocol,
        client: Arc<ClientInfo>,
    ) where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let proxy = self.proxy;
        let marks = registration.state().clone();
        // An HTTP/1 body answered unread is drained before its connection
        // closes (see `ClientIncoming`).
        let http1 = matches!(protocol, h1::Protocol::Http1);
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let proxy = proxy.clone();
            let client = client.clone();
            let in_flight = marks.request_started();
            // HTTP/1.0 has no `100 Continue`: its body comes anyway.
            let expects_continue = http1
                && req.version() == http::Version::HTTP_11
                && !req.body().is_end_stream()
                && expects_continue(req.headers());
            let req = req.map(|body| {
                let linger = (http1 && !body.is_end_stream()).then(|| marks.request_started());
                Some(ClientIncoming::new(body, linger, expects_continue))
            });
            let handling = handling(proxy, req, client);
            async move {
                let response = handling.await;
                // An HTTP/2 stream's answer notes its frames for the
                // stream's send timeout (`h2_send.rs`).
                let noted = |body| NotedBody::new(InFlightBody::new(body, in_flight));
                Ok::<_, Infallible>(response.map(noted))
            }
        });
        let builder = match protocol {
            h1::Protocol::Http1 => &self.builders.http1,
            h1::Protocol::Http2 => &self.builders.http2,
        };
        let conn = builder.serve_connection(io, service);
        tokio::pin!(conn);
        match registration.serve(conn).await {
            Ended::Done(Ok(())) => {}
            Ended::Done(Err(e)) => {
                tracing::debug!(client = %self.addr, error = %e, "connection ended with an error")
            }
            Ended::HeadTimeout => {
                tracing::debug!(client = %self.addr, "request head or graceful close not complete in time; closed")
            }
            Ended::SendTimeout => send_timed_out(self.addr),
        }
    }
}

/// Whether a request asks for `100 Continue` before it sends its body.
fn expects_continue(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

fn send_timed_out(client: SocketAddr) {
    tracing::info!(%client, "the client took nothing of its answer for send_timeout; closed");
}

impl<I, S, E> Closable for auto::Connection<'_, I, S, E>
where
    Self: Future,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    S: hyper::service::HttpService<Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResBody: hyper::body::Body + 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, S::ResBody>,
{
    fn close_gracefully(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// One request through the pipeline, its future boxed, for hyper's side: a
/// connection keeps room for the request future it runs, idle or not, and
/// the pipeline's (≈ 5.9 KiB) would cost that much per idle keep-alive
/// connection. (The own HTTP/1 side boxes the pipeline together with the
/// writing of its answer: `h1::answer`.) Written
/// straight into its box (`Box::write`): `Box::pin(f)` builds the future on
/// the stack and copies all of it over.
fn handling(
    proxy: Arc<Proxy>,
    request: Request<ClientBody>,
    client: Arc<ClientInfo>,
) -> Pin<Box<impl Future<Output = Response<ResponseBody>>>> {
    Box::into_pin(Box::write(Box::new_uninit(), async move {
        pipeline::handle(&proxy, Box::new(request), &client)
            .await
            .into_response()
    }))
}

/// Binds a listener, with a clear error naming the address.
pub async fn bind(addr: SocketAddr, what: &str) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket
        .bind(addr)
        .and_then(|()| socket.listen(1024))
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot listen on {addr} for the {what}: {e}"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http2_pings_wait_past_the_idle_close() {
        for secs in [1, 10, 60, 300] {
            let idle = Duration::from_secs(secs);
            // The reaper closes an idle connection by 1.25 × idle_timeout.
            assert!(h2_ping_interval(idle) > idle * 5 / 4, "{idle:?}");
        }
    }
}
