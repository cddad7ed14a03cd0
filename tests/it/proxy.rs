//! Proxying: methods, bodies, queries, headers, HTTP/2, load balancing and
//! the proxy-made error answers.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use crate::harness::{
    client, error_of, h2_client, turn_gauge, Backend, Backstop, RawBackend, Reply,
};

fn route(name: &str, prefix: &str, upstreams: &[String], extra: &str) -> String {
    let list: Vec<String> = upstreams.iter().map(|u| format!("{u:?}")).collect();
    format!(
        "[[routes]]\nname = {name:?}\npath_prefix = {prefix:?}\nupstreams = [{}]\n{extra}\n",
        list.join(", ")
    )
}

#[tokio::test]
async fn get_post_put_with_bodies_queries_and_repeated_headers() {
    let backend = Backend::echo().await;
    let bs = Backstop::start(&route("api", "/api", &[backend.url()], ""));
    let c = client();

    let r = c
        .get(bs.url("/api/items?b=2&a=1&a=3"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for (method, body) in [("POST", "{\"name\":\"John\"}"), ("PUT", "replace me")] {
        let r = c
            .request(method.parse().unwrap(), bs.url("/api/items/7"))
            .header("x-multi", "one")
            .header("x-multi", "two")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), body);
    }
    let seen = backend.seen();
    assert_eq!(seen[0].method, "GET");
    assert_eq!(
        seen[0].uri, "/api/items?b=2&a=1&a=3",
        "query passed as sent"
    );
    assert_eq!(seen[1].method, "POST");
    assert_eq!(seen[2].method, "PUT");
    let multi: Vec<_> = seen[1].headers.get_all("x-multi").iter().collect();
    assert_eq!(multi, ["one", "two"], "repeated headers kept in order");
}

#[tokio::test]
async fn strips_prefix_sets_configured_and_forwarded_headers() {
    let backend = Backend::echo().await;
    let extra = "strip_prefix = true\nheaders = { \"X-Api-Key\" = \"k-123\" }";
    let bs = Backstop::start(&route(
        "ext",
        "/api/ext",
        &[format!("{}/v1", backend.url())],
        extra,
    ));
    let r = client()
        .get(bs.url("/api/ext/users/5"))
        .header("x-request-id", "req-abc")
        // The client's own claim: dropped (no proxy is trusted).
        .header("x-forwarded-for", "10.1.1.1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["x-request-id"],
        "req-abc",
        "request id returned"
    );
    let seen = &backend.seen()[0];
    assert_eq!(seen.uri, "/v1/users/5");
    assert_eq!(seen.headers["x-api-key"], "k-123");
    assert_eq!(seen.headers["x-request-id"], "req-abc");
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert_eq!(seen.headers["x-forwarded-host"], bs.addr.to_string());
    assert_eq!(
        seen.headers["host"],
        backend.addr.to_string(),
        "Host is the upstream's"
    );
    // The host has a port, so RFC 7239 wants it quoted.
    assert_eq!(
        seen.headers["forwarded"],
        format!("for=127.0.0.1;proto=http;host=\"{}\"", bs.addr).as_str()
    );
}

#[tokio::test]
async fn a_request_id_is_created_when_absent() {
    let backend = Backend::echo().await;
    let bs = Backstop::start(&route("api", "/", &[backend.url()], ""));
    let r = client().get(bs.url("/x")).send().await.unwrap();
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 36, "a UUID: {id}");
    assert_eq!(backend.seen()[0].headers["x-request-id"], id.as_str());
}

/// What a client says of itself (the forwarding headers and their kin)
/// when no proxy in front is trusted: nothing of it reaches the backend, on
/// either upstream way (a GET takes the own exchange, a POST with a body of
/// 20 KiB hyper's). A backend finds the client, scheme and host Backstop saw.
const CLIENT_CLAIMS: [(&str, &str); 9] = [
    ("x-forwarded-for", "203.0.113.9"),
    // Read as `X-Forwarded-Ssl` by servers that read `_` as `-`.
    ("x_forwarded_ssl", "on"),
    ("x-forwarded-proto", "https"),
    ("x-forwarded-host", "public.example"),
    (
        "forwarded",
        "for=203.0.113.9;host=public.example;proto=https",
    ),
    ("x-real-ip", "203.0.113.9"),
    ("x-forwarded-ssl", "on"),
    ("x-forwarded-port", "443"),
    ("x-forwarded-prefix", "/shop"),
];

/// Sends a GET, a 20 KiB POST and an HTTP/2 GET to `bs`, each with
/// [`CLIENT_CLAIMS`].
async fn send_claiming(bs: &Backstop) {
    let (c, h2) = (client(), h2_client());
    for (post, http2) in [(false, false), (true, false), (false, true)] {
        let mut request = if post {
            c.post(bs.url("/y")).body("x".repeat(20 * 1024))
        } else if http2 {
            h2.get(bs.url("/h2"))
        } else {
            c.get(bs.url("/x"))
        };
        for (name, value) in CLIENT_CLAIMS {
            request = request.header(name, value);
        }
        assert_eq!(request.send().await.unwrap().status(), 200);
    }
}

#[tokio::test]
async fn an_untrusted_clients_claims_about_itself_never_reach_the_backend() {
    let backend = Backend::echo().await;
    let bs = Backstop::start(&route("api", "/", &[backend.url()], ""));
    send_claiming(&bs).await;
    let seen = backend.seen();
    assert_eq!(seen.len(), 3);
    for seen in seen {
        let h = &seen.headers;
        assert_eq!(h["x-forwarded-for"], "127.0.0.1", "{}", seen.uri);
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], bs.addr.to_string().as_str());
        assert_eq!(
            h["forwarded"],
            format!("for=127.0.0.1;proto=http;host=\"{}\"", bs.addr).as_str()
        );
        for claim in [
            "x-real-ip",
            "x-forwarded-ssl",
            "x_forwarded_ssl",
            "x-forwarded-port",
            "x-forwarded-prefix",
        ] {
            assert!(!h.contains_key(claim), "{} kept {claim}", seen.uri);
        }
    }
}

