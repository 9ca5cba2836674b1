//! The inference engine, behind the [`Engine`] seam: which models it can serve, loading them,
//! and generating tokens.
//!
//! A generation's tokens arrive on a bounded channel ([`stream`]: the engine's [`TokenSender`],
//! the worker's [`TokenStream`]); a consumer that falls behind gets several tokens per event,
//! past a bound the engine waits, and dropping the receiver cancels the generation. The production engine is the
//! MLX runtime, a supervised Python child spoken to over JSON-RPC ([`mlx`], [`rpc`]), serving
//! the models a scan of the model directories finds ([`catalog`]); the `sim` crate has a scripted
//! one. This module owns the shapes, not the worker's use of them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

use crate::protocol::ErrorCode;

pub mod catalog;
pub mod mlx;
pub mod rpc;
pub mod stream;

pub use stream::{StreamClosed, TokenSender, TokenStream, token_channel};

/// One model the engine can serve.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelEntry {
    /// Where it lives, as advertised in `modelPaths`: the model directory it was found in, as
    /// configured, joined with its place below it (`model/org/name`; for a Hugging Face cache
    /// repository, its snapshot: `hub/models--org--name/snapshots/{commit}`).
    pub path: PathBuf,
    /// Bytes of its files on disk.
    pub size_bytes: u64,
    /// Parameters, when known from its configuration or weights.
    pub parameter_count: Option<u64>,
    /// Generations of this model the engine runs at once, when it says (for MLX, the batch size
    /// it asks the model to load with); the worker hands the engine no more than this of the
    /// model, nor more in all than the largest figure of its models. `None` from a scan of the
    /// model directory alone.
    pub streams_max: Option<usize>,
}

/// Every model the engine can serve, by the id clients send.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Catalog {
    /// Model id → entry.
    pub models: BTreeMap<String, ModelEntry>,
}

impl Catalog {
    /// Bytes of every model on disk.
    pub fn total_size_bytes(&self) -> u64 {
        self.models.values().map(|m| m.size_bytes).sum()
    }
}

/// A generation to run.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateRequest {
    /// Correlates the stream; unique among live generations (the worker uses the request id).
    pub stream_id: String,
    /// A model id from the catalog.
    pub model_id: String,
    /// Prompt text.
    pub prompt: String,
    /// Tokens to generate at most.
    pub max_tokens: u32,
    /// Sampling temperature.
    pub temperature: f64,
    /// Nucleus sampling mass.
    pub top_p: f64,
    /// The conversation it continues, if the client said (an engine with a prefix cache keeps
    /// the session's prompt for its next turn).
    pub session_id: Option<String>,
}

/// Why a generation stopped normally.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// It reached `max_tokens`.
    Length,
    /// The model emitted its end-of-sequence token.
    Stop,
}

/// One event of a generation, in order: tokens, then exactly one `Finished` or `Failed`.
#[derive(Clone, Debug, PartialEq)]
pub enum TokenEvent {
    /// The next tokens' texts, in order; never empty. One token each while the consumer keeps
    /// up, several once it has fallen behind ([`stream`]). A text may be empty, when a
    /// multi-byte character is split across tokens.
    Tokens(Vec<String>),
    /// The end.
    Finished(Finish),
    /// The generation failed.
    Failed(EngineError),
}

/// How a generation ended normally.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Finish {
    /// Why it stopped.
    pub reason: FinishReason,
    /// Its prompt's figures, when the engine stated them.
    pub usage: Option<PromptUsage>,
}

impl From<FinishReason> for Finish {
    fn from(reason: FinishReason) -> Finish {
        Finish {
            reason,
            usage: None,
        }
    }
}

/// A finished generation's prompt, in tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PromptUsage {
    /// Tokens of the prompt.
    pub prompt_tokens: u64,
    /// Of those, the ones the engine found in its prefix cache rather than prefilled.
    pub cached_tokens: u64,
}

/// How the engine is doing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EngineHealth {
    /// Starting for the first time.
    Starting,
    /// Serving; with the ids of the loaded models.
    Up {
        /// Loaded model ids.
        loaded: Vec<String>,
    },
    /// Recovering from a crash; requests fail until it is back.
    Restarting,
    /// Gave up (restart budget exhausted, or stopped).
    Down,
}

