//! Whether a request may be answered from the cache, and whether an answer
//! may be stored: the route's `cache` settings plus the HTTP rules a shared
//! cache must follow (RFC 9111), so that one client's private answer is
//! never served to another.
//!
//! Pure functions over headers: no I/O; the clock is a parameter.

use std::time::{Duration, SystemTime};

use http::header::{
    AGE, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, COOKIE, DATE, EXPIRES, PRAGMA, SET_COOKIE,
};
use http::{HeaderMap, HeaderName, Method, StatusCode};

use super::{entry, vary};
use crate::config::{CacheConfig, HeaderStrategy};

/// What the cache does for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestPlan {
    /// The route does not cache: no `X-Cache` header, no metric.
    Off,
    /// Not looked up and not stored (method not cached, `no-store`, a
    /// range or a condition only the backend can judge).
    Bypass,
    /// Not looked up (`Cache-Control: no-cache`), but the fresh answer
    /// replaces the stored one.
    Refresh,
    /// Looked up; a miss is stored.
    Lookup,
    /// A write (an unsafe method the route does not cache): not looked up
    /// nor stored, and once the backend accepts it (2xx, 3xx) the stored
    /// answers of its URI are stale (RFC 9111 §4.4).
    Invalidate,
}

pub fn request_plan(cache: &CacheConfig, method: &Method, headers: &HeaderMap) -> RequestPlan {
    if !cache.enabled {
        return RequestPlan::Off;
    }
    if !cache.methods.contains(method) {
        // Unsafe includes methods whose safety is unknown (RFC 9111 §4.4).
        // A method the route lists is a read there (a POST to a search API
        // keyed on its body): looked up, and never a write that invalidates.
        if method.is_safe() {
            return RequestPlan::Bypass;
        }
        return RequestPlan::Invalidate;
    }
    let directives = cache_control(headers);
    if directives.no_store || super::conditional::for_the_backend(headers) {
        return RequestPlan::Bypass;
    }
    // HTTP/1.0's word for it, read only without `Cache-Control`, which
    // takes its place when both come (RFC 9111 §5.4).
    let pragma_no_cache = !headers.contains_key(CACHE_CONTROL)
        && headers
            .get_all(PRAGMA)
            .iter()
            .any(|v| v.as_bytes().eq_ignore_ascii_case(b"no-cache"));
    if directives.no_cache || pragma_no_cache {
        return RequestPlan::Refresh;
    }
    RequestPlan::Lookup
}

/// Headers that carry one client's credentials: `Authorization` (RFC 9111
/// §3.5) and `Cookie`, a session's (a shared cache such as Varnish does
/// not store answers to either by default).
const CREDENTIALS: [HeaderName; 2] = [AUTHORIZATION, COOKIE];

/// Whether the request carried credentials that are not part of its key:
/// its answer may then be stored only if the backend says it is shared.
pub fn unkeyed_credentials(cache: &CacheConfig, request: &HeaderMap) -> bool {
    CREDENTIALS
        .iter()
        .any(|name| request.contains_key(name) && !keyed(cache, name))
}

/// What the backend allows a shared cache to do with an answer it may
/// store.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Storable {
    /// How long the answer is fresh by the backend's word, from its own
    /// age: `s-maxage`, else `max-age`, else `Expires` (RFC 9111 §4.2.1); the route's
    /// `ttl`, from storing, bounds it too. `None`: the backend set no
    /// bound, or `ignore_cache_control`.
    pub max_age: Option<Duration>,
    /// `must-revalidate`, `proxy-revalidate` or `s-maxage` (which implies
    /// `proxy-revalidate`, RFC 9111 §5.2.2.10): once stale, never served
    /// (§4.2.4), whatever `stale_if_error` says.
    pub must_revalidate: bool,
    /// The request headers the answer varies on (`Vary`): a stored answer
    /// serves only requests that send what this one sent.
    pub vary: Vec<HeaderName>,
    /// How old the answer already is by the backend's `Age` (say a cache
    /// in front of it answered): spent of `max_age` (not of the route's
    /// `ttl`), and part of the `Age` it is served with (RFC 9111 §4.2.3).
    /// Zero without one.
    pub age: Duration,
}