/// A request whose only claim is one that Backstop never sets itself (and
/// spelled with `_`) has it removed too: the removal does not hang on the
/// forwarding headers being there.
#[tokio::test]
async fn a_lone_claim_is_removed_too() {
    let backend = Backend::echo().await;
    let bs = Backstop::start(&route("api", "/", &[backend.url()], ""));
    for claim in ["x_forwarded_ssl", "cf-connecting-ip", "X-Original-URL"] {
        let r = client()
            .get(bs.url("/x"))
            .header(claim, "1")
            .header("x-kept", "1")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let seen = backend.seen();
    assert_eq!(seen.len(), 3);
    for (seen, claim) in seen
        .iter()
        .zip(["x_forwarded_ssl", "cf-connecting-ip", "x-original-url"])
    {
        assert!(!seen.headers.contains_key(claim), "{claim} passed");
        assert_eq!(seen.headers["x-kept"], "1");
    }
}

/// From a trusted proxy (`server.trusted_proxies`) the same headers are its
/// word about the client: they pass, the lists get this hop appended, and
/// the client it names is the one the access log shows.
#[tokio::test]
async fn a_trusted_proxys_word_about_the_client_passes() {
    let backend = Backend::echo().await;
    let bs = Backstop::start(&format!(
        "[server]\ntrusted_proxies = [\"127.0.0.1\"]\n[log]\nformat = \"json\"\naccess_log = true\n\n{}",
        route("api", "/", &[backend.url()], "")
    ));
    send_claiming(&bs).await;
    let seen = backend.seen();
    assert_eq!(seen.len(), 3);
    for seen in seen {
        let h = &seen.headers;
        assert_eq!(h["x_forwarded_ssl"], "on");
        assert_eq!(
            h["x-forwarded-for"], "203.0.113.9, 127.0.0.1",
            "{}",
            seen.uri
        );
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "public.example");
        assert_eq!(
            h["forwarded"],
            format!(
                "for=203.0.113.9;host=public.example;proto=https, \
                 for=127.0.0.1;proto=http;host=\"{}\"",
                bs.addr
            )
            .as_str()
        );
        assert_eq!(h["x-real-ip"], "203.0.113.9");
        assert_eq!(h["x-forwarded-ssl"], "on");
        assert_eq!(h["x-forwarded-port"], "443");
        assert_eq!(h["x-forwarded-prefix"], "/shop");
    }
    bs.wait_for_log("\"client_ip\"", Duration::from_secs(5))
        .await;
    let logs = bs.logs();
    let line = logs.lines().find(|l| l.contains("\"client_ip\"")).unwrap();
    let v: serde_json::Value = serde_json::from_str(line).expect("JSON log line");
    assert_eq!(v["fields"]["client_ip"], "203.0.113.9", "{line}");
    assert!(
        v["fields"]["client"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "the connection's peer: {line}"
    );
    // A request refused before routing is logged with that client too.
    let refused = bs
        .raw(b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\nX-Forwarded-For: 198.51.100.7\r\nConnection: close\r\n\r\n")
        .await;
    assert!(refused.starts_with("HTTP/1.1 400"), "{refused}");
    bs.wait_for_log("198.51.100.7", Duration::from_secs(5))
        .await;
    let logs = bs.logs();
    let line = logs.lines().find(|l| l.contains("198.51.100.7")).unwrap();
    let v: serde_json::Value = serde_json::from_str(line).expect("JSON log line");
    assert_eq!(v["fields"]["client_ip"], "198.51.100.7", "{line}");
    assert_eq!(v["fields"]["status"], 400, "{line}");
}

/// A request without a host (HTTP/1.0 without `Host`) gets no
/// `X-Forwarded-Host`: the client's own does not pass for the proxy's, on
/// either upstream way (a GET takes the own exchange, a POST with a body
/// of 20 KiB hyper's).
#[tokio::test]
async fn a_client_x_forwarded_host_never_passes_for_the_proxys() {
    let backend = Backend::echo().await;
    let bs = Backstop::start(&route("api", "/", &[backend.url()], ""));
    let body = "x".repeat(20 * 1024);
    let get = "GET /x HTTP/1.0\r\nX-Forwarded-Host: evil.example\r\n\r\n".to_string();
    let post = format!(
        "POST /y HTTP/1.0\r\nX-Forwarded-Host: evil.example\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    for request in [get, post] {
        let answer = bs.raw(request.as_bytes()).await;
        assert!(
            answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200"),
            "{answer}"
        );
    }
    let seen = backend.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert!(
            !s.headers.contains_key("x-forwarded-host"),
            "{} kept it",
            s.uri
        );
        assert_eq!(s.headers["x-forwarded-for"], "127.0.0.1");
    }
}

/// The path is made canonical before routing: `/api/public/../admin`,
/// `/api/%61dmin` and `//api//admin` are `/api/admin`'s, by its route and
/// as the path its backend gets; a `..` that climbs above the root is
/// refused. `;` path parameters (`..;` too) do not take a path out of its
/// route.
/// With `merge_slashes = false`, repeated slashes stay.
#[tokio::test]
async fn paths_are_made_canonical_before_routing() {
    let public = Backend::echo().await;
    let admin = Backend::echo().await;
    let other = Backend::echo().await;
    let toml = format!(
        "{}{}{}",
        route("public", "/api/public", &[public.url()], ""),
        route("admin", "/api/admin", &[admin.url()], ""),
        route("other", "/", &[other.url()], "")
    );
    let bs = Backstop::start(&toml);
    for target in [
        "/api/public/../admin/x?q=1",
        "/api/public/%2e%2E/admin/x?q=1",
        "/api/%61dmin/x?q=1",
        "//api//admin///x?q=1",
        "/api/public/..//admin/x?q=1",
        "/api/public/..;/admin/x?q=1",
        "/api/;/admin/x?q=1",
        "/;x/api/public/;/../admin/x?q=1",
        "/api;a=1/admin;jsessionid=7/x?q=1",
    ] {
        let answer = get_closing(&bs, target).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{target}: {answer}");
    }
    assert_eq!((public.hits(), other.hits()), (0, 0));
    let seen: Vec<String> = admin.seen().iter().map(|s| s.uri.clone()).collect();
    let mut want = vec!["/api/admin/x?q=1"; 8];
    want.push("/api;a=1/admin;jsessionid=7/x?q=1");
    assert_eq!(seen, want);
    let answer = get_closing(&bs, "/api/../../etc/passwd").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("bad_request"), "{answer}");

    let kept = Backstop::start(&format!("[server]\nmerge_slashes = false\n{toml}"));
    let answer = get_closing(&kept, "//api//admin/x").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(other.seen()[0].uri, "//api//admin/x");
    assert_eq!(admin.hits(), 9);
}

