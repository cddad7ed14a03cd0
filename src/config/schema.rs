//! The configuration schema: every key of DESIGN.md, its default, and how it
//! is read and checked. Each `read` function reads one table key by key and
//! records every problem it finds (see `reader`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method, Uri};

use super::reader::{BoolOrList, NumberUnit, Section};
use crate::canonical_path::{EscapedSlashes, PathRules, Resolved};
use crate::trusted_proxies::TrustedProxies;

/// The largest `server.max_header_bytes`: a request head this large is
/// already far past any real client's (hyper's HTTP/2 limit is a `u32`).
const MAX_HEADER_BYTES: usize = 1024 * 1024;
/// The most `server.workers`.
const MAX_WORKERS: usize = 1024;
const SECONDS: NumberUnit = NumberUnit::Seconds;

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub log: LogConfig,
    pub redis: Option<RedisConfig>,
    pub kafka: Option<KafkaConfig>,
    pub outbound_proxies: Vec<String>,
    pub replay: ReplayConfig,
    pub stats: StatsConfig,
    pub otlp: OtlpConfig,
    pub routes: Vec<RouteConfig>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub data_dir: PathBuf,
    pub max_body_bytes: u64,
    /// Bytes of request bodies buffered at once, across every request.
    pub max_buffered_bytes: u64,
    pub workers: usize,
    pub max_header_bytes: usize,
    /// Whether repeated slashes in a request's path are merged before it
    /// is routed and sent upstream (see `canonical_path`).
    pub merge_slashes: bool,
    /// What `%2F`, `%5C` and `\` in a request's path do.
    pub escaped_slashes: EscapedSlashes,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    /// How long a client may take nothing of an answer before its
    /// connection is closed.
    pub send_timeout: Duration,
    pub drain_timeout: Duration,
    pub connect_timeout: Duration,
    /// How long a kept-alive upstream connection may stay unused.
    pub upstream_idle_timeout: Duration,
    /// Idle keep-alive connections kept per upstream target.
    pub upstream_max_idle: usize,
    /// Requests in flight per upstream target of each route (busy
    /// connections; on HTTP/2, streams); more wait for one to finish.
    /// `None`: no cap.
    pub upstream_max_conns: Option<usize>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub admin_token: Option<String>,
    pub admin_insecure: bool,
    /// Peers whose forwarding headers are believed (load balancers in
    /// front); from every other peer they are dropped.
    pub trusted_proxies: TrustedProxies,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
    pub access_log: bool,
}

/// `[stats]`: per-route and per-path statistics and the request metrics.
#[derive(Debug, Clone)]
pub struct StatsConfig {
    /// Off: no statistics and no per-request Prometheus metrics (for
    /// measuring their cost; everything else still works).
    pub enabled: bool,
    /// Distinct paths kept per route; more go to one `{other}` entry.
    pub max_paths_per_route: usize,
    /// With `[redis]`: how often this instance pushes its statistics for
    /// the cluster view (`/api-stats?scope=cluster`).
    pub push_interval: Duration,
}

/// `[otlp]`: the OpenTelemetry trace exporter. Read and checked in every
/// build, so a file means the same everywhere; only a build with the `otlp`
/// cargo feature can turn it on.
#[derive(Clone, PartialEq)]
pub struct OtlpConfig {
    pub enabled: bool,
    /// The collector's OTLP/HTTP traces URL, used as is (no path is added).
    pub endpoint: String,
    /// The `service.name` resource attribute of every span.
    pub service_name: String,
    /// Share of the traces Backstop starts that are exported (0.0–1.0). A
    /// request with a `traceparent` follows its caller's sampled flag.
    pub sample_ratio: f64,
    /// Sent to the collector with every export (e.g. credentials): never
    /// logged, never shown (`Debug` prints the names only).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Longest wait for one export request.
    pub timeout: Duration,
}

impl std::fmt::Debug for OtlpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let headers: Vec<String> = self
            .headers
            .iter()
            .map(|(name, _)| format!("{name}: ***"))
            .collect();
        f.debug_struct("OtlpConfig")
            .field("enabled", &self.enabled)
            .field("endpoint", &redact_url(&self.endpoint))
            .field("service_name", &self.service_name)
            .field("sample_ratio", &self.sample_ratio)
            .field("headers", &headers)
            .field("timeout", &self.timeout)
            .finish()
    }
}

#[derive(Clone)]
pub struct RedisConfig {
    pub url: String,
    pub key_prefix: String,
    pub timeout: Duration,
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact_url(&self.url))
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct KafkaConfig {
    pub brokers: String,
    pub topic: String,
    pub dlq_topic: String,
    pub ack_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct ReplayConfig {
    pub enabled: bool,
    pub max_attempts: u32,
    pub initial_delay: Duration,
    pub max_delay: Duration,
    pub idempotency_header: HeaderName,
    pub group_id: String,
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub name: String,
    pub path_prefix: String,
    pub strip_prefix: bool,
    pub host: Option<String>,
    pub upstreams: Vec<Uri>,
    /// Shared: every request's `ProxySet` holds them.
    pub headers: Arc<[(HeaderName, HeaderValue)]>,
    pub forward_headers: ForwardHeaders,
    pub tls_ca_file: Option<PathBuf>,
    pub tls_verify: bool,
    pub upstream_h2c: bool,
    /// How long the backend may leave its answer's body waiting for more.
    pub body_read_timeout: Duration,
    pub capture: CaptureConfig,
    pub circuit_breaker: BreakerConfig,
    pub retry: RetryConfig,
    pub cache: CacheConfig,
    pub proxy: ProxyConfig,
    pub rate_limit: Option<RateLimitConfig>,
    pub health_check: Option<HealthCheckConfig>,
}

/// Which of the client's headers go upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardHeaders {
    All,
    /// Only the headers that describe the body (`Content-Type`, ...).
    None,
    Only(Vec<HeaderName>),
}

#[derive(Debug, Clone)]
pub struct CaptureConfig {
    pub enabled: bool,
    pub methods: Vec<Method>,
    pub respond_status: u16,
    pub redact_headers: Vec<HeaderName>,
}

/// What opens a circuit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerMode {
    /// `failure_threshold` failures in a row.
    Consecutive,
    /// At least `failure_rate_threshold` % of the calls in the last `window`
    /// failed (once `minimum_calls` were made), as resilience4j does.
    FailureRate,
}

#[derive(Debug, Clone)]
pub struct BreakerConfig {
    pub failure_threshold: u32,
    pub reset_timeout: Duration,
    pub request_timeout: Duration,
    pub success_threshold: u32,
    pub mode: BreakerMode,
    /// Percent (0–100] of failed calls in the window that opens the circuit.
    pub failure_rate_threshold: f64,
    pub minimum_calls: u32,
    pub window: Duration,
    /// A call slower than this counts as a failure; zero = never.
    pub slow_call_duration: Duration,
}

/// Failure kinds a retry may be made on (`retry_on_errors`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RetryableError {
    Timeout,
    ConnectionRefused,
    ConnectionReset,
    Dns,
}

