//! Path normalisation and the per-route path budget, so that statistics per
//! path stay bounded whatever clients send.
//!
//! A segment that looks like an identifier (all digits, a UUID, a long hex
//! string, a ULID, or a random token such as Stripe's `cus_NffrFeUfNV2Hib`)
//! becomes `{id}`, so `/users/42` and `/users/43` are one entry.
//! Each route keeps at most `max_paths` distinct normalised paths; any new
//! path past that is counted under [`OTHER`]. This module never allocates
//! more than the budget allows and never looks at the query string.

use foldhash::HashSet;
use std::borrow::Cow;

/// The entry that takes every path past a route's budget.
pub const OTHER: &str = "{other}";
/// What an identifier segment becomes.
pub const ID: &str = "{id}";

/// Longest path kept as is (longer ones are cut, so that one long path
/// cannot take much memory even under the budget).
const MAX_PATH_LEN: usize = 200;
/// A hex segment at least this long is an id (a short one may be a word
/// such as `cafe` or `add`).
const MIN_HEX_ID_LEN: usize = 16;
/// A token of letters and digits at least this long after a type prefix
/// (`cus_`), with digits, capitals and small letters mixed, is an id.
const MIN_TOKEN_LEN: usize = 12;
/// Without a prefix, at least this long, and with no run of
/// [`WORDLIKE_RUN`] small letters: `OAuth2Callback` is a name.
const MIN_BARE_TOKEN_LEN: usize = 16;
const WORDLIKE_RUN: usize = 5;

/// The longest path an event carries to the aggregator as it came.
const MAX_EVENT_PATH_LEN: usize = 1024;

/// A path longer than [`MAX_EVENT_PATH_LEN`] bytes normalized at once (at
/// most [`MAX_PATH_LEN`] bytes and an ellipsis): the aggregator's own
/// [`normalize`] then leaves it as it is. Cutting it short instead could
/// change what `normalize` makes of it (a long id cut in two is no id).
pub fn bound_for_counting(path: &mut String) {
    if path.len() > MAX_EVENT_PATH_LEN {
        *path = normalize(path).into_owned();
    }
}

/// The normalised form of a request path (without its query): the path
/// itself, not copied, when it has no identifier and is not too long (the
/// usual case, checked for every request).
pub fn normalize(path: &str) -> Cow<'_, str> {
    // Split as bytes: `str::split` sets up a searcher per call, which cost
    // more than the rest of this check.
    let unchanged = path.len() <= MAX_PATH_LEN
        && path.starts_with('/')
        && !path.as_bytes()[1..].split(|b| *b == b'/').any(is_id);
    if unchanged {
        return Cow::Borrowed(path);
    }
    let mut out = String::with_capacity(path.len().min(MAX_PATH_LEN));
    for segment in path.split('/').skip(1) {
        out.push('/');
        if is_id(segment.as_bytes()) {
            out.push_str(ID);
        } else {
            out.push_str(segment);
        }
        if out.len() > MAX_PATH_LEN {
            let mut cut = MAX_PATH_LEN;
            while !out.is_char_boundary(cut) {
                cut -= 1;
            }
            out.truncate(cut);
            out.push('…');
            break;
        }
    }
    if out.is_empty() {
        out.push('/');
    }
    Cow::Owned(out)
}

fn is_id(b: &[u8]) -> bool {
    if b.is_empty() {
        return false;
    }
    if b.iter().all(u8::is_ascii_digit) {
        return true;
    }
    // Most segments are short words: one length check and they are done.
    if b.len() < MIN_TOKEN_LEN {
        return false;
    }
    is_uuid(b)
        || (b.len() >= MIN_HEX_ID_LEN && b.iter().all(u8::is_ascii_hexdigit))
        || is_ulid(b)
        || is_token(b)
}

/// 26 characters of Crockford's base32, the first at most `7`.
fn is_ulid(b: &[u8]) -> bool {
    b.len() == 26
        && matches!(b[0], b'0'..=b'7')
        && b.iter().all(|c| {
            c.is_ascii_alphanumeric()
                && !matches!(c.to_ascii_uppercase(), b'I' | b'L' | b'O' | b'U')
        })
}

/// A random token, after an optional short type prefix (`cus_`, `pi_`):
/// letters and digits, with a digit, a capital and a small letter; one
/// without a prefix longer, and not spelling words.
fn is_token(b: &[u8]) -> bool {
    let (prefixed, token) = match b.iter().position(|&c| c == b'_') {
        Some(at) if (1..=8).contains(&at) && b[..at].iter().all(u8::is_ascii_lowercase) => {
            (true, &b[at + 1..])
        }
        _ => (false, b),
    };
    let min_len = if prefixed {
        MIN_TOKEN_LEN
    } else {
        MIN_BARE_TOKEN_LEN
    };
    token.len() >= min_len
        && token.iter().all(u8::is_ascii_alphanumeric)
        && token.iter().any(u8::is_ascii_digit)
        && token.iter().any(u8::is_ascii_uppercase)
        && token.iter().any(u8::is_ascii_lowercase)
        && (prefixed || !spells_words(token))
}

