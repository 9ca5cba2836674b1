//! [`RawConfig`] to the checked [`WorkerConfig`], one section per file: every value in its
//! range, defaults filled in, and each mistake reported with its dotted key.

mod controller;
mod engine;
mod logging;
mod nats;
mod node;

use std::time::Duration;

use super::raw::{RawConfig, RawMode};
use super::{ConfigError, WorkerConfig};

impl RawConfig {
    /// Validates every value and builds the resolved configuration.
    pub(super) fn resolve(self) -> Result<WorkerConfig, ConfigError> {
        if self.mode == Some(RawMode::Controller) {
            return Err(invalid(
                "mode",
                "is controller, which runs no worker, must be worker or both",
            ));
        }
        let nats = nats::resolve_nats(self.nats)?;
        let node = node::resolve_node(
            &self.worker,
            &self.discovery,
            &self.runtime,
            &self.model_subjects,
        )?;
        controller::check_shared_host(self.mode.as_ref(), self.controller.as_ref(), &node)?;
        Ok(WorkerConfig {
            nats,
            node,
            engine: engine::resolve_engine(&self.worker, self.runtime)?,
            logging: logging::resolve_logging(self.logging)?,
        })
    }
}

/// The error for a value of `key` that is out of range or inconsistent.
pub(super) fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        reason: reason.into(),
    }
}

/// `ms` milliseconds as a duration, which must lie within `min..=max`.
fn millis(key: &str, ms: u64, min: Duration, max: Duration) -> Result<Duration, ConfigError> {
    let d = Duration::from_millis(ms);
    if d < min || d > max {
        return Err(invalid(
            key,
            format!(
                "is {ms} ms, must be between {} and {} ms",
                min.as_millis(),
                max.as_millis()
            ),
        ));
    }
    Ok(d)
}

/// As [`millis`], with `default` when the key is not set.
fn millis_or(
    key: &str,
    ms: Option<u64>,
    default: Duration,
    min: Duration,
    max: Duration,
) -> Result<Duration, ConfigError> {
    ms.map_or(Ok(default), |ms| millis(key, ms, min, max))
}

/// `value`, which must lie within `min..=max`.
fn bounded<T: PartialOrd + std::fmt::Display>(
    key: &str,
    value: T,
    min: T,
    max: T,
) -> Result<T, ConfigError> {
    if value < min || value > max {
        return Err(invalid(
            key,
            format!("is {value}, must be between {min} and {max}"),
        ));
    }
    Ok(value)
}

/// The non-empty, trimmed items of a comma-separated list.
pub(super) fn comma_list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}
