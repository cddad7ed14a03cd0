//! The cache key, as the reference setup builds it: route, the scheme the
//! client used (`http`/`https` listener), the host it asked for (lower-cased),
//! method, path, the query parameters sorted by name, the request headers
//! chosen by `header_strategy`, and the body.
//!
//! Scheme and host are keyed because both reach the backend
//! (`X-Forwarded-Proto`, `X-Forwarded-Host`/`Forwarded`) and backends build
//! answers from them (redirects, absolute links): without them, one
//! client's `Host: evil.example` or a plain-HTTP "go to https" redirect
//! would be stored and served to everyone.
//!
//! Everything is fed, length-prefixed (so that no two different requests can
//! produce the same input), into one SHA-256 digest. The key is therefore the
//! same in every Backstop instance (entries are shared through Redis) and
//! cannot be steered into a collision by a client.
//!
//! This module never looks at the response and never decides whether a
//! request is cacheable: it only names it.

use std::borrow::Cow;

use http::header::{CONTENT_ENCODING, CONTENT_TYPE, FORWARDED};
use http::{HeaderMap, HeaderName, Method};
use ring::digest::{Context, SHA256};

use crate::config::HeaderStrategy;
use crate::headers;

/// The digest of one request's cache-relevant parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey([u8; 32]);

impl CacheKey {
    /// Which of `n` stripes (`n` > 0) the key falls in: from its first
    /// bytes, as evenly spread as the digest.
    pub fn stripe(&self, n: usize) -> usize {
        let [a, b, c, d, ..] = self.0;
        usize::try_from(u32::from_be_bytes([a, b, c, d])).unwrap_or(0) % n.max(1)
    }

    /// Lowercase hex, as used in Redis keys.
    pub fn hex(&self) -> String {
        use std::fmt::Write;
        self.0.iter().fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    }
}

/// The key of a request whose head has been read but whose body has not:
/// the head is read before the pipeline rewrites the headers for the
/// upstream, the body only once it is buffered.
#[derive(Clone)]
pub struct KeyHead(Context);

/// Headers that never go into a key: they describe the connection or the
/// framing (hop-by-hop, `Content-Length` — the body itself is keyed), are
/// unique per request by design (`X-Request-Id`, `traceparent`), so keying
/// on them would make every request a miss, or say how to use the cache
/// (`Cache-Control`, `Pragma`): a refresh must replace the entry that plain
/// requests read. A client's validators are judged against the entry, not
/// keyed (see `conditional`).
const NEVER_KEYED: [&str; 16] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "x-request-id",
    "traceparent",
    "tracestate",
    "cache-control",
    "pragma",
    "if-none-match",
    "if-modified-since",
];

/// Request headers that backends and their frameworks act on to rewrite
/// the URL or the method (`X-Original-URL`, `X-HTTP-Method-Override`), or
/// to build links (the scheme, port or path prefix they believe they are
/// served at). An answer shaped by one that the key left out would be
/// served to clients who never sent it: the best-known way to poison a
/// shared cache. So a request that sends one is keyed on it whatever
/// `header_strategy` says (a load balancer in front that sets
/// `X-Forwarded-Port` on every request gives every request the same
/// value). Only a trusted proxy's reach the key: an untrusted peer's claims
/// were removed on arrival (`headers::strip_client_claims`). `Forwarded`
/// is keyed on its claims, not its nodes (see [`FORWARDED_CLAIMS`]).
const REWRITING: [&str; 17] = [
    // The method overrides first (see `METHOD_OVERRIDES`).
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-url",
    "x-rewrite-url",
    "x-forwarded-prefix",
    "x-forwarded-port",
    "x-forwarded-scheme",
    "x-forwarded-ssl",
    "x-forwarded-server",
    "x-host",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-protocol",
    "x-scheme",
    "x-url-scheme",
    "x-original-host",
];

