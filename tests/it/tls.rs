//! TLS: HTTPS upstreams verified against a route's CA file (and refused
//! without it), and the TLS listener with ALPN.

use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::harness::{error_of, Backend, Backstop, Reply};

/// A test CA and a leaf certificate for `localhost` and `127.0.0.1` it signed.
pub(crate) struct Pki {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

pub(crate) fn make_pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "Backstop Test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca_cert, &ca_key)
        .unwrap();
    Pki {
        ca_pem: ca_cert.pem(),
        cert_pem: leaf.pem(),
        key_pem: leaf_key.serialize_pem(),
    }
}

/// A backend's TLS acceptor for the leaf of `pki`; with `h2`, offering
/// HTTP/2 by ALPN beside HTTP/1.1.
pub(crate) fn acceptor(pki: &Pki, h2: bool) -> tokio_rustls::TlsAcceptor {
    let certs = vec![CertificateDer::from_pem_slice(pki.cert_pem.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(pki.key_pem.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    if h2 {
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    }
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

#[tokio::test]
async fn https_upstream_is_trusted_with_the_route_ca_and_refused_without() {
    let pki = make_pki();
    let backend = Backend::start_tls(acceptor(&pki, true), |_| Reply::ok("secure")).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, &pki.ca_pem).unwrap();
    let upstream = format!("https://localhost:{}", backend.addr.port());
    let toml = format!(
        "[[routes]]\nname = \"private\"\npath_prefix = \"/private\"\nupstreams = [{upstream:?}]\ntls_ca_file = {ca_path:?}\n\
         [[routes]]\nname = \"public\"\npath_prefix = \"/public\"\nupstreams = [{upstream:?}]\n[routes.retry]\nmax_attempts = 1\n"
    );
    let bs = Backstop::start(&toml);
    let c = crate::harness::client();
    let r = c.get(bs.url("/private/x")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "secure");
    assert_eq!(
        backend.seen()[0].version,
        http::Version::HTTP_2,
        "ALPN chose h2 upstream"
    );

    let (status, code, _) = error_of(c.get(bs.url("/public/x")).send().await.unwrap()).await;
    assert_eq!((status, code.as_str()), (502, "upstream_unreachable"));
    assert_eq!(backend.hits(), 1, "the unverified upstream got nothing");
}

/// `upstream_h2c` is about `http://` targets: an `https://` target of the
/// same route still negotiates by ALPN, and one that speaks only HTTP/1.1
/// is answered over HTTP/1.1 (not sent the HTTP/2 preface).
#[tokio::test]
async fn an_h2c_routes_https_target_negotiates_by_alpn() {
    let pki = make_pki();
    let http1_only = Backend::start_tls(acceptor(&pki, false), |_| Reply::ok("tls 1.1")).await;
    let h2c = Backend::start(|_| Reply::ok("h2c")).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, &pki.ca_pem).unwrap();
    let tls = format!("https://localhost:{}", http1_only.addr.port());
    let toml = format!(
        "[[routes]]\nname = \"mixed\"\npath_prefix = \"/\"\nupstreams = [{tls:?}, {:?}]\n\
         upstream_h2c = true\ntls_ca_file = {ca_path:?}\n[routes.retry]\nmax_attempts = 1\n",
        h2c.url()
    );
    let bs = Backstop::start(&toml);
    let c = crate::harness::client();
    let mut bodies = Vec::new();
    for _ in 0..2 {
        let r = c.get(bs.url("/x")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        bodies.push(r.text().await.unwrap());
    }
    bodies.sort();
    assert_eq!(bodies, ["h2c", "tls 1.1"]);
    assert_eq!(http1_only.seen()[0].version, http::Version::HTTP_11);
    assert_eq!(h2c.seen()[0].version, http::Version::HTTP_2);
}

/// A route's `Host` reaches an HTTP/2 backend as `:authority`, HTTP/2's
/// only name for it (a `host` field beside a different `:authority` is not
/// allowed), by ALPN over TLS and with `upstream_h2c`, and an HTTP/1.1 one
/// as `Host`; the connections still go to the targets, and TLS still
/// verifies the target's name.
#[tokio::test]
async fn a_routes_host_reaches_http2_backends_as_the_authority() {
    let pki = make_pki();
    let h2 = Backend::start_tls(acceptor(&pki, true), |_| Reply::ok("h2")).await;
    let http1_only = Backend::start_tls(acceptor(&pki, false), |_| Reply::ok("h1")).await;
    let h2c = Backend::start(|_| Reply::ok("h2c")).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, &pki.ca_pem).unwrap();
    let route = |name: &str, target: String, h2c: bool| {
        format!(
            "[[routes]]\nname = {name:?}\npath_prefix = \"/{name}\"\nupstreams = [{target:?}]\n\
             upstream_h2c = {h2c}\ntls_ca_file = {ca_path:?}\n\
             headers = {{ Host = \"api.example:8443\" }}\n[routes.retry]\nmax_attempts = 1\n"
        )
    };
    let toml = [
        route("h2", format!("https://localhost:{}", h2.addr.port()), false),
        route(
            "h1",
            format!("https://localhost:{}", http1_only.addr.port()),
            false,
        ),
        route("cleartext", h2c.url(), true),
    ]
    .concat();
    let bs = Backstop::start(&toml);
    let c = crate::harness::client();
    for (name, backend, scheme) in [("h2", &h2, "https"), ("cleartext", &h2c, "http")] {
        let r = c
            .get(bs.url(&format!("/{name}/x?q=1")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{name}");
        let seen = &backend.seen()[0];
        assert_eq!(seen.version, http::Version::HTTP_2, "{name}");
        assert_eq!(
            seen.uri,
            format!("{scheme}://api.example:8443/{name}/x?q=1")
        );
        assert!(
            seen.headers.get("host").is_none(),
            "{name}: {:?}",
            seen.headers
        );
    }
    let r = c.get(bs.url("/h1/x")).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "h1");
    let seen = &http1_only.seen()[0];
    assert_eq!(seen.version, http::Version::HTTP_11);
    assert_eq!(seen.headers["host"], "api.example:8443");
}

#[tokio::test]
async fn tls_listener_speaks_h2_and_http1_by_alpn() {
    let pki = make_pki();
    let backend = Backend::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, &pki.cert_pem).unwrap();
    std::fs::write(&key, &pki.key_pem).unwrap();
    let toml = format!(
        "[server]\ntls_cert = {cert:?}\ntls_key = {key:?}\n\n[[routes]]\nname = \"a\"\npath_prefix = \"/\"\nupstreams = [{:?}]\n",
        backend.url()
    );
    let bs = Backstop::start(&toml);
    assert_eq!(bs.scheme, "https");
    let ca = reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap();
    let url = format!("https://localhost:{}/x", bs.addr.port());
    for (h2, want) in [
        (true, reqwest::Version::HTTP_2),
        (false, reqwest::Version::HTTP_11),
    ] {
        let mut builder = reqwest::Client::builder()
            .no_proxy()
            .add_root_certificate(ca.clone());
        if !h2 {
            builder = builder.http1_only();
        }
        let r = builder
            .build()
            .unwrap()
            .post(&url)
            .body("tls body")
            .send()
            .await
            .unwrap();
        assert_eq!(r.version(), want);
        assert_eq!(r.text().await.unwrap(), "tls body");
    }
    assert_eq!(backend.seen()[0].headers["x-forwarded-proto"], "https");
}

/// A request captured from an HTTPS client is replayed saying so
/// (`X-Forwarded-Proto: https`) and naming the host it asked for, as its
/// first try did: a backend that builds links or redirects from them must
/// not answer a replay differently.
#[tokio::test]
async fn a_capture_made_over_tls_is_replayed_as_https() {
    let pki = make_pki();
    let down = Backend::echo().await.stop().await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, &pki.cert_pem).unwrap();
    std::fs::write(&key, &pki.key_pem).unwrap();
    let toml = format!(
        "[server]\ntls_cert = {cert:?}\ntls_key = {key:?}\n\n\
         [replay]\ninitial_delay = \"100ms\"\nmax_delay = \"200ms\"\n\n\
         [[routes]]\nname = \"a\"\npath_prefix = \"/\"\nupstreams = [\"http://{}\"]\n\
         [routes.retry]\nmax_attempts = 1\n",
        down.addr
    );
    let bs = Backstop::start(&toml);
    let ca = reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap();
    let client = reqwest::Client::builder()
        .no_proxy()
        .add_root_certificate(ca)
        .build()
        .unwrap();
    let host = format!("localhost:{}", bs.addr.port());
    let r = client
        .post(format!("https://{host}/orders"))
        .body("order")
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    let (status, code, _) = error_of(r).await;
    assert_eq!((status, code.as_str()), (503, "captured"));

    let backend = Backend::start_on(down, |_| Reply::status(201)).await;
    backend
        .wait_for_hits(1, std::time::Duration::from_secs(10))
        .await;
    let seen = &backend.seen()[0];
    assert_eq!(seen.body, "order");
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    assert_eq!(seen.headers["x-forwarded-host"], host.as_str());
}

/// A reload reads the listener's certificate again: a renewed one (same
/// file names) is served from the next handshake on, without a restart; a
/// key that does not match its certificate is refused and the one in use
/// stays.
#[tokio::test]
async fn a_reload_serves_the_renewed_listener_certificate() {
    let (old, renewed) = (make_pki(), make_pki());
    let backend = Backend::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, &old.cert_pem).unwrap();
    std::fs::write(&key, &old.key_pem).unwrap();
    let bs = Backstop::start(&format!(
        "[server]\ntls_cert = {cert:?}\ntls_key = {key:?}\n\n[[routes]]\nname = \"a\"\npath_prefix = \"/\"\nupstreams = [{:?}]\n",
        backend.url()
    ));
    let url = format!("https://localhost:{}/x", bs.addr.port());
    // A new client per request: a new connection, a new handshake.
    let trusting = |pki: &Pki| {
        let ca = reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap();
        let client = reqwest::Client::builder()
            .no_proxy()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .build()
            .unwrap();
        let url = url.clone();
        async move { client.get(url).send().await.map(|r| r.status().as_u16()) }
    };
    assert_eq!(trusting(&old).await.unwrap(), 200);
    assert!(trusting(&renewed).await.is_err());

    std::fs::write(&cert, &renewed.cert_pem).unwrap();
    std::fs::write(&key, &renewed.key_pem).unwrap();
    bs.signal("HUP");
    bs.wait_for_log("configuration reloaded", Duration::from_secs(5))
        .await;
    assert_eq!(trusting(&renewed).await.unwrap(), 200, "the renewed one");
    assert!(trusting(&old).await.is_err());

    // A key of another certificate: refused, the renewed one stays.
    std::fs::write(&key, &old.key_pem).unwrap();
    bs.signal("HUP");
    bs.wait_for_log("reload refused", Duration::from_secs(5))
        .await;
    assert!(
        bs.logs()
            .contains("server.tls_key: does not match the certificate"),
        "{}",
        bs.logs()
    );
    assert_eq!(trusting(&renewed).await.unwrap(), 200);
}
