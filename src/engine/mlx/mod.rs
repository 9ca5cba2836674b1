//! [`MlxEngine`]: the production [`Engine`], the MLX runtime in a supervised Python child,
//! spoken to with newline-delimited JSON-RPC over its stdin and stdout.
//!
//! This face owns the catalog (the scan of the model directories, each model with the batch size
//! it is loaded with: the configured [`BatchSizes`] figure for its tier, within the streams the
//! runtime holds at once) and turns the seam's operations into runtime calls: load (with that
//! batch size; the answer's effective figure is the model's [`LoadedModel::streams_max`]),
//! unload and generate (in `stream.step` lines when the runtime has them), and the engine
//! errors their failures are. It neither runs the process nor reads its lines. Its parts, each
//! with its tasks:
//!
//! - `supervisor`: starts the child (in a process group of its own), waits for its readiness,
//!   pings it, and when it exits or stops answering fails everything in flight with `Crashed`,
//!   reports `Restarting` and starts it again with backoff within a restart budget (after which
//!   it reports `Down`), unless the engine is stopping;
//! - `stderr`: per child, a **forwarder** of its stderr lines into the log, at their level;
//! - `conn`: per child, a **writer** (one line at a time to stdin) and a **reader** (stdout
//!   lines with a hard cap, routed to waiting calls by id and to streams by `stream_id`); per
//!   generation, a **watcher** that sends `cancel` when the token receiver is dropped;
//! - `figures`: what the engine has done with each model ([`Engine::model_figures`]), from
//!   the loads and the completed streams' stats, kept across restarts.
//!
//! A load that fails is logged with the runtime's words; the error for clients has the host's
//! paths taken out (`redaction`).
//!
//! `engine::mlx` and `engine::rpc` are the only modules that know the runtime's process and
//! protocol. The child also exits by itself when its stdin closes, so it cannot outlive the
//! worker even when the worker is killed.

#[cfg(test)]
mod tests;

mod conn;
mod figures;
mod redaction;
mod stderr;
mod supervisor;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use self::conn::{CallError, lock, watch_cancel};
use self::supervisor::{Runtime, supervise};
use super::rpc::{self, Generate, GetState, LoadModel, Shutdown, UnloadModel};
use super::{
    Catalog, Engine, EngineError, EngineHealth, GenerateRequest, LoadedModel, ModelEntry,
    ModelFigures, TokenStream, catalog, token_channel,
};
use crate::clock::Clock;
use crate::config::EngineConfig;
use crate::limits::TOKEN_CHANNEL_CAPACITY;
use crate::plan::model_size::planned_tier;
use crate::plan::recommendation::BatchSizes;

/// The MLX runtime as an [`Engine`].
pub struct MlxEngine {
    /// The supervised runtime, shared with the supervisor task.
    runtime: Arc<Runtime>,
    /// The batch size asked for each model, by its tier.
    batch_sizes: BatchSizes,
    /// The scanned catalog, once scanned.
    catalog: Mutex<Option<Catalog>>,
    /// Stops the supervisor; fired by `shutdown`.
    stop: CancellationToken,
    /// The supervisor task, awaited by `shutdown`.
    supervisor: Mutex<Option<JoinHandle<()>>>,
}

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The interpreter is missing.
    #[error("python interpreter {path} not found; run ci/setup.sh or set runtime.pythonPath")]
    NoPython {
        /// The configured path.
        path: PathBuf,
    },
    /// The runtime package is missing.
    #[error("MLX runtime package not found in {path}; set runtime.runtimeDir")]
    NoRuntime {
        /// The configured directory.
        path: PathBuf,
    },
    /// The program `runtime.command` names, given as a path, is not there.
    #[error("runtime.command names {path}, which does not exist")]
    NoCommand {
        /// The program's path.
        path: PathBuf,
    },
    /// The first start failed.
    #[error("the MLX runtime did not start: {reason}")]
    Failed {
        /// What went wrong.
        reason: String,
    },
}

