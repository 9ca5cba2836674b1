//! The MLX engine, from the `runtime` section and the models of `worker` (`modelDir`,
//! `preWarming`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use super::{bounded, invalid, millis, millis_or};
use crate::config::raw::{RawModelDirs, RawRuntime, RawWorker};
use crate::config::{
    ConfigError, DEFAULT_BATCHING, DEFAULT_ENGINE_CALL_TIMEOUT, DEFAULT_ENGINE_RESTART_WINDOW,
    DEFAULT_ENGINE_RESTARTS_MAX, DEFAULT_ENGINE_STARTUP_TIMEOUT, DEFAULT_MODEL_DIR,
    DEFAULT_MODEL_LOAD_TIMEOUT, DEFAULT_PREFILL_STEP_SIZE, DEFAULT_PREFIX_CACHE, DEFAULT_PYTHON,
    DEFAULT_RUNTIME_DIR, DEFAULT_SESSION_TTL, DEFAULT_WARM_UP, EngineConfig,
};
use crate::limits::{
    BATCH_SIZE_MAX, PREFILL_STEP_SIZE_MAX, PREFILL_STEP_SIZE_MIN, PREFIX_CACHE_BYTES_MAX,
    REQUEST_TIMEOUT_MAX, RUNTIME_COMMAND_WORD_BYTES_MAX, RUNTIME_COMMAND_WORDS_MAX,
    SESSION_TTL_MAX,
};

pub(super) fn resolve_engine(w: &RawWorker, r: RawRuntime) -> Result<EngineConfig, ConfigError> {
    let preload = preload(w)?;
    let load_timeout = match (r.load_timeout_ms, w.pre_warming.timeout_per_model_ms) {
        (Some(ms), _) | (None, Some(ms)) => millis(
            "runtime.loadTimeoutMs",
            ms,
            Duration::from_millis(1),
            REQUEST_TIMEOUT_MAX,
        )?,
        (None, None) => DEFAULT_MODEL_LOAD_TIMEOUT,
    };
    Ok(EngineConfig {
        python: r
            .python_path
            .unwrap_or_else(|| PathBuf::from(DEFAULT_PYTHON)),
        runtime_dir: r
            .runtime_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_RUNTIME_DIR)),
        model_dirs: model_dirs(w)?,
        preload,
        startup_timeout: millis_or(
            "runtime.startupTimeoutMs",
            r.startup_timeout_ms,
            DEFAULT_ENGINE_STARTUP_TIMEOUT,
            Duration::from_millis(100),
            Duration::from_secs(600),
        )?,
        call_timeout: millis_or(
            "runtime.callTimeoutMs",
            r.call_timeout_ms,
            DEFAULT_ENGINE_CALL_TIMEOUT,
            Duration::from_millis(100),
            Duration::from_secs(600),
        )?,
        load_timeout,
        restarts_max: r.max_restarts.unwrap_or(DEFAULT_ENGINE_RESTARTS_MAX),
        restart_window: millis_or(
            "runtime.restartWindowMs",
            r.restart_window_ms,
            DEFAULT_ENGINE_RESTART_WINDOW,
            Duration::from_secs(1),
            Duration::from_secs(24 * 3600),
        )?,
        // With batching off, every model runs one stream at a time, whatever batchSize says.
        batching: r.batching.unwrap_or(DEFAULT_BATCHING),
        batch_size: r
            .batch_size
            .map(|n| bounded("runtime.batchSize", n, 1, BATCH_SIZE_MAX))
            .transpose()?,
        prefill_step_size: bounded(
            "runtime.prefillStepSize",
            r.prefill_step_size.unwrap_or(DEFAULT_PREFILL_STEP_SIZE),
            PREFILL_STEP_SIZE_MIN,
            PREFILL_STEP_SIZE_MAX,
        )?,
        prefix_cache: r.prefix_cache.unwrap_or(DEFAULT_PREFIX_CACHE),
        prefix_cache_bytes: r
            .prefix_cache_bytes
            .map(|n| bounded("runtime.prefixCacheBytes", n, 0, PREFIX_CACHE_BYTES_MAX))
            .transpose()?,
        session_ttl: millis_or(
            "runtime.sessionTtlMs",
            r.session_ttl_ms,
            DEFAULT_SESSION_TTL,
            Duration::ZERO,
            SESSION_TTL_MAX,
        )?,
        warm_up: r.warm_up.unwrap_or(DEFAULT_WARM_UP),
        command: r.command.map(command).transpose()?,
        env: r.env.map(env).transpose()?.unwrap_or_default(),
    })
}

