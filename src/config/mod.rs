//! Typed configuration: the schema with its defaults, loading (file and
//! environment) and validation.
//!
//! Config values are plain data: they are never mutated once loaded. A reload
//! builds a new [`Config`] and from it a new route table (see `runtime`).

mod load;
mod reader;
mod schema;

use std::fmt;
use std::path::PathBuf;

pub use load::{load, load_all, load_str};
pub use schema::*;

/// One problem in a configuration file: the key path and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

/// Every problem found in one file.
#[derive(Debug)]
pub struct ConfigErrors {
    pub file: PathBuf,
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = self.file.display();
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            if e.key.is_empty() {
                write!(f, "{file}: {}", e.message)?;
            } else {
                write!(f, "{file}: {}: {}", e.key, e.message)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}