/// Whether `name` is one of [`REWRITING`], also spelled with `_` for `-`
/// (which servers that read both alike take for it).
fn is_rewriting(name: &HeaderName) -> bool {
    REWRITING
        .iter()
        .any(|spelled| headers::read_alike(spelled, name.as_str()))
}

fn is_method_override(name: &HeaderName) -> bool {
    REWRITING[..METHOD_OVERRIDES]
        .iter()
        .any(|spelled| headers::read_alike(spelled, name.as_str()))
}

/// The section of a key that holds a trusted proxy's `Forwarded` claims
/// (`proto`, `host`): its `for` nodes name each client, and keying on them
/// would give every client its own entries.
const FORWARDED_CLAIMS: &[u8] = b"forwarded-claims";

/// How many of [`REWRITING`], from its start, are method overrides: a
/// write's say what the write is, nothing of the reads whose entries it
/// removes.
const METHOD_OVERRIDES: usize = 3;

/// The headers that name the reads a write makes stale, as keys have them:
/// the write's own without its method overrides and, when it sends a
/// rewriting header (or `Forwarded`), also without any (the reads of
/// clients that send none: one reached through a load balancer that sets
/// `X-Forwarded-Port`, the other from inside).
pub fn read_headers_of_write(headers: &HeaderMap) -> Vec<Cow<'_, HeaderMap>> {
    let shapes_reads = |name: &HeaderName| is_rewriting(name) || name == FORWARDED;
    if !headers.keys().any(shapes_reads) {
        return vec![Cow::Borrowed(headers)];
    }
    let without = |drop: &dyn Fn(&HeaderName) -> bool| {
        let mut kept = HeaderMap::with_capacity(headers.len());
        for (name, value) in headers.iter().filter(|(name, _)| !drop(name)) {
            kept.append(name.clone(), value.clone());
        }
        Cow::Owned(kept)
    };
    vec![without(&is_method_override), without(&shapes_reads)]
}

/// What of the request head goes into the key.
pub struct KeyInput<'a> {
    pub route: &'a str,
    /// `"http"` or `"https"`: the scheme the client reached Backstop with.
    pub scheme: &'a str,
    /// The authority the client asked for (the target's, else `Host`), as
    /// sent; `None` for an HTTP/1.0 request without one.
    pub host: Option<&'a [u8]>,
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    pub strategy: HeaderStrategy,
    /// The names for `HeaderStrategy::List`.
    pub listed: &'a [HeaderName],
}

impl KeyInput<'_> {
    /// Whether `header_strategy` puts the header `name` in the key.
    fn keys(&self, name: &HeaderName) -> bool {
        match self.strategy {
            HeaderStrategy::All => true,
            HeaderStrategy::List => self.listed.contains(name),
            HeaderStrategy::None => false,
        }
    }
}

