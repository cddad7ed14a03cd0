//! Conditional requests on caching routes (RFC 9110 §13), as nginx's cache
//! answers them: a client revalidating its copy (`If-None-Match`,
//! `If-Modified-Since`) gets `304 Not Modified` from a stored answer that
//! still matches, whether it is a hit or the answer a miss just fetched. A
//! miss asks the backend for the whole answer, which the cache stores, not
//! for a `304` that only this client could use (and that would leave the
//! requests coalesced behind it to go upstream one by one).
//!
//! Only `GET` and `HEAD` are judged so (RFC 9110 §13.1: a failed
//! `If-None-Match` on another method is a `412`, the backend's to give). A
//! `304` keeps the answer's headers but its representation's (RFC 9110
//! §15.4.5), so a `Set-Cookie` on the miss's own answer still arrives.
//!
//! Requests whose conditions only the backend can judge (`If-Match`,
//! `If-Unmodified-Since`) or that ask for part of the answer (`Range`,
//! `If-Range`) are not cached: they go upstream as they came.
//!
//! Pure functions over headers: no I/O.

use bytes::Bytes;
use http::header::{
    CONTENT_ENCODING, CONTENT_LANGUAGE, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG,
    IF_MATCH, IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE, IF_UNMODIFIED_SINCE, LAST_MODIFIED,
    RANGE, TRANSFER_ENCODING,
};
use http::{HeaderMap, HeaderName, Method, Response, StatusCode};
use http_body_util::{Either, Full};

use crate::body::ResponseBody;

/// The client's validators, judged here rather than by the backend.
const VALIDATORS: [HeaderName; 2] = [IF_NONE_MATCH, IF_MODIFIED_SINCE];

/// What only the backend can answer: such a request bypasses the cache.
const BACKENDS_TO_JUDGE: [HeaderName; 4] = [IF_MATCH, IF_UNMODIFIED_SINCE, RANGE, IF_RANGE];

/// What a `304` leaves out of the answer it stands for: the
/// representation's own metadata and framing (RFC 9110 §15.4.5).
const NOT_IN_304: [HeaderName; 6] = [
    CONTENT_TYPE,
    CONTENT_ENCODING,
    CONTENT_LANGUAGE,
    CONTENT_LENGTH,
    CONTENT_RANGE,
    TRANSFER_ENCODING,
];

/// Whether the request revalidates a copy the cache judges: a `GET` or
/// `HEAD` with `If-None-Match` or `If-Modified-Since`.
pub fn revalidates(method: &Method, request: &HeaderMap) -> bool {
    (method == Method::GET || method == Method::HEAD)
        && VALIDATORS.iter().any(|name| request.contains_key(name))
}

/// Whether the request has conditions or ranges only the backend can
/// judge.
pub fn for_the_backend(request: &HeaderMap) -> bool {
    BACKENDS_TO_JUDGE
        .iter()
        .any(|name| request.contains_key(name))
}

/// Removes the client's validators from a request that [revalidates]
/// and fills the cache: the backend is asked for the whole answer.
pub fn strip_validators(request: &mut HeaderMap) {
    for name in &VALIDATORS {
        request.remove(name);
    }
}

/// `answer` as the client of a request that [revalidates] with
/// `request`'s validators should get it: a `304` when the copy it holds
/// still matches, else as it is.
pub fn answer_for(request: &HeaderMap, answer: Response<ResponseBody>) -> Response<ResponseBody> {
    if !not_modified(request, answer.status(), answer.headers()) {
        return answer;
    }
    let (mut parts, _body) = answer.into_parts();
    parts.status = StatusCode::NOT_MODIFIED;
    for name in &NOT_IN_304 {
        parts.headers.remove(name);
    }
    Response::from_parts(parts, Either::Right(Full::new(Bytes::new())))
}

/// Whether a `200` answer with `answer`'s headers matches the copy the
/// client's validators describe (RFC 9110 §13.2.2): `If-None-Match` by weak
/// comparison when present, else `If-Modified-Since` against
/// `Last-Modified` (an answer without one is always newer).
fn not_modified(request: &HeaderMap, status: StatusCode, answer: &HeaderMap) -> bool {
    if status != StatusCode::OK {
        return false;
    }
    if request.contains_key(IF_NONE_MATCH) {
        let etag = answer.get(ETAG).map(|v| v.as_bytes());
        return request
            .get_all(IF_NONE_MATCH)
            .iter()
            .any(|list| list_matches(list.as_bytes(), etag));
    }
    let date = |headers: &HeaderMap, name| {
        let mut values = headers.get_all(name).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            return None;
        };
        httpdate::parse_http_date(value.to_str().ok()?.trim()).ok()
    };
    match (
        date(request, IF_MODIFIED_SINCE),
        date(answer, LAST_MODIFIED),
    ) {
        (Some(since), Some(modified)) => modified <= since,
        _ => false,
    }
}