/// A GET of `target` as it is, on a connection closed after the answer.
async fn get_closing(bs: &Backstop, target: &str) -> String {
    let request = format!("GET {target} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
    bs.raw(request.as_bytes()).await
}

/// An escaped slash cannot take a path out of its route (`/admin%2Fx`
/// past `/admin`'s): refused by default, as are a broken escape and an
/// escaped NUL; read as `/` with `escaped_slashes = "decode"`; routed and
/// sent as it is with `"keep"`. Other escapes are sent with upper-case hex
/// digits, and bytes beyond ASCII escaped.
#[tokio::test]
async fn escaped_slashes_are_refused_decoded_or_kept() {
    let admin = Backend::echo().await;
    let other = Backend::echo().await;
    let toml = format!(
        "{}{}",
        route("admin", "/admin", &[admin.url()], ""),
        route("other", "/", &[other.url()], "")
    );
    let refusing = Backstop::start(&toml);
    for (target, reason) in [
        ("/admin%2Fx", "escaped slash"),
        ("/admin%2fx", "escaped slash"),
        ("/admin%5Cx", "escaped slash"),
        ("/admin\\x", "escaped slash"),
        ("/public/..%2Fadmin", "escaped slash"),
        ("/admin%%32Fx", "two hex digits"),
        ("/a%zz", "two hex digits"),
        ("/admin%00.html", "escaped NUL"),
    ] {
        let answer = get_closing(&refusing, target).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{target}: {answer}");
        assert!(answer.contains("bad_request"), "{target}: {answer}");
        assert!(answer.contains(reason), "{target}: {answer}");
    }
    // Other escapes pass, upper-cased in the path, as they are in the
    // query; bytes beyond ASCII are escaped.
    for target in ["/admin/a%20b%3f?q=%2f", "/admin/caf\u{e9}"] {
        let answer = get_closing(&refusing, target).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{target}: {answer}");
    }
    assert_eq!((admin.hits(), other.hits()), (2, 0));

    let decoding = Backstop::start(&format!("[server]\nescaped_slashes = \"decode\"\n{toml}"));
    for target in [
        "/admin%2Fx?q=%2F",
        "/admin%5cx",
        "/admin\\x",
        "/public/..%2Fadmin/x",
    ] {
        let answer = get_closing(&decoding, target).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{target}: {answer}");
    }
    let seen: Vec<String> = admin.seen().iter().map(|s| s.uri.clone()).collect();
    assert_eq!(
        seen,
        [
            "/admin/a%20b%3F?q=%2f",
            "/admin/caf%C3%A9",
            "/admin/x?q=%2F",
            "/admin/x",
            "/admin/x",
            "/admin/x"
        ]
    );

    let keeping = Backstop::start(&format!("[server]\nescaped_slashes = \"keep\"\n{toml}"));
    let answer = get_closing(&keeping, "/admin%2Fx").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(other.seen()[0].uri, "/admin%2Fx");
    assert_eq!((admin.hits(), other.hits()), (6, 1));
}

/// Backstop's own headers come only from Backstop: a backend's
/// `X-Backstop-Capture-Id` would tell a client its request was queued, and
/// a client's `X-Backstop-Replay-Attempt` would tell a backend a live
/// request is a replay. Over HTTP/1.1 (Backstop's own exchange) and HTTP/2.
#[tokio::test]
async fn backstops_own_headers_come_only_from_backstop() {
    let backend = Backend::start(|_| {
        Reply::ok("done")
            .header("x-backstop-capture-id", "fake")
            .header("x-backstop-error", "captured")
    })
    .await;
    let bs = Backstop::start(&format!(
        "[[routes]]\nname = \"api\"\npath_prefix = \"/\"\nupstreams = [{:?}]\n",
        backend.url()
    ));
    for client in [client(), h2_client()] {
        let r = client
            .get(bs.url("/x"))
            .header("x-backstop-replay-attempt", "1")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let own: Vec<_> = r
            .headers()
            .keys()
            .filter(|name| name.as_str().starts_with("x-backstop-"))
            .collect();
        assert!(own.is_empty(), "{own:?}");
    }
    for seen in backend.seen() {
        assert!(!seen.headers.contains_key("x-backstop-replay-attempt"));
    }
    assert_eq!(backend.hits(), 2);
}

#[tokio::test]
async fn hop_by_hop_headers_are_removed_both_ways() {
    let backend = Backend::start(|_| {
        Reply::ok("hi")
            .header("connection", "x-backend-hop")
            .header("x-backend-hop", "secret")
            .header("keep-alive", "timeout=5")
            .header("proxy-authenticate", "Basic")
            .header("x-end-to-end", "yes")
    })
    .await;
    let bs = Backstop::start(&format!(
        "[server]\ntrusted_proxies = [\"127.0.0.1\"]\n{}",
        route("api", "/", &[backend.url()], "")
    ));
    let r = client()
        .get(bs.url("/x"))
        // What a trusted load balancer in front said of the client is not
        // the client's to name away.
        .header("connection", "x-client-hop, X-Forwarded-For, x-real-ip")
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-real-ip", "203.0.113.7")
        .header("x-client-hop", "1")
        .header("proxy-authorization", "Basic abc")
        .header("te", "trailers")
        .header("x-kept", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-end-to-end"], "yes");
    for h in ["x-backend-hop", "keep-alive", "proxy-authenticate"] {
        assert!(!r.headers().contains_key(h), "response kept {h}");
    }
    let seen = &backend.seen()[0];
    assert_eq!(seen.headers["x-kept"], "1");
    assert_eq!(seen.headers["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert_eq!(seen.headers["x-real-ip"], "203.0.113.7");
    for h in ["x-client-hop", "proxy-authorization", "te"] {
        assert!(!seen.headers.contains_key(h), "request kept {h}");
    }
}

#[tokio::test]
async fn forward_headers_false_and_list() {
    let backend = Backend::echo().await;
    let toml = format!(
        "{}{}",
        route("none", "/none", &[backend.url()], "forward_headers = false"),
        route(
            "some",
            "/some",
            &[backend.url()],
            "forward_headers = [\"X-Api-Key\"]"
        )
    );
    let bs = Backstop::start(&toml);
    for path in ["/none", "/some"] {
        client()
            .post(bs.url(path))
            .header("x-api-key", "k")
            .header("x-other", "o")
            .header("content-type", "text/plain")
            .body("b")
            .send()
            .await
            .unwrap();
    }
    let seen = backend.seen();
    assert!(!seen[0].headers.contains_key("x-api-key"));
    assert!(!seen[0].headers.contains_key("x-other"));
    assert_eq!(
        seen[0].headers["content-type"], "text/plain",
        "body headers always go"
    );
    assert_eq!(seen[1].headers["x-api-key"], "k");
    assert!(!seen[1].headers.contains_key("x-other"));
}

#[tokio::test]
async fn the_answer_carries_the_request_id_in_place_of_the_backends() {
    let backend = Backend::start(|_| Reply::ok("hi").header("x-request-id", "from-backend")).await;
    let bs = Backstop::start(&route("api", "/", &[backend.url()], ""));
    // A GET is the own HTTP/1 side's, a POST with a body hyper's, and so is
    // HTTP/2.
    let h1 = client().get(bs.url("/a")).header("x-request-id", "id-get");
    let h1_body = client()
        .post(bs.url("/b"))
        .header("x-request-id", "id-post")
        .body("x");
    let h2 = h2_client()
        .get(bs.url("/c"))
        .header("x-request-id", "id-h2");
    for (request, id) in [(h1, "id-get"), (h1_body, "id-post"), (h2, "id-h2")] {
        let r = request.send().await.unwrap();
        assert_eq!(r.status(), 200);
        let ids: Vec<_> = r.headers().get_all("x-request-id").iter().collect();
        assert_eq!(ids, [id], "{:?}", r.version());
    }
}

/// An HTTP/2 client's cookies, sent as a field each, reach an HTTP/1.1
/// backend as one `Cookie` line (RFC 9113 §8.2.3).
#[tokio::test]
async fn http2_cookie_fields_reach_an_http1_backend_as_one_line() {
    let backend = Backend::echo().await;
    let bs = Backstop::start(&route("api", "/", &[backend.url()], ""));
    let r = h2_client()
        .get(bs.url("/c"))
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    let seen = backend.seen();
    let cookies: Vec<_> = seen[0].headers.get_all("cookie").iter().collect();
    assert_eq!(cookies, ["a=1; b=2"]);
}

/// A GET whose body streams with no length given (chunked over HTTP/1.1,
/// DATA frames without `content-length` over HTTP/2) reaches the backend
/// with its body (a search API's GET), over either upstream protocol, read
/// whole and sent with its length.
#[tokio::test]
async fn a_get_with_a_streamed_body_of_unknown_length_keeps_its_body() {
    let backend = Backend::echo().await;
    let streamed = "[routes.retry]\nmax_attempts = 1\n[routes.capture]\nenabled = false";
    let toml = format!(
        "{}{}",
        route("h1", "/h1", &[backend.url()], streamed),
        route(
            "h2",
            "/h2",
            &[backend.url()],
            &format!("upstream_h2c = true\n{streamed}")
        )
    );
    let bs = Backstop::start(&toml);
    let query = r#"{"query":{"match_all":{}}}"#;
    let unknown_length = || {
        let chunks = [Ok::<_, std::io::Error>(bytes::Bytes::from(query))];
        reqwest::Body::wrap_stream(futures_util::stream::iter(chunks))
    };
    for (c, path) in [(client(), "/h1/_search"), (h2_client(), "/h2/_search")] {
        // hyper's client too needs to be told (it drops the body otherwise).
        let get = c.get(bs.url(path)).header("transfer-encoding", "chunked");
        let r = get.body(unknown_length()).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.text().await.unwrap(), query, "{path}");
    }
    // An HTTP/2 GET ended by an empty DATA frame has no body upstream.
    let empty = reqwest::Body::wrap_stream(futures_util::stream::iter(Vec::<
        Result<bytes::Bytes, std::io::Error>,
    >::new()));
    let r = h2_client()
        .get(bs.url("/h1/empty"))
        .body(empty)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = backend.seen();
    let bodies: Vec<_> = seen.iter().map(|s| s.body.clone()).collect();
    assert_eq!(bodies, [query.as_bytes(), query.as_bytes(), b"".as_slice()]);
    // Read whole, they go with their length, not chunked.
    for s in seen.iter().rev() {
        assert!(
            s.headers.get("transfer-encoding").is_none(),
            "{:?}",
            s.headers
        );
    }
    assert!(seen[2]
        .headers
        .get("content-length")
        .is_none_or(|v| v == "0"));
    let length = query.len().to_string();
    assert_eq!(seen[0].headers["content-length"], length.as_str());
}

#[tokio::test]
async fn http2_from_the_client_and_to_the_upstream() {
    let backend = Backend::echo().await;
    let toml = format!(
        "{}{}",
        route("h1", "/h1", &[backend.url()], ""),
        route("h2", "/h2", &[backend.url()], "upstream_h2c = true")
    );
    let bs = Backstop::start(&toml);
    let c = h2_client();
    for path in ["/h1/a", "/h2/b"] {
        let r = c
            .post(bs.url(path))
            .header("x-request-id", path)
            .body("over h2")
            .send()
            .await
            .unwrap();
        assert_eq!(r.version(), reqwest::Version::HTTP_2);
        assert_eq!(r.status(), 200);
        // Hyper's side returns the request id too (the own HTTP/1 side
        // writes it into the head itself).
        assert_eq!(r.headers()["x-request-id"], path);
        assert_eq!(r.text().await.unwrap(), "over h2");
    }
    let seen = backend.seen();
    assert_eq!(seen[0].version, http::Version::HTTP_11);
    assert_eq!(seen[1].version, http::Version::HTTP_2);
    assert_eq!(seen[1].headers["x-request-id"], "/h2/b");
}

/// gRPC through an h2c route: the client's `te: trailers` reaches the
/// backend (gRPC servers refuse a request without it), also with
/// `forward_headers = false`, and the backend's trailers (`grpc-status`)
/// reach the client after the body, but for Backstop's own. The client's
/// request trailers pass too, but for those no trailer may carry: a claim
/// about the client (which the headers were cleared of), framing, what
/// Backstop sets itself.
#[tokio::test]
async fn grpc_te_trailers_and_answer_trailers_pass_an_h2c_route() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let te_seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = te_seen.clone();
    let (trailers_seen, seen_trailers) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut connection = h2::server::handshake(tcp).await.unwrap();
        let mut trailers_seen = Some(trailers_seen);
        while let Some(Ok((request, mut respond))) = connection.accept().await {
            let te = request.headers().get("te").cloned();
            seen.lock().unwrap().push(te);
            let mut upload = request.into_body();
            let trailers_seen = trailers_seen.take();
            // The upload is read by a task of its own: its frames come in
            // only while the connection is polled (`accept`).
            tokio::spawn(async move {
                while let Some(chunk) = upload.data().await {
                    let chunk = chunk.unwrap();
                    upload.flow_control().release_capacity(chunk.len()).unwrap();
                }
                let trailers = upload.trailers().await.unwrap();
                if let Some(tx) = trailers_seen {
                    let _ = tx.send(trailers);
                }
            });
            let head = http::Response::builder()
                .header("content-type", "application/grpc")
                .body(())
                .unwrap();
            let mut stream = respond.send_response(head, false).unwrap();
            stream
                .send_data(bytes::Bytes::from_static(b"\0\0\0\0\x02hi"), false)
                .unwrap();
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
            // Only Backstop says what it did with a request.
            trailers.insert(
                "x-backstop-capture-id",
                http::HeaderValue::from_static("forged"),
            );
            stream.send_trailers(trailers).unwrap();
        }
    });
    let bs = Backstop::start(&route(
        "grpc",
        "/",
        &[format!("http://{backend}")],
        // The one TE goes on even when the client's headers do not. The
        // body streams (nothing to retry or capture), trailers and all.
        "upstream_h2c = true\nforward_headers = false\n\
         [routes.retry]\nmax_attempts = 1\n[routes.capture]\nenabled = false",
    ));
    let tcp = TcpStream::connect(bs.addr).await.unwrap();
    let (mut h2, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let request = http::Request::post(bs.url("/pkg.Greeter/SayHello"))
        .header("te", "trailers")
        .header("content-type", "application/grpc")
        .body(())
        .unwrap();
    let (answer, mut upload) = h2.send_request(request, false).unwrap();
    upload
        .send_data(bytes::Bytes::from_static(b"\0\0\0\0\x00"), false)
        .unwrap();
    let mut sent_trailers = http::HeaderMap::new();
    for (name, value) in [
        ("grpc-client-note", "kept"),
        ("x-forwarded-for", "6.6.6.6"),
        ("x_real_ip", "6.6.6.6"),
        ("forwarded", "for=6.6.6.6;proto=https"),
        ("x-request-id", "forged"),
    ] {
        sent_trailers.insert(name, http::HeaderValue::from_static(value));
    }
    upload.send_trailers(sent_trailers).unwrap();
    let answer = answer.await.unwrap();
    assert_eq!(answer.status(), 200);
    let mut body = answer.into_body();
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        body.flow_control().release_capacity(chunk.len()).unwrap();
        data.extend_from_slice(&chunk);
    }
    assert_eq!(data, b"\0\0\0\0\x02hi");
    let trailers = body
        .trailers()
        .await
        .unwrap()
        .expect("the backend's trailers");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers.len(), 1, "{trailers:?}");
    let te_seen = te_seen.lock().unwrap().clone();
    assert_eq!(te_seen, [Some(http::HeaderValue::from_static("trailers"))]);
    let trailers = seen_trailers
        .await
        .unwrap()
        .expect("the client's trailers reached the backend");
    let names: Vec<&str> = trailers.keys().map(|name| name.as_str()).collect();
    assert_eq!(names, ["grpc-client-note"], "{trailers:?}");
}

