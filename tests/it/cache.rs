//! Response caching over real sockets: hits and misses, keys (sorted query,
//! header strategies, POST bodies), TTL, Cache-Control, the backend's `Age`,
//! writes that invalidate, stale-if-error, coalescing, the memory bound,
//! purge, reloads, and the Redis store — shared by two instances, and a
//! Redis server killed mid-test.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::harness::{
    client, error_of, h2_client_giving_up_after, metric_value, next_request, Backend, Backstop,
    Reply, StuckBackend,
};

/// A backend that answers every request with a new body (`n=<count>`), so a
/// test sees whether an answer came from the cache or from upstream.
async fn counting_backend(extra: Vec<(&'static str, &'static str)>) -> Backend {
    let n = Arc::new(AtomicUsize::new(0));
    Backend::start(move |seen| {
        let i = n.fetch_add(1, Ordering::SeqCst) + 1;
        let mut reply = Reply::ok(&format!("n={i} {} {}", seen.method, seen.uri));
        for (k, v) in &extra {
            reply = reply.header(k, v);
        }
        reply
    })
    .await
}

fn route(name: &str, prefix: &str, upstream: &str, cache: &str) -> String {
    route_with(name, prefix, upstream, "", cache)
}

/// A cached route; `extra` are route keys, `cache` keys of `[routes.cache]`.
fn route_with(name: &str, prefix: &str, upstream: &str, extra: &str, cache: &str) -> String {
    format!(
        "[[routes]]\nname = {name:?}\npath_prefix = {prefix:?}\nupstreams = [{upstream:?}]\n\
         {extra}\n[routes.retry]\nmax_attempts = 1\n[routes.cache]\nenabled = true\n{cache}\n"
    )
}

/// A fresh Redis key prefix per test, so tests never see each other's entries.
fn prefix(test: &str) -> String {
    format!("bs-test:{test}:{}:{}:", std::process::id(), entry_nanos())
}

fn entry_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn redis_section(url: &str, prefix: &str) -> String {
    format!("[redis]\nurl = {url:?}\nkey_prefix = {prefix:?}\ntimeout = \"50ms\"\n\n")
}

struct Got {
    status: u16,
    x_cache: String,
    age: Option<u64>,
    body: String,
}

/// `DELETE /cache/{route}` on `bs`'s admin listener.
async fn purge(bs: &Backstop, route: &str) -> reqwest::Response {
    let url = bs.admin_url(&format!("/cache/{route}"));
    client().delete(url).send().await.unwrap()
}

async fn get(url: &str) -> Got {
    got(client().get(url).send().await.unwrap()).await
}

async fn got(r: reqwest::Response) -> Got {
    let header = |name: &str| {
        r.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    };
    let x_cache = header("x-cache").unwrap_or_default();
    // A MISS passes on the backend's `Age`, whatever it holds.
    let age = header("age").and_then(|a| a.parse().ok());
    let status = r.status().as_u16();
    Got {
        status,
        x_cache,
        age,
        body: r.text().await.unwrap(),
    }
}

async fn metrics(bs: &Backstop) -> String {
    bs.admin_text("/metrics").await
}

#[tokio::test]
async fn second_request_is_a_hit_with_age_and_counted() {
    let backend = counting_backend(vec![("content-type", "text/plain")]).await;
    let bs = Backstop::start(&route("r", "/", &backend.url(), ""));
    let first = get(&bs.url("/items/1")).await;
    assert_eq!((first.status, first.x_cache.as_str()), (200, "MISS"));
    assert_eq!(first.body, "n=1 GET /items/1");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second = get(&bs.url("/items/1")).await;
    assert_eq!((second.status, second.x_cache.as_str()), (200, "HIT"));
    assert_eq!(second.body, "n=1 GET /items/1", "the stored answer");
    assert!(second.age.unwrap() >= 1, "Age counts from storing");
    assert_eq!(backend.hits(), 1);
    // HEAD is cached separately from GET.
    for want in ["MISS", "HIT"] {
        let head = client().head(bs.url("/items/1")).send().await.unwrap();
        assert_eq!(head.headers()["x-cache"], want);
        assert_eq!(
            head.headers()["content-length"],
            "17",
            "the backend's length"
        );
    }
    let text = metrics(&bs).await;
    assert_eq!(
        metric_value(&text, "backstop_cache_total{route=\"r\",result=\"hit\"}"),
        2.0
    );
    assert_eq!(
        metric_value(&text, "backstop_cache_total{route=\"r\",result=\"miss\"}"),
        2.0
    );
}

#[tokio::test]
async fn query_parameters_are_keyed_sorted() {
    let backend = counting_backend(vec![]).await;
    let bs = Backstop::start(&route("r", "/", &backend.url(), ""));
    let cases = [
        ("/s?b=2&a=1", "MISS"),
        ("/s?a=1&b=2", "HIT"),
        ("/s?a=1&b=3", "MISS"),
        ("/s?a=1&a=2", "MISS"),
        ("/s?a=2&a=1", "MISS"),
        ("/s", "MISS"),
        ("/s?", "HIT"),
    ];
    for (path, want) in cases {
        assert_eq!(get(&bs.url(path)).await.x_cache, want, "{path}");
    }
    let seen = backend.seen();
    assert_eq!(seen[0].uri, "/s?b=2&a=1", "upstream gets the query as sent");
}

/// (path, request headers, X-Cache)
type HeaderCase = (
    &'static str,
    &'static [(&'static str, &'static str)],
    &'static str,
);

/// A keyed header the client's `Connection` names away never reaches the
/// backend, so it is not keyed either: the backend's answer without it is
/// not stored as the answer for that header's value.
#[tokio::test]
async fn a_keyed_header_named_in_connection_is_not_keyed() {
    let backend = Backend::start(|seen| {
        let tenant = seen.headers.get("x-tenant");
        let tenant = tenant.map_or("none", |t| t.to_str().unwrap());
        Reply::ok(&format!("tenant={tenant}"))
    })
    .await;
    let bs = Backstop::start(&route(
        "list",
        "/list",
        &backend.url(),
        "header_strategy = \"list\"\nheaders = [\"X-Tenant\"]",
    ));
    let request = format!(
        "GET /list/a HTTP/1.1\r\nHost: {}\r\nX-Tenant: 2\r\nConnection: x-tenant, close\r\n\r\n",
        bs.addr
    );
    let answer = bs.raw(request.as_bytes()).await;
    assert!(answer.ends_with("tenant=none"), "{answer}");
    let tenant_2 = client().get(bs.url("/list/a")).header("x-tenant", "2");
    let got = got(tenant_2.send().await.unwrap()).await;
    assert_eq!(
        (got.x_cache.as_str(), got.body.as_str()),
        ("MISS", "tenant=2")
    );
    let got = get(&bs.url("/list/a")).await;
    assert_eq!(
        (got.x_cache.as_str(), got.body.as_str()),
        ("HIT", "tenant=none")
    );
}

#[tokio::test]
async fn each_header_strategy_keys_its_headers() {
    let backend = counting_backend(vec![]).await;
    let url = backend.url();
    let config = [
        route("none", "/none", &url, ""),
        route("all", "/all", &url, "header_strategy = \"all\""),
        route(
            "list",
            "/list",
            &url,
            "header_strategy = \"list\"\nheaders = [\"X-Tenant\"]",
        ),
    ]
    .concat();
    let bs = Backstop::start(&config);
    let c = client();
    let send = |path: &'static str, headers: &'static [(&'static str, &'static str)]| {
        let mut req = c.get(bs.url(path));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        async move { got(req.send().await.unwrap()).await.x_cache }
    };
    let cases: [HeaderCase; 12] = [
        ("/none/a", &[("x-tenant", "1")], "MISS"),
        ("/none/a", &[("x-tenant", "2")], "HIT"),
        ("/none/a", &[], "HIT"),
        ("/all/a", &[("x-tenant", "1")], "MISS"),
        ("/all/a", &[("x-tenant", "1")], "HIT"),
        ("/all/a", &[("x-tenant", "2")], "MISS"),
        (
            "/all/a",
            &[("x-tenant", "1"), ("x-request-id", "other")],
            "HIT",
        ),
        ("/list/a", &[("x-tenant", "1"), ("accept", "a/b")], "MISS"),
        ("/list/a", &[("x-tenant", "1"), ("accept", "c/d")], "HIT"),
        ("/list/a", &[("x-tenant", "2")], "MISS"),
        ("/list/a", &[], "MISS"),
        ("/list/a", &[("X-TENANT", "2")], "HIT"),
    ];
    for (i, (path, headers, want)) in cases.into_iter().enumerate() {
        assert_eq!(
            send(path, headers).await,
            want,
            "case {i}: {path} {headers:?}"
        );
    }
}

#[tokio::test]
async fn an_answer_that_varies_serves_only_requests_that_send_the_same() {
    let n = Arc::new(AtomicUsize::new(0));
    let backend = Backend::start(move |seen| {
        let i = n.fetch_add(1, Ordering::SeqCst) + 1;
        let gzip = seen
            .headers
            .get("accept-encoding")
            .is_some_and(|v| v.to_str().unwrap().contains("gzip"));
        let body = if gzip { "gzipped" } else { "plain" };
        Reply::ok(&format!("{body} n={i}")).header("vary", "Accept-Encoding")
    })
    .await;
    let url = backend.url();
    let config = [
        route("none", "/", &url, ""),
        route(
            "listed",
            "/listed",
            &url,
            "header_strategy = \"list\"\nheaders = [\"Accept-Encoding\"]",
        ),
    ]
    .concat();
    let bs = Backstop::start(&config);
    let c = client();
    let send = |path: &'static str, encoding: Option<&'static str>| {
        let mut req = c.get(bs.url(path));
        if let Some(encoding) = encoding {
            req = req.header("accept-encoding", encoding);
        }
        async move {
            let r = got(req.send().await.unwrap()).await;
            (r.x_cache, r.body)
        }
    };
    // (path, Accept-Encoding, X-Cache, body)
    let cases: [(&str, Option<&str>, &str, &str); 9] = [
        ("/v", Some("gzip"), "MISS", "gzipped n=1"),
        ("/v", Some("gzip"), "HIT", "gzipped n=1"),
        ("/v", Some("identity"), "MISS", "plain n=2"),
        ("/v", Some("identity"), "HIT", "plain n=2"),
        ("/v", None, "MISS", "plain n=3"),
        ("/v", Some("gzip"), "MISS", "gzipped n=4"),
        // Keyed: each variant has its own entry.
        ("/listed/v", Some("gzip"), "MISS", "gzipped n=5"),
        ("/listed/v", Some("identity"), "MISS", "plain n=6"),
        ("/listed/v", Some("gzip"), "HIT", "gzipped n=5"),
    ];
    for (i, (path, encoding, x_cache, body)) in cases.into_iter().enumerate() {
        assert_eq!(
            send(path, encoding).await,
            (x_cache.to_string(), body.to_string()),
            "case {i}: {path} {encoding:?}"
        );
    }
}

