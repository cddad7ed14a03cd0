//! The floor the benchmark compares Backstop with: the smallest reverse
//! proxy built on the same libraries (hyper-util's server on Tokio's
//! single-threaded runtime, as Backstop runs with `workers = 1`), with none
//! of Backstop's pipeline. The gap between this and Backstop is what
//! Backstop's own code costs; the gap between this and nginx is what the
//! libraries cost.
//!
//! Two upstream clients, to measure what the client costs:
//! - default: hyper-util's pooled legacy client, the one Backstop uses for
//!   https and h2c targets;
//! - `--own-pool`: a plain list of `hyper::client::conn::http1` senders to the
//!   one upstream (take the first ready one, put it back once the response
//!   head is in, open a connection when none is ready). HTTP/1.1 only, no
//!   timeouts, no idle expiry: the floor under Backstop's list of hyper
//!   connections (`src/upstream/h1_pool.rs`, for streaming request bodies).
//!   Backstop's own exchange (`src/upstream/h1_client.rs`, every GET) costs
//!   less than hyper's client, so for it this floor is not a floor.
//!
//! `cargo run --release --example bare_proxy -- LISTEN_ADDR UPSTREAM_ADDR [--own-pool]`

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

/// The same allocator as Backstop, so the two differ only in their code.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        return Err("usage: bare_proxy LISTEN_ADDR UPSTREAM_ADDR [--own-pool]".into());
    };
    let listen: SocketAddr = listen.parse()?;
    let upstream: SocketAddr = upstream.parse()?;
    let client = match args.next().as_deref() {
        None => Upstream::Legacy(Arc::new(legacy_client())),
        Some("--own-pool") => Upstream::OwnPool(Arc::default()),
        Some(other) => return Err(format!("unknown option {other:?}").into()),
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(serve(listen, upstream, client))
}

type Body = Either<Incoming, Empty<Bytes>>;

#[derive(Clone)]
enum Upstream {
    Legacy(Arc<Client<HttpConnector, Incoming>>),
    OwnPool(Arc<Mutex<Vec<SendRequest<Incoming>>>>),
}

fn legacy_client() -> Client<HttpConnector, Incoming> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(connector)
}

async fn serve(
    listen: SocketAddr,
    upstream: SocketAddr,
    client: Upstream,
) -> Result<(), Box<dyn std::error::Error>> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let client = client.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req| forward(client.clone(), upstream, req));
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn forward(
    client: Upstream,
    upstream: SocketAddr,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let response = match client {
        Upstream::Legacy(client) => {
            let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
            match format!("http://{upstream}{path}").parse() {
                Ok(uri) => *req.uri_mut() = uri,
                Err(_) => return Ok(bad_gateway()),
            }
            client.request(req).await.ok()
        }
        Upstream::OwnPool(pool) => send_pooled(&pool, upstream, req).await,
    };
    Ok(response.map_or_else(bad_gateway, |r| r.map(Either::Left)))
}

async fn send_pooled(
    pool: &Mutex<Vec<SendRequest<Incoming>>>,
    upstream: SocketAddr,
    req: Request<Incoming>,
) -> Option<Response<Incoming>> {
    let ready = {
        let mut senders = pool.lock().unwrap_or_else(|p| p.into_inner());
        senders.retain(|s| !s.is_closed());
        let index = senders.iter().position(SendRequest::is_ready);
        index.map(|i| senders.swap_remove(i))
    };
    let mut sender = match ready {
        Some(sender) => sender,
        None => {
            let stream = tokio::net::TcpStream::connect(upstream).await.ok()?;
            let _ = stream.set_nodelay(true);
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .ok()?;
            tokio::spawn(conn);
            sender
        }
    };
    let response = sender.send_request(req).await;
    // Back in the list at once: it turns ready again when the body is done.
    pool.lock().unwrap_or_else(|p| p.into_inner()).push(sender);
    response.ok()
}

fn bad_gateway() -> Response<Body> {
    let mut response = Response::new(Either::Right(Empty::new()));
    *response.status_mut() = StatusCode::BAD_GATEWAY;
    response
}