/// Whether an `If-None-Match` value (`*` or a list of entity tags) names
/// the answer's `etag`, compared weakly (`W/` ignored). A list that does
/// not parse matches nothing: the client gets the whole answer.
fn list_matches(list: &[u8], etag: Option<&[u8]>) -> bool {
    if list.trim_ascii() == b"*" {
        return true;
    }
    let Some(etag) = etag.and_then(|e| opaque_tags(e).next()) else {
        return false;
    };
    opaque_tags(list).any(|tag| tag == etag)
}

/// The opaque tags (quotes included, `W/` dropped) of a comma-separated
/// list of entity tags, up to the first that does not parse. Split by
/// hand, not at commas: a tag may hold a comma.
fn opaque_tags(mut rest: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        rest = rest.trim_ascii_start();
        while let [b',', tail @ ..] = rest {
            rest = tail.trim_ascii_start();
        }
        if let [b'W', b'/', tail @ ..] = rest {
            rest = tail;
        }
        let [b'"', tail @ ..] = rest else {
            return None;
        };
        let end = tail.iter().position(|&b| b == b'"')?;
        let tag = &rest[..end + 2];
        rest = &tail[end + 1..];
        Some(tag)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(HeaderName, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(name, value.parse().unwrap());
        }
        map
    }

    #[test]
    fn entity_tags_compare_weakly_and_may_hold_commas() {
        let cases: [(&str, Option<&str>, bool); 9] = [
            ("\"v1\"", Some("\"v1\""), true),
            ("W/\"v1\"", Some("\"v1\""), true),
            ("\"v1\"", Some("W/\"v1\""), true),
            ("\"v0\", \"v1\"", Some("\"v1\""), true),
            ("\"a,b\"", Some("\"a,b\""), true),
            ("\"a,b\"", Some("\"a\""), false),
            ("*", None, true),
            ("\"v1\"", None, false),
            ("v1", Some("v1"), false),
        ];
        for (list, etag, want) in cases {
            assert_eq!(
                list_matches(list.as_bytes(), etag.map(str::as_bytes)),
                want,
                "{list} against {etag:?}"
            );
        }
    }

    #[test]
    fn only_gets_and_heads_with_validators_revalidate() {
        let with = headers(&[(IF_NONE_MATCH, "\"v1\"")]);
        assert!(revalidates(&Method::GET, &with));
        assert!(revalidates(&Method::HEAD, &with));
        assert!(!revalidates(&Method::POST, &with), "a 412 is the backend's");
        assert!(!revalidates(&Method::GET, &HeaderMap::new()));
    }

    #[test]
    fn if_none_match_decides_over_if_modified_since() {
        let answer = headers(&[
            (ETAG, "\"v2\""),
            (LAST_MODIFIED, "Mon, 07 Dec 2026 10:00:00 GMT"),
        ]);
        let later = "Mon, 07 Dec 2026 11:00:00 GMT";
        let earlier = "Mon, 07 Dec 2026 09:00:00 GMT";
        let judge = |request: &[(HeaderName, &str)]| {
            not_modified(&headers(request), StatusCode::OK, &answer)
        };
        assert!(judge(&[(IF_MODIFIED_SINCE, later)]));
        assert!(!judge(&[(IF_MODIFIED_SINCE, earlier)]));
        assert!(!judge(&[
            (IF_NONE_MATCH, "\"v1\""),
            (IF_MODIFIED_SINCE, later)
        ]));
        assert!(judge(&[
            (IF_NONE_MATCH, "\"v2\""),
            (IF_MODIFIED_SINCE, earlier)
        ]));
        assert!(!judge(&[(IF_MODIFIED_SINCE, "yesterday")]));
        assert!(!judge(&[]));
        let not_ok = not_modified(
            &headers(&[(IF_NONE_MATCH, "\"v2\"")]),
            StatusCode::NOT_FOUND,
            &answer,
        );
        assert!(!not_ok, "only a 200 stands for a 304");
    }
}