#[tokio::test]
async fn a_concurrent_twin_with_other_varied_headers_goes_upstream_itself() {
    let backend = Backend::start(|seen| {
        let lang = seen.headers["accept-language"]
            .to_str()
            .unwrap()
            .to_string();
        Reply::ok(&lang)
            .header("vary", "accept-language")
            .delay(Duration::from_millis(500))
    })
    .await;
    let bs = Backstop::start(&route("r", "/", &backend.url(), ""));
    let c = client();
    let ask = |lang: &'static str| {
        let req = c.get(bs.url("/greeting")).header("accept-language", lang);
        async move { got(req.send().await.unwrap()).await }
    };
    let en = tokio::spawn(ask("en"));
    backend.wait_for_hits(1, Duration::from_secs(5)).await;
    let de = ask("de").await;
    assert_eq!((de.x_cache.as_str(), de.body.as_str()), ("MISS", "de"));
    let en = en.await.unwrap();
    assert_eq!((en.x_cache.as_str(), en.body.as_str()), ("MISS", "en"));
    assert_eq!(backend.hits(), 2);
}

#[tokio::test]
async fn post_bodies_are_part_of_the_key_when_post_is_cached() {
    let backend = counting_backend(vec![]).await;
    let url = backend.url();
    let config = [
        route("read", "/search", &url, "methods = [\"GET\", \"POST\"]"),
        route("write", "/orders", &url, ""),
    ]
    .concat();
    let bs = Backstop::start(&config);
    let c = client();
    let post = |path: &'static str, body: &'static str| {
        let req = c.post(bs.url(path)).body(body);
        async move { got(req.send().await.unwrap()).await }
    };
    let a = post("/search", "{\"q\":\"rust\"}").await;
    assert_eq!(a.x_cache, "MISS");
    let b = post("/search", "{\"q\":\"rust\"}").await;
    assert_eq!((b.x_cache.as_str(), b.body), ("HIT", a.body));
    assert_eq!(post("/search", "{\"q\":\"go\"}").await.x_cache, "MISS");
    // The upstream got the body.
    assert_eq!(backend.seen()[0].body, "{\"q\":\"rust\"}");
    // POST is not in the default methods: never cached.
    assert_eq!(post("/orders", "x").await.x_cache, "BYPASS");
    assert_eq!(post("/orders", "x").await.x_cache, "BYPASS");
    assert_eq!(backend.hits(), 4);
}

/// Sends `method` to `url` (no redirects followed), with a body unless it
/// is a GET or HEAD: status and `X-Cache`.
async fn send(method: &str, url: String, headers: &[(&str, &str)]) -> (u16, String) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let read = method == reqwest::Method::GET || method == reqwest::Method::HEAD;
    let mut req = no_redirects().build().unwrap().request(method, url);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    if !read {
        req = req.body("{}");
    }
    let r = got(req.send().await.unwrap()).await;
    (r.status, r.x_cache)
}

#[tokio::test]
async fn a_write_the_backend_accepts_invalidates_the_reads_of_its_uri() {
    let n = Arc::new(AtomicUsize::new(0));
    let backend = Backend::start(move |seen| {
        let i = n.fetch_add(1, Ordering::SeqCst) + 1;
        let body = format!("n={i} {} {}", seen.method, seen.uri);
        let write = !matches!(seen.method.as_str(), "GET" | "HEAD");
        match (write, seen.uri.as_str()) {
            (true, "/locked") => Reply::status(409).body(body),
            // POST-redirect-GET.
            (true, "/items/2") => Reply::status(303).header("location", "/items/2"),
            _ => Reply::ok(&body),
        }
    })
    .await;
    let bs = Backstop::start(&route("r", "/", &backend.url(), ""));
    // (method, path, status, X-Cache), in order.
    let steps = [
        ("GET", "/items/1", 200, "MISS"),
        ("GET", "/items/1", 200, "HIT"),
        ("HEAD", "/items/1", 200, "MISS"),
        ("HEAD", "/items/1", 200, "HIT"),
        ("GET", "/items/1?v=1", 200, "MISS"),
        ("GET", "/items/2", 200, "MISS"),
        ("GET", "/locked", 200, "MISS"),
        ("PUT", "/items/1", 200, "BYPASS"),
        ("GET", "/items/1", 200, "MISS"),
        ("HEAD", "/items/1", 200, "MISS"),
        // Other URIs keep their entries.
        ("GET", "/items/1?v=1", 200, "HIT"),
        ("GET", "/items/2", 200, "HIT"),
        ("PATCH", "/items/1", 200, "BYPASS"),
        ("GET", "/items/1", 200, "MISS"),
        ("DELETE", "/items/1", 200, "BYPASS"),
        ("GET", "/items/1", 200, "MISS"),
        ("POST", "/items/1", 200, "BYPASS"),
        ("GET", "/items/1", 200, "MISS"),
        ("GET", "/items/1", 200, "HIT"),
        // A write the backend refuses changed nothing.
        ("PUT", "/locked", 409, "BYPASS"),
        ("GET", "/locked", 200, "HIT"),
        // A redirect is no error: the write was accepted.
        ("POST", "/items/2", 303, "BYPASS"),
        ("GET", "/items/2", 200, "MISS"),
    ];
    for (i, (method, path, status, x_cache)) in steps.into_iter().enumerate() {
        assert_eq!(
            send(method, bs.url(path), &[]).await,
            (status, x_cache.to_string()),
            "step {i}: {method} {path}"
        );
    }
}

/// A write retried after an attempt that timed out may have been applied
/// by that attempt, whatever the retry's answer: a DELETE whose first
/// answer was lost gets 404 the second time, and the entry goes.
#[tokio::test]
async fn a_write_retried_after_a_lost_answer_invalidates_whatever_its_status() {
    let deletes = Arc::new(AtomicUsize::new(0));
    let backend = Backend::start(move |seen| match seen.method.as_str() {
        "DELETE" if deletes.fetch_add(1, Ordering::SeqCst) == 0 => {
            Reply::status(204).delay(Duration::from_millis(1500))
        }
        "DELETE" => Reply::status(404),
        _ => Reply::ok("item 7"),
    })
    .await;
    let toml = format!(
        "[[routes]]\nname = \"r\"\npath_prefix = \"/\"\nupstreams = [{:?}]\n\
         [routes.circuit_breaker]\nrequest_timeout = 300\n\
         [routes.retry]\nmax_attempts = 2\ninitial_delay = \"10ms\"\n\
         [routes.cache]\nenabled = true\n",
        backend.url()
    );
    let bs = Backstop::start(&toml);
    let url = bs.url("/items/7");
    assert_eq!(send("GET", url.clone(), &[]).await, (200, "MISS".into()));
    assert_eq!(send("GET", url.clone(), &[]).await, (200, "HIT".into()));
    assert_eq!(
        send("DELETE", url.clone(), &[]).await,
        (404, "BYPASS".into())
    );
    assert_eq!(backend.seen().len(), 3, "the DELETE was tried twice");
    assert_eq!(send("GET", url, &[]).await, (200, "MISS".into()));
}

#[tokio::test]
async fn a_write_invalidates_the_variant_keyed_on_its_own_headers() {
    let backend = counting_backend(vec![]).await;
    let bs = Backstop::start(&route(
        "r",
        "/",
        &backend.url(),
        "header_strategy = \"list\"\nheaders = [\"X-Tenant\"]",
    ));
    let tenant = |n: &'static str| [("x-tenant", n)];
    // (method, tenant, X-Cache), in order.
    let steps = [
        ("GET", "1", "MISS"),
        ("GET", "2", "MISS"),
        ("PUT", "1", "BYPASS"),
        ("GET", "1", "MISS"),
        // Keyed on another value: not found by tenant 1's write.
        ("GET", "2", "HIT"),
    ];
    for (i, (method, who, x_cache)) in steps.into_iter().enumerate() {
        let (_, got) = send(method, bs.url("/doc"), &tenant(who)).await;
        assert_eq!(got, x_cache, "step {i}: {method} as tenant {who}");
    }
}

#[tokio::test]
async fn a_post_the_route_caches_is_a_read_and_invalidates_nothing() {
    let backend = counting_backend(vec![]).await;
    let bs = Backstop::start(&route(
        "r",
        "/",
        &backend.url(),
        "methods = [\"GET\", \"POST\"]",
    ));
    // (method, X-Cache), in order, all on one URI.
    let steps = [
        ("GET", "MISS"),
        ("POST", "MISS"),
        ("POST", "HIT"),
        ("GET", "HIT"),
        ("PUT", "BYPASS"),
        ("GET", "MISS"),
        // Keyed on its body, a cached POST cannot be named by the write:
        // it lives out its ttl.
        ("POST", "HIT"),
    ];
    for (i, (method, x_cache)) in steps.into_iter().enumerate() {
        let (_, got) = send(method, bs.url("/search?q=rust"), &[]).await;
        assert_eq!(got, x_cache, "step {i}: {method}");
    }
}

