//! Logging setup: human-readable text or JSON lines on stderr, filtered by
//! `log.level` (or `RUST_LOG`, which wins). Credentials never reach a log
//! line: URLs with passwords are redacted where they are formatted.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

pub fn init(config: &LogConfig) {
    // `RUST_LOG` set but empty (`RUST_LOG: ${RUST_LOG}` in a compose file)
    // would turn every level off: it counts as unset, as empty variables
    // do in the configuration.
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .filter(|directives| !directives.trim().is_empty())
        .and_then(|directives| EnvFilter::try_new(directives).ok());
    let filter = from_env
        .or_else(|| EnvFilter::try_new(&config.level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match config.format {
        LogFormat::Json => builder.json().with_current_span(false).try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
    // Already set (tests that start twice in one process): keep the first.
    let _ = result;
}