/// Whether `token` has a run of [`WORDLIKE_RUN`] small letters.
fn spells_words(token: &[u8]) -> bool {
    token
        .split(|c| !c.is_ascii_lowercase())
        .any(|run| run.len() >= WORDLIKE_RUN)
}

fn is_uuid(b: &[u8]) -> bool {
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// The distinct paths one route has seen, up to its budget.
#[derive(Debug, Default)]
pub struct PathBudget {
    known: HashSet<String>,
}

impl PathBudget {
    /// The key to count `normalized` under: itself while the budget allows,
    /// else [`OTHER`].
    pub fn admit<'p>(&mut self, normalized: Cow<'p, str>, max_paths: usize) -> Cow<'p, str> {
        if self.known.contains(normalized.as_ref()) {
            return normalized;
        }
        if self.known.len() < max_paths {
            self.known.insert(normalized.clone().into_owned());
            return normalized;
        }
        Cow::Borrowed(OTHER)
    }

    pub fn len(&self) -> usize {
        self.known.len()
    }

    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_bounded_for_counting_normalizes_as_the_whole() {
        let uuid = "/8c3f2a9e-1b7d-4c52-9e0f-3a6b8d1c7e24";
        let hex = format!("/{}", "0123456789abcdef".repeat(125));
        for segment in ["/12345", "/éé", "/word", uuid, &hex] {
            let whole = format!("/a{}/meta", segment.repeat(400));
            let mut bounded = whole.clone();
            bound_for_counting(&mut bounded);
            assert!(bounded.len() <= MAX_PATH_LEN + '…'.len_utf8());
            assert_eq!(normalize(&bounded), normalize(&whole), "{segment}");
        }
        let mut short = format!("/a{uuid}");
        bound_for_counting(&mut short);
        assert_eq!(short, format!("/a{uuid}"), "left for the aggregator");
    }

    #[test]
    fn a_path_without_identifiers_is_not_copied() {
        for path in ["/", "/api/users", "/api/users/", "/bench/small"] {
            assert!(
                matches!(normalize(path), Cow::Borrowed(p) if p == path),
                "{path}"
            );
        }
        assert_eq!(normalize(""), "/");
        assert_eq!(normalize("*"), "/");
        assert_eq!(normalize("ab"), "/");
        assert!(matches!(normalize("/users/42"), Cow::Owned(_)));
    }

    #[test]
    fn identifiers_become_id() {
        for (path, want) in [
            ("/api/users/42", "/api/users/{id}"),
            ("/api/users/42/orders/7", "/api/users/{id}/orders/{id}"),
            (
                "/api/items/0193a2b4-7c1d-7e2f-8a9b-0c1d2e3f4a5b",
                "/api/items/{id}",
            ),
            ("/api/blobs/deadbeefdeadbeefdeadbeef", "/api/blobs/{id}"),
            ("/api/blobs/cafe", "/api/blobs/cafe"),
            ("/api/users/01HZX3K8Q4ZJ7R6N5M2P1VWXYZ", "/api/users/{id}"),
            ("/api/users/01hzx3k8q4zj7r6n5m2p1vwxyz", "/api/users/{id}"),
            ("/v1/customers/cus_NffrFeUfNV2Hib", "/v1/customers/{id}"),
            ("/s/aZ3kP9qLmN2xR7tY8wV1bC", "/s/{id}"),
            ("/auth/OAuth2Callback", "/auth/OAuth2Callback"),
            ("/x/HTML5ValidatorService", "/x/HTML5ValidatorService"),
            ("/api/authentication", "/api/authentication"),
            (
                "/api/InternationalizationSettings",
                "/api/InternationalizationSettings",
            ),
            ("/blog/my-first-post-2024", "/blog/my-first-post-2024"),
            (
                "/api/get_user_by_email_address",
                "/api/get_user_by_email_address",
            ),
            ("/api/v1/users", "/api/v1/users"),
            ("/", "/"),
            ("", "/"),
            ("/api/users/", "/api/users/"),
        ] {
            assert_eq!(normalize(path), want, "{path}");
        }
    }

    #[test]
    fn long_paths_are_cut() {
        let long = format!("/api/{}", "z".repeat(1000));
        let n = normalize(&long);
        assert!(n.len() <= MAX_PATH_LEN + '…'.len_utf8());
        assert!(n.ends_with('…'));
    }

    #[test]
    fn budget_overflows_to_other() {
        let mut budget = PathBudget::default();
        assert_eq!(budget.admit("/a".into(), 2), "/a");
        assert_eq!(budget.admit("/b".into(), 2), "/b");
        assert_eq!(budget.admit("/c".into(), 2), OTHER);
        assert_eq!(budget.admit("/a".into(), 2), "/a");
        assert_eq!(budget.len(), 2);
    }
}