impl KeyHead {
    pub fn new(input: &KeyInput<'_>) -> KeyHead {
        let mut ctx = Context::new(&SHA256);
        field(&mut ctx, b"backstop-cache-v2");
        field(&mut ctx, input.route.as_bytes());
        field(&mut ctx, input.scheme.as_bytes());
        match input.host {
            // Host names are case-insensitive (RFC 3986 §3.2.2): one key
            // for `Example.COM` and `example.com`. The port stays: it
            // reaches the backend too.
            Some(host) => {
                count(&mut ctx, 1);
                field(&mut ctx, &host.to_ascii_lowercase());
            }
            None => count(&mut ctx, 0),
        }
        field(&mut ctx, input.method.as_str().as_bytes());
        field(&mut ctx, input.path.as_bytes());
        let params = sorted_query(input.query.unwrap_or(""));
        count(&mut ctx, params.len());
        for param in params {
            field(&mut ctx, param.as_bytes());
        }
        match input.strategy {
            HeaderStrategy::None => count(&mut ctx, 0),
            HeaderStrategy::All => {
                let mut pairs: Vec<(&str, &[u8])> = input
                    .headers
                    .iter()
                    .filter(|(name, _)| !NEVER_KEYED.contains(&name.as_str()))
                    .map(|(name, value)| (name.as_str(), value.as_bytes()))
                    .collect();
                // Stable: repeated headers keep their order.
                pairs.sort_by_key(|(name, _)| *name);
                count(&mut ctx, pairs.len());
                for (name, value) in pairs {
                    field(&mut ctx, name.as_bytes());
                    field(&mut ctx, value);
                }
            }
            HeaderStrategy::List => {
                count(&mut ctx, input.listed.len());
                for name in input.listed {
                    keyed_header(&mut ctx, input.headers, name);
                }
            }
        }
        // Only requests that send one get the section, so other requests'
        // keys are what they were without it.
        let mut unkeyed: Vec<&HeaderName> = input
            .headers
            .keys()
            .filter(|name| is_rewriting(name) && !input.keys(name))
            .collect();
        if !unkeyed.is_empty() {
            // One order, whatever order the request sent them in.
            unkeyed.sort_unstable_by_key(|name| name.as_str());
            field(&mut ctx, b"rewriting");
            for name in unkeyed {
                keyed_header(&mut ctx, input.headers, name);
            }
        }
        if !input.keys(&FORWARDED) {
            let claims: Vec<Vec<(usize, &[u8])>> = input
                .headers
                .get_all(FORWARDED)
                .iter()
                .map(|line| headers::forwarded_claims(line.as_bytes()))
                .collect();
            // Nodes alone shape no answer: keyed as no header.
            if claims.iter().any(|line| !line.is_empty()) {
                field(&mut ctx, FORWARDED_CLAIMS);
                count(&mut ctx, claims.len());
                for line in claims {
                    count(&mut ctx, line.len());
                    for (element, pair) in line {
                        count(&mut ctx, element);
                        field(&mut ctx, pair);
                    }
                }
            }
        }
        KeyHead(ctx)
    }

    /// The key, once the body is known (empty for requests without one).
    /// A body is keyed with the headers that say how to read it, whatever
    /// `header_strategy` says: the same bytes sent as `text/plain` must not
    /// store an answer (a JSON API's "no query") for those sent as JSON.
    pub fn finish(self, headers: &HeaderMap, body: &[u8]) -> CacheKey {
        let mut ctx = self.0;
        if !body.is_empty() {
            field(&mut ctx, b"body-read-as");
            keyed_header(&mut ctx, headers, &CONTENT_TYPE);
            keyed_header(&mut ctx, headers, &CONTENT_ENCODING);
        }
        field(&mut ctx, body);
        let digest = ctx.finish();
        let mut key = [0u8; 32];
        key.copy_from_slice(digest.as_ref());
        CacheKey(key)
    }
}

/// The query's `name=value` parameters sorted by name; the values of a
/// repeated name keep their order (`a=1&a=2` is not `a=2&a=1` for many
/// APIs). Parameters are compared as sent, without percent-decoding: two
/// spellings of one value are two keys, which costs a miss, never a wrong hit.
fn sorted_query(query: &str) -> Vec<&str> {
    let mut params: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
    params.sort_by_key(|p| p.split('=').next().unwrap_or(""));
    params
}

/// A header's name and its values; a missing header and an empty one are
/// different keys.
fn keyed_header(ctx: &mut Context, headers: &HeaderMap, name: &HeaderName) {
    field(ctx, name.as_str().as_bytes());
    let values = headers.get_all(name);
    count(ctx, values.iter().count());
    for value in values {
        field(ctx, value.as_bytes());
    }
}

fn field(ctx: &mut Context, bytes: &[u8]) {
    ctx.update(&(bytes.len() as u64).to_le_bytes());
    ctx.update(bytes);
}