#[tokio::test]
async fn a_read_in_flight_during_a_write_neither_stores_nor_shares_its_older_answer() {
    // A document whose version a PUT moves on; the first read of it is
    // answered slowly, after the PUT.
    let version = Arc::new(AtomicUsize::new(1));
    let reads = Arc::new(AtomicUsize::new(0));
    let backend = Backend::start(move |seen| {
        if seen.method == "PUT" {
            version.fetch_add(1, Ordering::SeqCst);
            return Reply::ok("updated");
        }
        let reply = Reply::ok(&format!("v{}", version.load(Ordering::SeqCst)));
        if reads.fetch_add(1, Ordering::SeqCst) == 0 {
            reply.delay(Duration::from_millis(3000))
        } else {
            reply
        }
    })
    .await;
    let bs = Backstop::start(&route("r", "/", &backend.url(), ""));
    let first = tokio::spawn(get_at_once(bs.url("/doc"), 1));
    backend.wait_for_hits(1, Duration::from_secs(5)).await;
    // Twins that wait for the first read's answer (given time to be
    // waiting on a loaded machine).
    let twins = tokio::spawn(get_at_once(bs.url("/doc"), 3));
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(send("PUT", bs.url("/doc"), &[]).await.0, 200);
    // A read after the write fetches anew rather than wait for the old read.
    let started = Instant::now();
    let after = get(&bs.url("/doc")).await;
    assert_eq!(
        (after.x_cache.as_str(), after.body.as_str()),
        ("MISS", "v2")
    );
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "it waited for the read in flight: {:?}",
        started.elapsed()
    );
    // The read that raced the write answers its own client with what it got,
    // but hands it to no one: the twins looked again and found the newer
    // answer, rather than each asking the backend.
    assert_eq!(first.await.unwrap()[0].body, "v1");
    for twin in twins.await.unwrap() {
        assert_eq!((twin.x_cache.as_str(), twin.body.as_str()), ("HIT", "v2"));
    }
    assert_eq!(backend.hits(), 3, "GET, PUT, GET: the twins went nowhere");
    // Nor was it stored over the newer answer.
    let later = get(&bs.url("/doc")).await;
    assert_eq!((later.x_cache.as_str(), later.body.as_str()), ("HIT", "v2"));
}

/// A GET of `url` with `Host: api.example`: one host, so that the keys
/// (and which of them share a write count) are the same in every run.
async fn get_at_site(url: String) -> Got {
    let req = client().get(url).header("host", "api.example");
    got(req.send().await.unwrap()).await
}

#[tokio::test]
async fn a_write_leaves_the_reads_in_flight_of_other_uris_stored_and_shared() {
    let reads = Arc::new(AtomicUsize::new(0));
    let backend = Backend::start(move |seen| {
        if seen.method != "GET" {
            return Reply::ok("updated");
        }
        let i = reads.fetch_add(1, Ordering::SeqCst) + 1;
        Reply::ok(&format!("read {i}")).delay(Duration::from_millis(2000))
    })
    .await;
    let bs = Backstop::start(&route("r", "/", &backend.url(), ""));
    let first = tokio::spawn(get_at_site(bs.url("/b")));
    backend.wait_for_hits(1, Duration::from_secs(5)).await;
    let twins: Vec<_> = (0..3)
        .map(|_| tokio::spawn(get_at_site(bs.url("/b"))))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A write to another URI of the route while /b is upstream.
    let write = send("PUT", bs.url("/a"), &[("host", "api.example")]).await;
    assert_eq!(write, (200, "BYPASS".to_string()));
    let first = first.await.unwrap();
    assert_eq!(
        (first.x_cache.as_str(), first.body.as_str()),
        ("MISS", "read 1")
    );
    for twin in twins {
        let twin = twin.await.unwrap();
        assert_eq!(
            (twin.x_cache.as_str(), twin.body.as_str()),
            ("HIT", "read 1"),
            "shared with the twins"
        );
    }
    let later = get_at_site(bs.url("/b")).await;
    assert_eq!(
        (later.x_cache.as_str(), later.body.as_str()),
        ("HIT", "read 1")
    );
    assert_eq!(backend.hits(), 2, "one GET of /b, the PUT of /a");
}

#[tokio::test]
async fn entries_expire_after_ttl() {
    let backend = counting_backend(vec![]).await;
    let bs = Backstop::start(&route("r", "/", &backend.url(), "ttl = \"1s\""));
    assert_eq!(get(&bs.url("/t")).await.x_cache, "MISS");
    assert_eq!(get(&bs.url("/t")).await.x_cache, "HIT");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let after = get(&bs.url("/t")).await;
    assert_eq!(
        (after.x_cache.as_str(), after.body.as_str()),
        ("MISS", "n=2 GET /t")
    );
    assert_eq!(get(&bs.url("/t")).await.x_cache, "HIT");
}

#[tokio::test]
async fn the_backends_max_age_shortens_the_ttl() {
    let n = Arc::new(AtomicUsize::new(0));
    let backend = Backend::start(move |seen| {
        let i = n.fetch_add(1, Ordering::SeqCst) + 1;
        let reply = Reply::ok(&format!("n={i}"));
        let path = seen.uri.trim_start_matches("/ignore");
        match path {
            "/max-age" => reply.header("cache-control", "max-age=1"),
            "/s-maxage" => reply.header("cache-control", "max-age=600, s-maxage=1"),
            "/zero" => reply.header("cache-control", "max-age=0, must-revalidate"),
            _ => reply,
        }
    })
    .await;
    let url = backend.url();
    let config = [
        route("strict", "/", &url, "ttl = \"60s\""),
        route("ignore", "/ignore", &url, "ignore_cache_control = true"),
    ]
    .concat();
    let bs = Backstop::start(&config);
    for path in ["/max-age", "/s-maxage", "/ignore/max-age"] {
        assert_eq!(get(&bs.url(path)).await.x_cache, "MISS", "{path}");
        assert_eq!(get(&bs.url(path)).await.x_cache, "HIT", "{path}");
    }
    for want in ["MISS", "MISS"] {
        assert_eq!(get(&bs.url("/zero")).await.x_cache, want, "max-age=0");
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for path in ["/max-age", "/s-maxage"] {
        assert_eq!(get(&bs.url(path)).await.x_cache, "MISS", "{path} expired");
    }
    // ignore_cache_control: the route's ttl alone.
    assert_eq!(get(&bs.url("/ignore/max-age")).await.x_cache, "HIT");
    assert_eq!(get(&bs.url("/ignore/zero")).await.x_cache, "MISS");
    assert_eq!(get(&bs.url("/ignore/zero")).await.x_cache, "HIT");
}

#[tokio::test]
async fn the_backends_age_is_spent_of_its_max_age_and_served_on() {
    let n = Arc::new(AtomicUsize::new(0));
    let backend = Backend::start(move |seen| {
        let i = n.fetch_add(1, Ordering::SeqCst) + 1;
        let reply = Reply::ok(&format!("n={i}"));
        match seen.uri.as_str() {
            // As a cache in front of the backend would answer: 58 of the
            // answer's 60 seconds are spent.
            "/aged" => reply
                .header("cache-control", "max-age=60")
                .header("age", "58"),
            "/at-lifetime" => reply
                .header("cache-control", "max-age=60")
                .header("age", "60"),
            "/invalid" => reply.header("age", "-5"),
            _ => reply,
        }
    })
    .await;
    let bs = Backstop::start(&route("r", "/", &backend.url(), "ttl = \"120s\""));
    assert_eq!(get(&bs.url("/aged")).await.x_cache, "MISS");
    let hit = get(&bs.url("/aged")).await;
    assert_eq!((hit.x_cache.as_str(), hit.body.as_str()), ("HIT", "n=1"));
    let age = hit.age.unwrap();
    assert!(
        (58..=59).contains(&age),
        "the backend's age and ours: {age}"
    );
    // Already as old as its max-age: never fresh here, so not stored.
    for want in ["MISS", "MISS"] {
        assert_eq!(get(&bs.url("/at-lifetime")).await.x_cache, want);
    }
    // An Age that is not a non-negative integer is ignored.
    assert_eq!(get(&bs.url("/invalid")).await.x_cache, "MISS");
    let invalid = get(&bs.url("/invalid")).await;
    assert_eq!(invalid.x_cache, "HIT");
    assert!(invalid.age.unwrap() <= 1, "counted from storing");
    // Two seconds were left of /aged's max-age.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let expired = get(&bs.url("/aged")).await;
    assert_eq!(
        (expired.x_cache.as_str(), expired.body.as_str()),
        ("MISS", "n=5")
    );
}

#[tokio::test]
async fn the_routes_ttl_counts_from_storing_whatever_the_backends_age() {
    let backend = Backend::start(|seen| match seen.uri.trim_start_matches("/ignore") {
        // Fresh for 3480 s more by the backend's word, 1 s by the route's.
        "/long" => Reply::ok("long")
            .header("cache-control", "max-age=3600")
            .header("age", "120"),
        _ => Reply::ok("no max-age").header("age", "600"),
    })
    .await;
    let config = [
        route("r", "/", &backend.url(), "ttl = \"1s\""),
        route(
            "ignore",
            "/ignore",
            &backend.url(),
            "ttl = \"1s\"\nignore_cache_control = true",
        ),
    ]
    .concat();
    let bs = Backstop::start(&config);
    // (path, the backend's Age)
    let cases = [("/long", 120), ("/plain", 600), ("/ignore/long", 120)];
    for (path, backend_age) in cases {
        assert_eq!(get(&bs.url(path)).await.x_cache, "MISS", "{path}");
        let hit = get(&bs.url(path)).await;
        assert_eq!(
            hit.x_cache, "HIT",
            "{path}: stored though older than the ttl"
        );
        let age = hit.age.unwrap();
        assert!(
            (backend_age..=backend_age + 1).contains(&age),
            "{path}: served with the backend's age and ours: {age}"
        );
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for (path, _) in cases {
        assert_eq!(get(&bs.url(path)).await.x_cache, "MISS", "{path}: ttl over");
    }
}

/// A stale entry stands in for a failure only while it is within
/// `stale_if_error`, judged when the failure comes: a backend that took
/// its time to fail does not get an entry served past its window.
#[tokio::test]
async fn a_stale_entry_is_not_served_past_its_window_after_a_slow_failure() {
    let calls = Arc::new(AtomicUsize::new(0));
    let backend = Backend::start(move |_| {
        if calls.fetch_add(1, Ordering::SeqCst) == 0 {
            Reply::ok("fresh")
        } else {
            Reply::ok("late").delay(Duration::from_secs(10))
        }
    })
    .await;
    let bs = Backstop::start(&route_with(
        "r",
        "/",
        &backend.url(),
        "[routes.circuit_breaker]\nrequest_timeout = 2500",
        "ttl = \"1s\"\nstale_if_error = \"2s\"",
    ));
    assert_eq!(get(&bs.url("/a")).await.x_cache, "MISS");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Stale for 1.5 s more as it goes upstream; held 4 s when it times out.
    let r = client().get(bs.url("/a")).send().await.unwrap();
    assert_ne!(
        r.headers().get("x-cache").map(|v| v.to_str().unwrap()),
        Some("STALE")
    );
    let (status, code, _) = error_of(r).await;
    assert_eq!((status, code.as_str()), (504, "upstream_timeout"));
}

#[tokio::test]
async fn must_revalidate_answers_are_never_served_stale() {
    let backend = Backend::start(|seen| match seen.uri.as_str() {
        "/strict" => Reply::ok("strict").header("cache-control", "max-age=60, must-revalidate"),
        "/proxy" => Reply::ok("proxy").header("cache-control", "proxy-revalidate"),
        _ => Reply::ok("lenient").header("cache-control", "max-age=60"),
    })
    .await;
    let bs = Backstop::start(&route(
        "r",
        "/",
        &backend.url(),
        "ttl = \"1s\"\nstale_if_error = \"30s\"",
    ));
    for path in ["/strict", "/proxy", "/lenient"] {
        assert_eq!(get(&bs.url(path)).await.x_cache, "MISS", "{path}");
        assert_eq!(get(&bs.url(path)).await.x_cache, "HIT", "{path}");
    }
    let _stopped = backend.stop().await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let lenient = get(&bs.url("/lenient")).await;
    assert_eq!(
        (lenient.x_cache.as_str(), lenient.body.as_str()),
        ("STALE", "lenient")
    );
    for path in ["/strict", "/proxy"] {
        let r = client().get(bs.url(path)).send().await.unwrap();
        assert_ne!(
            r.headers().get("x-cache").map(|v| v.to_str().unwrap()),
            Some("STALE")
        );
        let (status, code, _) = error_of(r).await;
        assert_eq!(
            (status, code.as_str()),
            (502, "upstream_unreachable"),
            "{path}"
        );
    }
}

#[tokio::test]
async fn cache_control_no_store_and_private_are_respected_unless_ignored() {
    let backend = Backend::start(|seen| {
        let reply = Reply::ok("answer");
        match seen.uri.as_str() {
            "/no-store" => reply.header("cache-control", "no-store"),
            "/private" => reply.header("cache-control", "private, max-age=60"),
            "/cookie" => reply.header("set-cookie", "session=abc"),
            "/error" => Reply::status(500),
            _ => reply.header("cache-control", "max-age=60"),
        }
    })
    .await;
    let url = backend.url();
    let config = [
        route("strict", "/", &url, ""),
        route_with(
            "ignore",
            "/ignore",
            &url,
            "strip_prefix = true",
            "ignore_cache_control = true",
        ),
    ]
    .concat();
    let bs = Backstop::start(&config);
    for path in ["/no-store", "/private", "/cookie", "/error"] {
        assert_eq!(get(&bs.url(path)).await.x_cache, "MISS", "{path}");
        assert_eq!(
            get(&bs.url(path)).await.x_cache,
            "MISS",
            "{path} not stored"
        );
    }
    assert_eq!(get(&bs.url("/max-age")).await.x_cache, "MISS");
    assert_eq!(get(&bs.url("/max-age")).await.x_cache, "HIT");

    // The client's own Cache-Control.
    let c = client();
    let with = |value: &'static str| {
        let req = c.get(bs.url("/max-age")).header("cache-control", value);
        async move { got(req.send().await.unwrap()).await.x_cache }
    };
    assert_eq!(with("no-cache").await, "BYPASS");
    assert_eq!(with("no-store").await, "BYPASS");

    // ignore_cache_control: stored anyway, and a cookie is never replayed.
    for path in ["/ignore/no-store", "/ignore/private"] {
        assert_eq!(get(&bs.url(path)).await.x_cache, "MISS", "{path}");
        assert_eq!(get(&bs.url(path)).await.x_cache, "HIT", "{path} stored");
    }
    assert_eq!(get(&bs.url("/ignore/cookie")).await.x_cache, "MISS");
    let r = client().get(bs.url("/ignore/cookie")).send().await.unwrap();
    assert_eq!(r.headers()["x-cache"], "HIT");
    assert!(r.headers().get("set-cookie").is_none(), "cookie not shared");
    assert_eq!(get(&bs.url("/ignore/error")).await.x_cache, "MISS");
    assert_eq!(
        get(&bs.url("/ignore/error")).await.x_cache,
        "MISS",
        "500 is not a cacheable status"
    );
}

#[tokio::test]
async fn requests_with_credentials_are_not_shared() {
    let backend = counting_backend(vec![]).await;
    let bs = Backstop::start(&route("r", "/", &backend.url(), ""));
    let c = client();
    let authed = || {
        let req = c.get(bs.url("/me")).header("authorization", "Bearer alice");
        async move { got(req.send().await.unwrap()).await }
    };
    assert_eq!(authed().await.x_cache, "MISS");
    assert_eq!(authed().await.x_cache, "MISS", "not stored");
    assert_eq!(
        get(&bs.url("/me")).await.body,
        "n=3 GET /me",
        "never served to others"
    );
    // A session's cookie is a credential too.
    let with_session = |session: &'static str| {
        let req = c.get(bs.url("/cart")).header("cookie", session);
        async move { got(req.send().await.unwrap()).await }
    };
    assert_eq!(with_session("session=alice").await.x_cache, "MISS");
    let bob = with_session("session=bob").await;
    assert_eq!(
        (bob.x_cache.as_str(), bob.body.as_str()),
        ("MISS", "n=5 GET /cart"),
        "alice's cart is not served to bob"
    );
}

