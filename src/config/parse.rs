//! YAML text to [`RawConfig`]: the size bound, the alias budget, the `cluster:` wrapper, and
//! parser messages (with their line and column) folded into one line.

use std::path::Path;

use super::ConfigError;
use super::raw::RawConfig;
use crate::limits::CONFIG_BYTES_MAX;

/// Reads and parses a config file.
pub(super) fn read_file(path: &Path) -> Result<RawConfig, ConfigError> {
    let read_err = |source| ConfigError::Read {
        path: path.to_owned(),
        source,
    };
    let len = std::fs::metadata(path).map_err(read_err)?.len();
    if len > CONFIG_BYTES_MAX as u64 {
        return Err(ConfigError::TooLarge {
            path: path.to_owned(),
            len,
            limit: CONFIG_BYTES_MAX,
        });
    }
    let text = std::fs::read_to_string(path).map_err(read_err)?;
    parse(&text, path)
}

/// Parses YAML text; `path` only names the source in errors.
pub(super) fn parse(text: &str, path: &Path) -> Result<RawConfig, ConfigError> {
    if text.len() > CONFIG_BYTES_MAX {
        return Err(ConfigError::TooLarge {
            path: path.to_owned(),
            len: text.len() as u64,
            limit: CONFIG_BYTES_MAX,
        });
    }
    let yaml_err = |message: String| ConfigError::Yaml {
        path: path.to_owned(),
        message,
    };
    // An empty file (or one holding only comments) is the all-defaults configuration.
    if text
        .lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
    {
        return Ok(RawConfig::default());
    }
    // Aliases are allowed (one tier-limit map reused for several tiers, say), but what they may
    // expand to is bounded: a "billion laughs" document of a few hundred bytes is refused after
    // a few thousand replayed events, long before it could take memory or time.
    let options = serde_saphyr::options! {
        with_snippet: false,
        budget: serde_saphyr::budget! {
            max_anchors: 64,
            max_aliases: 256,
            max_depth: 32,
        },
        alias_limits: serde_saphyr::alias_limits! {
            max_total_replayed_events: 4096,
            max_replay_stack_depth: 16,
        },
    };
    let raw: RawConfig = serde_saphyr::from_str_with_options(text, options)
        .map_err(|e| yaml_err(one_line(&e.to_string())))?;
    match raw.cluster {
        None => Ok(raw),
        Some(inner) => {
            let outer_rest = RawConfig {
                cluster: None,
                ..raw
            };
            if outer_rest != RawConfig::default() {
                return Err(yaml_err(
                    "a top-level `cluster:` section excludes other top-level keys".to_owned(),
                ));
            }
            if inner.cluster.is_some() {
                return Err(yaml_err("`cluster:` sections cannot nest".to_owned()));
            }
            Ok(*inner)
        }
    }
}

/// Folds a multi-line parser message into one line, as the exit message is one line.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}