#[derive(Debug, Clone)]
pub struct RetryConfig {
    pub max_attempts: u32,
    pub initial_delay: Duration,
    pub max_delay: Duration,
    pub backoff_factor: f64,
    pub retry_on_status: Vec<u16>,
    pub retry_on_errors: Vec<RetryableError>,
    pub retry_non_idempotent: bool,
    /// Bounds the whole forwarding of one request (every attempt and every
    /// backoff); zero = no bound beyond the attempts.
    pub deadline: Duration,
    /// Retries may add at most this percentage of extra load (retry budget).
    pub budget_percent: f64,
    /// Retries always allowed per second, whatever the budget.
    pub budget_min_per_second: f64,
    /// How far back the budget looks at requests and retries.
    pub budget_window: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderStrategy {
    None,
    All,
    List,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStore {
    Memory,
    Redis,
}

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub enabled: bool,
    pub ttl: Duration,
    pub methods: Vec<Method>,
    pub header_strategy: HeaderStrategy,
    pub headers: Vec<HeaderName>,
    pub store: CacheStore,
    pub cacheable_status: Vec<u16>,
    pub ignore_cache_control: bool,
    pub stale_if_error: Duration,
    /// How long a coalesced miss waits for the one request filling its key
    /// before it goes upstream itself (nginx's `proxy_cache_lock_timeout`).
    pub lock_timeout: Duration,
    /// Bound of the route's memory store, in bytes (bodies, headers, keys).
    pub max_bytes: u64,
    /// Larger answers stream through uncached (they are never buffered).
    pub max_entry_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyStrategy {
    RoundRobin,
    OnRateLimit,
    Never,
}

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub use_proxy: bool,
    pub strategy: ProxyStrategy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateLimitKey {
    Route,
    ClientIp,
    Header(HeaderName),
}

#[derive(Debug, Clone)]
pub struct RateLimitConfig {
    pub requests_per_second: f64,
    pub burst: u32,
    pub key: RateLimitKey,
    /// Most clients (IPs or header values) tracked per route.
    pub max_keys: usize,
    /// Count in Redis, shared by every instance (needs `[redis]`).
    pub shared: bool,
}

/// Active health checks of a route's targets.
#[derive(Debug, Clone)]
pub struct HealthCheckConfig {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

impl Config {
    pub(crate) fn read(root: &Section<'_>) -> Config {
        let server = ServerConfig::read(&root.section("server"));
        let log = LogConfig::read(&root.section("log"));
        let redis = root
            .contains("redis")
            .then(|| RedisConfig::read(&root.section("redis")));
        let kafka = root
            .contains("kafka")
            .then(|| KafkaConfig::read(&root.section("kafka")));
        let outbound_proxies = read_outbound_proxies(&root.section("outbound_proxies"));
        let replay = ReplayConfig::read(&root.section("replay"));
        let stats = StatsConfig::read(&root.section("stats"));
        let otlp = OtlpConfig::read(&root.section("otlp"));
        let routes: Vec<RouteConfig> = root
            .array_of_tables("routes")
            .iter()
            .map(RouteConfig::read)
            .collect();
        let config = Config {
            server,
            log,
            redis,
            kafka,
            outbound_proxies,
            replay,
            stats,
            otlp,
            routes,
        };
        config.check_routes(root);
        config
    }

    /// Rules that span several routes or sections.
    fn check_routes(&self, root: &Section<'_>) {
        if self.routes.is_empty() {
            root.error("routes", "at least one [[routes]] entry is required");
        }
        for (i, route) in self.routes.iter().enumerate() {
            let key = |k: &str| format!("routes[{i}].{k}");
            // Requests are routed by their canonical path: a prefix that is
            // not canonical would never match.
            // (Trailing slashes are the route's own to trim: `/api/` is `/api`.)
            let prefix = &route.path_prefix;
            // (One with `?`, `#` or `;` is refused as it is.)
            if prefix.starts_with('/') && !prefix.contains(['?', '#', ';']) {
                let trimmed = normalize_prefix(prefix);
                match crate::canonical_path::resolve(trimmed, self.server.path_rules()) {
                    Resolved::Unchanged => {}
                    Resolved::Changed(canonical) => root.error(
                        &key("path_prefix"),
                        format!("{prefix:?} would never match: request paths are matched as made canonical; write it as {canonical:?}"),
                    ),
                    Resolved::Refused(refusal) => root.error(
                        &key("path_prefix"),
                        format!("{prefix:?} {}", refusal.reason()),
                    ),
                }
            }
            for (j, earlier) in self.routes[..i].iter().enumerate() {
                if !route.name.is_empty() && earlier.name == route.name {
                    root.error(
                        &key("name"),
                        format!("duplicate route name {:?} (also routes[{j}])", route.name),
                    );
                }
                if normalize_prefix(&earlier.path_prefix) == normalize_prefix(&route.path_prefix)
                    && earlier.host == route.host
                {
                    root.error(
                        &key("path_prefix"),
                        format!(
                            "prefix {:?} overlaps routes[{j}] ({:?}): same prefix and host",
                            route.path_prefix, earlier.name
                        ),
                    );
                }
            }
            if route.cache.enabled && route.cache.store == CacheStore::Redis && self.redis.is_none()
            {
                root.error(&key("cache.store"), "\"redis\" needs a [redis] section");
            }
            if route.rate_limit.as_ref().is_some_and(|r| r.shared) && self.redis.is_none() {
                root.error(&key("rate_limit.shared"), "needs a [redis] section");
            }
            if route.proxy.use_proxy
                && route.proxy.strategy != ProxyStrategy::Never
                && self.outbound_proxies.is_empty()
            {
                root.error(
                    &key("proxy.use_proxy"),
                    "needs [outbound_proxies] urls (or PROXY_URLS)",
                );
            }
        }
    }

    /// Whether the proxy listener terminates TLS.
    pub fn tls_enabled(&self) -> bool {
        self.server.tls_cert.is_some()
    }
}

impl ServerConfig {
    /// How request paths are made canonical.
    pub fn path_rules(&self) -> PathRules {
        PathRules {
            merge_slashes: self.merge_slashes,
            escaped_slashes: self.escaped_slashes,
        }
    }

    fn read(s: &Section<'_>) -> Self {
        let listen = socket_addr(s, "listen", "0.0.0.0:8080");
        let admin_listen = socket_addr(s, "admin_listen", "127.0.0.1:9901");
        let max_body_bytes = s.get("max_body_bytes", 10 * 1024 * 1024u64);
        if max_body_bytes == 0 {
            s.error("max_body_bytes", "must be greater than 0");
        }
        let max_buffered_bytes = s.get("max_buffered_bytes", 256 * 1024 * 1024u64);
        if max_buffered_bytes < max_body_bytes {
            s.error(
                "max_buffered_bytes",
                format!(
                    "must be at least max_body_bytes ({max_body_bytes}): a body that size could never be buffered"
                ),
            );
        }
        let max_header_bytes = s.get("max_header_bytes", 32 * 1024usize);
        if !(8192..=MAX_HEADER_BYTES).contains(&max_header_bytes) {
            s.error(
                "max_header_bytes",
                format!("must be from 8192 to {MAX_HEADER_BYTES}"),
            );
        }
        let workers = s.get("workers", 0usize);
        if workers > MAX_WORKERS {
            // Each is a thread made at start: a typo's 100000 would use up
            // the process limit, or stall behind threads never made.
            s.error("workers", format!("must be at most {MAX_WORKERS}"));
        }
        let tls_cert: Option<PathBuf> = s.opt("tls_cert");
        let tls_key: Option<PathBuf> = s.opt("tls_key");
        match (&tls_cert, &tls_key) {
            (Some(_), None) => s.error("tls_key", "required when tls_cert is set"),
            (None, Some(_)) => s.error("tls_cert", "required when tls_key is set"),
            _ => {}
        }
        // Their contents are read by `check` and by `run` at start
        // (`runtime::load_checked`) and by a reload into the running
        // listener, not here: a `queue` command may not be able to read
        // the key.
        for (k, path) in [("tls_cert", &tls_cert), ("tls_key", &tls_key)] {
            if let Some(message) = path.as_deref().and_then(not_a_file) {
                s.error(k, message);
            }
        }
        let admin_token: Option<String> = s.opt_secret("admin_token");
        if admin_token.as_deref() == Some("") {
            s.error("admin_token", "must not be empty");
        } else if admin_token
            .as_deref()
            .is_some_and(|t| !t.bytes().all(|b| b.is_ascii_graphic()))
        {
            // Spaces around it are trimmed from a header, and other bytes
            // cannot be read from one: no request could ever present it.
            s.error(
                "admin_token",
                "use visible ASCII characters only (no spaces): no request could present it",
            );
        }
        if listeners_collide(listen, admin_listen) {
            s.error(
                "admin_listen",
                format!(
                    "{admin_listen} overlaps listen ({listen}): the proxy and the admin API \
                     need different ports"
                ),
            );
        }
        let admin_insecure = s.get("admin_insecure", false);
        if !admin_listen.ip().is_loopback() && admin_token.is_none() && !admin_insecure {
            s.error(
                "admin_listen",
                format!(
                    "{admin_listen} is not a loopback address: set server.admin_token, \
                     or server.admin_insecure = true to allow an unauthenticated admin API"
                ),
            );
        }
        let config = ServerConfig {
            listen,
            admin_listen,
            data_dir: s.get("data_dir", PathBuf::from("./backstop-data")),
            max_body_bytes,
            max_buffered_bytes,
            workers,
            max_header_bytes,
            merge_slashes: s.get("merge_slashes", true),
            escaped_slashes: read_escaped_slashes(s),
            header_read_timeout: s.duration("header_read_timeout", secs(10), SECONDS),
            idle_timeout: s.duration("idle_timeout", secs(60), SECONDS),
            send_timeout: s.duration("send_timeout", secs(60), SECONDS),
            drain_timeout: s.duration("drain_timeout", secs(30), SECONDS),
            connect_timeout: s.duration("connect_timeout", secs(2), SECONDS),
            upstream_idle_timeout: s.duration("upstream_idle_timeout", secs(90), SECONDS),
            upstream_max_idle: s.get("upstream_max_idle", 256usize),
            upstream_max_conns: Some(s.get("upstream_max_conns", 0usize)).filter(|&n| n > 0),
            tls_cert,
            tls_key,
            admin_token,
            admin_insecure,
            trusted_proxies: read_trusted_proxies(s),
        };
        for (k, d) in [
            ("header_read_timeout", config.header_read_timeout),
            ("idle_timeout", config.idle_timeout),
            ("send_timeout", config.send_timeout),
            // Zero would cut every in-flight request at a stop.
            ("drain_timeout", config.drain_timeout),
            ("connect_timeout", config.connect_timeout),
            ("upstream_idle_timeout", config.upstream_idle_timeout),
        ] {
            if d.is_zero() {
                s.error(k, "must be greater than 0");
            }
        }
        if config.upstream_max_conns > Some(MAX_UPSTREAM_CONNS) {
            s.error(
                "upstream_max_conns",
                format!("must be at most {MAX_UPSTREAM_CONNS} (0 = no cap)"),
            );
        }
        s.reject_unknown_keys();
        config
    }
}

/// Whether two listeners could not both bind: the same port (not 0, which
/// picks a free one) on the same address, or on a wildcard address that
/// covers the other (`0.0.0.0` covers IPv4; `[::]`, dual-stack, both).
fn listeners_collide(a: SocketAddr, b: SocketAddr) -> bool {
    let covers = |wild: SocketAddr, other: SocketAddr| {
        wild.ip().is_unspecified() && (wild.is_ipv6() || other.is_ipv4())
    };
    a.port() != 0 && a.port() == b.port() && (a.ip() == b.ip() || covers(a, b) || covers(b, a))
}

fn read_escaped_slashes(s: &Section<'_>) -> EscapedSlashes {
    match s.get("escaped_slashes", "reject".to_string()).as_str() {
        "reject" => EscapedSlashes::Reject,
        "keep" => EscapedSlashes::Keep,
        "decode" => EscapedSlashes::Decode,
        other => {
            s.error(
                "escaped_slashes",
                format!("expected \"reject\", \"keep\" or \"decode\", found {other:?}"),
            );
            EscapedSlashes::Reject
        }
    }
}

/// The largest `upstream_max_conns`: far above what one target can take,
/// and within what a semaphore can count.
const MAX_UPSTREAM_CONNS: usize = 1_000_000;

impl LogConfig {
    fn read(s: &Section<'_>) -> Self {
        let format = match s.get("format", "text".to_string()).as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                s.error(
                    "format",
                    format!("expected \"text\" or \"json\", found {other:?}"),
                );
                LogFormat::Text
            }
        };
        let level = s.get("level", "info".to_string());
        if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
            s.error("level", format!("invalid log filter {level:?}"));
        }
        let config = LogConfig {
            format,
            level,
            access_log: s.get("access_log", false),
        };
        s.reject_unknown_keys();
        config
    }
}

