//! A tiny HTTP forward proxy for tests: absolute-form requests are forwarded
//! (with `Via: <name>` added, so a backend can tell they came through), and
//! `CONNECT` opens a raw tunnel (503 when the target cannot be reached). It records what it saw, including the
//! `Proxy-Authorization` header. A locked one answers every request 407.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::harness::{bind_retrying, Stopped};

/// One request the proxy handled.
#[derive(Debug, Clone)]
pub struct ProxySeen {
    pub method: String,
    /// The request target: absolute URI, or `host:port` for CONNECT.
    pub target: String,
    pub proxy_authorization: Option<String>,
}

pub struct ForwardProxy {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<ProxySeen>>>,
    task: JoinHandle<()>,
}

type ProxyBody = BoxBody<Bytes, hyper::Error>;

impl ForwardProxy {
    pub async fn start(name: &'static str) -> ForwardProxy {
        ForwardProxy::start_with(name, false).await
    }

    /// A proxy that asks for credentials it never takes: 407 to everything.
    pub async fn locked(name: &'static str) -> ForwardProxy {
        ForwardProxy::start_with(name, true).await
    }

    /// A proxy where one was down until now.
    pub async fn start_at(name: &'static str, down: Stopped) -> ForwardProxy {
        let addr = down.addr;
        drop(down);
        ForwardProxy::start_on(name, false, bind_retrying(addr).await)
    }

    async fn start_with(name: &'static str, locked: bool) -> ForwardProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        ForwardProxy::start_on(name, locked, listener)
    }

    fn start_on(name: &'static str, locked: bool, listener: TcpListener) -> ForwardProxy {
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let client: Client<HttpConnector, Incoming> =
            Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let log = log.clone();
                let client = client.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let log = log.clone();
                        let client = client.clone();
                        async move {
                            let response = match locked {
                                true => refuse(req, &log),
                                false => handle(name, req, log, client).await,
                            };
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        ForwardProxy { addr, seen, task }
    }

    pub fn seen(&self) -> Vec<ProxySeen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn hits(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

impl Drop for ForwardProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn empty(status: u16) -> Response<ProxyBody> {
    let mut r = Response::new(Empty::new().map_err(|never| match never {}).boxed());
    *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
    r
}

fn refuse(mut req: Request<Incoming>, log: &Mutex<Vec<ProxySeen>>) -> Response<ProxyBody> {
    record(&mut req, log);
    let mut response = empty(407);
    response.headers_mut().insert(
        "proxy-authenticate",
        http::HeaderValue::from_static("Basic realm=\"test\""),
    );
    response
}

/// Logs `req`, taking its `Proxy-Authorization` out.
fn record(req: &mut Request<Incoming>, log: &Mutex<Vec<ProxySeen>>) {
    let auth = req
        .headers_mut()
        .remove("proxy-authorization")
        .map(|v| v.to_str().unwrap().to_string());
    log.lock().unwrap().push(ProxySeen {
        method: req.method().to_string(),
        target: req.uri().to_string(),
        proxy_authorization: auth,
    });
}

async fn handle(
    name: &'static str,
    mut req: Request<Incoming>,
    log: Arc<Mutex<Vec<ProxySeen>>>,
    client: Client<HttpConnector, Incoming>,
) -> Response<ProxyBody> {
    record(&mut req, &log);
    if req.method() == Method::CONNECT {
        let Some(target) = req.uri().authority().map(|a| a.to_string()) else {
            return empty(400);
        };
        // As Squid does: the target first, and 503 when it cannot be reached.
        let Ok(mut server) = TcpStream::connect(target).await else {
            return empty(503);
        };
        tokio::spawn(async move {
            let Ok(upgraded) = hyper::upgrade::on(req).await else {
                return;
            };
            let mut client = TokioIo::new(upgraded);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        });
        return empty(200);
    }
    if req.uri().scheme().is_none() {
        return empty(400);
    }
    req.headers_mut()
        .insert("via", http::HeaderValue::from_static(name));
    match client.request(req).await {
        Ok(response) => response.map(|b| b.boxed()),
        Err(_) => empty(502),
    }
}
