//! A request's path made canonical before routing (RFC 3986 §6.2.2), as
//! nginx does before it matches a location: percent-encoded unreserved
//! characters decoded (`/%61dmin` is `/admin`; other escapes upper-cased,
//! bytes beyond ASCII escaped, so `/café` is `/caf%C3%A9`), repeated slashes merged
//! (`//admin` is `/admin`; nginx's `merge_slashes`, on by default here as
//! there, off with `server.merge_slashes = false` for a backend that gives
//! them a meaning; a segment of only `;` parameters counts as empty) and
//! dot segments (`.` and `..`, with or without parameters) resolved (§5.2.4).
//! Otherwise `/api/public/../admin`, `/api/%61dmin` or `//admin` would
//! miss `/admin`'s route and its rules (rate limit, host binding, capture),
//! fall to a broader route, and reach a backend that reads them as
//! `/admin`.
//!
//! Escaped slashes (`%2F`; `%5C` and `\`, which Windows servers and some
//! Java frameworks read as `/`) are refused by default, as Tomcat does
//! (Apache answers 404): a backend that decodes them would read
//! `/admin%2Fx` as `/admin/x`, which a route must not miss
//! (`server.escaped_slashes`; Envoy's `path_with_escaped_slashes_action`).

/// What to do with a request's path.
#[derive(Debug, PartialEq, Eq)]
pub enum Resolved {
    /// Already canonical: the path stays as it is (nearly every request).
    Unchanged,
    /// The canonical path.
    Changed(String),
    /// No path to route: refused (`400`).
    Refused(Refusal),
}

/// Why a path is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A `..` climbs above the root, as nginx refuses.
    AboveRoot,
    /// An escaped slash, under [`EscapedSlashes::Reject`].
    EscapedSlash,
    /// A `%` without two hex digits after it, as nginx refuses: decoding
    /// around it could make a new escape (`%%32F` would be `%2F`).
    BadEscape,
    /// `%00`, as nginx refuses: a backend in C would read `/admin%00x` as
    /// `/admin`, past the route that `/admin%00x` missed.
    EscapedNul,
}

impl Refusal {
    /// What is wrong with the path, to follow "the path".
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::AboveRoot => "climbs above the root with '..'",
            Refusal::EscapedSlash => {
                "has an escaped slash (%2F, %5C or \\), which server.escaped_slashes = \"reject\" refuses"
            }
            Refusal::BadEscape => "has a '%' that is not followed by two hex digits",
            Refusal::EscapedNul => "has an escaped NUL (%00)",
        }
    }
}

/// How a path's escaped slashes are taken (`server.escaped_slashes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EscapedSlashes {
    /// Refused (`400`): no route can be missed by one.
    Reject,
    /// Routed and sent as they are, as part of their segment.
    Keep,
    /// Read as `/` before routing (then merged, dots resolved), as nginx
    /// does with `%2F`; the decoded path is the one sent upstream.
    Decode,
}

/// The settings that make a path canonical.
#[derive(Debug, Clone, Copy)]
pub struct PathRules {
    pub merge_slashes: bool,
    pub escaped_slashes: EscapedSlashes,
}

/// The canonical form of `path` (an origin-form path, from `/`) under
/// `rules`.
pub fn resolve(path: &str, rules: PathRules) -> Resolved {
    // One short scan for the common case (no dot, no escape, no `//`).
    if !needs_work(path.as_bytes(), rules.merge_slashes) {
        return Resolved::Unchanged;
    }
    let decoded = match normalize_escapes(path, rules.escaped_slashes) {
        Ok(decoded) => decoded,
        Err(refusal) => return Resolved::Refused(refusal),
    };
    let merged = match decoded.as_deref().unwrap_or(path) {
        text if rules.merge_slashes => drop_empty_segments(text),
        _ => None,
    };
    let changed = merged.or(decoded);
    match resolve_dots(changed.as_deref().unwrap_or(path)) {
        Resolved::Unchanged => changed.map_or(Resolved::Unchanged, Resolved::Changed),
        other => other,
    }
}

/// Whether `path` has a dot, an escape, a backslash, a byte beyond ASCII
/// or (when merging) a `//` or `/;`.
fn needs_work(path: &[u8], merge_slashes: bool) -> bool {
    let mut after_slash = false;
    for &b in path {
        match b {
            b'.' | b'%' | b'\\' | 128.. => return true,
            b'/' | b';' if after_slash && merge_slashes => return true,
            _ => {}
        }
        after_slash = b == b'/';
    }
    false
}