/// A header that rewrites what the backend answers (its URL, method, or the
/// prefix it builds links with) is keyed whatever `header_strategy` says:
/// its answer never serves clients who did not send it. (Behind a trusted
/// proxy, whose such headers pass; an untrusted client's forwarding claims
/// never reach the backend at all, see the next test.)
#[tokio::test]
async fn rewriting_headers_are_keyed_so_they_cannot_poison_the_cache() {
    let backend = Backend::start(|seen| {
        let prefix = seen
            .headers
            .get("x-forwarded-prefix")
            .map_or("", |v| v.to_str().unwrap_or("?"));
        Reply::ok(&format!("<a href=\"{prefix}/next\">"))
    })
    .await;
    let bs = Backstop::start(&format!(
        "[server]\ntrusted_proxies = [\"127.0.0.1\"]\n{}",
        route("r", "/", &backend.url(), "")
    ));
    let poisoned = || {
        let req = client()
            .get(bs.url("/page"))
            .header("x-forwarded-prefix", "//evil.example");
        async move { got(req.send().await.unwrap()).await }
    };
    let evil = "<a href=\"//evil.example/next\">";
    let attacker = poisoned().await;
    assert_eq!(
        (attacker.x_cache.as_str(), attacker.body.as_str()),
        ("MISS", evil)
    );
    let victim = get(&bs.url("/page")).await;
    assert_eq!(
        (victim.x_cache.as_str(), victim.body.as_str()),
        ("MISS", "<a href=\"/next\">"),
        "the attacker's answer is not the victim's"
    );
    assert_eq!(get(&bs.url("/page")).await.x_cache, "HIT");
    let again = poisoned().await;
    assert_eq!((again.x_cache.as_str(), again.body.as_str()), ("HIT", evil));
    assert_eq!(backend.hits(), 2);
    // A write still removes the plain read's entry, whatever rewriting
    // headers of its own it sends.
    for (name, value) in [
        ("x-http-method-override", "PATCH"),
        ("x-forwarded-port", "443"),
    ] {
        let write = client().post(bs.url("/page")).header(name, value);
        assert_eq!(write.send().await.unwrap().status(), 200);
        assert_eq!(get(&bs.url("/page")).await.x_cache, "MISS", "after {name}");
        assert_eq!(get(&bs.url("/page")).await.x_cache, "HIT");
    }
}

/// A trusted proxy's `X-Forwarded-Proto` reaches the backend, which builds
/// links with it: it is keyed, so a page made for `https` never answers an
/// `http` request. An untrusted client's is dropped on arrival: the
/// backend sees Backstop's own, and one entry serves every client.
#[tokio::test]
async fn a_trusted_proxys_scheme_is_keyed_and_an_untrusted_clients_dropped() {
    let backend = Backend::start(|seen| {
        let proto = seen.headers.get("x-forwarded-proto");
        let proto = proto.map_or("?", |v| v.to_str().unwrap_or("?"));
        Reply::ok(&format!("{proto}://shop.example/next"))
    })
    .await;
    for trusted in [true, false] {
        let server = if trusted {
            "[server]\ntrusted_proxies = [\"127.0.0.1\"]\n"
        } else {
            ""
        };
        let bs = Backstop::start(&format!("{server}{}", route("r", "/", &backend.url(), "")));
        let page = |proto: &'static str| {
            let req = client()
                .get(bs.url("/page"))
                .header("x-forwarded-proto", proto);
            async move {
                let got = got(req.send().await.unwrap()).await;
                (got.x_cache, got.body)
            }
        };
        let pair = |cache: &str, body: &str| (cache.to_string(), body.to_string());
        let https = "https://shop.example/next";
        let http = "http://shop.example/next";
        if trusted {
            assert_eq!(page("https").await, pair("MISS", https));
            assert_eq!(page("http").await, pair("MISS", http));
            assert_eq!(page("https").await, pair("HIT", https));
        } else {
            assert_eq!(page("https").await, pair("MISS", http));
            assert_eq!(page("http").await, pair("HIT", http));
        }
    }
    assert_eq!(backend.hits(), 3);
}

/// A server-sent event stream on a caching route reaches the client as it
/// comes: it is never stored (a stored answer is read whole first, and a
/// stream does not end).
#[tokio::test]
async fn an_event_stream_on_a_caching_route_streams_through() {
    let event = b"data: hello\n\n";
    let mut answer = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
        transfer-encoding: chunked\r\n\r\n"
        .to_vec();
    answer.extend_from_slice(format!("{:x}\r\n", event.len()).as_bytes());
    answer.extend_from_slice(event);
    answer.extend_from_slice(b"\r\n");
    let backend = StuckBackend::start(answer).await;
    let bs = Backstop::start(&route(
        "r",
        "/",
        &backend.url,
        "ignore_cache_control = true",
    ));
    let mut r = client().get(bs.url("/events")).send().await.unwrap();
    assert_eq!(r.headers()["x-cache"], "MISS");
    let first = tokio::time::timeout(Duration::from_secs(3), r.chunk()).await;
    let first = first.expect("the first event never came").unwrap();
    assert_eq!(first.as_deref(), Some(&event[..]));
}

