//! The route table: a route with a `host` only matches that Host and goes
//! before every route without one; then the longest path prefix wins (on a
//! segment boundary). The prefix may be stripped.
//!
//! A table is built whole from a [`Config`] and never changed: a reload builds
//! a new table and swaps it in (see `runtime`).

use std::sync::{Arc, OnceLock};

use crate::config::{normalize_prefix, Config, ConfigError, ProxyStrategy, RouteConfig};
use crate::resilience::{Registry, RouteGuards};
use crate::upstream::Upstream;

/// A route at run time: its configuration and its handles.
pub struct Route {
    pub config: RouteConfig,
    pub upstream: Upstream,
    /// `path_prefix` without a trailing slash ("/" stays "/").
    prefix: String,
    /// This route's policy state, found in the registry by name on the
    /// route's first request and kept here, so later requests skip the
    /// lookup. (A reload builds new routes, which find the same state.)
    guards: OnceLock<Arc<RouteGuards>>,
    /// See [`Route::carries_trailers`]; known once, asked per request.
    carries_trailers: bool,
}

impl Route {
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The route's circuit breaker, retry budget and rate limiter in
    /// `registry` (the proxy's; a route serves one proxy).
    pub fn guards(&self, registry: &Registry) -> &RouteGuards {
        self.guards.get_or_init(|| registry.route(self.name()))
    }

    /// Whether the backends' trailers reach the client: every request goes
    /// through hyper's client (h2c, or `https://` targets only, over HTTP/2
    /// or HTTP/1.1 as ALPN decides), not Backstop's own HTTP/1.1 exchange,
    /// which drops them.
    pub fn carries_trailers(&self) -> bool {
        self.carries_trailers
    }

    /// The path sent upstream: with the prefix removed if `strip_prefix`.
    /// `None` for a path outside the route's prefix, which a request routed
    /// here never has but a replay may: its route's prefix can have changed
    /// since the capture.
    pub fn upstream_path<'p>(&self, path: &'p str) -> Option<&'p str> {
        if self.config.strip_prefix && self.prefix != "/" {
            self.below_prefix(path)
        } else {
            Some(path)
        }
    }

    fn matches(&self, host: Option<&str>, path: &str) -> bool {
        if let Some(want) = &self.config.host {
            if host.is_none_or(|h| !same_host(h, want)) {
                return false;
            }
        }
        self.prefix == "/" || self.below_prefix(path).is_some()
    }

    /// What of `path` follows the prefix, if the path is the prefix or
    /// below it (`/api` does not take `/apis`).
    fn below_prefix<'p>(&self, path: &'p str) -> Option<&'p str> {
        let rest = path.strip_prefix(self.prefix.as_str());
        match rest {
            Some(rest) if rest.is_empty() || rest.starts_with('/') => Some(rest),
            _ if path.contains(';') => below_prefix_with_parameters(&self.prefix, path),
            _ => None,
        }
    }
}

/// Whether the host a request asked for (without its port) is a route's
/// `host` (as `check` wrote it: lower case, no trailing dot, an IPv6
/// address in its one form): names compare without case and without a
/// fully qualified name's trailing dot (as nginx does), IPv6 addresses as
/// addresses (`[2001:DB8:0::1]` is `2001:db8::1`).
fn same_host(asked: &str, want: &str) -> bool {
    let asked = asked.strip_suffix('.').unwrap_or(asked);
    asked.eq_ignore_ascii_case(want)
        || asked
            .parse::<std::net::Ipv6Addr>()
            .is_ok_and(|ip| want.parse() == Ok(ip))
}

/// What of `path` follows `prefix` when the path's segments, each read
/// without its `;` path parameters, start with the prefix's. Backends that
/// read parameters (Tomcat, Jetty, Spring) take `/api;jsessionid=1/admin`
/// for `/api/admin`, so it must not slip past `/api/admin`'s route to a
/// broader one. The prefix's segments go with their parameters.
fn below_prefix_with_parameters<'p>(prefix: &str, path: &'p str) -> Option<&'p str> {
    let mut rest = path;
    for wanted in prefix.split('/').skip(1) {
        let after_slash = rest.strip_prefix('/')?;
        let end = after_slash.find('/').unwrap_or(after_slash.len());
        let segment = &after_slash[..end];
        let name = segment.split(';').next().unwrap_or(segment);
        if name != wanted {
            return None;
        }
        rest = &after_slash[end..];
    }
    Some(rest)
}