/// `path` without its empty segments but the last (so `/a/` keeps its
/// slash): those of `//`, and those that are only `;` parameters, which
/// Tomcat drops and then merges the slashes (`/api/;x/admin` is its
/// `/api/admin`). `None` when there is none.
fn drop_empty_segments(path: &str) -> Option<String> {
    let segments: Vec<&str> = path.strip_prefix('/')?.split('/').collect();
    let (_, inner) = segments.split_last()?;
    let empty = |segment: &&str| segment.split(';').next().unwrap_or(segment).is_empty();
    if !inner.iter().any(empty) {
        return None;
    }
    let mut kept = String::with_capacity(path.len());
    for (i, segment) in segments.iter().enumerate() {
        if i + 1 == segments.len() || !empty(segment) {
            kept.push('/');
            kept.push_str(segment);
        }
    }
    Some(kept)
}

/// `path` with its escapes in canonical form (RFC 3986 §6.2.2.1-2): `%XX`
/// decoded where it stands for an unreserved character (letters, digits,
/// `-._~`), which is the same URI either way, the hex digits of the others
/// upper-cased and bytes beyond ASCII escaped, so `/caf%c3%a9` and `/café`
/// are both `/caf%C3%A9` and neither misses a route that a backend which
/// decodes would give them; `%2F`, `%5C` and `\` refused, made `/` or kept
/// as `escaped_slashes` says. `None` when nothing changes. Other escapes
/// (`%20`, `%3F`, ...) stay escaped: decoded they would mean something
/// else. Refused: a `%` without two hex digits, and `%00`.
fn normalize_escapes(
    path: &str,
    escaped_slashes: EscapedSlashes,
) -> Result<Option<String>, Refusal> {
    // What an escaped slash of `len` bytes becomes, `kept` if it stays.
    let slash = |len, kept| match escaped_slashes {
        EscapedSlashes::Reject => Err(Refusal::EscapedSlash),
        EscapedSlashes::Decode => Ok((len, Canonical::Byte(b'/'))),
        EscapedSlashes::Keep => Ok((len, kept)),
    };
    let bytes = path.as_bytes();
    let mut out: Option<Vec<u8>> = None;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let (len, canonical) = if b == b'%' {
            let c = match bytes.get(i + 1..i + 3) {
                Some([hi, lo]) => hex(*hi).zip(hex(*lo)).map(|(hi, lo)| hi * 16 + lo),
                _ => None,
            };
            match c.ok_or(Refusal::BadEscape)? {
                0 => return Err(Refusal::EscapedNul),
                c if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') => {
                    (3, Canonical::Byte(c))
                }
                c @ (b'/' | b'\\') => slash(3, Canonical::Escape(c))?,
                c => (3, Canonical::Escape(c)),
            }
        } else if !b.is_ascii() {
            (1, Canonical::Escape(b))
        } else if b == b'\\' {
            slash(1, Canonical::Same)?
        } else {
            (1, Canonical::Same)
        };
        let source = &bytes[i..i + len];
        let mut escape = [b'%', 0, 0];
        let canonical: &[u8] = match canonical {
            Canonical::Same => source,
            Canonical::Byte(c) => &[c],
            Canonical::Escape(c) => {
                escape[1] = HEX_DIGITS[usize::from(c >> 4)];
                escape[2] = HEX_DIGITS[usize::from(c & 15)];
                &escape
            }
        };
        if out.is_none() && canonical != source {
            out = Some(bytes[..i].to_vec());
        }
        if let Some(out) = &mut out {
            out.extend_from_slice(canonical);
        }
        i += len;
    }
    // Whole characters are replaced by ASCII: the text stays UTF-8.
    Ok(out.and_then(|out| String::from_utf8(out).ok()))
}

/// What stands for a byte or an escape in the canonical path.
enum Canonical {
    Same,
    Byte(u8),
    Escape(u8),
}

const HEX_DIGITS: &[u8; 16] = b"0123456789ABCDEF";

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Resolves the dot segments of `path`.
fn resolve_dots(path: &str) -> Resolved {
    let Some(rest) = path.strip_prefix('/') else {
        return Resolved::Unchanged;
    };
    if !rest.split('/').any(|segment| dots(segment).is_some()) {
        return Resolved::Unchanged;
    }
    let mut kept: Vec<&str> = Vec::new();
    let mut ends_in_directory = false;
    for segment in rest.split('/') {
        ends_in_directory = true;
        match dots(segment) {
            Some(Dots::One) => {}
            Some(Dots::Two) => {
                if kept.pop().is_none() {
                    return Resolved::Refused(Refusal::AboveRoot);
                }
            }
            None => {
                kept.push(segment);
                ends_in_directory = false;
            }
        }
    }
    let mut resolved = String::with_capacity(path.len());
    for segment in &kept {
        resolved.push('/');
        resolved.push_str(segment);
    }
    // `/a/b/..` is the directory `/a/`, not the file `/a`.
    if ends_in_directory || kept.is_empty() {
        resolved.push('/');
    }
    Resolved::Changed(resolved)
}

enum Dots {
    One,
    Two,
}

