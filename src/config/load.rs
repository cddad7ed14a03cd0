//! Loading: the file, then the environment variables the reference setups
//! understood (`PROXY_URLS`, `REDIS_HOST`, `REDIS_PORT`, `REDIS_PASSWORD`,
//! `KAFKA_BROKERS`), then validation of the whole. Each `REDIS_*` variable
//! replaces only its part of `[redis] url`: a password given alone must not
//! send Backstop to another Redis or database.

use std::net::Ipv6Addr;
use std::path::Path;

use toml::{Table, Value};

use super::reader::{Errors, Section};
use super::schema::DEFAULT_REDIS_URL;
use super::{redact_url, Config, ConfigError, ConfigErrors};

/// Reads and validates `path`, with the environment overrides applied.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    match load_all(path) {
        (Some(config), errors) if errors.is_empty() => Ok(config),
        (_, errors) => Err(ConfigErrors {
            file: path.to_path_buf(),
            errors,
        }),
    }
}

/// [`load`], but also the configuration as read when the file has errors
/// (each bad value replaced by its default), so that checks of what the
/// file names (the listener's TLS files) list their errors with the rest.
/// No configuration: the file cannot be read or is no TOML.
pub fn load_all(path: &Path) -> (Option<Config>, Vec<ConfigError>) {
    match std::fs::read_to_string(path) {
        Ok(text) => read_all(&text, |name| std::env::var(name).ok()),
        Err(e) => (
            None,
            vec![ConfigError {
                key: String::new(),
                message: format!("cannot read file: {e}"),
            }],
        ),
    }
}

/// Parses and validates `text`; `env` looks up environment variables (a
/// function so that tests need not touch the process environment).
pub fn load_str(
    text: &str,
    path: &Path,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Config, ConfigErrors> {
    match read_all(text, env) {
        (Some(config), errors) if errors.is_empty() => Ok(config),
        (_, errors) => Err(ConfigErrors {
            file: path.to_path_buf(),
            errors,
        }),
    }
}

fn read_all(
    text: &str,
    env: impl Fn(&str) -> Option<String>,
) -> (Option<Config>, Vec<ConfigError>) {
    let mut table: Table = match text.parse() {
        Ok(table) => table,
        Err(e) => {
            let e: toml::de::Error = e;
            // Where and why, without the line itself, which toml's own text
            // quotes: an invalid escape in a password is a common cause.
            let message = match e.span() {
                Some(span) => {
                    let before = text.get(..span.start).unwrap_or(text);
                    let line = before.matches('\n').count() + 1;
                    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
                    let column = before[line_start..].chars().count() + 1;
                    format!(
                        "invalid TOML at line {line}, column {column}: {}",
                        e.message().trim_end()
                    )
                }
                None => format!("invalid TOML: {}", e.message().trim_end()),
            };
            let error = ConfigError {
                key: String::new(),
                message,
            };
            return (None, vec![error]);
        }
    };
    let errors = Errors::default();
    let from_env = apply_env(&mut table, &env, &errors);
    let root = Section::root(&table, &errors);
    let config = Config::read(&root);
    root.reject_unknown_keys();
    let mut errors = errors.into_vec();
    // The key may not be in the file at all: the error names the variable.
    for error in &mut errors {
        let by_env = from_env.iter().find(|(key, _)| {
            let under = error.key.strip_prefix(key);
            under.is_some_and(|rest| rest.is_empty() || rest.starts_with('['))
        });
        if let Some((_, var)) = by_env {
            error.message.push_str(&format!(" (set by {var})"));
        }
    }
    (Some(config), errors)
}

/// Applies the environment variables of the reference setups. An empty
/// variable counts as unset (`REDIS_PASSWORD=` in a compose file means
/// "none given", not "an empty password"); a problem with a variable is
/// reported under the key it overrides. Returns the keys set whole by a
/// variable, with its name.
fn apply_env(
    table: &mut Table,
    env: &impl Fn(&str) -> Option<String>,
    errors: &Errors,
) -> Vec<(&'static str, &'static str)> {
    let var = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    let mut from_env = Vec::new();
    if let Some(urls) = var("PROXY_URLS") {
        from_env.push(("outbound_proxies.urls", "PROXY_URLS"));
        let list: Vec<Value> = urls
            .split([';', ','])
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|u| Value::String(u.to_string()))
            .collect();
        subtable(table, "outbound_proxies").insert("urls".into(), Value::Array(list));
    }
    let parts = RedisParts {
        host: var("REDIS_HOST"),
        port: var("REDIS_PORT"),
        password: var("REDIS_PASSWORD"),
    };
    if !parts.is_empty() {
        let redis = subtable(table, "redis");
        let base = match redis.get("url") {
            None => Some(DEFAULT_REDIS_URL.to_string()),
            Some(Value::String(url)) => Some(url.clone()),
            // Not a string: validation reports the file's value.
            Some(_) => None,
        };
        if let Some(base) = base {
            match parts.apply(&base) {
                Ok(Some(url)) => {
                    redis.insert("url".into(), Value::String(url));
                }
                // The file's URL does not parse: validation reports it.
                Ok(None) => {}
                Err(message) => errors.push("redis.url", message),
            }
        }
    }
    if let Some(brokers) = var("KAFKA_BROKERS") {
        from_env.push(("kafka.brokers", "KAFKA_BROKERS"));
        subtable(table, "kafka").insert("brokers".into(), Value::String(brokers));
    }
    from_env
}