impl StatsConfig {
    fn read(s: &Section<'_>) -> Self {
        let max_paths_per_route = s.get("max_paths_per_route", 100usize);
        if !(1..=10_000).contains(&max_paths_per_route) {
            s.error("max_paths_per_route", "must be between 1 and 10000");
        }
        let push_interval = s.duration("push_interval", secs(5), SECONDS);
        if !(Duration::from_millis(100)..=Duration::from_secs(600)).contains(&push_interval) {
            s.error("push_interval", "must be between 100ms and 10m");
        }
        let config = StatsConfig {
            enabled: s.get("enabled", true),
            max_paths_per_route,
            push_interval,
        };
        s.reject_unknown_keys();
        config
    }
}

impl OtlpConfig {
    fn read(s: &Section<'_>) -> Self {
        let enabled = s.get("enabled", false);
        if enabled && !cfg!(feature = "otlp") {
            s.error(
                "enabled",
                "this build has no OTLP exporter (build with --features otlp)",
            );
        }
        let endpoint = s.get("endpoint", "http://127.0.0.1:4318/v1/traces".to_string());
        if let Err(message) = check_collector_url(&endpoint) {
            s.error("endpoint", message);
        }
        let sample_ratio = s.get("sample_ratio", 1.0f64);
        if !(0.0..=1.0).contains(&sample_ratio) {
            s.error("sample_ratio", "must be a number between 0.0 and 1.0");
        }
        let timeout = s.duration("timeout", secs(10), SECONDS);
        if timeout.is_zero() {
            s.error("timeout", "must be greater than 0");
        }
        let config = OtlpConfig {
            enabled,
            endpoint,
            service_name: non_empty(s, "service_name", "backstop"),
            sample_ratio,
            headers: read_header_map(s, "headers"),
            timeout,
        };
        s.reject_unknown_keys();
        config
    }
}