/// Whether `segment` is `.` or `..` (an escaped dot is decoded before),
/// with or without `;` path parameters: Tomcat and Jetty read `..;x` as
/// `..`, so it must climb here too (its parameters go with it).
fn dots(segment: &str) -> Option<Dots> {
    match segment.split(';').next().unwrap_or(segment) {
        "." => Some(Dots::One),
        ".." => Some(Dots::Two),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_made_canonical_and_others_left_alone() {
        let changed = |s: &str| Resolved::Changed(s.to_string());
        let cases = [
            ("/api/users/7", Resolved::Unchanged),
            ("/", Resolved::Unchanged),
            ("/a/.hidden/b..c/...", Resolved::Unchanged),
            ("/a/%2F%20", Resolved::Unchanged),
            ("/api/%61dmin/%7Eu", changed("/api/admin/~u")),
            ("/a/%41%2F", changed("/a/A%2F")),
            ("/caf%c3%a9/%3a", changed("/caf%C3%A9/%3A")),
            ("/café/x", changed("/caf%C3%A9/x")),
            ("/a%2f%5c", changed("/a%2F%5C")),
            ("/a/%zz", Resolved::Refused(Refusal::BadEscape)),
            ("/a/%4", Resolved::Refused(Refusal::BadEscape)),
            ("/a/%%32F", Resolved::Refused(Refusal::BadEscape)),
            ("/admin%00x", Resolved::Refused(Refusal::EscapedNul)),
            ("/api/public/../admin", changed("/api/admin")),
            ("/api/public/%2e%2E/admin/x", changed("/api/admin/x")),
            ("/a/./b/.", changed("/a/b/")),
            ("/a/b/..", changed("/a/")),
            ("/a/.%2e", changed("/")),
            ("/./", changed("/")),
            // Merged first, as nginx does: `..` climbs over `a`.
            ("/a//../b", changed("/b")),
            ("/..", Resolved::Refused(Refusal::AboveRoot)),
            ("/a/../../etc/passwd", Resolved::Refused(Refusal::AboveRoot)),
            ("//admin", changed("/admin")),
            ("/api///users//7/", changed("/api/users/7/")),
            ("/a//%61/.//b", changed("/a/a/b")),
            ("/a/b;c=1/d", Resolved::Unchanged),
            ("/api/public/..;/admin", changed("/api/admin")),
            (
                "/api/public/%2e%2e;x=1/admin/.;y/z",
                changed("/api/admin/z"),
            ),
            ("/a/..x;y/b", Resolved::Unchanged),
            ("/api/;/admin", changed("/api/admin")),
            ("/;x/api/;y=1/admin/", changed("/api/admin/")),
            ("/api/public/;/../admin", changed("/api/admin")),
            ("/a/;x", Resolved::Unchanged),
            ("//", changed("/")),
            ("//..", Resolved::Refused(Refusal::AboveRoot)),
        ];
        let keep = |merge_slashes| PathRules {
            merge_slashes,
            escaped_slashes: EscapedSlashes::Keep,
        };
        for (path, want) in cases {
            assert_eq!(resolve(path, keep(true)), want, "{path}");
        }
        // Not merging, repeated slashes stay as they are.
        let kept = [
            ("//admin", Resolved::Unchanged),
            ("/a//%61", changed("/a//a")),
            ("/a//./b", changed("/a//b")),
            // Not merged, the empty segment is the one `..` climbs over.
            ("/a//../b", changed("/a/b")),
        ];
        for (path, want) in kept {
            assert_eq!(resolve(path, keep(false)), want, "{path}");
        }
    }

    #[test]
    fn escaped_slashes_are_refused_decoded_or_kept() {
        let changed = |s: &str| Resolved::Changed(s.to_string());
        let rules = |escaped_slashes| PathRules {
            merge_slashes: true,
            escaped_slashes,
        };
        let cases = [
            // path, rejected?, decoded
            ("/admin%2Fx", true, changed("/admin/x")),
            ("/admin%2fx", true, changed("/admin/x")),
            ("/admin%5Cx", true, changed("/admin/x")),
            ("/admin%5cx", true, changed("/admin/x")),
            ("/admin\\x", true, changed("/admin/x")),
            ("/api/public/..%2Fadmin", true, changed("/api/admin")),
            ("/a/%2F%2F/b/", true, changed("/a/b/")),
            ("/a/%2F..", true, changed("/")),
            ("/%2F..%2F..", true, Resolved::Refused(Refusal::AboveRoot)),
            ("/a%20b/%3F/%252F", false, Resolved::Unchanged),
            ("/a/%61", false, changed("/a/a")),
        ];
        for (path, rejected, decoded) in cases {
            let refused = resolve(path, rules(EscapedSlashes::Reject))
                == Resolved::Refused(Refusal::EscapedSlash);
            assert_eq!(refused, rejected, "{path}");
            assert_eq!(
                resolve(path, rules(EscapedSlashes::Decode)),
                decoded,
                "{path}"
            );
        }
        assert_eq!(
            resolve("/admin%2Fx\\y", rules(EscapedSlashes::Keep)),
            Resolved::Unchanged
        );
    }
}
