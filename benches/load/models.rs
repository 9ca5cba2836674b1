//! The models of the batching part: the tiny model and a larger random model of its family,
//! made on demand by the tiny model's generator (its shape options) in a model directory of the
//! bench's own under `target/`, which git ignores. Not under `models/`: a worker serving
//! `models/` advertises every model there, and the tests expect the tiny one alone.

use std::path::{Path, PathBuf};

use crate::harness::repo;

/// The batching part's model directory.
pub(crate) fn root() -> PathBuf {
    repo("target/bench-models")
}

/// A random model of the tiny model's family: the generator's shape options.
pub(crate) struct RandomModel {
    /// The directory under `mlx-worker/`.
    name: &'static str,
    hidden_size: usize,
    layers: usize,
    attention_heads: usize,
    kv_heads: usize,
    intermediate_size: usize,
}

/// The tiny model itself, the generator's default shape: byte for byte the one `ci/setup.sh`
/// makes under `models/`.
pub(crate) const TINY: RandomModel = RandomModel {
    name: "tiny-llama",
    hidden_size: 64,
    layers: 2,
    attention_heads: 4,
    kv_heads: 2,
    intermediate_size: 128,
};

/// The larger model: about 190 MB of float32 weights.
pub(crate) const LARGER: RandomModel = RandomModel {
    name: "bench-llama",
    hidden_size: 1024,
    layers: 4,
    attention_heads: 16,
    kv_heads: 8,
    intermediate_size: 2816,
};

/// The mid-sized model: about 12 M parameters (48 MB of float32 weights), where prefill is
/// most of a first token's time.
pub(crate) const MIDDLE: RandomModel = RandomModel {
    name: "sessions-llama",
    hidden_size: 512,
    layers: 4,
    attention_heads: 8,
    kv_heads: 4,
    intermediate_size: 1408,
};

/// The larger model's stand-in when the bench only checks that it runs: made the same way,
/// as small as the tiny model.
pub(crate) const LARGER_CHECK: RandomModel = RandomModel {
    name: "bench-llama-check",
    hidden_size: 128,
    layers: 2,
    attention_heads: 4,
    kv_heads: 2,
    intermediate_size: 256,
};

impl RandomModel {
    /// The id the worker serves it as.
    pub(crate) fn id(&self) -> String {
        format!("mlx-worker/{}", self.name)
    }

    /// Its directory.
    pub(crate) fn dir(&self) -> PathBuf {
        root().join(self.id())
    }

    /// Writes the model with the tiny model's generator, unless it is there already.
    pub(crate) async fn make(&self) -> Result<(), String> {
        let dims = [
            ("--hidden-size", self.hidden_size),
            ("--layers", self.layers),
            ("--attention-heads", self.attention_heads),
            ("--kv-heads", self.kv_heads),
            ("--intermediate-size", self.intermediate_size),
        ];
        let mut command = tokio::process::Command::new(repo(".venv/bin/python"));
        command
            .arg(repo("fixtures/tiny_model/make_tiny_model.py"))
            .arg("--out")
            .arg(self.dir());
        for (option, value) in dims {
            command.arg(option).arg(value.to_string());
        }
        let out = command
            .output()
            .await
            .map_err(|e| format!("the model generator did not run: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "the model generator failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    }
}

/// A model's shape (from its `config.json`) and the size of its weights, for the report.
pub(crate) fn describe(dir: &Path) -> String {
    let config: serde_json::Value = std::fs::read(dir.join("config.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default();
    let dim = |key: &str| config[key].as_u64().unwrap_or(0);
    let mb = std::fs::metadata(dir.join("model.safetensors")).map_or(0.0, |m| m.len() as f64 / 1e6);
    format!(
        "random weights, {} layers, hidden size {}, {} attention heads ({} key-value), MLP {}, vocabulary {}; {mb:.1} MB of weights",
        dim("num_hidden_layers"),
        dim("hidden_size"),
        dim("num_attention_heads"),
        dim("num_key_value_heads"),
        dim("intermediate_size"),
        dim("vocab_size"),
    )
}

/// The project's runtime (its venv and package) serving the bench's model directory; the
/// error says what setup is missing.
pub(crate) fn runtime_paths() -> Result<mlx_worker::config::EngineConfig, String> {
    let mut paths =
        testkit::runtime::engine_config(&crate::harness::repo("")).map_err(|m| m.to_string())?;
    paths.model_dirs = vec![root()];
    Ok(paths)
}