/// The collector URL: http or https, with a host. Credentials belong in
/// `otlp.headers`, where they are never logged.
fn check_collector_url(url: &str) -> Result<(), String> {
    let shown = redact_url(url);
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("invalid URL {shown:?}: {e}"))?;
    if !matches!(uri.scheme_str(), Some("http") | Some("https")) {
        return Err(format!(
            "invalid URL {shown:?}: scheme must be http or https"
        ));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("invalid URL {shown:?}: no host"));
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(format!(
            "invalid URL {shown:?}: put credentials in otlp.headers, not in the URL"
        ));
    }
    Ok(())
}

impl RedisConfig {
    fn read(s: &Section<'_>) -> Self {
        let url = s.get("url", DEFAULT_REDIS_URL.to_string());
        if let Err(message) = check_redis_url(&url) {
            s.error("url", message);
        }
        let config = RedisConfig {
            url,
            key_prefix: s.get("key_prefix", "backstop:".to_string()),
            timeout: s.duration("timeout", Duration::from_millis(50), SECONDS),
        };
        // Zero would fail every Redis call: the cache, shared limits and
        // cluster statistics would all be skipped.
        if config.timeout.is_zero() {
            s.error("timeout", "must be greater than 0");
        }
        s.reject_unknown_keys();
        config
    }
}

/// `[redis] url` when the file has none (and the base of `REDIS_HOST`,
/// `REDIS_PORT`, `REDIS_PASSWORD`).
pub(crate) const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

/// A URL the redis crate can connect with: `redis://`, a host, a port
/// number, a numeric database. The message never shows the password.
fn check_redis_url(url: &str) -> Result<(), String> {
    let shown = redact_url(url);
    if url.starts_with("rediss://") {
        // TLS to Redis would pull a second TLS stack into the redis crate.
        return Err("rediss:// (TLS) is not supported by this build; use redis://".into());
    }
    if !url.starts_with("redis://") {
        return Err(format!("expected a redis:// URL, found {shown:?}"));
    }
    let parsed = url::Url::parse(url).map_err(|e| format!("invalid URL {shown:?}: {e}"))?;
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(format!("invalid URL {shown:?}: no host"));
    }
    if parsed
        .host_str()
        .and_then(|h| h.trim_matches(['[', ']']).parse::<std::net::IpAddr>().ok())
        .is_some_and(|ip| ip.is_unspecified())
    {
        return Err(format!(
            "invalid URL {shown:?}: a wildcard address cannot be connected to; name the Redis host"
        ));
    }
    let db = parsed.path().trim_matches('/');
    if !db.is_empty() && db.parse::<u32>().is_err() {
        return Err(format!(
            "invalid URL {shown:?}: the path must be a database number, found {db:?}"
        ));
    }
    // What the redis crate itself refuses (a wildcard host, credentials
    // that are not UTF-8 once decoded, ...).
    redis::IntoConnectionInfo::into_connection_info(url)
        .map(drop)
        .map_err(|e| format!("invalid URL {shown:?}: {e}"))
}

impl KafkaConfig {
    fn read(s: &Section<'_>) -> Self {
        let brokers = s.get("brokers", "127.0.0.1:9092".to_string());
        if brokers.trim().is_empty() {
            s.error("brokers", "must not be empty");
        }
        let config = KafkaConfig {
            brokers,
            topic: non_empty(s, "topic", "failed-requests"),
            dlq_topic: non_empty(s, "dlq_topic", "failed-requests.dlq"),
            ack_timeout: s.duration("ack_timeout", secs(5), SECONDS),
        };
        // It becomes librdkafka's `message.timeout.ms`, which must exceed
        // the producer's `linger.ms` (2), and `request.timeout.ms`, at most
        // 900000: outside, the producer cannot be made and `run` would stop.
        if !(Duration::from_millis(3)..=Duration::from_secs(15 * 60)).contains(&config.ack_timeout)
        {
            s.error("ack_timeout", "must be between 3ms and 15m");
        }
        for (key, topic) in [("topic", &config.topic), ("dlq_topic", &config.dlq_topic)] {
            if !is_kafka_topic_name(topic) {
                s.error(
                    key,
                    "must be a Kafka topic name: letters, digits, '.', '_' and '-', at most 249, not \".\" or \"..\"",
                );
            }
        }
        // The replay workers consume `topic`: dead letters written there
        // would come back as captures, over and over.
        if config.dlq_topic == config.topic {
            s.error(
                "dlq_topic",
                "must not be the capture topic: the replay workers would read the dead letters back as captures",
            );
        }
        s.reject_unknown_keys();
        config
    }
}

impl ReplayConfig {
    fn read(s: &Section<'_>) -> Self {
        let max_attempts = s.get("max_attempts", 10u32);
        if max_attempts == 0 {
            s.error("max_attempts", "must be at least 1");
        }
        let initial_delay = s.duration("initial_delay", secs(1), SECONDS);
        let max_delay = s.duration("max_delay", secs(60), SECONDS);
        // Zero: every attempt at once, so a record is dead-lettered within
        // milliseconds of its backend going down instead of waiting it out.
        if initial_delay.is_zero() {
            s.error("initial_delay", "must be greater than 0");
        } else if max_delay < initial_delay {
            s.error("max_delay", "must not be shorter than initial_delay");
        }
        let config = ReplayConfig {
            enabled: s.get("enabled", true),
            max_attempts,
            initial_delay,
            max_delay,
            idempotency_header: header_name(s, "idempotency_header", "Idempotency-Key"),
            group_id: non_empty(s, "group_id", "backstop-replay"),
        };
        s.reject_unknown_keys();
        config
    }
}

impl RouteConfig {
    fn read(s: &Section<'_>) -> Self {
        let name: String = s.get("name", String::new());
        if !s.contains("name") {
            s.error("name", "required");
        } else if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            s.error(
                "name",
                format!("{name:?}: use letters, digits, '-', '_' and '.' only"),
            );
        }
        let path_prefix: String = s.get("path_prefix", String::new());
        if !s.contains("path_prefix") {
            s.error("path_prefix", "required");
        } else if !path_prefix.starts_with('/') {
            s.error(
                "path_prefix",
                format!("{path_prefix:?} must start with '/'"),
            );
        } else if path_prefix.contains(['?', '#', ';']) {
            s.error(
                "path_prefix",
                format!("{path_prefix:?} must be a path, without '?', '#' or ';'"),
            );
        }
        let upstreams = read_upstreams(s);
        let tls_ca_file: Option<PathBuf> = s.opt("tls_ca_file");
        let tls_verify = s.get("tls_verify", true);
        if let Some(path) = &tls_ca_file {
            if let Some(message) = not_a_file(path) {
                s.error("tls_ca_file", message);
            } else if tls_verify {
                // Read as building the route will (which ignores it when
                // verification is off), so that `check` lists it with the
                // file's other errors.
                if let Err(message) = crate::upstream::tls::ca_roots(path) {
                    s.error("tls_ca_file", message);
                }
            }
        }
        let config = RouteConfig {
            name,
            path_prefix,
            strip_prefix: s.get("strip_prefix", false),
            host: read_route_host(s),
            upstreams,
            headers: read_header_map(s, "headers").into(),
            forward_headers: read_forward_headers(s),
            tls_ca_file,
            tls_verify,
            upstream_h2c: s.get("upstream_h2c", false),
            body_read_timeout: s.duration("body_read_timeout", secs(60), SECONDS),
            capture: CaptureConfig::read(&s.section("capture")),
            circuit_breaker: BreakerConfig::read(&s.section("circuit_breaker")),
            retry: RetryConfig::read(&s.section("retry")),
            cache: CacheConfig::read(&s.section("cache")),
            proxy: ProxyConfig::read(&s.section("proxy")),
            rate_limit: s
                .contains("rate_limit")
                .then(|| RateLimitConfig::read(&s.section("rate_limit"))),
            health_check: s
                .contains("health_check")
                .then(|| HealthCheckConfig::read(&s.section("health_check"))),
        };
        if config.body_read_timeout.is_zero() {
            s.error("body_read_timeout", "must be greater than 0");
        }
        s.reject_unknown_keys();
        config
    }

    /// Whether requests with this method must be buffered: a body that may be
    /// sent twice (retry), written to the capture store or hashed into a
    /// cache key must be held whole.
    pub fn buffers_body(&self, method: &Method) -> bool {
        let capturable = self.capture.enabled && self.capture.methods.contains(method);
        let retryable = self.retry.max_attempts > 1;
        let cacheable = self.cache.enabled && self.cache.methods.contains(method);
        capturable || retryable || cacheable
    }
}