#[tokio::test]
async fn ignore_cache_control_still_keeps_credentialed_answers_private() {
    let backend = counting_backend(vec![("cache-control", "private")]).await;
    let bs = Backstop::start(&route(
        "r",
        "/",
        &backend.url(),
        "ignore_cache_control = true",
    ));
    let c = client();
    let me = c.get(bs.url("/me")).header("authorization", "Bearer alice");
    let alice = got(me.send().await.unwrap()).await;
    assert_eq!(
        (alice.x_cache.as_str(), alice.body.as_str()),
        ("MISS", "n=1 GET /me")
    );
    let anonymous = get(&bs.url("/me")).await;
    assert_eq!(
        (anonymous.x_cache.as_str(), anonymous.body.as_str()),
        ("MISS", "n=2 GET /me"),
        "alice's answer is not served to others"
    );
    // Without credentials, ignore_cache_control stores despite `private`.
    assert_eq!(get(&bs.url("/me")).await.x_cache, "HIT");
}

/// A client that shows redirects rather than following them.
fn no_redirects() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
}

/// A backend that redirects to the host it was told about, as many do
/// (canonical host, trailing slash, login pages).
async fn redirecting_backend() -> Backend {
    Backend::start(|seen| {
        let host = seen.headers["x-forwarded-host"].to_str().unwrap();
        Reply::status(301).header("location", &format!("https://{host}/home"))
    })
    .await
}

#[tokio::test]
async fn one_clients_host_header_is_never_served_to_another() {
    let backend = redirecting_backend().await;
    // No `host` binding: the route takes any Host.
    let bs = Backstop::start(&route("r", "/", &backend.url(), ""));
    let c = no_redirects().build().unwrap();
    let location = |host: &'static str| {
        let req = c.get(bs.url("/")).header("host", host);
        async move {
            let r = req.send().await.unwrap();
            let location = r.headers()["location"].to_str().unwrap().to_string();
            (got(r).await.x_cache, location)
        }
    };
    let poisoned = location("evil.example").await;
    assert_eq!(
        poisoned,
        ("MISS".into(), "https://evil.example/home".into())
    );
    assert_eq!(
        location("shop.example").await,
        ("MISS".into(), "https://shop.example/home".into()),
        "another host's answer is not this host's"
    );
    assert_eq!(
        location("Shop.EXAMPLE").await,
        ("HIT".into(), "https://shop.example/home".into()),
        "host names are case-insensitive"
    );
    assert_eq!(
        location("shop.example:8443").await.0,
        "MISS",
        "the port reaches the backend too"
    );
    assert_eq!(backend.hits(), 3);
}

#[tokio::test]
async fn a_plain_http_answer_is_never_served_to_https_clients() {
    // The backend sends plain-HTTP clients to https, and answers https.
    let backend = Backend::start(|seen| match seen.headers["x-forwarded-proto"].to_str() {
        Ok("https") => Reply::ok("the page"),
        _ => Reply::status(301).header("location", "https://shop.example/page"),
    })
    .await;
    let pki = crate::tls::make_pki();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, &pki.cert_pem).unwrap();
    std::fs::write(&key, &pki.key_pem).unwrap();
    let prefix = prefix("scheme");
    let shared = format!(
        "{}{}",
        redis_section(MACHINE_REDIS, &prefix),
        route("r", "/", &backend.url(), "store = \"redis\"")
    );
    // Two instances share the Redis store: one plain, one TLS.
    let plain = Backstop::start(&shared);
    let tls = Backstop::start(&format!(
        "[server]\ntls_cert = {cert:?}\ntls_key = {key:?}\n\n{shared}"
    ));
    assert_eq!(tls.scheme, "https");
    let ca = reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap();
    let https = no_redirects()
        .add_root_certificate(ca)
        .http1_only()
        .build()
        .unwrap();
    let http = no_redirects().build().unwrap();
    let page = |c: &reqwest::Client, url: String| {
        let req = c.get(url).header("host", "shop.example");
        async move { got(req.send().await.unwrap()).await }
    };
    let redirect = page(&http, plain.url("/page")).await;
    assert_eq!((redirect.status, redirect.x_cache.as_str()), (301, "MISS"));
    let tls_url = format!("https://localhost:{}/page", tls.addr.port());
    let secure = page(&https, tls_url.clone()).await;
    assert_eq!(
        (secure.status, secure.x_cache.as_str(), secure.body.as_str()),
        (200, "MISS", "the page"),
        "no redirect loop for https clients"
    );
    assert_eq!(page(&https, tls_url).await.x_cache, "HIT");
    assert_eq!(page(&http, plain.url("/page")).await.status, 301);
    assert_eq!(backend.hits(), 2);
}

#[tokio::test]
async fn a_stale_entry_is_served_when_the_backend_is_down() {
    let backend = counting_backend(vec![]).await;
    let url = backend.url();
    let config = [
        route(
            "stale",
            "/stale",
            &url,
            "ttl = \"1s\"\nstale_if_error = \"30s\"",
        ),
        route("fresh-only", "/fresh", &url, "ttl = \"1s\""),
    ]
    .concat();
    let bs = Backstop::start(&config);
    assert_eq!(get(&bs.url("/stale/a")).await.x_cache, "MISS");
    assert_eq!(get(&bs.url("/fresh/a")).await.x_cache, "MISS");
    let _stopped = backend.stop().await;
    // Still fresh: a hit, whatever the backend's state.
    assert_eq!(get(&bs.url("/stale/a")).await.x_cache, "HIT");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let stale = get(&bs.url("/stale/a")).await;
    assert_eq!(stale.status, 200);
    assert_eq!(stale.x_cache, "STALE");
    assert_eq!(stale.body, "n=1 GET /stale/a");
    assert!(stale.age.unwrap() >= 1);
    // Without stale_if_error the failure is the answer.
    let r = client().get(bs.url("/fresh/a")).send().await.unwrap();
    let (status, code, _) = error_of(r).await;
    assert_eq!((status, code.as_str()), (502, "upstream_unreachable"));
    let text = metrics(&bs).await;
    assert_eq!(
        metric_value(
            &text,
            "backstop_cache_total{route=\"stale\",result=\"stale\"}"
        ),
        1.0
    );
}

/// `stale_if_error` covers what says the backend is down (here an answer
/// whose body stalls, which nothing has reached the client of yet), not
/// the backend's own word on the request: its 500 and 429 are passed on.
#[tokio::test]
async fn a_stale_entry_stands_in_for_a_broken_answer_but_not_for_a_500_or_429() {
    let backend = StuckBackend::scripted(vec![
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfresh".to_vec(),
        b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 4\r\n\r\noops".to_vec(),
        b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 7\r\ncontent-length: 4\r\n\r\nslow"
            .to_vec(),
        b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789".to_vec(),
    ])
    .await;
    let bs = Backstop::start(&route_with(
        "stale",
        "/",
        &backend.url,
        "body_read_timeout = \"300ms\"",
        "ttl = \"1s\"\nstale_if_error = \"30s\"",
    ));
    let url = bs.url("/a");
    assert_eq!(get(&url).await.x_cache, "MISS");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let failed = get(&url).await;
    assert_eq!((failed.status, failed.body.as_str()), (500, "oops"));
    let limited = get(&url).await;
    assert_eq!((limited.status, limited.body.as_str()), (429, "slow"));
    let broken = get(&url).await;
    assert_eq!(
        (broken.status, broken.x_cache.as_str(), broken.body.as_str()),
        (200, "STALE", "fresh")
    );
    assert_eq!(backend.requests(), 4);
}

/// A client revalidating its copy gets its `304` from the cache, and a
/// revalidating miss asks the backend for the whole answer: stored, and
/// shared with the plain requests coalesced behind it (a `304` from the
/// backend would have sent each of them upstream on its own). A range
/// goes upstream as it came.
#[tokio::test]
async fn conditional_requests_are_answered_by_the_cache() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let backend = Backend::start(move |seen| {
        counted.fetch_add(1, Ordering::SeqCst);
        if seen
            .headers
            .get("if-none-match")
            .is_some_and(|v| v == "\"v1\"")
        {
            return Reply::status(304).header("etag", "\"v1\"");
        }
        if seen.uri == "/session" {
            // Not stored (it sets a cookie); its 304 still carries it.
            return Reply::ok("yours")
                .header("etag", "\"s1\"")
                .header("set-cookie", "s=renewed");
        }
        Reply::ok("the page")
            .header("etag", "\"v1\"")
            .header("last-modified", "Mon, 07 Dec 2026 10:00:00 GMT")
            .delay(Duration::from_millis(300))
    })
    .await;
    let bs = Backstop::start(&route("r", "/", &backend.url(), "ttl = \"60s\""));
    let url = bs.url("/page");
    let revalidating = client().get(&url).header("if-none-match", "\"v1\"");
    let leader = tokio::spawn(async move { revalidating.send().await.unwrap() });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let plain = get_at_once(url.clone(), 4).await;
    let leader = leader.await.unwrap();
    assert_eq!(leader.status(), 304);
    assert_eq!(leader.headers()["etag"], "\"v1\"");
    assert_eq!(leader.headers()["x-cache"], "MISS");
    assert!(leader.bytes().await.unwrap().is_empty());
    for got in &plain {
        assert_eq!((got.status, got.body.as_str()), (200, "the page"));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "one whole answer, shared");

    let conditional = |name: &'static str, value: &'static str| {
        let req = client().get(&url).header(name, value);
        async move { req.send().await.unwrap() }
    };
    let r = conditional("if-none-match", "W/\"v1\"").await;
    assert_eq!(r.status(), 304);
    assert_eq!(r.headers()["x-cache"], "HIT");
    let r = conditional("if-none-match", "\"v0\"").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "the page");
    let r = conditional("if-modified-since", "Mon, 07 Dec 2026 11:00:00 GMT").await;
    assert_eq!(r.status(), 304);
    let r = conditional("if-modified-since", "Mon, 07 Dec 2026 09:00:00 GMT").await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "all answered from the entry"
    );

    let r = conditional("range", "bytes=0-2").await;
    assert_eq!(r.headers()["x-cache"], "BYPASS");
    assert_eq!(calls.load(Ordering::SeqCst), 2, "a range goes upstream");

    let r = client()
        .get(bs.url("/session"))
        .header("if-none-match", "\"s1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    assert_eq!(r.headers()["set-cookie"], "s=renewed");
    assert!(!r.headers().contains_key("content-type"));
}

