//! Single values from the environment or flags ([`Override`]s), applied to the [`RawConfig`]
//! read from the file before it is resolved, so they go through the same checks as the file's
//! values. This is the one place the worker reads its environment.

use std::fmt;

use super::raw::RawConfig;
use super::{ConfigError, Setting};

/// The prefix of every environment variable the worker reads.
pub const ENV_PREFIX: &str = "MLX_WORKER_";

/// The environment variable naming the config file when no `--config` flag is given.
pub const ENV_CONFIG_FILE: &str = "MLX_WORKER_CONFIG";

/// Where an override came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// An environment variable, by name.
    Env(String),
    /// A command-line flag, by name.
    Flag(&'static str),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Env(name) => write!(f, "environment variable {name}"),
            Origin::Flag(flag) => write!(f, "flag {flag}"),
        }
    }
}

/// One setting's value from the environment or a flag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Override {
    /// What it sets.
    pub setting: Setting,
    /// The text given.
    pub value: String,
    /// Where it came from.
    pub origin: Origin,
}

/// Reads the process environment once and returns the `MLX_WORKER_*` pairs, sorted by name.
///
/// This is the one place the worker reads its environment.
pub fn read_environment() -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .collect();
    vars.sort();
    vars
}

/// Turns `MLX_WORKER_*` pairs into overrides. `MLX_WORKER_CONFIG` (the file path) and
/// `RUST_LOG`-style variables are not settings and are skipped; any other unknown
/// `MLX_WORKER_*` name is an error, so a misspelt variable is not silently ignored.
pub fn environment_overrides(vars: &[(String, String)]) -> Result<Vec<Override>, ConfigError> {
    let mut overrides = Vec::new();
    for (name, value) in vars {
        let Some(suffix) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if name == ENV_CONFIG_FILE {
            continue;
        }
        let setting = Setting::ALL
            .into_iter()
            .find(|s| s.env_suffix() == suffix)
            .ok_or_else(|| ConfigError::UnknownEnv {
                name: name.clone(),
                known: Setting::ALL
                    .iter()
                    .map(|s| format!("{ENV_PREFIX}{}", s.env_suffix()))
                    .chain([ENV_CONFIG_FILE.to_owned()])
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        overrides.push(Override {
            setting,
            value: value.clone(),
            origin: Origin::Env(name.clone()),
        });
    }
    Ok(overrides)
}

impl RawConfig {
    /// Applies one environment or flag override.
    pub(super) fn apply(&mut self, o: &Override) -> Result<(), ConfigError> {
        o.setting
            .apply(self, &o.value)
            .map_err(|reason| ConfigError::Override {
                origin: o.origin.clone(),
                key: o.setting.key(),
                reason,
            })
    }
}