/// A route's `host`: a name or an IP address, compared with the request's
/// host without its port (so a port here could never match). An IPv6
/// address may be written with or without brackets.
fn read_route_host(s: &Section<'_>) -> Option<String> {
    let text = s.opt::<String>("host")?;
    match check_route_host(&text) {
        Ok(host) => Some(host),
        Err(message) => {
            s.error("host", message);
            None
        }
    }
}

fn check_route_host(text: &str) -> Result<String, String> {
    let host = text.trim();
    if host.is_empty() {
        return Err("must not be empty (leave host out to match every host)".into());
    }
    if host.contains("://") || host.contains('/') {
        return Err(format!(
            "{text:?} must be a host name such as \"api.example.com\", not a URL"
        ));
    }
    let unbracketed = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = unbracketed.parse::<std::net::Ipv6Addr>() {
        // Its one written form: requests are compared as addresses.
        return Ok(ip.to_string());
    }
    // `api.example.com.` is the same name, fully qualified.
    let host = host.strip_suffix('.').unwrap_or(host);
    if let Some((name, port)) = host.rsplit_once(':') {
        if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!(
                "{text:?} has a port: routes match the request's host without its port, \
                 so write {:?}",
                name.trim_start_matches('[').trim_end_matches(']')
            ));
        }
    }
    if !host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    {
        return Err(format!(
            "{text:?} is not a host name (letters, digits, '-', '_' and '.')"
        ));
    }
    Ok(host.to_ascii_lowercase())
}

impl CaptureConfig {
    fn read(s: &Section<'_>) -> Self {
        let respond_status = s.get("respond_status", 503u16);
        if respond_status != 503 && respond_status != 202 {
            s.error(
                "respond_status",
                format!("expected 503 or 202, found {respond_status}"),
            );
        }
        let config = CaptureConfig {
            enabled: s.get("enabled", true),
            methods: methods(s, "methods", &["POST", "PUT", "PATCH", "DELETE"]),
            respond_status,
            redact_headers: header_names(s, "redact_headers"),
        };
        s.reject_unknown_keys();
        config
    }
}

impl BreakerConfig {
    fn read(s: &Section<'_>) -> Self {
        let mode = match s.get("mode", "consecutive".to_string()).as_str() {
            "consecutive" => BreakerMode::Consecutive,
            "failure_rate" => BreakerMode::FailureRate,
            other => {
                s.error(
                    "mode",
                    format!("expected consecutive or failure_rate, found {other:?}"),
                );
                BreakerMode::Consecutive
            }
        };
        let failure_rate_threshold = s.get("failure_rate_threshold", 50.0f64);
        if !(failure_rate_threshold > 0.0 && failure_rate_threshold <= 100.0) {
            s.error("failure_rate_threshold", "must be a percentage in (0, 100]");
        }
        let window = s.duration("window", secs(60), SECONDS);
        if window < Duration::from_secs(1) {
            s.error("window", "must be at least 1s");
        }
        let config = BreakerConfig {
            mode,
            failure_rate_threshold,
            minimum_calls: at_least_one(s, "minimum_calls", 10),
            window,
            slow_call_duration: s.duration("slow_call_duration", Duration::ZERO, SECONDS),
            failure_threshold: at_least_one(s, "failure_threshold", 5),
            reset_timeout: s.duration("reset_timeout", secs(30), SECONDS),
            request_timeout: s.duration(
                "request_timeout",
                Duration::from_millis(10_000),
                NumberUnit::Milliseconds,
            ),
            success_threshold: at_least_one(s, "success_threshold", 2),
        };
        // A zero reset_timeout half-opens an open circuit at once: the
        // breaker would never keep a failing backend's traffic off.
        for (k, d) in [
            ("reset_timeout", config.reset_timeout),
            ("request_timeout", config.request_timeout),
        ] {
            if d.is_zero() {
                s.error(k, "must be greater than 0");
            }
        }
        s.reject_unknown_keys();
        config
    }
}

impl RetryConfig {
    fn read(s: &Section<'_>) -> Self {
        let initial_delay = s.duration("initial_delay", secs(1), SECONDS);
        let max_delay = s.duration("max_delay", secs(10), SECONDS);
        // Zero: every retry at once, whatever `backoff_factor`, and a
        // `Retry-After` capped to nothing (a rate-limited API hammered).
        if initial_delay.is_zero() {
            s.error("initial_delay", "must be greater than 0");
        } else if max_delay < initial_delay {
            s.error("max_delay", "must not be shorter than initial_delay");
        }
        let backoff_factor = s.get("backoff_factor", 2.0f64);
        if !(backoff_factor.is_finite() && backoff_factor >= 1.0) {
            s.error("backoff_factor", "must be a number >= 1.0");
        }
        let retry_on_errors = s
            .get(
                "retry_on_errors",
                vec![
                    "timeout".to_string(),
                    "connection_refused".into(),
                    "connection_reset".into(),
                    "dns".into(),
                ],
            )
            .iter()
            .filter_map(|e| match e.as_str() {
                "timeout" => Some(RetryableError::Timeout),
                "connection_refused" => Some(RetryableError::ConnectionRefused),
                "connection_reset" => Some(RetryableError::ConnectionReset),
                "dns" => Some(RetryableError::Dns),
                other => {
                    s.error(
                        "retry_on_errors",
                        format!(
                            "unknown error kind {other:?} (expected timeout, \
                             connection_refused, connection_reset or dns)"
                        ),
                    );
                    None
                }
            })
            .collect();
        let config = RetryConfig {
            max_attempts: at_least_one(s, "max_attempts", 3),
            initial_delay,
            max_delay,
            backoff_factor,
            retry_on_status: status_codes(s, "retry_on_status", &[500, 502, 503, 504, 429]),
            retry_on_errors,
            retry_non_idempotent: s.get("retry_non_idempotent", false),
            deadline: s.duration("deadline", secs(30), SECONDS),
            budget_percent: s.get("budget_percent", 20.0f64),
            budget_min_per_second: s.get("budget_min_per_second", 10.0f64),
            budget_window: s.duration("budget_window", secs(10), SECONDS),
        };
        if !(config.budget_percent.is_finite() && config.budget_percent >= 0.0) {
            s.error("budget_percent", "must be a number >= 0");
        }
        if !(config.budget_min_per_second.is_finite() && config.budget_min_per_second >= 0.0) {
            s.error("budget_min_per_second", "must be a number >= 0");
        }
        if config.budget_window < Duration::from_secs(1) {
            s.error("budget_window", "must be at least 1s");
        }
        s.reject_unknown_keys();
        config
    }
}