#[tokio::test]
async fn a_stale_entry_a_write_removed_while_its_reader_waited_is_not_served() {
    let gets = Arc::new(AtomicUsize::new(0));
    let backend = Backend::start(move |seen| {
        if seen.method == "PUT" {
            return Reply::ok("updated");
        }
        match gets.fetch_add(1, Ordering::SeqCst) {
            0 => Reply::ok("v1"),
            // The fill the second reader waits for: slow, and failing.
            1 => Reply::status(503).delay(Duration::from_millis(1000)),
            _ => Reply::status(503),
        }
    })
    .await;
    let cache = "ttl = \"1s\"\nstale_if_error = \"60s\"\nlock_timeout = \"500ms\"";
    let bs = Backstop::start(&route("r", "/", &backend.url(), cache));
    assert_eq!(get(&bs.url("/d")).await.x_cache, "MISS");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let leader = tokio::spawn(get_at_once(bs.url("/d"), 1));
    backend.wait_for_hits(2, Duration::from_secs(5)).await;
    // Reads the stale entry, then waits for the leader (500 ms at most).
    let waiter = tokio::spawn(get_at_once(bs.url("/d"), 1));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(send("PUT", bs.url("/d"), &[]).await.0, 200);
    // The waiter gives up on the leader, goes upstream, fails: the entry it
    // read is gone, so it is no answer any more.
    let waiter = &waiter.await.unwrap()[0];
    assert_ne!(waiter.x_cache, "STALE", "{}", waiter.body);
    assert_eq!(waiter.status, 503);
    assert_ne!(leader.await.unwrap()[0].x_cache, "STALE");
}

/// A backend's failure status passed on (with nothing stale to serve) is
/// marked too: its lookup missed.
#[tokio::test]
async fn a_failure_status_passed_on_says_it_missed() {
    let backend = Backend::start(|_| Reply::status(503).body("overloaded")).await;
    let bs = Backstop::start(&route("r", "/", &backend.url(), "ttl = \"1s\""));
    let r = get(&bs.url("/x")).await;
    assert_eq!(
        (r.status, r.x_cache.as_str(), r.body.as_str()),
        (503, "MISS", "overloaded")
    );
}

#[tokio::test]
async fn a_stale_entry_is_served_when_the_backend_answers_503() {
    let backend = Backend::scripted(vec![
        Reply::ok("good"),
        Reply::status(503).body("overloaded"),
    ])
    .await;
    let bs = Backstop::start(&route(
        "r",
        "/",
        &backend.url(),
        "ttl = \"1s\"\nstale_if_error = \"30s\"",
    ));
    assert_eq!(get(&bs.url("/x")).await.x_cache, "MISS");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let stale = get(&bs.url("/x")).await;
    assert_eq!((stale.status, stale.x_cache.as_str()), (200, "STALE"));
    assert_eq!(stale.body, "good");
}

#[tokio::test]
async fn concurrent_misses_make_one_upstream_call() {
    let backend =
        Backend::start(|_| Reply::ok("slow answer").delay(Duration::from_millis(500))).await;
    let bs = Backstop::start(&route("r", "/", &backend.url(), ""));
    let answers = get_at_once(bs.url("/slow?a=1&b=2"), 100).await;
    assert_eq!(backend.hits(), 1, "one upstream call for 100 requests");
    assert!(answers
        .iter()
        .all(|a| a.status == 200 && a.body == "slow answer"));
    let misses = answers.iter().filter(|a| a.x_cache == "MISS").count();
    let hits = answers.iter().filter(|a| a.x_cache == "HIT").count();
    assert_eq!((misses, hits), (1, 99));
}

#[tokio::test]
async fn waiters_go_upstream_themselves_when_the_answer_cannot_be_shared() {
    // no-store: the leader's answer is one client's; each waiter asks itself.
    let backend = Backend::start(|_| {
        Reply::ok("private")
            .header("cache-control", "no-store")
            .delay(Duration::from_millis(300))
    })
    .await;
    let bs = Backstop::start(&route("r", "/", &backend.url(), ""));
    let answers = get_at_once(bs.url("/p"), 5).await;
    assert!(answers
        .iter()
        .all(|a| a.status == 200 && a.x_cache == "MISS"));
    assert_eq!(backend.hits(), 5);
}

#[tokio::test]
async fn a_waiter_goes_upstream_itself_after_lock_timeout() {
    // The first fill stalls for 5 s; the twin behind it waits only 300 ms.
    let n = Arc::new(AtomicUsize::new(0));
    let backend = Backend::start(move |_| {
        let i = n.fetch_add(1, Ordering::SeqCst) + 1;
        let reply = Reply::ok(&format!("n={i}"));
        if i == 1 {
            reply.delay(Duration::from_secs(5))
        } else {
            reply
        }
    })
    .await;
    let bs = Backstop::start(&route("r", "/", &backend.url(), "lock_timeout = \"300ms\""));
    let first = tokio::spawn(get_at_once(bs.url("/k"), 1));
    backend.wait_for_hits(1, Duration::from_secs(5)).await;
    let started = Instant::now();
    let twin = get(&bs.url("/k")).await;
    let waited = started.elapsed();
    assert_eq!((twin.status, twin.body.as_str()), (200, "n=2"));
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
        "the twin waited {waited:?}: lock_timeout is 300 ms and the fill 5 s"
    );
    assert!(!first.is_finished(), "the first fill is still stalled");
    assert_eq!(first.await.unwrap()[0].body, "n=1");
}

#[tokio::test]
async fn lock_timeout_zero_turns_coalescing_off() {
    let backend = Backend::start(|_| Reply::ok("slow").delay(Duration::from_millis(300))).await;
    let bs = Backstop::start(&route("r", "/", &backend.url(), "lock_timeout = 0"));
    let answers = get_at_once(bs.url("/k"), 5).await;
    assert!(answers
        .iter()
        .all(|a| a.status == 200 && a.x_cache == "MISS"));
    assert_eq!(backend.hits(), 5, "every concurrent miss went upstream");
}

/// `n` GETs of `url` sent at once by one client; their answers, in order.
async fn get_at_once(url: String, n: usize) -> Vec<Got> {
    let c = client();
    let requests: Vec<_> = (0..n)
        .map(|_| {
            let req = c.get(&url);
            tokio::spawn(async move { got(req.send().await.unwrap()).await })
        })
        .collect();
    let mut answers = Vec::with_capacity(n);
    for request in requests {
        answers.push(request.await.unwrap());
    }
    answers
}

#[tokio::test]
async fn the_memory_store_stays_within_max_bytes() {
    let body = "x".repeat(10_000);
    let backend = Backend::start(move |_| Reply::ok(&body)).await;
    let bs = Backstop::start(&route(
        "r",
        "/",
        &backend.url(),
        "max_bytes = 65536\nmax_entry_bytes = 16384",
    ));
    for i in 0..20 {
        assert_eq!(get(&bs.url(&format!("/big/{i}"))).await.x_cache, "MISS");
    }
    // moka applies its bound in maintenance passes, run as the cache is used.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let _ = get(&bs.url("/big/0")).await;
    let mut hits = 0;
    for i in 0..20 {
        if get(&bs.url(&format!("/big/{i}"))).await.x_cache == "HIT" {
            hits += 1;
        }
    }
    // 64 KiB holds at most six 10 kB answers (and does hold some).
    assert!(
        (1..=6).contains(&hits),
        "{hits} answers of 10 kB kept in 64 KiB"
    );
}

#[tokio::test]
async fn answers_over_max_entry_bytes_stream_through_uncached() {
    let big = "y".repeat(200_000);
    let expected = big.clone();
    let backend = Backend::start(move |_| Reply::ok(&big)).await;
    let bs = Backstop::start(&route("r", "/", &backend.url(), "max_entry_bytes = 100000"));
    for _ in 0..2 {
        let r = get(&bs.url("/huge")).await;
        assert_eq!(r.x_cache, "MISS");
        assert_eq!(r.body, expected);
    }
    assert_eq!(backend.hits(), 2);
}

#[tokio::test]
async fn purge_empties_a_routes_memory_store() {
    let backend = counting_backend(vec![]).await;
    let bs = Backstop::start(&route("r", "/", &backend.url(), ""));
    assert_eq!(get(&bs.url("/p")).await.x_cache, "MISS");
    assert_eq!(get(&bs.url("/p")).await.x_cache, "HIT");
    let r = purge(&bs, "r").await;
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["route"], "r");
    assert_eq!(body["purged"]["redis"], serde_json::Value::Null);
    assert_eq!(get(&bs.url("/p")).await.x_cache, "MISS");
    let missing = purge(&bs, "nope").await;
    assert_eq!(missing.status(), 404);
}

/// A purge while a miss is upstream: what that miss fetched predates the
/// purge, and must not fill the store again.
#[tokio::test]
async fn a_miss_upstream_during_a_purge_does_not_store_its_answer() {
    let n = Arc::new(AtomicUsize::new(0));
    let backend = Backend::start(move |_| {
        let i = n.fetch_add(1, Ordering::SeqCst) + 1;
        let delay = if i == 1 { 1000 } else { 0 };
        Reply::ok(&format!("n={i}")).delay(Duration::from_millis(delay))
    })
    .await;
    let bs = Backstop::start(&route("r", "/", &backend.url(), ""));
    let url = bs.url("/p");
    let slow = tokio::spawn(async move { get(&url).await });
    backend.wait_for_hits(1, Duration::from_secs(5)).await;
    let r = purge(&bs, "r").await;
    assert_eq!(r.status(), 200);
    let first = slow.await.unwrap();
    assert_eq!(
        (first.x_cache.as_str(), first.body.as_str()),
        ("MISS", "n=1")
    );
    let next = get(&bs.url("/p")).await;
    assert_eq!(
        (next.x_cache.as_str(), next.body.as_str()),
        ("MISS", "n=2"),
        "the purge holds"
    );
    assert_eq!(get(&bs.url("/p")).await.x_cache, "HIT");
}

