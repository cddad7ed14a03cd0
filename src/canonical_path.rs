//! A request's path made canonical before routing (RFC 3986 §6.2.2), as
//! nginx does before it matches a location: percent-encoded unreserved
//! characters decoded (`/%61dmin` is `/admin`), repeated slashes merged
//! (`//admin` is `/admin`; nginx's `merge_slashes`, on by default here as
//! there, off with `server.merge_slashes = false` for a backend that gives
//! them a meaning; a segment of only `;` parameters counts as empty) and
//! dot segments (`.` and `..`, with or without parameters) resolved (§5.2.4).
//! Otherwise `/api/public/../admin`, `/api/%61dmin` or `//admin` would
//! miss `/admin`'s route and its rules (rate limit, host binding, capture),
//! fall to a broader route, and reach a backend that reads them as
//! `/admin`.

/// What to do with a request's path.
#[derive(Debug, PartialEq, Eq)]
pub enum Resolved {
    /// Already canonical: the path stays as it is (nearly every request).
    Unchanged,
    /// The canonical path.
    Changed(String),
    /// A `..` that climbs above the root: refused, as nginx does.
    AboveRoot,
}

/// The canonical form of `path` (an origin-form path, from `/`), with
/// repeated slashes merged if `merge_slashes`.
pub fn resolve(path: &str, merge_slashes: bool) -> Resolved {
    // One short scan for the common case (no dot, no escape, no `//`).
    if !needs_work(path.as_bytes(), merge_slashes) {
        return Resolved::Unchanged;
    }
    let decoded = decode_unreserved(path);
    let merged = match decoded.as_deref().unwrap_or(path) {
        text if merge_slashes => drop_empty_segments(text),
        _ => None,
    };
    let changed = merged.or(decoded);
    match resolve_dots(changed.as_deref().unwrap_or(path)) {
        Resolved::Unchanged => changed.map_or(Resolved::Unchanged, Resolved::Changed),
        other => other,
    }
}

/// Whether `path` has a dot, an escape or (when merging) a `//` or `/;`.
fn needs_work(path: &[u8], merge_slashes: bool) -> bool {
    let mut after_slash = false;
    for &b in path {
        match b {
            b'.' | b'%' => return true,
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

/// `path` with `%XX` decoded where it stands for an unreserved character
/// (letters, digits, `-._~`), which is the same URI either way; `None` when
/// there is none. Other escapes (`%2F`, `%20`, ...) stay: decoded they would
/// mean something else.
fn decode_unreserved(path: &str) -> Option<String> {
    let bytes = path.as_bytes();
    let mut out: Option<Vec<u8>> = None;
    let mut i = 0;
    while i < bytes.len() {
        let unreserved = match bytes.get(i..i + 3) {
            Some([b'%', hi, lo]) => hex(*hi)
                .zip(hex(*lo))
                .map(|(hi, lo)| hi * 16 + lo)
                .filter(|&c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~')),
            _ => None,
        };
        match unreserved {
            Some(c) => {
                out.get_or_insert_with(|| bytes[..i].to_vec()).push(c);
                i += 3;
            }
            None => {
                if let Some(out) = &mut out {
                    out.push(bytes[i]);
                }
                i += 1;
            }
        }
    }
    // Only ASCII went in for ASCII: the text stays UTF-8.
    out.and_then(|out| String::from_utf8(out).ok())
}

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
                    return Resolved::AboveRoot;
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
            ("/a/%zz%4", Resolved::Unchanged),
            ("/api/public/../admin", changed("/api/admin")),
            ("/api/public/%2e%2E/admin/x", changed("/api/admin/x")),
            ("/a/./b/.", changed("/a/b/")),
            ("/a/b/..", changed("/a/")),
            ("/a/.%2e", changed("/")),
            ("/./", changed("/")),
            // Merged first, as nginx does: `..` climbs over `a`.
            ("/a//../b", changed("/b")),
            ("/..", Resolved::AboveRoot),
            ("/a/../../etc/passwd", Resolved::AboveRoot),
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
            ("//..", Resolved::AboveRoot),
        ];
        for (path, want) in cases {
            assert_eq!(resolve(path, true), want, "{path}");
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
            assert_eq!(resolve(path, false), want, "{path}");
        }
    }
}