/// `runtime.command`: a program and its arguments, each a word a process can take.
fn command(words: Vec<String>) -> Result<Vec<String>, ConfigError> {
    const KEY: &str = "runtime.command";
    match words.first() {
        None => return Err(invalid(KEY, "is empty: name the program to run")),
        Some(program) if program.trim().is_empty() => {
            return Err(invalid(KEY, "names no program: its first word is blank"));
        }
        Some(_) => {}
    }
    at_most(KEY, words.len(), "words")?;
    for (i, word) in words.iter().enumerate() {
        word_fits(&format!("{KEY}[{i}]"), word)?;
    }
    Ok(words)
}

/// `runtime.env`: variables whose names are identifiers and whose values a process can take.
fn env(vars: BTreeMap<String, String>) -> Result<BTreeMap<String, String>, ConfigError> {
    const KEY: &str = "runtime.env";
    at_most(KEY, vars.len(), "variables")?;
    for (name, value) in &vars {
        let key = format!("{KEY}.{name}");
        let identifier = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !identifier {
            return Err(invalid(
                &key,
                "is not a variable name (letters, digits and _, not starting with a digit)",
            ));
        }
        word_fits(&key, name)?;
        word_fits(&key, value)?;
    }
    Ok(vars)
}

fn at_most(key: &str, count: usize, what: &str) -> Result<(), ConfigError> {
    if count > RUNTIME_COMMAND_WORDS_MAX {
        return Err(invalid(
            key,
            format!("has {count} {what}, at most {RUNTIME_COMMAND_WORDS_MAX}"),
        ));
    }
    Ok(())
}

fn word_fits(key: &str, word: &str) -> Result<(), ConfigError> {
    if word.contains('\0') {
        return Err(invalid(key, "holds a NUL character"));
    }
    if word.len() > RUNTIME_COMMAND_WORD_BYTES_MAX {
        return Err(invalid(
            key,
            format!(
                "is {} bytes long, at most {RUNTIME_COMMAND_WORD_BYTES_MAX}",
                word.len()
            ),
        ));
    }
    Ok(())
}

/// The directories scanned for models, in order: `modelDir`'s text split at each `:` (empty
/// parts dropped), or its list, whose items must not be empty; at least one, and none starting
/// with `~`.
fn model_dirs(w: &RawWorker) -> Result<Vec<PathBuf>, ConfigError> {
    let dirs: Vec<PathBuf> = match &w.model_dir {
        None => vec![PathBuf::from(DEFAULT_MODEL_DIR)],
        Some(RawModelDirs::Text(text)) => text
            .split(':')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
            .collect(),
        Some(RawModelDirs::List(dirs)) => {
            if let Some(empty) = dirs.iter().position(|d| d.as_os_str().is_empty()) {
                return Err(invalid(&format!("worker.modelDir[{empty}]"), "is empty"));
            }
            dirs.clone()
        }
    };
    if dirs.is_empty() {
        return Err(invalid("worker.modelDir", "names no directory"));
    }
    // `~/.cache/huggingface/hub` is the directory most often meant; unexpanded, it would be a
    // missing directory, and so silently an empty one.
    if let Some(dir) = dirs.iter().find(|d| d.to_string_lossy().starts_with('~')) {
        return Err(invalid(
            "worker.modelDir",
            format!(
                "{} starts with ~, which the worker does not expand: give the full path",
                dir.display()
            ),
        ));
    }
    Ok(dirs)
}

/// The models loaded at start: none when pre-warming is disabled.
fn preload(w: &RawWorker) -> Result<Vec<String>, ConfigError> {
    let preload: Vec<String> = if w.pre_warming.enabled == Some(false) {
        Vec::new()
    } else {
        w.pre_warming
            .models
            .iter()
            .flatten()
            .map(|m| m.id().to_owned())
            .collect()
    };
    if let Some(empty) = preload.iter().position(String::is_empty) {
        return Err(invalid(
            &format!("worker.preWarming.models[{empty}]"),
            "is empty",
        ));
    }
    Ok(preload)
}
