//! Loading: the file, then the environment variables the reference setups
//! understood (`PROXY_URLS`, `REDIS_HOST`, `REDIS_PORT`, `REDIS_PASSWORD`,
//! `KAFKA_BROKERS`), then validation of the whole.

use std::path::Path;

use toml::{Table, Value};

use super::reader::{Errors, Section};
use super::{Config, ConfigError, ConfigErrors};

/// Reads and validates `path`, with the environment overrides applied.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
        file: path.to_path_buf(),
        errors: vec![ConfigError {
            key: String::new(),
            message: format!("cannot read file: {e}"),
        }],
    })?;
    load_str(&text, path, |name| std::env::var(name).ok())
}

/// Parses and validates `text`; `env` looks up environment variables (a
/// function so that tests need not touch the process environment).
pub fn load_str(
    text: &str,
    path: &Path,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Config, ConfigErrors> {
    let fail = |errors| ConfigErrors {
        file: path.to_path_buf(),
        errors,
    };
    let mut table: Table = text.parse().map_err(|e: toml::de::Error| {
        fail(vec![ConfigError {
            key: String::new(),
            message: format!("invalid TOML: {}", e.to_string().trim_end()),
        }])
    })?;
    apply_env(&mut table, &env);
    let errors = Errors::default();
    let root = Section::root(&table, &errors);
    let config = Config::read(&root);
    root.reject_unknown_keys();
    let errors = errors.into_vec();
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(fail(errors))
    }
}

fn apply_env(table: &mut Table, env: &impl Fn(&str) -> Option<String>) {
    if let Some(urls) = env("PROXY_URLS") {
        let list: Vec<Value> = urls
            .split([';', ','])
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|u| Value::String(u.to_string()))
            .collect();
        subtable(table, "outbound_proxies").insert("urls".into(), Value::Array(list));
    }
    let host = env("REDIS_HOST");
    let port = env("REDIS_PORT");
    let password = env("REDIS_PASSWORD");
    if host.is_some() || port.is_some() || password.is_some() {
        let auth = password.map(|p| format!(":{p}@")).unwrap_or_default();
        let url = format!(
            "redis://{auth}{}:{}",
            host.as_deref().unwrap_or("127.0.0.1"),
            port.as_deref().unwrap_or("6379")
        );
        subtable(table, "redis").insert("url".into(), Value::String(url));
    }
    if let Some(brokers) = env("KAFKA_BROKERS") {
        subtable(table, "kafka").insert("brokers".into(), Value::String(brokers));
    }
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