/// Every route, most specific first.
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
    /// Whether any route is bound to a host: if none is, routing never
    /// needs the request's host.
    any_host: bool,
}

/// What a valid configuration does that its operator should hear of:
/// `(route, warning)`. Logged at start and at each reload, and printed by
/// `check` (not from [`RouteTable::build`], which runs before logging is
/// set up).
pub fn warnings(config: &Config) -> Vec<(&str, &'static str)> {
    let mut warnings = Vec::new();
    for rc in &config.routes {
        if !rc.tls_verify {
            warnings.push((
                rc.name.as_str(),
                "TLS certificate verification is off for this route",
            ));
        }
        let plain_targets = rc.upstreams.iter().any(|u| u.scheme_str() == Some("http"));
        let proxied = rc.proxy.use_proxy && rc.proxy.strategy != ProxyStrategy::Never;
        if rc.upstream_h2c && proxied && plain_targets {
            warnings.push((
                rc.name.as_str(),
                "upstream_h2c: requests through an outbound proxy go to http:// targets over HTTP/1.1",
            ));
        }
    }
    warnings
}

/// Logs [`warnings`].
pub fn log_warnings(config: &Config) {
    for (route, warning) in warnings(config) {
        tracing::warn!(route, "{warning}");
    }
}

impl RouteTable {
    /// Builds the runtime routes (upstream clients, TLS roots). Validation
    /// has read the CA files already: an error here is one that only
    /// building finds, or a file changed since.
    pub fn build(config: &Config) -> Result<RouteTable, Vec<ConfigError>> {
        let mut routes = Vec::with_capacity(config.routes.len());
        let mut errors = Vec::new();
        for (i, rc) in config.routes.iter().enumerate() {
            match Upstream::build(rc, &config.server, &config.outbound_proxies) {
                Ok(upstream) => routes.push(Arc::new(Route {
                    prefix: normalize_prefix(&rc.path_prefix).to_string(),
                    config: rc.clone(),
                    upstream,
                    guards: OnceLock::new(),
                    carries_trailers: rc.upstream_h2c
                        || rc
                            .upstreams
                            .iter()
                            .all(|target| target.scheme() == Some(&http::uri::Scheme::HTTPS)),
                })),
                Err(message) => errors.push(ConfigError {
                    key: format!("routes[{i}].tls_ca_file"),
                    message,
                }),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        // Routes bound to a host first, as a server block comes before its
        // locations in nginx: `host = "admin.example.com"` on `/` takes all
        // of that host, also paths an unbound route has a longer prefix
        // for. Then the longest prefix first.
        routes.sort_by(|a, b| {
            b.config
                .host
                .is_some()
                .cmp(&a.config.host.is_some())
                .then(b.prefix.len().cmp(&a.prefix.len()))
        });
        let any_host = routes.iter().any(|r| r.config.host.is_some());
        Ok(RouteTable { routes, any_host })
    }

    /// Whether [`Self::find`] looks at the host.
    pub fn matches_hosts(&self) -> bool {
        self.any_host
    }

    /// The route for a request; `host` without its port.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| r.matches(host, path))
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| r.name() == name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.routes.iter()
    }
}

#[cfg(test)]
impl RouteTable {
    /// The table of a configuration file's text (for tests).
    pub fn from_toml(text: &str) -> RouteTable {
        let path = std::path::Path::new("t.toml");
        let config = crate::config::load_str(text, path, |_| None).expect("a valid config");
        RouteTable::build(&config).expect("valid routes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailers_are_carried_only_when_every_target_answers_through_hyper() {
        let t = RouteTable::from_toml(
            r#"
            [[routes]]
            name = "plain"
            path_prefix = "/plain"
            upstreams = ["http://127.0.0.1:1"]
            [[routes]]
            name = "h2c"
            path_prefix = "/h2c"
            upstreams = ["http://127.0.0.1:2"]
            upstream_h2c = true
            [[routes]]
            name = "tls"
            path_prefix = "/tls"
            upstreams = ["https://127.0.0.1:3", "https://127.0.0.1:4"]
            [[routes]]
            name = "mixed"
            path_prefix = "/mixed"
            upstreams = ["https://127.0.0.1:5", "http://127.0.0.1:6"]
            "#,
        );
        let carries = |name: &str| t.get(name).expect(name).carries_trailers();
        assert!(!carries("plain"));
        assert!(carries("h2c"));
        assert!(carries("tls"));
        assert!(
            !carries("mixed"),
            "its http:// target goes through the own exchange"
        );
    }

    #[test]
    fn longest_prefix_on_segment_boundary_wins() {
        let t = RouteTable::from_toml(
            r#"
            [[routes]]
            name = "root"
            path_prefix = "/"
            upstreams = ["http://127.0.0.1:1"]
            [[routes]]
            name = "api"
            path_prefix = "/api"
            upstreams = ["http://127.0.0.1:2"]
            [[routes]]
            name = "users"
            path_prefix = "/api/users/"
            strip_prefix = true
            upstreams = ["http://127.0.0.1:3"]
            [[routes]]
            name = "users-example"
            path_prefix = "/api/users"
            host = "example.com"
            upstreams = ["http://127.0.0.1:4"]
            [[routes]]
            name = "admin"
            path_prefix = "/"
            host = "admin.example.com"
            upstreams = ["http://127.0.0.1:5"]
            "#,
        );
        let cases = [
            (None, "/api", "api"),
            (None, "/api/", "api"),
            (None, "/apix", "root"),
            (None, "/api/users", "users"),
            (None, "/api/users/7", "users"),
            (None, "/api/usersx", "api"),
            (None, "/api;jsessionid=1", "api"),
            (None, "/api/users;v=2/7", "users"),
            (None, "/api;a/users;b/7", "users"),
            (None, "/api;a/usersx", "api"),
            (None, "/apix;a", "root"),
            (Some("example.com"), "/api/users/7", "users-example"),
            (Some("other.com"), "/api/users/7", "users"),
            (Some("admin.example.com"), "/api/users/7", "admin"),
            (Some("admin.example.com"), "/", "admin"),
            (None, "/", "root"),
        ];
        for (host, path, want) in cases {
            assert_eq!(t.find(host, path).unwrap().name(), want, "{host:?} {path}");
        }
        let users = t.get("users").unwrap();
        assert_eq!(users.upstream_path("/api/users/7"), Some("/7"));
        assert_eq!(users.upstream_path("/api/users"), Some(""));
        assert_eq!(users.upstream_path("/api/users;v=2/7"), Some("/7"));
        assert_eq!(users.upstream_path("/api;a/users;v=2"), Some(""));
        assert_eq!(
            t.get("api").unwrap().upstream_path("/api/x"),
            Some("/api/x")
        );
        // A replay whose route's prefix changed since the capture: refused,
        // not cut at the old prefix's length (nor inside a character).
        assert_eq!(users.upstream_path("/api/usersx"), None);
        assert_eq!(users.upstream_path("/api/üsers/7"), None);
        assert_eq!(users.upstream_path("/ä"), None);
    }

    #[test]
    fn hosts_match_as_names_and_addresses() {
        let t = RouteTable::from_toml(
            r#"
            [[routes]]
            name = "any"
            path_prefix = "/"
            upstreams = ["http://127.0.0.1:1"]
            [[routes]]
            name = "named"
            path_prefix = "/"
            host = "API.example.com."
            upstreams = ["http://127.0.0.1:2"]
            [[routes]]
            name = "v6"
            path_prefix = "/"
            host = "[2001:DB8:0::1]"
            upstreams = ["http://127.0.0.1:3"]
            "#,
        );
        let cases = [
            ("api.example.com", "named"),
            ("Api.Example.Com.", "named"),
            ("api.example.com..", "any"),
            ("2001:db8::1", "v6"),
            ("2001:0db8:0000::0001", "v6"),
            ("2001:db8::2", "any"),
            ("example.com", "any"),
        ];
        for (host, want) in cases {
            assert_eq!(t.find(Some(host), "/x").unwrap().name(), want, "{host}");
        }
    }
}
