//! A small example backend for the quickstart and the benchmark.
//!
//! `cargo run --example backend -- 127.0.0.1:3000 [--quiet]`
//!
//! - `GET /bench/small` answers 13 bytes and `GET /bench/16k` answers 16 KiB:
//!   fixed bodies, so the benchmark measures the proxy and not the backend.
//! - Every other request is echoed back as JSON (method, path, query, headers,
//!   body) and, unless `--quiet`, logged on stdout, so the quickstart can show a
//!   replayed request arriving with its `Idempotency-Key`.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

static SMALL: &[u8] = b"hello, world\n";
static LARGE: [u8; 16 * 1024] = [b'x'; 16 * 1024];

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut addr: SocketAddr = "127.0.0.1:3000".parse().expect("valid default address");
    let mut quiet = false;
    for arg in std::env::args().skip(1) {
        if arg == "--quiet" {
            quiet = true;
        } else {
            addr = arg.parse().map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{arg}: {e}"))
            })?;
        }
    }
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("backend listening on http://{}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(req, quiet));
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(req: Request<Incoming>, quiet: bool) -> Result<Response<Full<Bytes>>, Infallible> {
    match req.uri().path() {
        "/bench/small" => return Ok(Response::new(Full::new(Bytes::from_static(SMALL)))),
        "/bench/16k" => return Ok(Response::new(Full::new(Bytes::from_static(&LARGE)))),
        _ => {}
    }
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let echo = serde_json::json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
    });
    if !quiet {
        let key = parts
            .headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        println!(
            "{} {} idempotency-key={key} body={}",
            parts.method,
            parts.uri,
            String::from_utf8_lossy(&body)
        );
    }
    let mut response = Response::new(Full::new(Bytes::from(echo.to_string())));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}