#[tokio::test]
async fn round_robin_and_skipping_a_target_that_refuses() {
    let a = Backend::echo().await;
    let b = Backend::echo().await;
    let dead = Backend::echo().await.stop().await;
    let extra = "[routes.retry]\nmax_attempts = 2\ninitial_delay = \"10ms\"";
    let bs = Backstop::start(&route(
        "lb",
        "/",
        &[a.url(), b.url(), format!("http://{dead}")],
        extra,
    ));
    let c = client();
    for _ in 0..12 {
        let r = c.get(bs.url("/x")).send().await.unwrap();
        assert_eq!(r.status(), 200, "a refused target is retried elsewhere");
    }
    assert_eq!(a.hits() + b.hits(), 12);
    assert!(
        a.hits() >= 3 && b.hits() >= 3,
        "each live target gets its share: a={} b={}",
        a.hits(),
        b.hits()
    );
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_reused() {
    let backend = Backend::start(|seen| match seen.uri.starts_with("/slow") {
        true => Reply::ok("slow").delay(Duration::from_millis(300)),
        false => Reply::ok("fast"),
    })
    .await;
    let bs = Backstop::start(&route("api", "/", &[backend.url()], ""));
    let c = client();
    let peers = |from: usize| -> HashSet<SocketAddr> {
        backend.seen()[from..].iter().map(|s| s.peer).collect()
    };

    for _ in 0..20 {
        let r = c.get(bs.url("/one")).send().await.unwrap();
        assert_eq!(r.text().await.unwrap(), "fast");
    }
    assert_eq!(
        peers(0).len(),
        1,
        "sequential requests share one connection"
    );

    let concurrent = (0..8).map(|_| async {
        let r = c.get(bs.url("/slow")).send().await.unwrap();
        assert_eq!(r.text().await.unwrap(), "slow");
    });
    futures_util::future::join_all(concurrent).await;
    let busy = peers(20);
    assert_eq!(
        busy.len(),
        8,
        "each concurrent request has its own connection"
    );

    for _ in 0..20 {
        let r = c.get(bs.url("/two")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let after = peers(28);
    assert!(
        after.is_subset(&peers(0)),
        "no new connection once enough are open: {after:?}"
    );
}

/// A backend that closes connections idle for 100 ms without saying
/// `Connection: close` first (as servers with a short keep-alive timeout do).
#[tokio::test]
async fn a_backend_closing_idle_connections_costs_no_request() {
    let backend = RawBackend::start(Some(Duration::from_millis(100))).await;
    let bs = Backstop::start(&route("api", "/", &[backend.url()], ""));
    let c = client();
    for i in 0..5 {
        let r = c.get(bs.url("/x")).send().await.unwrap();
        assert_eq!(r.status(), 200, "request {i}");
        assert_eq!(r.text().await.unwrap(), "ok");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(backend.accepted(), 5, "a new connection each time");
}

/// A backend's `408` on a kept-alive connection it closes as idle (sent
/// as the next request came) is no answer to that request: an idempotent
/// one goes again on a new connection; a POST fails as a reset connection
/// (captured where its route captures), never as the client's timeout.
#[tokio::test]
async fn a_408_on_a_reused_connection_is_its_idle_close_not_an_answer() {
    let backend = RawBackend::timing_out_reuse().await;
    let bs = Backstop::start(&route(
        "api",
        "/",
        &[backend.url()],
        "[routes.retry]\nmax_attempts = 1\n[routes.capture]\nenabled = false",
    ));
    let c = client();
    for i in 0..2 {
        let r = c.get(bs.url("/x")).send().await.unwrap();
        assert_eq!(r.status(), 200, "request {i}");
        assert_eq!(r.text().await.unwrap(), "ok");
    }
    assert_eq!(backend.accepted(), 2, "the 408 cost a new connection");
    let (status, code, _) = error_of(c.post(bs.url("/x")).send().await.unwrap()).await;
    assert_eq!((status, code.as_str()), (502, "upstream_unreachable"));
}

/// `server.upstream_idle_timeout` closes a kept-alive upstream connection
/// that has not been used for that long (within half as long again); with
/// the default (90 s) the same wait leaves it open.
#[tokio::test]
async fn idle_upstream_connections_close_after_upstream_idle_timeout() {
    let c = client();
    for (timeout, closes) in [(Some("300ms"), true), (None, false)] {
        let backend = RawBackend::start(None).await;
        let bs = Backstop::start(&format!(
            "{}{}",
            upstream_idle_timeout(timeout),
            route("api", "/", &[backend.url()], "")
        ));
        let r = c.get(bs.url("/x")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), "ok");
        check_idle_close(|| backend.open(), closes).await;
        if closes {
            let r = c.get(bs.url("/x")).send().await.unwrap();
            assert_eq!(r.status(), 200, "the next request opens a new connection");
            assert_eq!(backend.accepted(), 2);
        }
    }
}

/// The same setting for the pooled HTTP/2 (h2c) client, whose idle
/// connections hyper-util's pool closes (checking once per timeout).
#[tokio::test]
async fn idle_http2_upstream_connections_close_after_upstream_idle_timeout() {
    let c = client();
    for (timeout, closes) in [(Some("300ms"), true), (None, false)] {
        let backend = Backend::echo().await;
        let bs = Backstop::start(&format!(
            "{}{}",
            upstream_idle_timeout(timeout),
            route("h2", "/", &[backend.url()], "upstream_h2c = true")
        ));
        let r = c.post(bs.url("/x")).body("over h2").send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), "over h2");
        assert_eq!(backend.seen()[0].version, http::Version::HTTP_2);
        check_idle_close(|| backend.open(), closes).await;
        if closes {
            let r = c.post(bs.url("/x")).body("again").send().await.unwrap();
            assert_eq!(r.status(), 200, "the next request opens a new connection");
            assert_eq!(r.text().await.unwrap(), "again");
            assert_eq!(backend.open(), 1);
        }
    }
}

/// A `[server]` section setting `upstream_idle_timeout`, or none (the default).
fn upstream_idle_timeout(timeout: Option<&str>) -> String {
    timeout
        .map(|t| format!("[server]\nupstream_idle_timeout = {t:?}\n\n"))
        .unwrap_or_default()
}

/// With the backend's one connection just used: waits up to 1.5 s for it to
/// close, and checks that it closed (not before 250 ms) exactly when `closes`.
async fn check_idle_close(open: impl Fn() -> usize, closes: bool) {
    let used = std::time::Instant::now();
    assert_eq!(open(), 1, "kept alive after the answer");
    while open() > 0 && used.elapsed() < Duration::from_millis(1500) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let idle_for = used.elapsed();
    if closes {
        assert_eq!(open(), 0, "closed within 1.5 s of its last use");
        assert!(
            idle_for >= Duration::from_millis(250),
            "closed too early: after {idle_for:?}"
        );
    } else {
        assert_eq!(open(), 1, "the default keeps it open for 90 s");
    }
}

/// `server.upstream_max_idle` bounds the idle connections kept per target.
/// Six slow requests at once open six backend connections; once answered,
/// two stay open with a cap of 2 (the rest closed on return by Backstop's
/// own exchange for GETs, at the next sweep of hyper's list for POSTs of
/// 20 KiB, which go that way), none with 0 (keep-alive off), and all six
/// with the default cap. The idle timeout (4 s) is longer than the wait.
#[tokio::test]
async fn idle_upstream_connections_are_capped_per_target() {
    let cases = [
        (Some(2), false, 2),
        (Some(2), true, 2),
        (Some(0), true, 0),
        (None, false, 6),
    ];
    for (cap, large_post, kept) in cases {
        let case = format!("cap {cap:?}, large POST {large_post}");
        // Slow enough that all six are in flight at once.
        let backend = Backend::start(|_| Reply::ok("slow").delay(Duration::from_secs(1))).await;
        let server = match cap {
            Some(n) => format!("upstream_max_idle = {n}\n"),
            None => String::new(),
        };
        let bs = Backstop::start(&format!(
            "[server]\nupstream_idle_timeout = \"4s\"\n{server}\n{}",
            route("api", "/", &[backend.url()], "")
        ));
        let bodies = six_at_once(&bs, large_post).await;
        assert!(bodies.iter().all(|b| b == "slow"), "{case}: {bodies:?}");
        let peers: HashSet<SocketAddr> = backend.seen().iter().map(|s| s.peer).collect();
        assert_eq!(peers.len(), 6, "{case}: a connection per request");
        let answered = std::time::Instant::now();
        while backend.open() > kept && answered.elapsed() < Duration::from_millis(2500) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Settled: nothing else closes before the idle timeout.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(backend.open(), kept, "{case}");
    }
}

/// The bodies of six requests sent at once: GETs, or 20 KiB POSTs (which
/// go upstream over hyper's connection, not the own exchange).
async fn six_at_once(bs: &Backstop, large_post: bool) -> Vec<String> {
    let c = client();
    let requests = (0..6).map(|_| {
        let request = if large_post {
            c.post(bs.url("/x")).body(vec![b'x'; 20 * 1024])
        } else {
            c.get(bs.url("/x"))
        };
        async move { request.send().await.unwrap().text().await.unwrap() }
    });
    futures_util::future::join_all(requests).await
}

#[tokio::test]
async fn requests_in_flight_are_capped_per_target() {
    // Six at once through a cap of two: three waves of two, on two
    // connections, on both upstream ways (GETs, 20 KiB POSTs).
    for large_post in [false, true] {
        let backend = Backend::start(|_| Reply::ok("slow").delay(Duration::from_millis(600))).await;
        let bs = Backstop::start(&format!(
            "[server]\nupstream_max_conns = 2\n\n{}",
            route("api", "/", &[backend.url()], "")
        ));
        let in_flight = turn_gauge("in_flight", "api", &backend.url());
        let waiting = turn_gauge("waiting", "api", &backend.url());
        let started = Instant::now();
        let done = AtomicBool::new(false);
        let six = async {
            let bodies = six_at_once(&bs, large_post).await;
            done.store(true, Ordering::Relaxed);
            bodies
        };
        // The gauges while the waves pass: at most two in flight, and the
        // first wave has four waiting.
        let watch = async {
            let mut most = (0.0f64, 0.0f64);
            while !done.load(Ordering::Relaxed) {
                most.0 = most.0.max(bs.metric(&in_flight).await);
                most.1 = most.1.max(bs.metric(&waiting).await);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            most
        };
        let (bodies, most) = tokio::join!(six, watch);
        let took = started.elapsed();
        assert!(bodies.iter().all(|b| b == "slow"), "{bodies:?}");
        assert!(
            took >= Duration::from_millis(1750),
            "large POST {large_post}: six 600 ms answers two at a time took {took:?}"
        );
        let peers: HashSet<SocketAddr> = backend.seen().iter().map(|s| s.peer).collect();
        assert_eq!(peers.len(), 2, "large POST {large_post}: two connections");
        assert_eq!(
            most,
            (2.0, 4.0),
            "large POST {large_post}: most in flight, waiting"
        );
        assert_eq!(bs.metric(&waiting).await, 0.0);
        let answered = Instant::now();
        while bs.metric(&in_flight).await > 0.0 && answered.elapsed() < Duration::from_secs(2) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(bs.metric(&in_flight).await, 0.0, "every turn given back");
    }
}

#[tokio::test]
async fn the_wait_for_a_turn_is_not_the_backends_time() {
    // One turn, 400 ms answers, a 700 ms request_timeout: the second
    // request waits 400 ms for its turn, then has its whole 700 ms.
    let backend = Backend::start(|_| Reply::ok("slow").delay(Duration::from_millis(400))).await;
    let bs = Backstop::start(&format!(
        "[server]\nupstream_max_conns = 1\n\n{}",
        route(
            "api",
            "/",
            &[backend.url()],
            "[routes.circuit_breaker]\nrequest_timeout = 700\n[routes.retry]\nmax_attempts = 1"
        )
    ));
    let c = client();
    let requests = (0..2).map(|_| {
        let request = c.get(bs.url("/x"));
        async move { request.send().await.unwrap().status().as_u16() }
    });
    let statuses = futures_util::future::join_all(requests).await;
    assert_eq!(statuses, [200, 200]);
    assert_eq!(backend.hits(), 2);
}

#[tokio::test]
async fn error_answers_have_the_json_shape() {
    let slow = Backend::start(|_| Reply::ok("late").delay(Duration::from_secs(3))).await;
    let dead = Backend::echo().await.stop().await;
    let toml = format!(
        "[server]\nmax_body_bytes = 1024\n\n{}{}{}",
        route(
            "slow",
            "/slow",
            &[slow.url()],
            "[routes.circuit_breaker]\nrequest_timeout = 300\n[routes.retry]\nmax_attempts = 1"
        ),
        route(
            "dead",
            "/dead",
            &[format!("http://{dead}")],
            "[routes.retry]\nmax_attempts = 1\n[routes.capture]\nenabled = false"
        ),
        route(
            "small",
            "/small",
            &[slow.url()],
            "[routes.capture]\nenabled = true"
        ),
    );
    let bs = Backstop::start(&toml);
    let c = client();

    let (status, header, error) = error_of(c.get(bs.url("/nowhere")).send().await.unwrap()).await;
    assert_eq!((status, header.as_str()), (404, "no_route"));
    assert_eq!(error["code"], "no_route");
    assert!(error["request_id"].as_str().unwrap().len() > 8);
    assert!(error["route"].is_null());

    let (status, header, error) = error_of(c.get(bs.url("/slow")).send().await.unwrap()).await;
    assert_eq!((status, header.as_str()), (504, "upstream_timeout"));
    assert_eq!(error["route"], "slow");

    let (status, header, _) =
        error_of(c.post(bs.url("/dead")).body("x").send().await.unwrap()).await;
    assert_eq!((status, header.as_str()), (502, "upstream_unreachable"));

    let big = vec![b'x'; 4096];
    let (status, header, _) =
        error_of(c.post(bs.url("/small")).body(big).send().await.unwrap()).await;
    assert_eq!((status, header.as_str()), (413, "body_too_large"));
    assert_eq!(
        slow.hits(),
        1,
        "nothing sent upstream for a body that is too large"
    );

    let r = c.get(bs.url("/health")).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), r#"{"status":"ok"}"#);
    let r = c.get(bs.admin_url("/health")).send().await.unwrap();
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["status"], "ok");
}