/// Whether an answer may be stored, and how it may be reused if so.
/// `unkeyed_auth`: see [`unkeyed_credentials`]; `received`: when the
/// answer came (for an `Expires` without a `Date`).
pub fn storable(
    cache: &CacheConfig,
    unkeyed_auth: bool,
    status: StatusCode,
    response: &HeaderMap,
    received: SystemTime,
) -> Option<Storable> {
    if !cache.cacheable_status.contains(&status.as_u16()) {
        return None;
    }
    // An event stream never ends, and a stored answer is read whole before
    // the client gets a byte: its events would be held back (whatever
    // `ignore_cache_control` says, it is no answer to keep).
    if is_event_stream(response) {
        return None;
    }
    let directives = cache_control(response);
    // RFC 9111 §3.5: an answer to an authenticated request (here also one
    // with a session's cookie) is shared only when the backend says it may
    // be, unless the credential is in the key.
    // `ignore_cache_control` overrides the backend's directives, never this
    // rule: it protects one client's credentials, not the backend's wishes.
    if unkeyed_auth && !(directives.public || directives.s_maxage.is_some()) {
        return None;
    }
    // A variant chosen by request headers is served only to requests that
    // send the same: that is no backend's wish but what the answer is.
    let vary = vary::names(response);
    if vary
        .as_ref()
        .is_ok_and(|names| names.len() > vary::MAX_NAMES)
    {
        return None;
    }
    // Kept under ignore_cache_control too, for the `Age` served: a fact
    // about the answer. It shortens only the backend's `max_age`, which
    // ignore_cache_control sets aside.
    let age = age(response);
    if cache.ignore_cache_control {
        // The route's ttl and stale_if_error alone decide (`Vary: *` too
        // is overridden: the answer is shared as the key has it).
        return fresh(
            Storable {
                vary: vary.unwrap_or_default(),
                age,
                ..Storable::default()
            },
            cache.ttl,
        );
    }
    if directives.no_store || directives.private || directives.no_cache {
        return None;
    }
    // A cookie set for one client must not be handed to the next.
    if response.contains_key(SET_COOKIE) {
        return None;
    }
    // `Vary: *` says no stored answer can ever match.
    let vary = vary.ok()?;
    let storable = Storable {
        max_age: directives
            .s_maxage
            .or(directives.max_age)
            .or_else(|| expires_lifetime(response, received)),
        must_revalidate: directives.must_revalidate || directives.s_maxage.is_some(),
        vary,
        age,
    };
    fresh(storable, cache.ttl)
}

/// The answer if it would be fresh once stored (see [`entry::fresh_for`]).
/// One that would not (`max-age=0`, or an `Age` at or past `max-age`) is
/// not stored: it could only ever be served stale, and a `stale_if_error`
/// copy of an answer already too old is not worth a slot.
fn fresh(storable: Storable, ttl: Duration) -> Option<Storable> {
    let fresh_for = entry::fresh_for(ttl, storable.max_age, storable.age);
    (!fresh_for.is_zero()).then_some(storable)
}

/// The backend's `Age` (RFC 9111 §5.1): a value that is not a non-negative
/// integer is ignored, as §4.2.3 asks; of several lines, the oldest counts
/// (the safe side). One too large for the clock is capped: past any max-age.
fn age(response: &HeaderMap) -> Duration {
    response
        .get_all(AGE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| digits(v.trim()))
        .max()
        .unwrap_or(Duration::ZERO)
}