/// Without `max-age`, `Expires` says how long an answer is fresh: in the
/// past (or `0`, no date) it is not stored; a minute ahead it is.
#[tokio::test]
async fn expires_in_the_past_is_not_stored() {
    let past = counting_backend(vec![("expires", "Thu, 01 Jan 1970 00:00:00 GMT")]).await;
    let zero = counting_backend(vec![("expires", "0")]).await;
    let ahead = Backend::start(|_| {
        let in_a_minute = std::time::SystemTime::now() + Duration::from_secs(60);
        Reply::ok("fresh").header("expires", &httpdate::fmt_http_date(in_a_minute))
    })
    .await;
    let bs = Backstop::start(&format!(
        "{}{}{}",
        route("past", "/past", &past.url(), ""),
        route("zero", "/zero", &zero.url(), ""),
        route("ahead", "/ahead", &ahead.url(), "")
    ));
    for path in ["/past/a", "/zero/a"] {
        assert_eq!(get(&bs.url(path)).await.x_cache, "MISS", "{path}");
        assert_eq!(get(&bs.url(path)).await.x_cache, "MISS", "{path}");
    }
    assert_eq!((past.hits(), zero.hits()), (2, 2));
    assert_eq!(get(&bs.url("/ahead/a")).await.x_cache, "MISS");
    assert_eq!(get(&bs.url("/ahead/a")).await.x_cache, "HIT");
}

#[tokio::test]
async fn cached_entries_survive_a_config_reload() {
    let backend = counting_backend(vec![]).await;
    let config = route("r", "/", &backend.url(), "");
    let bs = Backstop::start(&config);
    assert_eq!(get(&bs.url("/keep")).await.x_cache, "MISS");
    std::fs::write(
        &bs.config_path,
        std::fs::read_to_string(&bs.config_path)
            .unwrap()
            .replace("enabled = true", "enabled = true\nttl = \"120s\""),
    )
    .unwrap();
    bs.signal("HUP");
    bs.wait_for_log("configuration reloaded", Duration::from_secs(10))
        .await;
    assert_eq!(get(&bs.url("/keep")).await.x_cache, "HIT");
}

// ---- Redis ----------------------------------------------------------------

const MACHINE_REDIS: &str = "redis://127.0.0.1:6379";

/// The TTL Redis holds for the one key under `prefix`, in milliseconds.
fn redis_pttl(url: &str, prefix: &str) -> i64 {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client
        .get_connection()
        .expect("the machine's Redis on 127.0.0.1:6379");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query(&mut conn)
        .unwrap();
    assert_eq!(keys.len(), 1, "one entry stored: {keys:?}");
    redis::cmd("PTTL").arg(&keys[0]).query(&mut conn).unwrap()
}

#[tokio::test]
async fn two_instances_share_entries_through_redis() {
    let prefix = prefix("share");
    let backend = counting_backend(vec![]).await;
    let config = format!(
        "{}{}",
        redis_section(MACHINE_REDIS, &prefix),
        route(
            "r",
            "/",
            &backend.url(),
            "store = \"redis\"\nttl = \"60s\"\nstale_if_error = \"30s\""
        )
    );
    let a = Backstop::start(&config);
    let b = Backstop::start(&config);
    // Behind a load balancer every instance sees the site's one Host (the
    // host is keyed).
    let at = |url: String| {
        let req = client().get(url).header("host", "api.example");
        async move { got(req.send().await.unwrap()).await }
    };
    let first = at(a.url("/shared?x=1&y=2")).await;
    assert_eq!(first.x_cache, "MISS");
    let other = at(b.url("/shared?y=2&x=1")).await;
    assert_eq!((other.x_cache.as_str(), other.body), ("HIT", first.body));
    assert_eq!(backend.hits(), 1);
    // Redis keeps the entry for ttl + stale_if_error.
    let pttl = redis_pttl(MACHINE_REDIS, &prefix);
    assert!((85_000..=90_000).contains(&pttl), "PTTL {pttl}");

    // A purge on one instance empties Redis for both.
    let r = purge(&b, "r").await;
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["purged"]["redis"], 1);
    assert_eq!(at(a.url("/shared?x=1&y=2")).await.x_cache, "MISS");
    assert_eq!(backend.hits(), 2);
}

#[tokio::test]
async fn an_aged_answer_is_kept_in_redis_for_what_is_left_of_its_lifetime() {
    let prefix = prefix("age");
    let backend = Backend::start(|_| {
        Reply::ok("aged")
            .header("cache-control", "max-age=60")
            .header("age", "50")
    })
    .await;
    let config = format!(
        "{}{}",
        redis_section(MACHINE_REDIS, &prefix),
        route("r", "/", &backend.url(), "store = \"redis\"\nttl = \"60s\"")
    );
    let a = Backstop::start(&config);
    let b = Backstop::start(&config);
    // One site's Host at both instances (the host is keyed).
    let at = |url: String| {
        let req = client().get(url).header("host", "api.example");
        async move { got(req.send().await.unwrap()).await }
    };
    assert_eq!(at(a.url("/aged")).await.x_cache, "MISS");
    let hit = at(b.url("/aged")).await;
    assert_eq!(hit.x_cache, "HIT");
    let age = hit.age.unwrap();
    assert!((50..=51).contains(&age), "as old to every instance: {age}");
    let pttl = redis_pttl(MACHINE_REDIS, &prefix);
    assert!((8_000..=10_000).contains(&pttl), "PTTL {pttl}");
}

#[tokio::test]
async fn a_write_through_one_instance_invalidates_the_shared_entry() {
    let prefix = prefix("write");
    let backend = counting_backend(vec![]).await;
    let config = format!(
        "{}{}",
        redis_section(MACHINE_REDIS, &prefix),
        route("r", "/", &backend.url(), "store = \"redis\"")
    );
    let a = Backstop::start(&config);
    let b = Backstop::start(&config);
    let site = [("host", "api.example")];
    // (instance, method, X-Cache), in order, all on one URI.
    let steps = [
        (&a, "GET", "MISS"),
        (&b, "GET", "HIT"),
        (&b, "HEAD", "MISS"),
        (&a, "HEAD", "HIT"),
        (&a, "PUT", "BYPASS"),
        (&b, "GET", "MISS"),
        (&b, "HEAD", "MISS"),
        (&a, "GET", "HIT"),
    ];
    for (i, (bs, method, x_cache)) in steps.into_iter().enumerate() {
        let (status, got) = send(method, bs.url("/items/1"), &site).await;
        assert_eq!((status, got.as_str()), (200, x_cache), "step {i}: {method}");
    }
    assert_eq!(backend.hits(), 5);
}

/// A TCP relay to `to` that holds each new connection for `hold` before
/// passing it on: a Redis that is slow to connect to.
async fn slow_relay(to: &'static str, hold: Duration) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                tokio::time::sleep(hold).await;
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    format!("redis://{addr}")
}