impl CacheConfig {
    fn read(s: &Section<'_>) -> Self {
        let header_strategy = match s.get("header_strategy", "none".to_string()).as_str() {
            "none" => HeaderStrategy::None,
            "all" => HeaderStrategy::All,
            "list" => HeaderStrategy::List,
            other => {
                s.error(
                    "header_strategy",
                    format!("expected none, all or list, found {other:?}"),
                );
                HeaderStrategy::None
            }
        };
        let store = match s.get("store", "memory".to_string()).as_str() {
            "memory" => CacheStore::Memory,
            "redis" => CacheStore::Redis,
            other => {
                s.error(
                    "store",
                    format!("expected memory or redis, found {other:?}"),
                );
                CacheStore::Memory
            }
        };
        let config = CacheConfig {
            enabled: s.get("enabled", false),
            ttl: s.duration("ttl", secs(60), SECONDS),
            methods: methods(s, "methods", &["GET", "HEAD"]),
            header_strategy,
            headers: header_names(s, "headers"),
            store,
            cacheable_status: status_codes(s, "cacheable_status", &[200, 203, 204, 301, 404, 410]),
            ignore_cache_control: s.get("ignore_cache_control", false),
            stale_if_error: s.duration("stale_if_error", Duration::ZERO, SECONDS),
            lock_timeout: s.duration("lock_timeout", secs(5), SECONDS),
            max_bytes: s.get("max_bytes", 64 * 1024 * 1024u64),
            max_entry_bytes: s.get("max_entry_bytes", 1024 * 1024u64),
        };
        if config.ttl.is_zero() {
            s.error("ttl", "must be greater than 0");
        }
        for (i, code) in config.cacheable_status.iter().enumerate() {
            // Stored under the request's key, these would answer requests
            // that asked for the whole answer.
            let why = match code {
                100..=199 => "an interim answer",
                206 => "a part of an answer, not the whole",
                304 => "no answer of its own, only that the client's copy is current",
                _ => continue,
            };
            s.error(
                &format!("cacheable_status[{i}]"),
                format!("{code} cannot be cached: it is {why}"),
            );
        }
        if config.max_bytes == 0 {
            s.error("max_bytes", "must be greater than 0");
        }
        // The memory store weighs entries in u32, and one entry must fit.
        if config.max_entry_bytes == 0 || config.max_entry_bytes > u64::from(u32::MAX) {
            s.error("max_entry_bytes", "must be between 1 and 4294967295");
        } else if config.max_entry_bytes > config.max_bytes {
            s.error("max_entry_bytes", "must not be larger than max_bytes");
        }
        if config.header_strategy == HeaderStrategy::List && config.headers.is_empty() {
            s.error(
                "headers",
                "header_strategy = \"list\" needs at least one header",
            );
        }
        s.reject_unknown_keys();
        config
    }
}

impl ProxyConfig {
    fn read(s: &Section<'_>) -> Self {
        let strategy = match s.get("strategy", "round_robin".to_string()).as_str() {
            "round_robin" => ProxyStrategy::RoundRobin,
            "on_rate_limit" => ProxyStrategy::OnRateLimit,
            "never" => ProxyStrategy::Never,
            other => {
                s.error(
                    "strategy",
                    format!("expected round_robin, on_rate_limit or never, found {other:?}"),
                );
                ProxyStrategy::RoundRobin
            }
        };
        let config = ProxyConfig {
            use_proxy: s.get("use_proxy", false),
            strategy,
        };
        s.reject_unknown_keys();
        config
    }
}

impl RateLimitConfig {
    fn read(s: &Section<'_>) -> Self {
        let requests_per_second = s.get("requests_per_second", 100.0f64);
        if !(requests_per_second.is_finite() && requests_per_second > 0.0) {
            s.error("requests_per_second", "must be a number greater than 0");
        }
        let key_text = s.get("key", "route".to_string());
        let key = match key_text.as_str() {
            "route" => RateLimitKey::Route,
            "client_ip" => RateLimitKey::ClientIp,
            other => match other.strip_prefix("header:").map(HeaderName::try_from) {
                Some(Ok(name)) => RateLimitKey::Header(name),
                _ => {
                    s.error(
                        "key",
                        format!("expected route, client_ip or header:<name>, found {other:?}"),
                    );
                    RateLimitKey::Route
                }
            },
        };
        let config = RateLimitConfig {
            requests_per_second,
            burst: at_least_one(s, "burst", 200),
            key,
            max_keys: s.get("max_keys", 100_000usize),
            shared: s.get("shared", false),
        };
        if config.max_keys == 0 {
            s.error("max_keys", "must be at least 1");
        }
        s.reject_unknown_keys();
        config
    }
}

impl HealthCheckConfig {
    fn read(s: &Section<'_>) -> Self {
        let path = s.get("path", "/health".to_string());
        if !path.starts_with('/') {
            s.error("path", format!("{path:?} must start with '/'"));
        } else if http::uri::PathAndQuery::try_from(path.as_str()).is_err() {
            // Else every probe would fail, and every target be taken out.
            s.error(
                "path",
                format!("{path:?} is not a valid request path (escape spaces and other characters as %XX)"),
            );
        }
        let config = HealthCheckConfig {
            path,
            interval: s.duration("interval", secs(10), SECONDS),
            timeout: s.duration("timeout", secs(2), SECONDS),
            healthy_threshold: at_least_one(s, "healthy_threshold", 2),
            unhealthy_threshold: at_least_one(s, "unhealthy_threshold", 3),
        };
        for (k, d) in [("interval", config.interval), ("timeout", config.timeout)] {
            if d.is_zero() {
                s.error(k, "must be greater than 0");
            }
        }
        s.reject_unknown_keys();
        config
    }
}

fn read_outbound_proxies(s: &Section<'_>) -> Vec<String> {
    // They may carry credentials: not shown in a type error.
    let urls: Vec<String> = s.opt_secret("urls").unwrap_or_default();
    for (i, url) in urls.iter().enumerate() {
        match crate::upstream::proxy_pool::parse_proxy_url(url) {
            Some(_) => {}
            None => s.error(
                &format!("urls[{i}]"),
                format!(
                    "expected http://[user:pass@]host:port, found {:?}",
                    redact_url(url)
                ),
            ),
        }
    }
    s.reject_unknown_keys();
    urls
}

fn read_upstreams(s: &Section<'_>) -> Vec<Uri> {
    if !s.contains("upstreams") {
        s.error(
            "upstreams",
            "required: at least one http:// or https:// URL",
        );
        return Vec::new();
    }
    let urls: Vec<String> = s.get("upstreams", Vec::new());
    if urls.is_empty() && s.contains("upstreams") {
        s.error("upstreams", "must list at least one URL");
    }
    urls.iter()
        .enumerate()
        .filter_map(|(i, url)| match check_upstream_url(url) {
            Ok(uri) => Some(uri),
            Err(message) => {
                s.error(&format!("upstreams[{i}]"), message);
                None
            }
        })
        .collect()
}

