//! The `logging` section.

use super::invalid;
use crate::config::raw::{RawLogFormat, RawLogging};
use crate::config::{ConfigError, LogFormat, LoggingConfig};

pub(super) fn resolve_logging(l: RawLogging) -> Result<LoggingConfig, ConfigError> {
    let level = l.level.unwrap_or_else(|| "info".to_owned());
    if level.trim().is_empty() {
        return Err(invalid("logging.level", "is empty"));
    }
    if l.file.as_ref().is_some_and(|f| f.as_os_str().is_empty()) {
        return Err(invalid("logging.file", "is empty"));
    }
    Ok(LoggingConfig {
        level,
        file: l.file,
        format: match l.format {
            Some(RawLogFormat::Json) => LogFormat::Json,
            Some(RawLogFormat::Text) | None => LogFormat::Text,
        },
    })
}
