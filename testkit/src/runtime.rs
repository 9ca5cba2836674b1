//! The real MLX runtime, as `ci/setup.sh` leaves it in a repository: the project venv
//! (`.venv`) with CPU MLX, and the tiny model under `models/`.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use mlx_worker::config::EngineConfig;

/// The model `ci/setup.sh` generates for the real runtime.
pub const TINY: &str = "mlx-worker/tiny-llama";

/// The runtime or its model is not where `ci/setup.sh` puts them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MissingRuntime;

impl fmt::Display for MissingRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the MLX runtime venv or the tiny model is missing: run ci/setup.sh")
    }
}

impl std::error::Error for MissingRuntime {}

/// The engine configuration for the venv, runtime and model directory of the repository at
/// `repo_root`, with a restart window long enough for a test that kills the runtime.
pub fn engine_config(repo_root: &Path) -> Result<EngineConfig, MissingRuntime> {
    let python = repo_root.join(".venv/bin/python");
    let model = repo_root
        .join("models")
        .join(TINY)
        .join("model.safetensors");
    if !python.exists() || !model.exists() {
        return Err(MissingRuntime);
    }
    let mut config = mlx_worker::config::from_yaml("", Path::new("defaults.yaml"))
        .expect("the defaults are a valid configuration")
        .engine;
    config.python = python;
    config.runtime_dir = repo_root.join("runtime");
    config.model_dirs = vec![repo_root.join("models")];
    config.restart_window = Duration::from_secs(60);
    Ok(config)
}