/// Why `path` is visibly not a file to read: missing, or something else.
/// One this process may not look at (a key in a directory only its
/// service user may enter) is left to the read, which `check` and `run` do
/// with its own error, and which a `queue` command never needs.
fn not_a_file(path: &std::path::Path) -> Option<String> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => None,
        Ok(_) => Some(format!("{} is not a file", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Some(format!("file {} does not exist", path.display()))
        }
        Err(_) => None,
    }
}

fn check_upstream_url(url: &str) -> Result<Uri, String> {
    let shown = redact_url(url);
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(format!(
            "invalid URL {shown:?}: scheme must be http or https"
        ));
    }
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("invalid URL {shown:?}: {e}"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => {
            return Err(format!(
                "invalid URL {shown:?}: scheme must be http or https"
            ))
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("invalid URL {shown:?}: no host"));
    }
    if uri.query().is_some() {
        return Err(format!("invalid URL {shown:?}: must not have a query"));
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(format!(
            "invalid URL {:?}: credentials in upstream URLs are not supported, use headers",
            shown
        ));
    }
    let host_port = uri.authority().map_or("", |a| a.as_str());
    if !crate::upstream::port_is_valid(host_port.as_bytes()) {
        return Err(format!(
            "invalid URL {shown:?}: the port must be a number from 1 to 65535"
        ));
    }
    Ok(uri)
}

fn read_header_map(s: &Section<'_>, key: &str) -> Vec<(HeaderName, HeaderValue)> {
    // Values may be secrets (an API key): not shown in a type error.
    let map: BTreeMap<String, String> = s.opt_secret(key).unwrap_or_default();
    let mut headers: Vec<(HeaderName, HeaderValue)> = Vec::with_capacity(map.len());
    for (name, value) in map {
        let at = format!("{key}.{name}");
        match (
            HeaderName::try_from(name.as_str()),
            HeaderValue::try_from(value.as_str()),
        ) {
            (Err(_), _) => s.error(&at, "invalid header name"),
            (_, Err(_)) => s.error(&at, "invalid header value"),
            (Ok(n), Ok(_)) if crate::headers::PER_MESSAGE.contains(&n) => s.error(
                &at,
                "is set for each message or connection; it cannot be configured",
            ),
            // It becomes HTTP/2's `:authority` (see `upstream::host_as_authority`).
            (Ok(n), Ok(_)) if n == http::header::HOST && !is_host_and_port(&value) => s.error(
                &at,
                "must be a host name or address with an optional port (host[:port]), without credentials",
            ),
            // TOML keys are case-sensitive, header names are not.
            (Ok(n), Ok(_)) if headers.iter().any(|(seen, _)| *seen == n) => {
                s.error(&at, "duplicate header name (names are case-insensitive)")
            }
            (Ok(n), Ok(v)) => headers.push((n, v)),
        }
    }
    headers
}

