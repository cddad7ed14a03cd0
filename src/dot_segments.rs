//! Dot segments (`.` and `..`, also percent-encoded) in a request's path,
//! resolved before routing (RFC 3986 §5.2.4), as nginx does: otherwise
//! `/api/public/../admin` would be routed by `/api/public`'s rules (its
//! rate limit, host binding, capture) and reach the backend as a path that
//! means `/api/admin`.

/// What to do with a request's path.
#[derive(Debug, PartialEq, Eq)]
pub enum Resolved {
    /// No dot segments: the path stays as it is (nearly every request).
    Unchanged,
    /// The path with its dot segments resolved.
    Changed(String),
    /// A `..` that climbs above the root: refused, as nginx does.
    AboveRoot,
}

/// Resolves the dot segments of `path` (an origin-form path, from `/`).
pub fn resolve(path: &str) -> Resolved {
    // One short scan for the common case (no dot, no escape at all);
    // segments only for the rare path that may hold a dot segment.
    if !path.bytes().any(|b| b == b'.' || b == b'%') {
        return Resolved::Unchanged;
    }
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

/// Whether `segment` is `.` or `..`, a dot also written `%2e` or `%2E`.
fn dots(segment: &str) -> Option<Dots> {
    let mut count = 0;
    let mut rest = segment.as_bytes();
    while !rest.is_empty() {
        rest = match rest {
            [b'.', tail @ ..] => tail,
            [b'%', b'2', b'e' | b'E', tail @ ..] => tail,
            _ => return None,
        };
        count += 1;
    }
    match count {
        1 => Some(Dots::One),
        2 => Some(Dots::Two),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_are_resolved_and_others_left_alone() {
        let changed = |s: &str| Resolved::Changed(s.to_string());
        let cases = [
            ("/api/users/7", Resolved::Unchanged),
            ("/", Resolved::Unchanged),
            ("/a/.hidden/b..c/...", Resolved::Unchanged),
            ("/a/%41%2F", Resolved::Unchanged),
            ("/api/public/../admin", changed("/api/admin")),
            ("/api/public/%2e%2E/admin/x", changed("/api/admin/x")),
            ("/a/./b/.", changed("/a/b/")),
            ("/a/b/..", changed("/a/")),
            ("/a/.%2e", changed("/")),
            ("/./", changed("/")),
            ("/a//../b", changed("/a/b")),
            ("/..", Resolved::AboveRoot),
            ("/a/../../etc/passwd", Resolved::AboveRoot),
        ];
        for (path, want) in cases {
            assert_eq!(resolve(path), want, "{path}");
        }
    }
}