impl MlxEngine {
    /// Starts the runtime and waits until it is ready (or the first start failed). Each model
    /// is loaded with its tier's figure of `batch_sizes` (within the runtime's live-stream
    /// bound); see [`BatchSizes::configured`] for what the configuration asks.
    pub async fn start(
        config: EngineConfig,
        batch_sizes: BatchSizes,
        clock: Arc<dyn Clock>,
    ) -> Result<MlxEngine, StartError> {
        match config.command.as_deref() {
            // A bare name is looked up on PATH when the runtime starts.
            Some([program, ..]) => {
                let path = Path::new(program);
                if path.components().count() > 1 && !path.exists() {
                    return Err(StartError::NoCommand {
                        path: path.to_owned(),
                    });
                }
            }
            _ => {
                if !config.python.exists() {
                    return Err(StartError::NoPython {
                        path: config.python.clone(),
                    });
                }
                if !config.runtime_dir.join("mlx_runtime").is_dir() {
                    return Err(StartError::NoRuntime {
                        path: config.runtime_dir.clone(),
                    });
                }
            }
        }
        let runtime = Arc::new(Runtime::new(config, clock));
        let stop = CancellationToken::new();
        let (first_tx, first_rx) = oneshot::channel();
        let supervisor = tokio::spawn(
            supervise(runtime.clone(), stop.clone(), first_tx).instrument(info_span!("engine")),
        );
        match first_rx.await {
            Ok(Ok(())) => Ok(MlxEngine {
                runtime,
                batch_sizes,
                catalog: Mutex::new(None),
                stop,
                supervisor: Mutex::new(Some(supervisor)),
            }),
            Ok(Err(reason)) => {
                stop.cancel();
                let _ = supervisor.await;
                Err(StartError::Failed { reason })
            }
            Err(_) => Err(StartError::Failed {
                reason: "the supervisor ended".to_owned(),
            }),
        }
    }

    /// Marks the start of the worker's stop: the runtime keeps serving the drain, but one that
    /// exits from now on is not restarted.
    pub fn begin_stop(&self) {
        self.runtime.begin_stop();
    }

    /// Generations the runtime itself counts as live (its `runtime/state`).
    pub async fn active_streams(&self) -> Result<u64, EngineError> {
        let conn = self.runtime.conn()?;
        let state = conn
            .call(&GetState {}, self.runtime.config.call_timeout)
            .await
            .map_err(|e| e.into_engine("runtime/state"))?;
        Ok(state.active_streams.unwrap_or(0))
    }

    /// The batch size a load of the model `model_id`, `entry` of the catalog, asks for: its
    /// tier's figure, at most the streams the runtime holds at once.
    fn batch_size(&self, model_id: &str, entry: &ModelEntry) -> usize {
        let asked = self
            .batch_sizes
            .for_tier(planned_tier(&entry.facts(model_id)));
        asked.min(self.runtime.streams_max()).max(1)
    }

    /// The model's catalog entry, its directory, resolved, and the model directories'
    /// spellings (as configured and resolved) for [`redaction::without_paths`].
    fn catalog_entry(
        &self,
        model_id: &str,
    ) -> Result<(ModelEntry, PathBuf, Vec<PathBuf>), EngineError> {
        let not_found = || EngineError::ModelNotFound {
            model: model_id.to_owned(),
        };
        let config = &self.runtime.config;
        let catalog = lock(&self.catalog).clone();
        let catalog = match catalog {
            Some(c) => c,
            None => catalog::scan(&config.model_dirs).map_err(|e| {
                warn!(cause = %e, "cannot scan the model directories");
                EngineError::Unavailable {
                    reason: redaction::without_paths(&e.to_string(), &config.model_dirs),
                }
            })?,
        };
        let entry = catalog.models.get(model_id).ok_or_else(not_found)?;
        // The catalog only holds scanned directories; still, never load outside the roots. A
        // cache snapshot's directory is inside its root, whatever its files link to.
        let resolved: Vec<PathBuf> = config
            .model_dirs
            .iter()
            .filter_map(|root| root.canonicalize().ok())
            .collect();
        let path = entry.path.canonicalize().map_err(|_| not_found())?;
        if !resolved.iter().any(|root| path.starts_with(root)) {
            return Err(not_found());
        }
        let roots = resolved
            .into_iter()
            .chain(config.model_dirs.iter().cloned())
            .collect();
        Ok((entry.clone(), path, roots))
    }
}