/// Kafka's rule for topic names (a broker refuses every record sent to
/// another: captures would wait for Kafka for good).
fn is_kafka_topic_name(name: &str) -> bool {
    name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Whether `value` is `host[:port]`: an authority without user info, whose
/// port (if any) is a port number.
fn is_host_and_port(value: &str) -> bool {
    !value.contains('@')
        && value.parse::<http::uri::Authority>().is_ok()
        && crate::upstream::port_is_valid(value.as_bytes())
}

fn read_forward_headers(s: &Section<'_>) -> ForwardHeaders {
    match s.opt::<BoolOrList>("forward_headers") {
        None | Some(BoolOrList::Bool(true)) => ForwardHeaders::All,
        Some(BoolOrList::Bool(false)) => ForwardHeaders::None,
        Some(BoolOrList::List(_)) => ForwardHeaders::Only(header_names(s, "forward_headers")),
    }
}

fn socket_addr(s: &Section<'_>, key: &str, default: &str) -> SocketAddr {
    let fallback: SocketAddr = default
        .parse()
        .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
    match s.opt::<String>(key) {
        None => fallback,
        Some(text) => text.parse().unwrap_or_else(|_| {
            s.error(
                key,
                format!("expected an address such as \"{default}\", found {text:?}"),
            );
            fallback
        }),
    }
}

fn header_name(s: &Section<'_>, key: &str, default: &'static str) -> HeaderName {
    let text = s.get(key, default.to_string());
    let fallback = HeaderName::from_static("idempotency-key");
    let Ok(name) = HeaderName::try_from(text.as_str()) else {
        s.error(key, format!("invalid header name {text:?}"));
        return fallback;
    };
    // Set on requests after everything else: one that frames the message
    // or describes its body would corrupt every one, and one Backstop sets
    // itself (`Host`, `X-Forwarded-*`, `X-Request-Id`, `traceparent`,
    // `X-Backstop-*`) would be the client's on some ways and not others.
    let describing = [http::header::CONTENT_TYPE, http::header::CONTENT_ENCODING];
    if crate::headers::PER_MESSAGE.contains(&name)
        || describing.contains(&name)
        || crate::headers::set_by_backstop(&name)
    {
        s.error(
            key,
            format!("{text:?} frames or describes the request, or Backstop sets it: name a header of its own"),
        );
        return fallback;
    }
    name
}

fn read_trusted_proxies(s: &Section<'_>) -> TrustedProxies {
    let entries: Vec<String> = s.get("trusted_proxies", Vec::new());
    let networks = entries.iter().enumerate().filter_map(|(i, entry)| {
        TrustedProxies::parse_entry(entry)
            .map_err(|message| s.error(&format!("trusted_proxies[{i}]"), message))
            .ok()
    });
    TrustedProxies::new(networks.collect())
}

fn header_names(s: &Section<'_>, key: &str) -> Vec<HeaderName> {
    let names: Vec<String> = s.get(key, Vec::new());
    names
        .iter()
        .enumerate()
        .filter_map(|(i, n)| {
            HeaderName::try_from(n.as_str())
                .map_err(|_| s.error(&format!("{key}[{i}]"), format!("invalid header name {n:?}")))
                .ok()
        })
        .collect()
}

fn methods(s: &Section<'_>, key: &str, default: &[&str]) -> Vec<Method> {
    let names: Vec<String> = s.get(key, default.iter().map(|m| m.to_string()).collect());
    names
        .iter()
        .enumerate()
        .filter_map(|(i, m)| {
            let upper = m.to_ascii_uppercase();
            match Method::from_bytes(upper.as_bytes()) {
                Ok(method) => Some(method),
                Err(_) => {
                    s.error(&format!("{key}[{i}]"), format!("invalid HTTP method {m:?}"));
                    None
                }
            }
        })
        .collect()
}

fn status_codes(s: &Section<'_>, key: &str, default: &[u16]) -> Vec<u16> {
    let codes: Vec<u16> = s.get(key, default.to_vec());
    for (i, code) in codes.iter().enumerate() {
        if !(100..=599).contains(code) {
            s.error(
                &format!("{key}[{i}]"),
                format!("{code} is not an HTTP status"),
            );
        }
    }
    codes
}

fn at_least_one(s: &Section<'_>, key: &str, default: u32) -> u32 {
    let n = s.get(key, default);
    if n == 0 {
        s.error(key, "must be at least 1");
        return default;
    }
    n
}

fn non_empty(s: &Section<'_>, key: &str, default: &str) -> String {
    let text = s.get(key, default.to_string());
    if text.trim().is_empty() {
        s.error(key, "must not be empty");
        return default.to_string();
    }
    text
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// `/api/` and `/api` route the same requests.
pub(crate) fn normalize_prefix(prefix: &str) -> &str {
    match prefix.trim_end_matches('/') {
        "" => "/",
        p => p,
    }
}

/// Hides the credentials of a URL for logs and errors: the password of
/// `scheme://user:password@host`, a user given alone (a provider's token,
/// `http://TOKEN@proxy`), the query's values (`?api-key=...`) and the
/// fragment. The password ends at the last `@`: one that was not
/// percent-encoded may hold `/`, `?`, `#` or `@`, and an invalid URL is
/// shown too. This hides more than the password of a URL with a port and
/// an `@` in its path.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let (scheme, rest) = url.split_at(scheme_end + 3);
    let mut shown = scheme.to_string();
    // Where the authority ends if nothing in it was left unescaped.
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let at_inside = rest[..end].rfind('@');
    let at_past = rest[end..].rfind('@').map(|i| end + i);
    // The host and port, if the authority's `@` ends a userinfo.
    let host_port = &rest[at_inside.map_or(0, |at| at + 1)..end];
    let is_port = |text: &str| {
        text.rsplit_once(':')
            .is_some_and(|(_, port)| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()))
    };
    // An `@` past the first delimiter ends a password that holds one
    // unescaped (`user:pa/ss@host`) when a `:` came before it that starts
    // no port; else it is the path's or the query's (`/users/@me`).
    let password_past_delimiter =
        at_past.is_some() && rest[..end].contains(':') && !is_port(host_port);
    let userinfo_end = if password_past_delimiter {
        at_past
    } else {
        at_inside
    };
    // `host:1234/x@y` may yet be `user:1234/x@y` (a password of digits,
    // then a `/`): past the authority, nothing is shown.
    if userinfo_end.is_none() && at_past.is_some() && rest[..end].contains(':') {
        shown.push_str(&rest[..end]);
        if end < rest.len() {
            shown.push_str(&rest[end..=end]);
            shown.push_str("***");
        }
        return shown;
    }
    let after_userinfo = match userinfo_end {
        Some(at) => {
            match rest[..at].split_once(':') {
                Some((user, _password)) => {
                    shown.push_str(user);
                    shown.push_str(":***@");
                }
                None => shown.push_str("***@"),
            }
            &rest[at + 1..]
        }
        None => rest,
    };
    let (before_fragment, fragment) = match after_userinfo.split_once('#') {
        Some((before, _)) => (before, Some("#***")),
        None => (after_userinfo, None),
    };
    match before_fragment.split_once('?') {
        Some((path, query)) => {
            shown.push_str(path);
            // The names say what is wrong with a query; values may be keys.
            for (i, pair) in query.split('&').enumerate() {
                shown.push(if i == 0 { '?' } else { '&' });
                match pair.split_once('=') {
                    Some((name, _value)) => {
                        shown.push_str(name);
                        shown.push_str("=***");
                    }
                    None => shown.push_str(pair),
                }
            }
        }
        None => shown.push_str(before_fragment),
    }
    shown.extend(fragment);
    shown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden_even_when_they_hold_url_delimiters() {
        let cases = [
            ("redis://:s3cret@redis:6379", "redis://:***@redis:6379"),
            ("http://u:pa/ss@proxy:3128", "http://u:***@proxy:3128"),
            (
                "redis://:Zm9v/YmFy@redis:6379/0",
                "redis://:***@redis:6379/0",
            ),
            ("http://u:p@ss?#x@proxy:3128", "http://u:***@proxy:3128"),
            ("http://proxy:3128", "http://proxy:3128"),
            (
                "https://api.example.com/users/@me",
                "https://api.example.com/users/@me",
            ),
            ("http://TOKEN@proxy:8012", "http://***@proxy:8012"),
            (
                "https://otlp.example.com/v1/traces?api-key=SECRET&flag",
                "https://otlp.example.com/v1/traces?api-key=***&flag",
            ),
            (
                "redis://:pw@redis:6379/0#SECRET",
                "redis://:***@redis:6379/0#***",
            ),
            (
                "https://collector/v1?api-key=SECRET&ts=12:00&m=a@b",
                "https://collector/v1?api-key=***&ts=***&m=***",
            ),
            ("https://TOKEN@host/users/@me", "https://***@host/users/@me"),
            (
                "https://otlp.example.com:4318/v1?user=ops@corp&x-api-key=SECRET",
                "https://otlp.example.com:4318/***",
            ),
            (
                "https://APIKEY@collector:4318/v1?tenant=me@corp",
                "https://***@collector:4318/v1?tenant=***",
            ),
            ("http://u:1234/5@proxy:3128", "http://u:1234/***"),
            (
                "redis://u:pw@redis:6379/0?x=a@b",
                "redis://u:***@redis:6379/0?x=***",
            ),
        ];
        for (url, shown) in cases {
            assert_eq!(redact_url(url), shown, "{url}");
        }
        // And in `check`'s message for an invalid URL.
        for url in ["ftp://u:pa/ss@proxy:3128", "http://u:pa ss@host"] {
            let error = check_upstream_url(url).unwrap_err();
            assert!(!error.contains("ss"), "{error}");
        }
    }

    #[test]
    fn listeners_that_cannot_both_bind() {
        let cases = [
            ("127.0.0.1:9901", "127.0.0.1:9901", true),
            ("0.0.0.0:8080", "127.0.0.1:8080", true),
            ("127.0.0.1:8080", "0.0.0.0:8080", true),
            ("[::]:8080", "127.0.0.1:8080", true),
            ("[::1]:8080", "[::]:8080", true),
            ("0.0.0.0:8080", "127.0.0.1:9901", false),
            ("127.0.0.1:8080", "127.0.0.2:8080", false),
            ("0.0.0.0:8080", "[::1]:8080", false),
            // Port 0: each gets a free port of its own.
            ("127.0.0.1:0", "127.0.0.1:0", false),
        ];
        for (a, b, want) in cases {
            let (a, b) = (a.parse().unwrap(), b.parse().unwrap());
            assert_eq!(listeners_collide(a, b), want, "{a} {b}");
        }
    }

    #[test]
    fn route_hosts() {
        let cases = [
            ("API.Example.com", Ok("api.example.com")),
            ("::1", Ok("::1")),
            ("[::1]", Ok("::1")),
            ("10.0.0.1", Ok("10.0.0.1")),
            ("api.example.com:8443", Err("has a port")),
            ("10.0.0.1:80", Err("has a port")),
            ("[::1]:8443", Err("has a port: routes match the request's host without its port, so write \"::1\"")),
            ("", Err("must not be empty")),
            ("  ", Err("must not be empty")),
            ("https://api.example.com", Err("not a URL")),
            ("api.example.com/v1", Err("not a URL")),
            ("api example.com", Err("is not a host name")),
        ];
        for (text, want) in cases {
            match (check_route_host(text), want) {
                (Ok(host), Ok(want)) => assert_eq!(host, want, "{text:?}"),
                (Err(message), Err(want)) => {
                    assert!(message.contains(want), "{text:?}: {message}")
                }
                (got, want) => panic!("{text:?}: got {got:?}, want {want:?}"),
            }
        }
    }
}