/// The parts of `[redis] url` given by `REDIS_HOST`, `REDIS_PORT` and
/// `REDIS_PASSWORD`; the rest (user name, database, other parts) stays
/// the file's.
struct RedisParts {
    host: Option<String>,
    port: Option<String>,
    password: Option<String>,
}

impl RedisParts {
    fn is_empty(&self) -> bool {
        self.host.is_none() && self.port.is_none() && self.password.is_none()
    }

    /// `base` with the given parts replaced; `None` when `base` itself is
    /// not a URL. Errors name the variable, never the password.
    fn apply(&self, base: &str) -> Result<Option<String>, String> {
        let Ok(mut url) = url::Url::parse(base) else {
            return Ok(None);
        };
        if let Some(host) = &self.host {
            let host = host.trim();
            // An IPv6 address goes in brackets in a URL.
            let in_url = match host.parse::<Ipv6Addr>() {
                Ok(_) => format!("[{host}]"),
                Err(_) => host.to_string(),
            };
            let invalid = || format!("REDIS_HOST {host:?} is not a host name or IP address");
            if in_url.contains(':') && !in_url.starts_with('[') {
                return Err(format!("{} (a port goes in REDIS_PORT)", invalid()));
            }
            url.set_host(Some(&in_url))
                .map_err(|e| format!("{} ({e})", invalid()))?;
            // The url crate stops a host at `/`, `?` or `#`: what it kept
            // must be the whole of it.
            if !url
                .host_str()
                .is_some_and(|kept| kept.eq_ignore_ascii_case(&in_url))
            {
                return Err(invalid());
            }
        }
        if let Some(port) = &self.port {
            let number = port
                .trim()
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| format!("REDIS_PORT {port:?} is not a port number (1-65535)"))?;
            url.set_port(Some(number))
                .map_err(|()| format!("REDIS_PORT cannot be applied to {:?}", redact_url(base)))?;
        }
        if let Some(password) = &self.password {
            // The redis crate percent-decodes the password; every byte
            // that is not unreserved is encoded, `%` included (the url
            // crate would take `%41` as already encoded).
            url.set_password(Some(&percent_encode(password)))
                .map_err(|()| {
                    format!("REDIS_PASSWORD cannot be applied to {:?}", redact_url(base))
                })?;
        }
        Ok(Some(url.to_string()))
    }
}

/// Every byte but RFC 3986's unreserved ones, escaped.
const NOT_UNRESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `text` with every byte but RFC 3986's unreserved ones as `%XX`.
fn percent_encode(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, NOT_UNRESERVED).to_string()
}