#[async_trait]
impl Engine for MlxEngine {
    async fn catalog(&self) -> Result<Catalog, EngineError> {
        let roots = self.runtime.config.model_dirs.clone();
        let mut catalog = tokio::task::spawn_blocking(move || catalog::scan(&roots))
            .await
            .map_err(|e| EngineError::Unavailable {
                reason: format!("model scan failed: {e}"),
            })?
            .map_err(|e| EngineError::Unavailable {
                reason: e.to_string(),
            })?;
        // The worker hands the runtime no more streams of a model than it decodes together.
        for (id, entry) in &mut catalog.models {
            entry.streams_max = Some(self.batch_size(id, entry));
        }
        *lock(&self.catalog) = Some(catalog.clone());
        Ok(catalog)
    }

    async fn load(&self, model_id: &str) -> Result<LoadedModel, EngineError> {
        if let Some(model) = self.runtime.loaded(model_id) {
            return Ok(model);
        }
        let (entry, path, roots) = self.catalog_entry(model_id)?;
        let conn = self.runtime.conn()?;
        let local_path = path.display().to_string();
        let asked = self.batch_size(model_id, &entry);
        let config = &self.runtime.config;
        // Only a runtime with a prefix cache is told of one.
        let cache = conn.features().prefix_cache;
        // A budget of 0 turns the model's cache off; none leaves the runtime's default.
        let cache_bytes = if config.prefix_cache {
            config.prefix_cache_bytes
        } else {
            Some(0)
        };
        let params = LoadModel {
            batch_size: Some(asked),
            local_path: &local_path,
            model_id,
            prefill_step_size: Some(config.prefill_step_size),
            prefix_cache_bytes: cache_bytes.filter(|_| cache),
            session_ttl_seconds: cache.then_some(config.session_ttl.as_secs()),
            // Said only to a runtime that warms up, and only to turn it off.
            warm_up: (conn.features().warm_up && !config.warm_up).then_some(false),
        };
        let result = conn
            .call(&params, self.runtime.config.load_timeout)
            .await
            .map_err(|e| match e {
                CallError::Rpc(rpc) => {
                    // The operator gets the runtime's words; the client, the same without
                    // the host's paths.
                    warn!(model = model_id, path = %local_path, reason = %rpc.message, "model failed to load");
                    EngineError::LoadFailed {
                        model: model_id.to_owned(),
                        reason: redaction::without_paths(&rpc.message, &roots),
                    }
                }
                other => other.into_engine("load_model"),
            })?;
        // The existing runtime states no batch size.
        let streams_max = result
            .batch_size
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n > 0);
        let model = LoadedModel {
            model_id: model_id.to_owned(),
            context_length: result.context_length.unwrap_or(0),
            parameter_count: result.parameter_count.filter(|&n| n > 0),
            streams_max,
        };
        let batch_size = streams_max.unwrap_or(asked);
        self.runtime.add_loaded(model.clone(), batch_size);
        let warm_up_ms = result.warm_up_seconds.map(|s| (s * 1000.0).round());
        if batch_size < asked {
            info!(
                model = model_id,
                batch_size,
                asked,
                warm_up_ms,
                "model loaded; it decodes fewer streams together than asked, so the worker \
                 runs fewer of its requests at once"
            );
        } else {
            info!(model = model_id, batch_size, batched = ?result.batched, warm_up_ms, "model loaded");
        }
        Ok(model)
    }

    async fn unload(&self, model_id: &str) -> Result<(), EngineError> {
        let conn = self.runtime.conn()?;
        conn.call(&UnloadModel { model_id }, self.runtime.config.call_timeout)
            .await
            .map_err(|e| e.into_engine("unload_model"))?;
        self.runtime.remove_loaded(model_id);
        Ok(())
    }

    async fn generate(&self, request: GenerateRequest) -> Result<TokenStream, EngineError> {
        let conn = self.runtime.conn()?;
        let (tx, rx) = token_channel(TOKEN_CHANNEL_CAPACITY);
        let stream_id = conn.new_stream_id();
        // Registered before the call: notifications may follow the answer at once.
        conn.open_stream(&stream_id, &request.model_id, tx.clone());
        let session = request.session_id.as_deref().map(runtime_session_id);
        let params = Generate {
            max_tokens: request.max_tokens,
            model_id: &request.model_id,
            prompt: &request.prompt,
            step_chunks: conn.features().step_chunks,
            session_id: session
                .as_deref()
                .filter(|_| conn.features().prefix_cache && self.runtime.config.prefix_cache),
            stream_id: &stream_id,
            streaming: true,
            temperature: request.temperature,
            top_p: request.top_p,
        };
        if let Err(err) = conn.call(&params, self.runtime.config.call_timeout).await {
            conn.close_stream(&stream_id);
            return Err(match err {
                CallError::Rpc(rpc) if rpc.code == rpc::code::INVALID_PARAMS => {
                    EngineError::Rejected {
                        reason: rpc.message,
                    }
                }
                CallError::Rpc(rpc) if rpc.code == rpc::code::MODEL_NOT_LOADED => {
                    // Lost in a restart the engine has not seen yet: load again next time.
                    self.runtime.remove_loaded(&request.model_id);
                    EngineError::Generation {
                        reason: rpc.message,
                    }
                }
                other => other.into_engine("generate"),
            });
        }
        debug!(request_id = %request.stream_id, stream_id, "generation started");
        tokio::spawn(watch_cancel(
            conn,
            tx,
            stream_id,
            self.runtime.config.call_timeout,
        ));
        Ok(rx)
    }

    fn health(&self) -> watch::Receiver<EngineHealth> {
        self.runtime.health()
    }

    fn model_figures(&self) -> BTreeMap<String, ModelFigures> {
        self.runtime.figures.snapshot()
    }

    async fn shutdown(&self, grace: Duration) {
        let Some(supervisor) = lock(&self.supervisor).take() else {
            return;
        };
        // Before the runtime is told: it exits once it has answered, and that is no crash.
        self.runtime.begin_stop();
        if let Ok(conn) = self.runtime.conn() {
            match conn.call(&Shutdown {}, grace).await {
                Ok(_) => debug!("runtime acknowledged shutdown"),
                Err(err) => warn!(cause = ?err, "runtime did not acknowledge shutdown"),
            }
        }
        self.stop.cancel();
        if timeout(grace + Duration::from_secs(1), supervisor)
            .await
            .is_err()
        {
            error!("engine supervisor did not stop in time");
        }
    }
}

impl Drop for MlxEngine {
    fn drop(&mut self) {
        // Without a shutdown, stop the supervisor; the child is killed on drop.
        self.stop.cancel();
    }
}

/// A session id as the runtime takes one (letters, digits and `_-./@:`, no `..`, at most 256
/// characters): the client's own when it is one, else a digest of it. The runtime only keys
/// pins by it, so a digest serves as well.
fn runtime_session_id(id: &str) -> String {
    let fits = !id.is_empty()
        && id.len() <= 256
        && !id.contains("..")
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-./@:".contains(&b));
    if fits {
        return id.to_owned();
    }
    let mut hasher = std::hash::DefaultHasher::new();
    std::hash::Hash::hash(id, &mut hasher);
    format!("session-{:016x}", std::hash::Hasher::finish(&hasher))
}
