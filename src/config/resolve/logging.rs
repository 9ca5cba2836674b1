//! The `logging` section.

use super::invalid;
use crate::config::raw::{RawLogFormat, RawLogging};
use crate::config::{ConfigError, LogFormat, LoggingConfig};

pub(super) fn resolve_logging(l: RawLogging) -> Result<LoggingConfig, ConfigError> {
    // `file` is accepted and ignored, as the existing tools do: the worker logs to stderr and
    // the service manager (launchd, systemd) keeps the file.
    let _ = l.file;
    let level = l.level.unwrap_or_else(|| "info".to_owned());
    if level.trim().is_empty() {
        return Err(invalid("logging.level", "is empty"));
    }
    Ok(LoggingConfig {
        level,
        format: match l.format {
            Some(RawLogFormat::Json) => LogFormat::Json,
            Some(RawLogFormat::Text) | None => LogFormat::Text,
        },
    })
}
