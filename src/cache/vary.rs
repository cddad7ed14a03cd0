//! `Vary` (RFC 9111 §4.1): an answer that varies on request headers is
//! stored with (a digest of) the request's values of those headers, and
//! serves only a request that sends the same values. A request that sends
//! others is a miss whose answer replaces the entry: one variant per key,
//! as nginx keeps them. A header listed in `cache.headers` (or every
//! header, with `header_strategy = "all"`) is in the key itself, so its
//! variants are kept side by side.
//!
//! Pure functions over headers: no I/O. This module never decides whether
//! an answer may be stored (`Vary: *` is `policy`'s), only which stored
//! variant a request may have.

use bytes::BytesMut;
use http::header::VARY;
use http::{HeaderMap, HeaderName};
use ring::digest::{Context, SHA256};

/// At most this many names in a stored answer's `Vary` (real ones name one
/// to three): an answer with more is not stored.
pub const MAX_NAMES: usize = 32;

/// `Vary: *`: no request can be known to match.
#[derive(Debug, PartialEq, Eq)]
pub struct Anything;

/// The request headers an answer's `Vary` names, lower-cased and without
/// repeats. A name that is no header name is left out: no request can send
/// it, so every request agrees on it (absent).
pub fn names(response: &HeaderMap) -> Result<Vec<HeaderName>, Anything> {
    let mut names: Vec<HeaderName> = Vec::new();
    let tokens = response
        .get_all(VARY)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(trim);
    for token in tokens {
        if token == b"*" {
            return Err(Anything);
        }
        // `from_bytes` lower-cases.
        if let Ok(name) = HeaderName::from_bytes(token) {
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    Ok(names)
}

/// What a stored answer's request sent of the headers the answer varies
/// on: their names, and a SHA-256 digest of the values rather than the
/// values themselves, since they may be credentials (`Vary: Cookie`) and
/// entries sit in a shared Redis.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Varied {
    names: Vec<HeaderName>,
    /// Meaningless (zero) when `names` is empty.
    digest: [u8; 32],
}

impl Varied {
    /// Records `request`'s values of `names`.
    pub fn record(names: &[HeaderName], request: &HeaderMap) -> Varied {
        if names.is_empty() {
            return Varied::default();
        }
        Varied {
            names: names.to_vec(),
            digest: digest(names, request),
        }
    }

    /// Whether `request` sends what the stored answer's request sent. An
    /// answer without `Vary` matches every request, at no cost.
    pub fn matches(&self, request: &HeaderMap) -> bool {
        self.names.is_empty() || digest(&self.names, request) == self.digest
    }

    /// The names and the digest, for encoding.
    pub fn parts(&self) -> (&[HeaderName], &[u8; 32]) {
        (&self.names, &self.digest)
    }

    /// From decoded names and digest.
    pub fn from_parts(names: Vec<HeaderName>, digest: [u8; 32]) -> Varied {
        Varied { names, digest }
    }

    /// Bytes held, for the memory bound.
    pub fn weight(&self) -> usize {
        let names: usize = self.names.iter().map(|n| n.as_str().len() + 16).sum();
        names + self.digest.len()
    }
}

/// The digest of `request`'s values of `names`. Each value is its lines,
/// without the whitespace around them, joined by commas (RFC 9111 §4.1
/// allows this much normalising; anything further could join requests the
/// backend tells apart). A header the request does not send is not the
/// same as an empty one. Length-prefixed, like the key.
fn digest(names: &[HeaderName], request: &HeaderMap) -> [u8; 32] {
    let mut ctx = Context::new(&SHA256);
    for name in names {
        let mut lines = request.get_all(name).iter();
        let Some(first) = lines.next() else {
            ctx.update(&[0]);
            continue;
        };
        let mut value = BytesMut::from(trim(first.as_bytes()));
        for line in lines {
            value.extend_from_slice(b",");
            value.extend_from_slice(trim(line.as_bytes()));
        }
        ctx.update(&[1]);
        ctx.update(&(value.len() as u64).to_le_bytes());
        ctx.update(&value);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(start, |i| i + 1);
    &bytes[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(*n, v.parse().unwrap());
        }
        h
    }

    type Headers = &'static [(&'static str, &'static str)];
    /// (why, response headers, names)
    type NamesCase = (&'static str, Headers, Result<Vec<HeaderName>, Anything>);

    #[test]
    fn vary_names() {
        let name = |n: &'static str| HeaderName::from_static(n);
        let cases: Vec<NamesCase> = vec![
            ("none", &[], Ok(vec![])),
            (
                "one",
                &[("vary", "Accept-Encoding")],
                Ok(vec![name("accept-encoding")]),
            ),
            (
                "a list over lines, repeats once",
                &[("vary", " accept ,COOKIE"), ("vary", "Accept,, ")],
                Ok(vec![name("accept"), name("cookie")]),
            ),
            ("star", &[("vary", "accept, *")], Err(Anything)),
            (
                "not a header name",
                &[("vary", "bad name, origin")],
                Ok(vec![name("origin")]),
            ),
        ];
        for (why, response, want) in cases {
            assert_eq!(names(&headers(response)), want, "{why}");
        }
    }

    #[test]
    fn a_stored_variant_serves_only_requests_that_send_the_same() {
        let names = [
            HeaderName::from_static("accept-encoding"),
            HeaderName::from_static("cookie"),
        ];
        let stored = Varied::record(&names, &headers(&[("accept-encoding", "gzip, br")]));
        // (why, request headers, matches?)
        let cases: Vec<(&str, Headers, bool)> = vec![
            ("same", &[("accept-encoding", "gzip, br")], true),
            (
                "other headers",
                &[("accept-encoding", "gzip, br"), ("accept", "x")],
                true,
            ),
            (
                "surrounding whitespace",
                &[("accept-encoding", "  gzip, br ")],
                true,
            ),
            ("other value", &[("accept-encoding", "identity")], false),
            ("order counts", &[("accept-encoding", "br, gzip")], false),
            ("absent", &[], false),
            ("empty is not absent", &[("accept-encoding", "")], false),
            (
                "a cookie the stored request had not",
                &[("accept-encoding", "gzip, br"), ("cookie", "s=1")],
                false,
            ),
            (
                "two lines are one list",
                &[("accept-encoding", "gzip"), ("accept-encoding", "br")],
                false,
            ),
        ];
        for (why, request, want) in cases {
            assert_eq!(stored.matches(&headers(request)), want, "{why}");
        }
        let two_lines = Varied::record(
            &names,
            &headers(&[("accept-encoding", "gzip"), ("accept-encoding", "br")]),
        );
        assert!(two_lines.matches(&headers(&[
            ("accept-encoding", "gzip"),
            ("accept-encoding", " br")
        ])));
        assert!(Varied::default().matches(&headers(&[("cookie", "s=1")])));
    }
}
