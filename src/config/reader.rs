//! A TOML reader that collects every error instead of stopping at the first.
//!
//! serde's derive stops at the first wrong key, but `backstop check` must list
//! every problem in a file at once, each with its full key path
//! (`routes[1].retry.max_attempts`). So each section is read key by key: a leaf
//! is still decoded by serde, but a failure is recorded and the default kept,
//! and when a section is finished every key that nobody asked for is reported
//! as unknown.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use toml::{Table, Value};

use super::ConfigError;

/// What a plain number means for a duration key (DESIGN.md: milliseconds for
/// `request_timeout`, seconds for every other duration).
#[derive(Clone, Copy)]
pub(crate) enum NumberUnit {
    Seconds,
    Milliseconds,
}

/// Errors found so far in one file.
#[derive(Default)]
pub(crate) struct Errors(RefCell<Vec<ConfigError>>);

impl Errors {
    pub(crate) fn push(&self, key: impl Into<String>, message: impl Into<String>) {
        self.0.borrow_mut().push(ConfigError {
            key: key.into(),
            message: message.into(),
        });
    }

    pub(crate) fn into_vec(self) -> Vec<ConfigError> {
        self.0.into_inner()
    }
}

/// One table of the file, read key by key.
pub(crate) struct Section<'a> {
    table: Option<&'a Table>,
    path: String,
    errors: &'a Errors,
    seen: RefCell<BTreeSet<String>>,
}

impl<'a> Section<'a> {
    pub(crate) fn root(table: &'a Table, errors: &'a Errors) -> Self {
        Section {
            table: Some(table),
            path: String::new(),
            errors,
            seen: RefCell::default(),
        }
    }

    /// The full key path of `key` in this section, for error messages.
    pub(crate) fn key(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    pub(crate) fn error(&self, key: &str, message: impl Into<String>) {
        self.errors.push(self.key(key), message);
    }

    fn raw(&self, key: &str) -> Option<&'a Value> {
        self.seen.borrow_mut().insert(key.to_string());
        self.table.and_then(|t| t.get(key))
    }

    pub(crate) fn contains(&self, key: &str) -> bool {
        self.table.is_some_and(|t| t.contains_key(key))
    }

    /// An optional value; a present value of the wrong type is an error.
    pub(crate) fn opt<T: DeserializeOwned>(&self, key: &str) -> Option<T> {
        self.read(key, str::to_string)
    }

    /// [`Section::opt`] for a value that may be a secret (a token, a
    /// header's value such as an API key): a value of the wrong type is
    /// not shown in the error, which `check` prints and a reload logs.
    pub(crate) fn opt_secret<T: DeserializeOwned>(&self, key: &str) -> Option<T> {
        self.read(key, without_value)
    }

    /// A present value, or its type error as `message` words it.
    fn read<T: DeserializeOwned>(&self, key: &str, message: fn(&str) -> String) -> Option<T> {
        let value = self.raw(key)?;
        T::deserialize(value.clone())
            .map_err(|e| self.error(key, message(e.message())))
            .ok()
    }

    /// A value with a default used when the key is absent (or wrong).
    pub(crate) fn get<T: DeserializeOwned>(&self, key: &str, default: T) -> T {
        self.opt(key).unwrap_or(default)
    }

    /// A duration: `"1s"`, `"250ms"`, `"1m 30s"`, or a plain number in `unit`.
    pub(crate) fn duration(&self, key: &str, default: Duration, unit: NumberUnit) -> Duration {
        let Some(value) = self.raw(key) else {
            return default;
        };
        let parsed = match value {
            Value::String(s) => humantime::parse_duration(s.trim())
                .map_err(|e| format!("invalid duration {s:?}: {e} (use e.g. \"1s\" or \"250ms\")")),
            Value::Integer(n) if *n >= 0 => Ok(number_duration(*n as f64, unit)),
            Value::Float(f) if f.is_finite() && *f >= 0.0 => Ok(number_duration(*f, unit)),
            other => Err(format!(
                "expected a duration such as \"1s\" or a non-negative number, found {}",
                describe(other)
            )),
        };
        let parsed = parsed.and_then(|d| {
            (d <= MAX_DURATION)
                .then_some(d)
                .ok_or_else(|| "must be at most 100 years".to_string())
        });
        parsed.unwrap_or_else(|message| {
            self.error(key, message);
            default
        })
    }