/// Why an engine operation failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The model is not in the catalog.
    #[error("model {model:?} is not served by this worker")]
    ModelNotFound {
        /// The id asked for.
        model: String,
    },
    /// The model could not be loaded.
    #[error("model {model:?} failed to load: {reason}")]
    LoadFailed {
        /// The model.
        model: String,
        /// The engine's words.
        reason: String,
    },
    /// The engine rejected the generation's parameters.
    #[error("the engine rejected the request: {reason}")]
    Rejected {
        /// The engine's words.
        reason: String,
    },
    /// The generation failed inside the engine.
    #[error("generation failed: {reason}")]
    Generation {
        /// The engine's words.
        reason: String,
    },
    /// The engine process died or stopped answering.
    #[error("the engine crashed: {reason}")]
    Crashed {
        /// What was seen.
        reason: String,
    },
    /// The engine is not available (restarting, or down for good).
    #[error("the engine is unavailable: {reason}")]
    Unavailable {
        /// Why.
        reason: String,
    },
    /// Loading the model would pass a resource bound (the memory the worker gives models).
    #[error("{reason}")]
    ResourceLimit {
        /// The figures.
        reason: String,
    },
    /// An engine call did not answer in time.
    #[error("the engine did not answer {call} within {millis} ms")]
    TimedOut {
        /// The call.
        call: String,
        /// The limit.
        millis: u64,
    },
}

impl EngineError {
    /// The wire code a request failed by this error ends with.
    pub fn code(&self) -> ErrorCode {
        match self {
            EngineError::ModelNotFound { .. } => ErrorCode::ModelNotFound,
            EngineError::LoadFailed { .. } => ErrorCode::ModelLoadFailed,
            EngineError::Rejected { .. } => ErrorCode::InvalidRequest,
            EngineError::ResourceLimit { .. } => ErrorCode::ResourceLimitExceeded,
            EngineError::Generation { .. } | EngineError::TimedOut { .. } => ErrorCode::EngineError,
            EngineError::Crashed { .. } | EngineError::Unavailable { .. } => {
                ErrorCode::EngineCrashed
            }
        }
    }
}

/// A model loaded and ready.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadedModel {
    /// Its id.
    pub model_id: String,
    /// Its context length, tokens.
    pub context_length: u64,
    /// Its parameters, when the engine could count them.
    pub parameter_count: Option<u64>,
    /// Generations of it the engine runs at once, as the load answered (for MLX, the effective
    /// batch size: 1 for a model whose cache cannot be batched); `None` when it did not say.
    /// Below the catalog's figure, the worker runs no more of the model than this.
    pub streams_max: Option<usize>,
}

/// What the engine has done with one model, since it started (counters only grow; a runtime
/// restart does not reset them).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelFigures {
    /// The effective batch size of the loaded model (0: not loaded).
    pub batch_size: usize,
    /// Prompt tokens of completed streams.
    pub prompt_tokens: u64,
    /// Of those, the ones found in the prefix cache.
    pub cached_tokens: u64,
    /// Its prefix cache, as last read.
    pub cache: CacheState,
    /// Sum of their `prompt_time` (prefill), seconds.
    pub prompt_seconds: f64,
    /// Tokens of completed streams.
    pub generated_tokens: u64,
    /// Sum of their `total_time - prompt_time`, seconds.
    pub decode_seconds: f64,
    /// Streams completed.
    pub streams_completed: u64,
}

/// A model's prefix cache as the engine last read it (all zero without one).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheState {
    /// Bytes its entries hold.
    pub bytes: u64,
    /// Its entries.
    pub entries: u64,
    /// Entries evicted for room since the model was loaded.
    pub evictions: u64,
}

/// Runs models.
#[async_trait]
pub trait Engine: Send + Sync + 'static {
    /// Every model the engine can serve (a scan of the model directories, for MLX).
    async fn catalog(&self) -> Result<Catalog, EngineError>;

    /// Loads a model from the catalog. Loading a loaded model is a cheap no-op.
    async fn load(&self, model_id: &str) -> Result<LoadedModel, EngineError>;

    /// Unloads a model; unloading one that is not loaded is a no-op.
    async fn unload(&self, model_id: &str) -> Result<(), EngineError>;

    /// Starts a generation on a loaded model. Tokens follow on the returned stream.
    async fn generate(&self, request: GenerateRequest) -> Result<TokenStream, EngineError>;

    /// The engine's health, updated as it changes.
    fn health(&self) -> watch::Receiver<EngineHealth>;

    /// What the engine has done with each model, by model id; none by default.
    fn model_figures(&self) -> BTreeMap<String, ModelFigures> {
        BTreeMap::new()
    }

    /// Stops the engine: in-flight generations end, then the engine gets `grace` to exit
    /// cleanly before it is killed. Idempotent.
    async fn shutdown(&self, grace: Duration);
}