/// The freshness lifetime `Expires` gives (RFC 9111 §4.2.1): `Expires`
/// minus `Date`, or minus `received` without a valid `Date`. A value that
/// is no date (`0`, say) or given twice is in the past (§5.3). `None`: no
/// `Expires`.
fn expires_lifetime(response: &HeaderMap, received: SystemTime) -> Option<Duration> {
    let mut lines = response.get_all(EXPIRES).iter();
    let first = lines.next()?;
    let http_date = |v: &http::HeaderValue| {
        v.to_str()
            .ok()
            .and_then(|v| httpdate::parse_http_date(v.trim()).ok())
    };
    let Some(expires) = http_date(first).filter(|_| lines.next().is_none()) else {
        return Some(Duration::ZERO);
    };
    let date = response.get(DATE).and_then(http_date).unwrap_or(received);
    Some(expires.duration_since(date).unwrap_or(Duration::ZERO))
}

/// Whether the answer is a server-sent event stream (`text/event-stream`).
fn is_event_stream(response: &HeaderMap) -> bool {
    response.get(CONTENT_TYPE).is_some_and(|v| {
        let essence = v
            .as_bytes()
            .split(|b| *b == b';')
            .next()
            .unwrap_or_default();
        essence
            .trim_ascii()
            .eq_ignore_ascii_case(b"text/event-stream")
    })
}

/// Whether the request header `name` is part of the cache key.
fn keyed(cache: &CacheConfig, name: &HeaderName) -> bool {
    match cache.header_strategy {
        HeaderStrategy::All => true,
        HeaderStrategy::List => cache.headers.contains(name),
        HeaderStrategy::None => false,
    }
}

/// The `Cache-Control` directives the cache acts on.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Directives {
    no_store: bool,
    no_cache: bool,
    private: bool,
    public: bool,
    max_age: Option<Duration>,
    s_maxage: Option<Duration>,
    /// `must-revalidate` or `proxy-revalidate` (the latter is the former
    /// for shared caches only: Backstop is one).
    must_revalidate: bool,
}

fn cache_control(headers: &HeaderMap) -> Directives {
    let mut d = Directives::default();
    // Read as text whatever its bytes: a line with a non-ASCII byte in
    // some extension's value still says `private` or `no-store`.
    for line in headers.get_all(CACHE_CONTROL) {
        let line = String::from_utf8_lossy(line.as_bytes());
        for token in line.split(',') {
            // `private="set-cookie"` and `no-cache="x"` still count as the
            // directive: treating them as the whole-answer form is the
            // safe side.
            let (name, value) = token.split_once('=').unwrap_or((token, ""));
            match name.trim().to_ascii_lowercase().as_str() {
                "no-store" => d.no_store = true,
                "no-cache" => d.no_cache = true,
                "private" => d.private = true,
                "public" => d.public = true,
                "max-age" => d.max_age = shortest(d.max_age, delta_seconds(value)),
                "s-maxage" => d.s_maxage = shortest(d.s_maxage, delta_seconds(value)),
                "must-revalidate" | "proxy-revalidate" => d.must_revalidate = true,
                _ => {}
            }
        }
    }
    d
}

/// A directive given twice counts with its shorter value (RFC 9111 §4.2.1:
/// conflicting values make the answer stale; the shorter is the safe side).
fn shortest(seen: Option<Duration>, value: Duration) -> Option<Duration> {
    Some(seen.map_or(value, |seen| seen.min(value)))
}

/// A `delta-seconds` value (RFC 9111 §1.2.2), quoted or not. A value that is
/// not one makes the answer stale at once (zero), as RFC 9111 §4.2.1 asks;
/// one too large for the clock is capped (the route's ttl bounds it anyway).
fn delta_seconds(value: &str) -> Duration {
    let value = value.trim();
    let value = value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value);
    digits(value).unwrap_or(Duration::ZERO)
}