#[tokio::test]
async fn a_write_whose_client_goes_away_still_invalidates() {
    let prefix = prefix("gone");
    let backend = counting_backend(vec![]).await;
    let cache = "store = \"redis\"";
    let a = Backstop::start(&format!(
        "{}{}",
        redis_section(MACHINE_REDIS, &prefix),
        route("r", "/", &backend.url(), cache)
    ));
    // B reaches Redis only after a second: the write's removal is its first
    // Redis command, still waiting when the client gives up.
    let slow = slow_relay("127.0.0.1:6379", Duration::from_secs(1)).await;
    let b = Backstop::start(&format!(
        "[redis]\nurl = {slow:?}\nkey_prefix = {prefix:?}\ntimeout = \"5s\"\n\n{}",
        route("r", "/", &backend.url(), cache)
    ));
    // Both name the entry by B's address: the host an HTTP/2 client to B
    // sends (`:authority`).
    let b_host = b.addr.to_string();
    let site = [("host", b_host.as_str())];
    assert_eq!(send("GET", a.url("/items/1"), &site).await.1, "MISS");
    assert_eq!(send("GET", a.url("/items/1"), &site).await.1, "HIT");
    // An HTTP/2 client that gives up resets its stream, which cancels its
    // request (an HTTP/1 client's close does not: `half_close`).
    let impatient = h2_client_giving_up_after(Duration::from_millis(300));
    let put = impatient.put(b.url("/items/1")).body("{}").send().await;
    assert!(put.is_err(), "the client gave up before the answer");
    backend.wait_for_hits(2, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(send("GET", a.url("/items/1"), &site).await.1, "MISS");
}

#[tokio::test]
async fn a_write_whose_client_goes_away_while_it_is_upstream_still_invalidates() {
    let n = Arc::new(AtomicUsize::new(0));
    let backend = Backend::start(move |seen| {
        let i = n.fetch_add(1, Ordering::SeqCst) + 1;
        let reply = Reply::ok(&format!("n={i}"));
        if seen.method == "PUT" {
            // Applied, maybe, but answered after the client gave up.
            reply.delay(Duration::from_millis(1000))
        } else {
            reply
        }
    })
    .await;
    let bs = Backstop::start(&route("r", "/", &backend.url(), ""));
    // The entry is named by the address: the host an HTTP/2 client sends
    // (`:authority`) and an HTTP/1 client's `Host` alike.
    assert_eq!(get(&bs.url("/items/1")).await.x_cache, "MISS");
    assert_eq!(get(&bs.url("/items/1")).await.x_cache, "HIT");
    // An HTTP/2 client that gives up resets its stream, which drops its
    // request while the PUT is upstream.
    let impatient = h2_client_giving_up_after(Duration::from_millis(300));
    let put = impatient.put(bs.url("/items/1")).body("{}").send().await;
    assert!(put.is_err(), "the client gave up before the answer");
    backend.wait_for_hits(2, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = get(&bs.url("/items/1")).await;
    assert_eq!(
        after.x_cache, "MISS",
        "the write's outcome is unknown: removed"
    );
}

#[tokio::test]
async fn an_entry_stored_in_an_older_format_is_a_clean_miss() {
    let prefix = prefix("format");
    let backend = counting_backend(vec![]).await;
    let bs = Backstop::start(&format!(
        "{}{}",
        redis_section(MACHINE_REDIS, &prefix),
        route("r", "/", &backend.url(), "store = \"redis\"")
    ));
    assert_eq!(get(&bs.url("/old")).await.x_cache, "MISS");
    // As an older Backstop wrote it: format 3, the layout before the
    // backend's Age was kept apart.
    let mut conn = redis::Client::open(MACHINE_REDIS)
        .unwrap()
        .get_connection()
        .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query(&mut conn)
        .unwrap();
    let mut value: Vec<u8> = redis::cmd("GET").arg(&keys[0]).query(&mut conn).unwrap();
    value[0] = 3;
    let () = redis::cmd("SET")
        .arg(&keys[0])
        .arg(value)
        .query(&mut conn)
        .unwrap();
    let old = get(&bs.url("/old")).await;
    assert_eq!((old.status, old.x_cache.as_str()), (200, "MISS"));
    assert_eq!(get(&bs.url("/old")).await.x_cache, "HIT", "stored anew");
    let text = metrics(&bs).await;
    assert_eq!(metric_value(&text, "backstop_redis_errors_total"), 0.0);
}

/// A `redis-server` of our own on an ephemeral port, killed on drop.
struct OwnRedis {
    child: Child,
    port: u16,
}

impl OwnRedis {
    /// A redis-server on `port`; `None` if it exits first (the port was
    /// taken meanwhile). Ready once it answers PING: a port that merely
    /// accepts could be another test's listener.
    fn try_start_on(port: u16) -> Option<OwnRedis> {
        use std::io::{Read, Write};
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed");
        let mut redis = OwnRedis { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if redis.child.try_wait().unwrap().is_some() {
                return None;
            }
            let pong = std::net::TcpStream::connect(("127.0.0.1", port)).and_then(|mut c| {
                c.set_read_timeout(Some(Duration::from_secs(1)))?;
                c.write_all(b"PING\r\n")?;
                let mut answer = [0u8; 7];
                c.read_exact(&mut answer)?;
                Ok(answer == *b"+PONG\r\n")
            });
            if pong.unwrap_or(false) {
                // Ours, not another test's that took the port first.
                let mut conn = redis::Client::open(redis.url())
                    .ok()?
                    .get_connection()
                    .ok()?;
                let info: String = redis::cmd("INFO").arg("server").query(&mut conn).ok()?;
                let ours = format!("process_id:{}", redis.child.id());
                return info.lines().any(|l| l.trim() == ours).then_some(redis);
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn start_on(port: u16) -> OwnRedis {
        Self::try_start_on(port)
            .unwrap_or_else(|| panic!("redis-server could not take port {port}"))
    }

    fn start() -> OwnRedis {
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            if let Some(redis) = Self::try_start_on(port) {
                return redis;
            }
        }
        panic!("redis-server found no free port in 5 tries")
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test]
async fn traffic_flows_when_redis_dies_and_the_cache_returns_with_it() {
    let mut redis = OwnRedis::start();
    let backend = Backend::start(|seen| {
        Reply::ok(&format!("answer {}", seen.uri)).delay(Duration::from_millis(20))
    })
    .await;
    let config = format!(
        "{}{}",
        redis_section(&redis.url(), "bs:"),
        route("r", "/", &backend.url(), "store = \"redis\"")
    );
    let bs = Backstop::start(&config);
    assert_eq!(get(&bs.url("/a")).await.x_cache, "MISS");
    assert_eq!(get(&bs.url("/a")).await.x_cache, "HIT");

    redis.kill();
    let before = backend.hits();
    for i in 0..30 {
        let started = Instant::now();
        let r = get(&bs.url("/a")).await;
        let took = started.elapsed();
        assert_eq!(r.status, 200, "request {i} answered");
        assert_eq!(r.body, "answer /a");
        assert_ne!(r.x_cache, "HIT", "nothing to hit without Redis");
        // Redis timeout (50 ms) + upstream (20 ms), asserted generously.
        assert!(took < Duration::from_secs(1), "request {i} took {took:?}");
    }
    assert_eq!(backend.hits() - before, 30, "every request went upstream");
    let text = metrics(&bs).await;
    assert!(
        metric_value(&text, "backstop_redis_errors_total") >= 1.0,
        "{text}"
    );
    bs.wait_for_log("redis unavailable", Duration::from_secs(5))
        .await;
    let warnings = bs.logs().matches("redis unavailable").count();
    assert!(warnings <= 2, "rate-limited log: {warnings} lines");

    // Redis comes back on the same port: after the breaker's cool-down the
    // cache is used again.
    let _again = OwnRedis::start_on(redis.port);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if get(&bs.url("/b")).await.x_cache == "HIT" {
            break;
        }
        assert!(Instant::now() < deadline, "cache never came back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every command `redis` receives from now on, as `MONITOR` shows them.
async fn monitor(redis: &OwnRedis) -> Arc<std::sync::Mutex<String>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", redis.port))
        .await
        .unwrap();
    conn.write_all(b"MONITOR\r\n").await.unwrap();
    let seen = Arc::new(std::sync::Mutex::new(String::new()));
    let log = seen.clone();
    let mut first = [0u8; 5];
    conn.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"+OK\r\n", "monitoring");
    tokio::spawn(async move {
        let mut buf = vec![0u8; 8192];
        while let Ok(n) = conn.read(&mut buf).await {
            if n == 0 {
                return;
            }
            log.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    seen
}

/// A raw HTTP/1.1 backend: a GET is answered with its head and half its
/// body at once, the other half `pause` later; any other method with 200.
/// Also the count of GET heads it has sent.
async fn trickling_backend(pause: Duration) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = Arc::new(AtomicUsize::new(0));
    let sent = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let sent = sent.clone();
            tokio::spawn(async move {
                let mut wire = Vec::new();
                // The request's body, if any, is read before answering.
                while let Some(head) = next_request(&mut stream, &mut wire).await {
                    if !head.starts_with("get ") {
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\nupdated";
                        if stream.write_all(ok).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    let start = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nolder";
                    if stream.write_all(start).await.is_err() {
                        return;
                    }
                    sent.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(pause).await;
                    if stream.write_all(b" body").await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, heads)
}

#[tokio::test]
async fn a_write_while_a_reads_body_comes_keeps_it_from_being_stored_at_all() {
    let redis = OwnRedis::start();
    let commands = monitor(&redis).await;
    let (backend, heads) = trickling_backend(Duration::from_millis(2000)).await;
    let config = format!(
        "{}{}",
        redis_section(&redis.url(), "bs:"),
        route("r", "/", &format!("http://{backend}"), "store = \"redis\"")
    );
    let bs = Backstop::start(&config);
    let read = tokio::spawn(get_at_once(bs.url("/doc"), 1));
    // The read's head is here, its body on its way: the write comes now.
    let deadline = Instant::now() + Duration::from_secs(5);
    while heads.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the read never reached the backend"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        send("PUT", bs.url("/doc"), &[]).await,
        (200, "BYPASS".to_string())
    );
    let read = &read.await.unwrap()[0];
    assert_eq!(
        (read.x_cache.as_str(), read.body.as_str()),
        ("MISS", "older body")
    );
    // Anything the read sends Redis goes before a command sent a while
    // after it: once that shows, the record is complete.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut sentinel = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let _: String = redis::cmd("ECHO")
        .arg("sentinel")
        .query(&mut sentinel)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !commands.lock().unwrap().contains("\"sentinel\"") {
        assert!(
            Instant::now() < deadline,
            "the monitor never saw the sentinel"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let commands = commands.lock().unwrap().clone();
    assert!(
        commands.contains("\"UNLINK\""),
        "the write's removal: {commands}"
    );
    // Not stored then removed again: other instances could have served it
    // in between, and a failed removal would have left it for its ttl.
    assert!(!commands.contains("\"SET\""), "stored: {commands}");
    assert_eq!(get(&bs.url("/doc")).await.x_cache, "MISS");
}

#[tokio::test]
async fn an_unreachable_redis_at_startup_only_skips_the_cache() {
    let down = Backend::echo().await.stop().await;
    let port = down.addr.port();
    let backend = counting_backend(vec![]).await;
    let config = format!(
        "{}{}",
        redis_section(&format!("redis://127.0.0.1:{port}"), "bs:"),
        route("r", "/", &backend.url(), "store = \"redis\"")
    );
    let bs = Backstop::start(&config);
    for _ in 0..5 {
        let started = Instant::now();
        let r = get(&bs.url("/x")).await;
        assert_eq!((r.status, r.x_cache.as_str()), (200, "MISS"));
        assert!(started.elapsed() < Duration::from_secs(1));
        // A write's invalidation cannot reach Redis: answered all the same.
        let started = Instant::now();
        let write = send("PUT", bs.url("/x"), &[]).await;
        assert_eq!(write, (200, "BYPASS".to_string()));
        assert!(started.elapsed() < Duration::from_secs(1));
    }
    let r = purge(&bs, "r").await;
    assert_eq!(r.status(), 502, "a purge that cannot reach Redis says so");

    // A route that caches in memory is purged whatever Redis says.
    let memory = route("r", "/", &backend.url(), "");
    let bs = Backstop::start(&format!(
        "{}{memory}",
        redis_section(&format!("redis://127.0.0.1:{port}"), "bs:")
    ));
    let r = purge(&bs, "r").await;
    assert_eq!(r.status(), 200);
}

/// A raw HTTP/1.1 backend answering every request with a chunked body of
/// `size` bytes (`z`), in 1000-byte chunks: answers of unknown length.
async fn chunked_backend(size: usize) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut wire = Vec::new();
                while next_request(&mut stream, &mut wire).await.is_some() {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let mut out = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
                    let mut left = size;
                    while left > 0 {
                        let n = left.min(1000);
                        out.extend_from_slice(format!("{n:x}\r\n").as_bytes());
                        out.extend(std::iter::repeat_n(b'z', n));
                        out.extend_from_slice(b"\r\n");
                        left -= n;
                    }
                    out.extend_from_slice(b"0\r\n\r\n");
                    if stream.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, hits)
}

#[tokio::test]
async fn answers_of_unknown_length_are_cached_when_small_and_streamed_when_large() {
    let (small, small_hits) = chunked_backend(5_000).await;
    let (large, large_hits) = chunked_backend(300_000).await;
    let config = [
        route_with(
            "small",
            "/small",
            &format!("http://{small}"),
            "",
            "max_entry_bytes = 100000",
        ),
        route_with(
            "large",
            "/large",
            &format!("http://{large}"),
            "",
            "max_entry_bytes = 100000",
        ),
    ]
    .concat();
    let bs = Backstop::start(&config);
    for want in ["MISS", "HIT"] {
        let r = get(&bs.url("/small/x")).await;
        assert_eq!(r.x_cache, want);
        assert_eq!(r.body, "z".repeat(5_000));
    }
    assert_eq!(small_hits.load(Ordering::SeqCst), 1);
    for _ in 0..2 {
        let r = get(&bs.url("/large/x")).await;
        assert_eq!(r.x_cache, "MISS");
        assert_eq!(r.body.len(), 300_000, "read prefix + rest, nothing lost");
        assert!(r.body.bytes().all(|b| b == b'z'));
    }
    assert_eq!(large_hits.load(Ordering::SeqCst), 2);
}