fn count(ctx: &mut Context, n: usize) {
    ctx.update(&(n as u64).to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request described compactly: method, path?query, headers, body.
    struct Req {
        route: &'static str,
        scheme: &'static str,
        host: Option<&'static str>,
        method: &'static str,
        target: &'static str,
        headers: &'static [(&'static str, &'static str)],
        body: &'static str,
    }

    const fn get(target: &'static str) -> Req {
        Req {
            route: "api",
            scheme: "http",
            host: Some("api.example"),
            method: "GET",
            target,
            headers: &[],
            body: "",
        }
    }

    /// A POST of `body` to `/s` with `headers`.
    const fn post(body: &'static str, headers: &'static [(&'static str, &'static str)]) -> Req {
        Req {
            method: "POST",
            body,
            headers,
            ..get("/s")
        }
    }

    fn key(req: &Req, strategy: HeaderStrategy, listed: &[&str]) -> CacheKey {
        let (path, query) = match req.target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (req.target, None),
        };
        let mut headers = HeaderMap::new();
        for (name, value) in req.headers {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        let listed: Vec<HeaderName> = listed
            .iter()
            .map(|n| HeaderName::from_bytes(n.as_bytes()).unwrap())
            .collect();
        let method = Method::from_bytes(req.method.as_bytes()).unwrap();
        KeyHead::new(&KeyInput {
            route: req.route,
            scheme: req.scheme,
            host: req.host.map(str::as_bytes),
            method: &method,
            path,
            query,
            headers: &headers,
            strategy,
            listed: &listed,
        })
        .finish(&headers, req.body.as_bytes())
    }

    use HeaderStrategy::{All, List, None as NoHeaders};

    /// (why, request a, request b, strategy, listed headers, same key?)
    type Case = (
        &'static str,
        Req,
        Req,
        HeaderStrategy,
        &'static [&'static str],
        bool,
    );

    #[test]
    fn keys_name_what_the_strategy_says_and_nothing_else() {
        let cases: Vec<Case> = vec![
            (
                "identical",
                get("/a?x=1"),
                get("/a?x=1"),
                NoHeaders,
                &[],
                true,
            ),
            (
                "query sorted",
                get("/a?b=2&a=1"),
                get("/a?a=1&b=2"),
                NoHeaders,
                &[],
                true,
            ),
            (
                "empty params ignored",
                get("/a?a=1&&b=2"),
                get("/a?b=2&a=1"),
                NoHeaders,
                &[],
                true,
            ),
            (
                "repeated keep order",
                get("/a?a=1&a=2"),
                get("/a?a=2&a=1"),
                NoHeaders,
                &[],
                false,
            ),
            (
                "query value",
                get("/a?a=1"),
                get("/a?a=2"),
                NoHeaders,
                &[],
                false,
            ),
            (
                "no query vs empty",
                get("/a"),
                get("/a?"),
                NoHeaders,
                &[],
                true,
            ),
            ("path", get("/a"), get("/b"), NoHeaders, &[], false),
            (
                "a rewriting header is keyed whatever the strategy",
                get("/a"),
                Req {
                    headers: &[("x-forwarded-prefix", "//evil.example")],
                    ..get("/a")
                },
                NoHeaders,
                &[],
                false,
            ),
            (
                "a rewriting header spelled with _ is keyed",
                get("/a"),
                Req {
                    headers: &[("x_forwarded_host", "evil.example")],
                    ..get("/a")
                },
                NoHeaders,
                &[],
                false,
            ),
            (
                "rewriting headers in any order",
                Req {
                    headers: &[("x-forwarded-port", "443"), ("x-forwarded-proto", "https")],
                    ..get("/a")
                },
                Req {
                    headers: &[("x-forwarded-proto", "https"), ("x-forwarded-port", "443")],
                    ..get("/a")
                },
                NoHeaders,
                &[],
                true,
            ),
            (
                "a trusted proxy's scheme",
                Req {
                    headers: &[("x-forwarded-proto", "https")],
                    ..get("/a")
                },
                Req {
                    headers: &[("x-forwarded-proto", "http")],
                    ..get("/a")
                },
                NoHeaders,
                &[],
                false,
            ),
            (
                "Forwarded: its claims are keyed",
                Req {
                    headers: &[("forwarded", "for=192.0.2.1;proto=https")],
                    ..get("/a")
                },
                Req {
                    headers: &[("forwarded", "for=192.0.2.1;proto=http")],
                    ..get("/a")
                },
                NoHeaders,
                &[],
                false,
            ),
            (
                "Forwarded: its nodes are not (each client's own)",
                Req {
                    headers: &[("forwarded", "for=192.0.2.1;proto=https")],
                    ..get("/a")
                },
                Req {
                    headers: &[("forwarded", "for=198.51.100.9;proto=https")],
                    ..get("/a")
                },
                NoHeaders,
                &[],
                true,
            ),
            (
                "Forwarded: nodes alone are keyed as no header",
                get("/a"),
                Req {
                    headers: &[("forwarded", "for=192.0.2.1")],
                    ..get("/a")
                },
                NoHeaders,
                &[],
                true,
            ),
            (
                "by its value",
                Req {
                    headers: &[("x-original-url", "/admin")],
                    ..get("/a")
                },
                Req {
                    headers: &[("x-original-url", "/")],
                    ..get("/a")
                },
                List,
                &["accept"],
                false,
            ),
            (
                "the same value, the same key",
                Req {
                    headers: &[("x-forwarded-port", "443"), ("x-other", "1")],
                    ..get("/a")
                },
                Req {
                    headers: &[("x-forwarded-port", "443"), ("x-other", "2")],
                    ..get("/a")
                },
                NoHeaders,
                &[],
                true,
            ),
            (
                "listed: keyed as the list says",
                Req {
                    headers: &[("x-forwarded-port", "443")],
                    ..get("/a")
                },
                Req {
                    headers: &[("x-forwarded-port", "80")],
                    ..get("/a")
                },
                List,
                &["x-forwarded-port"],
                false,
            ),
            (
                "path vs query",
                get("/a?b"),
                get("/a%3Fb"),
                NoHeaders,
                &[],
                false,
            ),
            (
                "method",
                get("/a"),
                Req {
                    method: "HEAD",
                    ..get("/a")
                },
                NoHeaders,
                &[],
                false,
            ),
            (
                "route",
                get("/a"),
                Req {
                    route: "other",
                    ..get("/a")
                },
                NoHeaders,
                &[],
                false,
            ),
            (
                "scheme",
                get("/a"),
                Req {
                    scheme: "https",
                    ..get("/a")
                },
                NoHeaders,
                &[],
                false,
            ),
            (
                "host",
                get("/a"),
                Req {
                    host: Some("evil.example"),
                    ..get("/a")
                },
                NoHeaders,
                &[],
                false,
            ),
            (
                "host: case-insensitive",
                get("/a"),
                Req {
                    host: Some("API.Example"),
                    ..get("/a")
                },
                NoHeaders,
                &[],
                true,
            ),
            (
                "host: the port counts",
                get("/a"),
                Req {
                    host: Some("api.example:8080"),
                    ..get("/a")
                },
                NoHeaders,
                &[],
                false,
            ),
            (
                "host: none is not empty",
                Req {
                    host: None,
                    ..get("/a")
                },
                Req {
                    host: Some(""),
                    ..get("/a")
                },
                NoHeaders,
                &[],
                false,
            ),
            (
                "body",
                post("{\"q\":1}", &[]),
                post("{\"q\":2}", &[]),
                NoHeaders,
                &[],
                false,
            ),
            (
                "same body",
                post("{\"q\":1}", &[]),
                post("{\"q\":1}", &[]),
                NoHeaders,
                &[],
                true,
            ),
            (
                "a body's type keyed whatever the strategy",
                post("{\"q\":1}", &[("content-type", "application/json")]),
                post("{\"q\":1}", &[("content-type", "text/plain")]),
                NoHeaders,
                &[],
                false,
            ),
            (
                "and its coding",
                post("{\"q\":1}", &[("content-encoding", "gzip")]),
                post("{\"q\":1}", &[]),
                NoHeaders,
                &[],
                false,
            ),
            (
                "a request without a body keys neither",
                Req {
                    headers: &[("content-type", "application/json")],
                    ..get("/a")
                },
                get("/a"),
                NoHeaders,
                &[],
                true,
            ),
            (
                "none ignores headers",
                Req {
                    headers: &[("accept", "a/b")],
                    ..get("/a")
                },
                Req {
                    headers: &[("accept", "c/d")],
                    ..get("/a")
                },
                NoHeaders,
                &[],
                true,
            ),
            (
                "all sees headers",
                Req {
                    headers: &[("accept", "a/b")],
                    ..get("/a")
                },
                Req {
                    headers: &[("accept", "c/d")],
                    ..get("/a")
                },
                All,
                &[],
                false,
            ),
            (
                "all: header order irrelevant",
                Req {
                    headers: &[("a", "1"), ("b", "2")],
                    ..get("/a")
                },
                Req {
                    headers: &[("b", "2"), ("a", "1")],
                    ..get("/a")
                },
                All,
                &[],
                true,
            ),
            (
                "all: request id and framing ignored",
                Req {
                    headers: &[("accept", "x"), ("x-request-id", "1")],
                    ..get("/a")
                },
                Req {
                    headers: &[
                        ("accept", "x"),
                        ("x-request-id", "2"),
                        ("connection", "close"),
                    ],
                    ..get("/a")
                },
                All,
                &[],
                true,
            ),
            (
                "all: trace context and a refresh ignored",
                Req {
                    headers: &[("accept", "x")],
                    ..get("/a")
                },
                Req {
                    headers: &[
                        ("accept", "x"),
                        (
                            "traceparent",
                            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                        ),
                        ("tracestate", "a=1"),
                        ("pragma", "no-cache"),
                        ("cache-control", "no-cache"),
                    ],
                    ..get("/a")
                },
                All,
                &[],
                true,
            ),
            (
                "list: listed header counts",
                Req {
                    headers: &[("x-tenant", "a")],
                    ..get("/a")
                },
                Req {
                    headers: &[("x-tenant", "b")],
                    ..get("/a")
                },
                List,
                &["x-tenant"],
                false,
            ),
            (
                "list: other headers ignored",
                Req {
                    headers: &[("x-tenant", "a"), ("accept", "1")],
                    ..get("/a")
                },
                Req {
                    headers: &[("x-tenant", "a"), ("accept", "2")],
                    ..get("/a")
                },
                List,
                &["x-tenant"],
                true,
            ),
            (
                "list: missing is not empty",
                get("/a"),
                Req {
                    headers: &[("x-tenant", "")],
                    ..get("/a")
                },
                List,
                &["x-tenant"],
                false,
            ),
            (
                "list: header names are case-insensitive",
                Req {
                    headers: &[("X-Tenant", "a")],
                    ..get("/a")
                },
                Req {
                    headers: &[("x-tenant", "a")],
                    ..get("/a")
                },
                List,
                &["X-TENANT"],
                true,
            ),
        ];
        for (why, a, b, strategy, listed, same) in cases {
            let (ka, kb) = (key(&a, strategy, listed), key(&b, strategy, listed));
            assert_eq!(ka == kb, same, "{why}");
        }
    }

    #[test]
    fn key_is_stable_across_processes() {
        // The key is shared through Redis: it must not depend on a random seed.
        let k = key(&get("/a?b=2&a=1"), NoHeaders, &[]);
        // Pinned: changing the key layout must be a deliberate act (bump the
        // version tag), since it turns every shared entry into a miss.
        assert_eq!(
            k.hex(),
            "f790c361957066fac7ba1705056b9e25f0ccda523a5029a43c8523fe1671c041"
        );
        assert_eq!(k, key(&get("/a?a=1&b=2"), NoHeaders, &[]));
    }
}