/// The table at `key`, created if absent; the environment wins over a
/// value of another type in the file.
fn subtable<'a>(table: &'a mut Table, key: &str) -> &'a mut Table {
    let entry = table
        .entry(key.to_string())
        .or_insert_with(|| Value::Table(Table::new()));
    if !entry.is_table() {
        *entry = Value::Table(Table::new());
    }
    match entry {
        Value::Table(t) => t,
        _ => unreachable!("replaced by a table above"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::{ConnectionAddr, IntoConnectionInfo};

    const ROUTE: &str =
        "[[routes]]\nname = \"a\"\npath_prefix = \"/a\"\nupstreams = [\"http://127.0.0.1:1\"]\n";

    fn load_with(file_url: Option<&str>, vars: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
        let redis = file_url.map_or(String::new(), |url| format!("[redis]\nurl = {url:?}\n"));
        load_str(&format!("{redis}{ROUTE}"), Path::new("t.toml"), |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    }

    /// What the redis crate connects with: host, port, database, user
    /// name and password (decoded).
    type Connects = (
        &'static str,
        u16,
        i64,
        Option<&'static str>,
        Option<&'static str>,
    );
    /// The file's URL, the variables, the URL loaded, what it connects with.
    type Case = (
        Option<&'static str>,
        Vec<(&'static str, &'static str)>,
        &'static str,
        Connects,
    );

    #[test]
    fn redis_variables_replace_only_their_part_of_the_url() {
        const FILE: Option<&str> = Some("redis://redis.internal:6380/2");
        let cases: Vec<Case> = vec![
            (
                FILE,
                vec![("REDIS_PASSWORD", "s3cret")],
                "redis://:s3cret@redis.internal:6380/2",
                ("redis.internal", 6380, 2, None, Some("s3cret")),
            ),
            (
                FILE,
                vec![("REDIS_HOST", "10.0.0.5")],
                "redis://10.0.0.5:6380/2",
                ("10.0.0.5", 6380, 2, None, None),
            ),
            (
                FILE,
                vec![("REDIS_PORT", " 7000 ")],
                "redis://redis.internal:7000/2",
                ("redis.internal", 7000, 2, None, None),
            ),
            (
                Some("redis://app:old@redis.internal/3"),
                vec![("REDIS_PASSWORD", "new")],
                "redis://app:new@redis.internal/3",
                ("redis.internal", 6379, 3, Some("app"), Some("new")),
            ),
            // Without a url in the file: the default's parts.
            (
                None,
                vec![("REDIS_HOST", "cache")],
                "redis://cache:6379",
                ("cache", 6379, 0, None, None),
            ),
            (
                None,
                vec![("REDIS_HOST", "::1"), ("REDIS_PORT", "6390")],
                "redis://[::1]:6390",
                ("::1", 6390, 0, None, None),
            ),
            (
                None,
                vec![("REDIS_HOST", "[fd00::5]")],
                "redis://[fd00::5]:6379",
                ("fd00::5", 6379, 0, None, None),
            ),
            // Every byte that means something in a URL is encoded, `%` too.
            (
                None,
                vec![("REDIS_PASSWORD", "p/a?s#s%w@r:d")],
                "redis://:p%2Fa%3Fs%23s%25w%40r%3Ad@127.0.0.1:6379",
                ("127.0.0.1", 6379, 0, None, Some("p/a?s#s%w@r:d")),
            ),
            (
                None,
                vec![("REDIS_PASSWORD", "%41 ü+")],
                "redis://:%2541%20%C3%BC%2B@127.0.0.1:6379",
                ("127.0.0.1", 6379, 0, None, Some("%41 ü+")),
            ),
            // An empty variable is no variable.
            (
                FILE,
                vec![
                    ("REDIS_PASSWORD", ""),
                    ("REDIS_HOST", " "),
                    ("REDIS_PORT", ""),
                ],
                "redis://redis.internal:6380/2",
                ("redis.internal", 6380, 2, None, None),
            ),
        ];
        for (file, vars, want_url, (host, port, db, user, password)) in cases {
            let config = load_with(file, &vars).unwrap_or_else(|e| panic!("{vars:?}: {e}"));
            let url = config.redis.expect("[redis]").url;
            assert_eq!(url, want_url, "{file:?} {vars:?}");
            let info = url.as_str().into_connection_info().unwrap();
            assert_eq!(
                info.addr(),
                &ConnectionAddr::Tcp(host.to_string(), port),
                "{vars:?}"
            );
            let settings = info.redis_settings();
            assert_eq!(settings.db(), db, "{vars:?}");
            assert_eq!(settings.username(), user, "{vars:?}");
            assert_eq!(settings.password(), password, "{vars:?}");
        }
    }

    #[test]
    fn bad_or_empty_redis_variables() {
        // No variable (or only empty ones) and no [redis]: no Redis at all.
        for vars in [vec![], vec![("REDIS_HOST", ""), ("REDIS_PASSWORD", "")]] {
            assert!(load_with(None, &vars).unwrap().redis.is_none(), "{vars:?}");
        }
        let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
            (
                vec![("REDIS_PORT", "abc")],
                "REDIS_PORT \"abc\" is not a port number (1-65535)",
            ),
            (
                vec![("REDIS_PORT", "0"), ("REDIS_PASSWORD", "s3cret")],
                "REDIS_PORT \"0\" is not a port number (1-65535)",
            ),
            (
                vec![("REDIS_HOST", "redis:6380"), ("REDIS_PASSWORD", "s3cret")],
                "REDIS_HOST \"redis:6380\" is not a host name or IP address (a port goes in REDIS_PORT)",
            ),
            (
                vec![("REDIS_HOST", "redis/1")],
                "REDIS_HOST \"redis/1\" is not a host name or IP address",
            ),
            (
                vec![("REDIS_HOST", "bad host")],
                "REDIS_HOST \"bad host\" is not a host name or IP address",
            ),
        ];
        for (vars, want) in cases {
            let errors = load_with(Some("redis://redis.internal:6380/2"), &vars)
                .expect_err("refused")
                .errors;
            assert_eq!(errors.len(), 1, "{vars:?}: {errors:?}");
            assert_eq!(errors[0].key, "redis.url");
            assert!(errors[0].message.starts_with(want), "{errors:?}");
            assert!(!errors[0].message.contains("s3cret"), "{errors:?}");
        }
    }

    /// A bad value from a variable is reported under the key it sets, which
    /// the file may not have, and names the variable.
    #[test]
    fn an_error_in_a_value_from_the_environment_names_its_variable() {
        let vars = [
            ("PROXY_URLS", "http://p:3128;ftp://q"),
            ("KAFKA_BROKERS", " "),
        ];
        let errors = load_with(None, &vars).unwrap_err().errors;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].key, "outbound_proxies.urls[1]");
        assert!(
            errors[0].message.ends_with(" (set by PROXY_URLS)"),
            "{errors:?}"
        );
        let text = format!("{ROUTE}[outbound_proxies]\nurls = [\"ftp://q\"]\n");
        let errors = load_str(&text, Path::new("t.toml"), |_| None)
            .unwrap_err()
            .errors;
        assert!(!errors[0].message.contains("set by"), "{errors:?}");
    }

    #[test]
    fn empty_proxy_urls_and_kafka_brokers_count_as_unset() {
        let text = format!(
            "[kafka]\nbrokers = \"k:9092\"\n[outbound_proxies]\nurls = [\"http://p:3128\"]\n{ROUTE}"
        );
        let env = |name: &str| matches!(name, "PROXY_URLS" | "KAFKA_BROKERS").then(String::new);
        let config = load_str(&text, Path::new("t.toml"), env).unwrap();
        assert_eq!(config.kafka.unwrap().brokers, "k:9092");
        assert_eq!(config.outbound_proxies, ["http://p:3128"]);
    }
}