/// Seconds written as decimal digits only; `None` for anything else. A
/// value too large for the clock is capped.
fn digits(value: &str) -> Option<Duration> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(Duration::from_secs(
        value.parse().unwrap_or(u64::from(u32::MAX)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn cache(extra: &str) -> CacheConfig {
        let toml = format!(
            "[[routes]]\nname = \"r\"\npath_prefix = \"/\"\nupstreams = [\"http://127.0.0.1:1\"]\n\
             [routes.cache]\nenabled = true\n{extra}\n"
        );
        crate::config::load_str(&toml, Path::new("t.toml"), |_| None)
            .unwrap()
            .routes[0]
            .cache
            .clone()
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(*n, v.parse().unwrap());
        }
        h
    }

    type Headers = &'static [(&'static str, &'static str)];
    /// (why, config, method, request headers, plan)
    type PlanCase<'a> = (&'static str, &'a CacheConfig, Method, Headers, RequestPlan);
    /// (why, config, request headers, status, response headers, storable?)
    type StoreCase<'a> = (&'static str, &'a CacheConfig, Headers, u16, Headers, bool);

    #[test]
    fn request_plans() {
        let default = cache("");
        let post = cache("methods = [\"GET\", \"POST\"]");
        let cases: Vec<PlanCase> = vec![
            ("plain GET", &default, Method::GET, &[], RequestPlan::Lookup),
            ("HEAD", &default, Method::HEAD, &[], RequestPlan::Lookup),
            (
                "POST not listed: a write",
                &default,
                Method::POST,
                &[],
                RequestPlan::Invalidate,
            ),
            ("PUT", &default, Method::PUT, &[], RequestPlan::Invalidate),
            ("PATCH", &post, Method::PATCH, &[], RequestPlan::Invalidate),
            (
                "DELETE",
                &post,
                Method::DELETE,
                &[],
                RequestPlan::Invalidate,
            ),
            (
                "a write whatever its Cache-Control",
                &default,
                Method::DELETE,
                &[("cache-control", "no-store")],
                RequestPlan::Invalidate,
            ),
            (
                "unknown methods are unsafe",
                &default,
                Method::from_bytes(b"PURGE").unwrap(),
                &[],
                RequestPlan::Invalidate,
            ),
            (
                "OPTIONS: safe, not cached",
                &default,
                Method::OPTIONS,
                &[],
                RequestPlan::Bypass,
            ),
            (
                "POST listed: a read",
                &post,
                Method::POST,
                &[],
                RequestPlan::Lookup,
            ),
            (
                "no-store",
                &default,
                Method::GET,
                &[("cache-control", "no-store")],
                RequestPlan::Bypass,
            ),
            (
                "no-cache",
                &default,
                Method::GET,
                &[("cache-control", "max-age=0, No-Cache")],
                RequestPlan::Refresh,
            ),
            (
                "pragma",
                &default,
                Method::GET,
                &[("pragma", "no-cache")],
                RequestPlan::Refresh,
            ),
            (
                "pragma beside cache-control is ignored",
                &default,
                Method::GET,
                &[("pragma", "no-cache"), ("cache-control", "max-age=10")],
                RequestPlan::Lookup,
            ),
            (
                "max-age only",
                &default,
                Method::GET,
                &[("cache-control", "max-age=10")],
                RequestPlan::Lookup,
            ),
        ];
        for (why, config, method, h, want) in cases {
            assert_eq!(request_plan(config, &method, &headers(h)), want, "{why}");
        }
        let off = CacheConfig {
            enabled: false,
            ..default.clone()
        };
        for method in [Method::GET, Method::PUT] {
            assert_eq!(
                request_plan(&off, &method, &HeaderMap::new()),
                RequestPlan::Off
            );
        }
    }

    #[test]
    fn storable_answers() {
        let default = cache("");
        let ignore = cache("ignore_cache_control = true");
        let keyed = cache("header_strategy = \"list\"\nheaders = [\"Authorization\"]");
        let auth: Headers = &[("authorization", "Bearer x")];
        let cookie_keyed = cache("header_strategy = \"list\"\nheaders = [\"Cookie\"]");
        let all = cache("header_strategy = \"all\"");
        let cookie: Headers = &[("cookie", "session=abc")];
        let cases: Vec<StoreCase> = vec![
            ("200", &default, &[], 200, &[], true),
            (
                "an event stream never ends",
                &default,
                &[],
                200,
                &[("content-type", "Text/Event-Stream; charset=utf-8")],
                false,
            ),
            (
                "nor when ignoring Cache-Control",
                &ignore,
                &[],
                200,
                &[("content-type", "text/event-stream")],
                false,
            ),
            ("404 listed", &default, &[], 404, &[], true),
            ("500 not listed", &default, &[], 500, &[], false),
            (
                "no-store",
                &default,
                &[],
                200,
                &[("cache-control", "no-store")],
                false,
            ),
            (
                "private",
                &default,
                &[],
                200,
                &[("cache-control", "max-age=60, private")],
                false,
            ),
            (
                "private beside a value that is not ASCII",
                &default,
                &[],
                200,
                &[("cache-control", "max-age=60, private, ext=\"é\"")],
                false,
            ),
            (
                "private=field",
                &default,
                &[],
                200,
                &[("cache-control", "private=\"x\"")],
                false,
            ),
            (
                "no-cache",
                &default,
                &[],
                200,
                &[("cache-control", "no-cache")],
                false,
            ),
            (
                "max-age",
                &default,
                &[],
                200,
                &[("cache-control", "public, max-age=60")],
                true,
            ),
            (
                "set-cookie",
                &default,
                &[],
                200,
                &[("set-cookie", "s=1")],
                false,
            ),
            (
                "vary *",
                &default,
                &[],
                200,
                &[("vary", "accept, *")],
                false,
            ),
            (
                "vary accept",
                &default,
                &[],
                200,
                &[("vary", "accept")],
                true,
            ),
            (
                "ignore no-store",
                &ignore,
                &[],
                200,
                &[("cache-control", "no-store")],
                true,
            ),
            ("ignore keeps status rule", &ignore, &[], 500, &[], false),
            ("authorization", &default, auth, 200, &[], false),
            (
                "authorization public",
                &default,
                auth,
                200,
                &[("cache-control", "public")],
                true,
            ),
            (
                "authorization s-maxage",
                &default,
                auth,
                200,
                &[("cache-control", "s-maxage=5")],
                true,
            ),
            ("authorization keyed", &keyed, auth, 200, &[], true),
            ("cookie", &default, cookie, 200, &[], false),
            (
                "cookie public",
                &default,
                cookie,
                200,
                &[("cache-control", "public, max-age=5")],
                true,
            ),
            ("cookie keyed", &cookie_keyed, cookie, 200, &[], true),
            ("cookie keyed by all", &all, cookie, 200, &[], true),
            (
                "cookie keyed, authorization not",
                &cookie_keyed,
                &[("cookie", "s=1"), ("authorization", "Bearer x")],
                200,
                &[],
                false,
            ),
            (
                "ignore keeps the authorization rule",
                &ignore,
                auth,
                200,
                &[("cache-control", "no-store")],
                false,
            ),
            (
                "ignore, authorization public",
                &ignore,
                auth,
                200,
                &[("cache-control", "public, no-store")],
                true,
            ),
        ];
        for (why, config, req, status, resp, want) in cases {
            let status = StatusCode::from_u16(status).unwrap();
            assert_eq!(
                storable(
                    config,
                    unkeyed_credentials(config, &headers(req)),
                    status,
                    &headers(resp),
                    SystemTime::UNIX_EPOCH,
                )
                .is_some(),
                want,
                "{why}"
            );
        }
    }

    /// 2026-01-01 00:00:00 UTC: when the answers of these tests came.
    fn received() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600)
    }

    #[test]
    fn the_backends_freshness_rules() {
        let default = cache("");
        let ignore = cache("ignore_cache_control = true");
        let secs = |n| Some(Duration::from_secs(n));
        let reuse = |max_age, must_revalidate| {
            Some(Storable {
                max_age,
                must_revalidate,
                vary: vec![],
                age: Duration::ZERO,
            })
        };
        // (why, config, response headers, what may be stored)
        let cases: Vec<(&str, &CacheConfig, Headers, Option<Storable>)> = vec![
            ("no directives", &default, &[], reuse(None, false)),
            (
                "max-age",
                &default,
                &[("cache-control", "public, max-age=30")],
                reuse(secs(30), false),
            ),
            (
                "quoted",
                &default,
                &[("cache-control", "max-age=\"30\"")],
                reuse(secs(30), false),
            ),
            (
                "s-maxage wins, even when longer, and is never served stale",
                &default,
                &[("cache-control", "max-age=5, S-MaxAge=300")],
                reuse(secs(300), true),
            ),
            (
                "over two lines",
                &default,
                &[
                    ("cache-control", "max-age=60"),
                    ("cache-control", "s-maxage=7"),
                ],
                reuse(secs(7), true),
            ),
            (
                "Expires minus Date",
                &default,
                &[
                    ("expires", "Thu, 01 Jan 2026 00:01:00 GMT"),
                    ("date", "Thu, 01 Jan 2026 00:00:00 GMT"),
                ],
                reuse(secs(60), false),
            ),
            (
                "Expires without Date: from when it came",
                &default,
                &[("expires", "Thu, 01 Jan 2026 00:00:30 GMT")],
                reuse(secs(30), false),
            ),
            (
                "Expires in the past is not stored",
                &default,
                &[("expires", "Thu, 01 Jan 1970 00:00:00 GMT")],
                None,
            ),
            (
                "Expires: 0 is in the past",
                &default,
                &[("expires", "0")],
                None,
            ),
            (
                "Expires twice is in the past",
                &default,
                &[
                    ("expires", "Thu, 01 Jan 2026 00:01:00 GMT"),
                    ("expires", "Thu, 01 Jan 2026 00:01:00 GMT"),
                ],
                None,
            ),
            (
                "max-age wins over Expires",
                &default,
                &[("cache-control", "max-age=20"), ("expires", "0")],
                reuse(secs(20), false),
            ),
            (
                "ignore_cache_control ignores Expires",
                &ignore,
                &[("expires", "0")],
                reuse(None, false),
            ),
            (
                "duplicates: the shorter",
                &default,
                &[("cache-control", "max-age=60, max-age=10")],
                reuse(secs(10), false),
            ),
            (
                "max-age=0 is not stored",
                &default,
                &[("cache-control", "max-age=0, must-revalidate")],
                None,
            ),
            (
                "s-maxage=0 is not stored",
                &default,
                &[("cache-control", "max-age=60, s-maxage=0")],
                None,
            ),
            (
                "invalid value: stale at once",
                &default,
                &[("cache-control", "max-age=soon")],
                None,
            ),
            (
                "negative: stale at once",
                &default,
                &[("cache-control", "max-age=-1")],
                None,
            ),
            (
                "huge: capped",
                &default,
                &[("cache-control", "max-age=99999999999999999999999")],
                reuse(secs(u64::from(u32::MAX)), false),
            ),
            (
                "must-revalidate",
                &default,
                &[("cache-control", "max-age=60, must-revalidate")],
                reuse(secs(60), true),
            ),
            (
                "proxy-revalidate",
                &default,
                &[("cache-control", "proxy-revalidate")],
                reuse(None, true),
            ),
            (
                "vary",
                &default,
                &[("vary", "Accept-Encoding, cookie")],
                Some(Storable {
                    vary: vec![
                        HeaderName::from_static("accept-encoding"),
                        HeaderName::from_static("cookie"),
                    ],
                    ..Storable::default()
                }),
            ),
            (
                "ignore_cache_control keeps vary",
                &ignore,
                &[("vary", "accept-encoding")],
                Some(Storable {
                    vary: vec![HeaderName::from_static("accept-encoding")],
                    ..Storable::default()
                }),
            ),
            (
                "ignore_cache_control: the route decides",
                &ignore,
                &[("cache-control", "max-age=0, must-revalidate")],
                reuse(None, false),
            ),
        ];
        for (why, config, resp, want) in cases {
            let got = storable(config, false, StatusCode::OK, &headers(resp), received());
            assert_eq!(got, want, "{why}");
        }
    }

    #[test]
    fn the_backends_age_is_spent_of_its_max_age() {
        let default = cache("ttl = \"60s\"");
        let ignore = cache("ttl = \"60s\"\nignore_cache_control = true");
        let secs = Duration::from_secs;
        // (why, config, response headers, the age counted; None: not stored)
        let cases: Vec<(&str, &CacheConfig, Headers, Option<Duration>)> = vec![
            ("no Age", &default, &[], Some(secs(0))),
            // Without max-age, the ttl counts from storing whatever the Age.
            ("within the ttl", &default, &[("age", "59")], Some(secs(59))),
            (
                "past the ttl",
                &default,
                &[("age", "3600")],
                Some(secs(3600)),
            ),
            (
                "past the ttl, within max-age",
                &default,
                &[("cache-control", "max-age=3600"), ("age", "120")],
                Some(secs(120)),
            ),
            (
                "at max-age: stale",
                &default,
                &[("cache-control", "max-age=30"), ("age", "30")],
                None,
            ),
            (
                "within max-age",
                &default,
                &[("cache-control", "max-age=30"), ("age", "29")],
                Some(secs(29)),
            ),
            (
                "past max-age, within the ttl",
                &default,
                &[("cache-control", "max-age=30"), ("age", "31")],
                None,
            ),
            (
                "past max-age, within s-maxage",
                &default,
                &[("cache-control", "max-age=10, s-maxage=30"), ("age", "20")],
                Some(secs(20)),
            ),
            ("padded", &default, &[("age", " 7 ")], Some(secs(7))),
            (
                "huge, under max-age",
                &default,
                &[
                    ("cache-control", "max-age=60"),
                    ("age", "99999999999999999999999"),
                ],
                None,
            ),
            (
                "negative: ignored",
                &default,
                &[("age", "-5")],
                Some(secs(0)),
            ),
            (
                "fraction: ignored",
                &default,
                &[("age", "1.5")],
                Some(secs(0)),
            ),
            ("text: ignored", &default, &[("age", "old")], Some(secs(0))),
            ("empty: ignored", &default, &[("age", "")], Some(secs(0))),
            (
                "quoted: ignored",
                &default,
                &[("age", "\"5\"")],
                Some(secs(0)),
            ),
            (
                "a list: ignored",
                &default,
                &[("age", "5, 70")],
                Some(secs(0)),
            ),
            (
                "two lines: the oldest",
                &default,
                &[("age", "5"), ("age", "50")],
                Some(secs(50)),
            ),
            (
                "two lines, one invalid",
                &default,
                &[("age", "x"), ("age", "50")],
                Some(secs(50)),
            ),
            (
                "ignore_cache_control: still counted",
                &ignore,
                &[("cache-control", "max-age=0"), ("age", "20")],
                Some(secs(20)),
            ),
            (
                "ignore_cache_control: past the ttl",
                &ignore,
                &[("age", "600")],
                Some(secs(600)),
            ),
        ];
        for (why, config, resp, want) in cases {
            let got = storable(config, false, StatusCode::OK, &headers(resp), received());
            assert_eq!(got.map(|s| s.age), want, "{why}");
        }
    }
}