/// A streamed body sent slowly, `chunks` of 1 KiB `every` apart.
fn slow_body(chunks: usize, every: Duration) -> reqwest::Body {
    let stream = futures_util::stream::unfold(0, move |sent| async move {
        if sent == chunks {
            return None;
        }
        tokio::time::sleep(every).await;
        Some((
            Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'u'; 1024])),
            sent + 1,
        ))
    });
    reqwest::Body::wrap_stream(stream)
}

fn streaming_route(upstream: &str, request_timeout_ms: u64, body_read_timeout: &str) -> String {
    let extra = format!(
        "body_read_timeout = {body_read_timeout:?}\nupstream_h2c = false\n[routes.retry]\nmax_attempts = 1\n\
         [routes.capture]\nenabled = false\n\
         [routes.circuit_breaker]\nrequest_timeout = {request_timeout_ms}\nfailure_threshold = 1"
    );
    route("up", "/", &[upstream.to_string()], &extra)
}

/// An upload's time is the client's: a body that takes longer to send than
/// `request_timeout` (the backend's time to answer) still goes through, and
/// nothing is held against the backend.
#[tokio::test]
async fn a_slow_upload_is_not_cut_by_the_request_timeout() {
    let backend = Backend::echo().await;
    let bs = Backstop::start(&streaming_route(&backend.url(), 500, "5s"));
    let started = Instant::now();
    let r = client()
        .post(bs.url("/upload"))
        .body(slow_body(8, Duration::from_millis(250)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.headers().get("x-backstop-error"));
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert_eq!(backend.seen()[0].body_len, 8 * 1024);
    let status = bs.admin_json("/circuit-status").await;
    assert_eq!(status["circuits"][0]["state"], "closed", "{status}");
}

/// A client that stops sending its streamed body is answered 408 after the
/// route's `body_read_timeout`, and the backend is not blamed (the circuit,
/// which one failure would open, stays closed).
#[tokio::test]
async fn a_stalled_upload_is_the_clients_timeout_not_the_backends() {
    let backend = Backend::echo().await;
    // Over HTTP/2 too, where hyper reports the stream's reset, not the
    // body's error.
    for h2c in [false, true] {
        let toml = streaming_route(&backend.url(), 10_000, "1s")
            .replace("upstream_h2c = false", &format!("upstream_h2c = {h2c}"));
        let bs = Backstop::start(&toml);
        let started = Instant::now();
        let r = client()
            .post(bs.url("/upload"))
            .body(slow_body(2, Duration::from_secs(4)))
            .send()
            .await
            .unwrap();
        let (status, code, _) = error_of(r).await;
        assert_eq!(
            (status, code.as_str()),
            (408, "request_timeout"),
            "h2c {h2c}"
        );
        let took = started.elapsed();
        assert!(took < Duration::from_secs(8), "{took:?}");
        let status = bs.admin_json("/circuit-status").await;
        assert_eq!(
            status["circuits"][0]["state"], "closed",
            "h2c {h2c}: {status}"
        );
    }
}

/// Once the body is sent, the backend has `request_timeout` to answer.
#[tokio::test]
async fn a_backend_silent_after_an_upload_times_out() {
    let slow = Backend::start(|_| Reply::ok("late").delay(Duration::from_secs(30))).await;
    let bs = Backstop::start(&streaming_route(&slow.url(), 500, "5s"));
    let started = Instant::now();
    let r = client()
        .post(bs.url("/upload"))
        .body(slow_body(4, Duration::from_millis(250)))
        .send()
        .await
        .unwrap();
    let (status, code, _) = error_of(r).await;
    assert_eq!((status, code.as_str()), (504, "upstream_timeout"));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

#[tokio::test]
async fn a_100_mib_body_streams_through_without_buffering() {
    let backend = Backend::echo().await;
    let extra = "[routes.retry]\nmax_attempts = 1\n[routes.capture]\nenabled = false";
    let bs = Backstop::start(&route("up", "/", &[backend.url()], extra));
    // Warm up so that pools and allocator arenas exist before measuring.
    client().get(bs.url("/warm")).send().await.unwrap();
    let before = bs.rss_kib();
    const TOTAL: u64 = 100 * 1024 * 1024;
    let chunks = futures_util::stream::iter(
        (0..(TOTAL / 65536)).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![7u8; 65536]))),
    );
    let pid = bs.pid();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(before));
    let peak_w = peak.clone();
    let sampler = tokio::spawn(async move {
        loop {
            if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                let rss: u64 = s
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                    .unwrap_or(0);
                peak_w.fetch_max(rss, std::sync::atomic::Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let r = client()
        .post(bs.url("/stream-count"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    sampler.abort();
    let peak = peak
        .load(std::sync::atomic::Ordering::Relaxed)
        .max(bs.rss_kib());
    assert_eq!(backend.seen()[1].body_len, TOTAL);
    let grew_mib = (peak.saturating_sub(before)) as f64 / 1024.0;
    assert!(
        grew_mib < 8.0,
        "RSS grew {grew_mib:.1} MiB while streaming 100 MiB"
    );
}