    /// A nested table (`[server]`, `[routes.retry]`). An absent table reads
    /// as empty, so every key takes its default.
    pub(crate) fn section(&self, key: &str) -> Section<'a> {
        let table = match self.raw(key) {
            None => None,
            Some(Value::Table(t)) => Some(t),
            Some(other) => {
                self.error(key, format!("expected a table, found {}", describe(other)));
                None
            }
        };
        Section {
            table,
            path: self.key(key),
            errors: self.errors,
            seen: RefCell::default(),
        }
    }

    /// An array of tables (`[[routes]]`).
    pub(crate) fn array_of_tables(&self, key: &str) -> Vec<Section<'a>> {
        match self.raw(key) {
            None => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .filter_map(|(i, item)| {
                    let path = format!("{}[{i}]", self.key(key));
                    match item {
                        Value::Table(t) => Some(Section {
                            table: Some(t),
                            path,
                            errors: self.errors,
                            seen: RefCell::default(),
                        }),
                        other => {
                            self.errors
                                .push(path, format!("expected a table, found {}", describe(other)));
                            None
                        }
                    }
                })
                .collect(),
            Some(other) => {
                self.error(
                    key,
                    format!("expected an array of tables, found {}", describe(other)),
                );
                Vec::new()
            }
        }
    }

    /// Reports every key of this table that was never read.
    pub(crate) fn reject_unknown_keys(&self) {
        let Some(table) = self.table else { return };
        let seen = self.seen.borrow();
        for key in table.keys() {
            if !seen.contains(key) {
                self.error(key, "unknown key");
            }
        }
    }
}

/// The longest duration any key takes: far beyond any sensible setting,
/// and short enough that a clock reading plus it cannot overflow.
const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// A plain number in `unit` (non-negative and finite); one too large for a
/// `Duration` is `Duration::MAX`, which the caller refuses.
fn number_duration(n: f64, unit: NumberUnit) -> Duration {
    let seconds = match unit {
        NumberUnit::Seconds => n,
        NumberUnit::Milliseconds => n / 1000.0,
    };
    Duration::try_from_secs_f64(seconds).unwrap_or(Duration::MAX)
}

fn describe(value: &Value) -> &'static str {
    match value {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a datetime",
        Value::Array(_) => "an array",
        Value::Table(_) => "a table",
    }
}

/// `forward_headers = true | false | ["X-API-KEY", ...]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub(crate) enum BoolOrList {
    Bool(bool),
    List(Vec<String>),
}

/// A type error without the value that came: serde's ``invalid type:
/// integer `834729384`, expected a string`` becomes `invalid type:
/// integer, expected a string`. Other messages are kept whole.
fn without_value(message: &str) -> String {
    let Some(rest) = message.strip_prefix("invalid type: ") else {
        return message.to_string();
    };
    let Some(expected) = rest.find(", expected") else {
        return message.to_string();
    };
    let found = &rest[..expected];
    // The kind is what comes before the quoted value (`string "..."`,
    // `floating point `...``); a kind alone (`map`) is kept as it is.
    let kind = found
        .find(['`', '"'])
        .map_or(found, |at| found[..at].trim_end());
    format!("invalid type: {kind}{}", &rest[expected..])
}

#[cfg(test)]
mod tests {
    use super::without_value;

    #[test]
    fn type_errors_lose_their_value() {
        let cases = [
            (
                "invalid type: integer `834729384`, expected a string",
                "invalid type: integer, expected a string",
            ),
            (
                "invalid type: string \"s3cret\", expected u64",
                "invalid type: string, expected u64",
            ),
            (
                "invalid type: floating point `1.5`, expected a string",
                "invalid type: floating point, expected a string",
            ),
            (
                "invalid type: map, expected a string",
                "invalid type: map, expected a string",
            ),
            ("missing field `x`", "missing field `x`"),
        ];
        for (message, want) in cases {
            assert_eq!(without_value(message), want);
        }
    }
}
