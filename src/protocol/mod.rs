//! The NATS wire protocol: every message the worker sends or receives, as the existing
//! mlx-serving controller (TypeScript) writes and reads it.
//!
//! Field names are camelCase, optional fields are omitted when absent (never `null`), and the
//! field order of each outbound message follows what the existing worker emits. Only this module
//! (and the JSON-RPC codec of the MLX engine) derives `Serialize` for wire data; the rest of the
//! worker works with domain types and converts at the edge.
//!
//! Inbound inference requests are not trusted: [`request::decode_request`] turns raw bytes into a
//! validated [`request::ValidRequest`] or a [`request::Rejection`] that names the field, the value
//! and the limit. This module owns the shapes and the checks, not what the worker does with them.

mod body;
pub mod control;
pub mod request;
pub mod service;
pub mod subject;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// `status` of a worker as the controller routes on it: only `online` receives traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerStatus {
    /// Ready to take requests.
    Online,
    /// Not taking requests (starting, draining or stopped).
    Offline,
    /// Alive but unroutable for a recoverable reason (engine restarting, error burst).
    Degraded,
}

/// Models a worker can serve, as the controller's router reads them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelSkills {
    /// Every model id a client may send; routing is exact string equality on these.
    pub available_models: Vec<String>,
    /// Model id → where the worker found it: one of its model directories, as configured,
    /// joined with the model's place below it.
    pub model_paths: BTreeMap<String, String>,
    /// Bytes of all model files on disk.
    pub total_model_size: u64,
    /// When the model directory was scanned, Unix epoch milliseconds.
    pub last_scanned: u64,
}

/// The host's hardware, as the product requirements' `HardwareProfile` describes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HardwareProfile {
    /// Chip name such as `M2-Max`, or `Unknown` off Apple Silicon.
    pub chip_model: String,
    /// Apple Silicon generation (1 for M1 …), 0 when unknown.
    pub chip_generation: u32,
    /// `Base`, `Pro`, `Max` or `Ultra`.
    pub variant: String,
    /// GPU cores.
    pub gpu_cores: u32,
    /// Logical CPU cores.
    pub cpu_cores: u32,
    /// Performance cores.
    pub performance_cores: u32,
    /// Efficiency cores.
    pub efficiency_cores: u32,
    /// Unified (or system) memory in GiB, rounded.
    #[serde(rename = "unifiedMemoryGB")]
    pub unified_memory_gb: f64,
    /// Metal version, or `Unknown`.
    pub metal_version: String,
    /// Operating system version string.
    pub os_version: String,
    /// When the profile was taken, Unix epoch milliseconds.
    pub detected_at: u64,
}

/// What the worker can take on, as the product requirements' registration describes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerCapabilities {
    /// Requests the worker runs at once.
    pub max_concurrent: u32,
    /// Tier names (`30B+`, `13-27B`, `7-13B`, `3-7B`, `<3B`) this hardware can serve.
    pub supported_model_tiers: Vec<String>,
    /// Memory available to models, GiB.
    #[serde(rename = "availableMemoryGB")]
    pub available_memory_gb: f64,
}

/// `worker.register`: a worker announces itself. A superset of what the existing controller
/// reads (`skills`, `status`, …) and what the product requirements add (`hardware`, `capabilities`, `tags`,
/// `priority`); both controllers accept it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerRegistration {
    /// The worker's id; also a token of its inference subject.
    pub worker_id: String,
    /// Host name.
    pub hostname: String,
    /// An IPv4 or IPv6 literal of the host.
    pub ip: String,
    /// The worker's HTTP port (metrics and health); traffic itself flows over NATS.
    pub port: u16,
    /// Models the worker serves.
    pub skills: ModelSkills,
    /// The host's hardware.
    pub hardware: HardwareProfile,
    /// What the worker can take on.
    pub capabilities: WorkerCapabilities,
    /// Operator labels (for example `production`).
    pub tags: Vec<String>,
    /// Operator priority, 0–100 (the controller's default is 50).
    pub priority: u8,
    /// Current status.
    pub status: WorkerStatus,
    /// Unix epoch milliseconds when sent.
    pub timestamp: u64,
}

/// Load figures carried by every heartbeat.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerMetrics {
    /// Host CPU use, 0–100.
    pub cpu_usage_percent: f64,
    /// Host memory in use, GiB.
    #[serde(rename = "memoryUsedGB")]
    pub memory_used_gb: f64,
    /// GPU use, 0–100.
    pub gpu_utilization_percent: f64,
    /// Requests running plus waiting: the controller's load-balancing input.
    pub active_requests: u32,
    /// Requests finished since start, successes and failures.
    pub total_requests_handled: u64,
    /// Mean latency of the recent successful requests, milliseconds.
    pub avg_latency_ms: f64,
    /// Model ids loaded in the engine now.
    pub models_loaded: Vec<String>,
    /// Requests waiting for a slot (extension; the existing controller ignores it).
    pub queue_depth: u32,
    /// Most requests that may wait (extension).
    pub queue_capacity: u32,
    /// Most requests that may run at once (extension).
    pub inflight_capacity: u32,
    /// Tokens generated per second over the recent window (extension).
    pub tokens_per_second: f64,
    /// Batching figures of each model loaded or with requests in hand (extension; the existing
    /// controller keeps the `metrics` object as sent and reads none of it). Absent from other
    /// workers' heartbeats, so it reads as empty when missing.
    #[serde(default)]
    pub models: Vec<ModelMetrics>,
}

/// One model's batching figures in a heartbeat (and in `$SRV.STATS`): what runs and waits now,
/// and rates over the interval since the previous heartbeat, from the streams of the model that
/// completed in it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelMetrics {
    /// The model id.
    pub model_id: String,
    /// Streams of the model the engine decodes together (0: not loaded).
    pub batch_size: u32,
    /// Requests of the model running (handed to the engine).
    pub running: u32,
    /// Requests of the model waiting in the worker's queue.
    pub queued: u32,
    /// Share of the batch the running requests fill, 0 to 1.
    pub batch_occupancy: f64,
    /// Prompt tokens per second over the interval.
    pub prompt_tokens_per_second: f64,
    /// Generated tokens per second over the interval.
    pub generation_tokens_per_second: f64,
    /// Mean prefill time of the streams completed in the interval, milliseconds.
    pub avg_prefill_ms: f64,
    /// Share of the interval's prompt tokens found in the prefix cache, 0 to 1.
    #[serde(default)]
    pub cached_prompt_share: f64,
    /// Bytes the model's prefix cache holds.
    #[serde(default)]
    pub prefix_cache_bytes: u64,
    /// Entries its prefix cache evicted for room since the model was loaded.
    #[serde(default)]
    pub prefix_cache_evictions: u64,
}

/// `worker.heartbeat`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerHeartbeat {
    /// The worker's id.
    pub worker_id: String,
    /// Current status.
    pub status: WorkerStatus,
    /// Load figures.
    pub metrics: WorkerMetrics,
    /// Unix epoch milliseconds when sent.
    pub timestamp: u64,
}

/// `worker.deregister`: the worker leaves the cluster.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerDeregistration {
    /// The worker's id.
    pub worker_id: String,
    /// Unix epoch milliseconds when sent.
    pub timestamp: u64,
}

/// Scheduling priority a request may ask for (an extension the existing worker's queue reads).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Served first.
    High,
    /// The default.
    Medium,
    /// Served last.
    Low,
}

impl Priority {
    /// Every priority, highest first.
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Medium, Priority::Low];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Medium => "medium",
            Priority::Low => "low",
        }
    }
}

/// `worker.{workerId}.inference`, as a client writes it. Decoding goes through
/// [`request::decode_request`], which checks every field; this type is what clients serialize.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InferenceRequest {
    /// Client-chosen id; the response subject is `response.{requestId}`.
    pub request_id: String,
    /// Model to run; must equal one of the worker's `availableModels`.
    pub model_id: String,
    /// Prompt text.
    pub prompt: String,
    /// Tokens to generate at most.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Sampling temperature, 0–2.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Nucleus sampling mass, in (0, 1].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// Session for sticky routing (the worker does not use it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// Whether the client streams (the worker always streams).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    /// Scheduling priority.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    /// Per-request deadline in milliseconds from receipt (extension); capped by the worker's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// `worker.{workerId}.cancel` (extension): stop a request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CancelRequest {
    /// The request to stop.
    pub request_id: String,
}

/// One generated token on `response.{requestId}`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenMessage<'a> {
    /// The request this token belongs to.
    pub request_id: &'a str,
    /// Always `token`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The token's text (it carries its own leading space, if any).
    pub token: &'a str,
    /// Position in the stream, contiguous from 0.
    pub index: u64,
}

/// The successful end of a stream on `response.{requestId}`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DoneMessage<'a> {
    /// The request that finished.
    pub request_id: &'a str,
    /// Always `done`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Token messages sent for this request.
    pub total_tokens: u64,
    /// Milliseconds from receipt of the request to this message.
    pub latency_ms: u64,
    /// Tokens of the prompt, when the engine stated them (an extra field: the controller's
    /// schema lets it through).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<u64>,
    /// Of those, the ones found in the engine's prefix cache rather than prefilled; with
    /// `promptTokens`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cached_tokens: Option<u64>,
}

/// The failed end of a stream on `response.{requestId}`, or a rejection on a reply subject.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorMessage<'a> {
    /// The request that failed; absent only in a reply to a message whose id was unreadable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<&'a str>,
    /// Always `error`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Human-readable reason.
    pub error: &'a str,
    /// Stable machine-readable code.
    pub code: ErrorCode,
}

impl<'a> TokenMessage<'a> {
    /// A token message.
    pub fn new(request_id: &'a str, token: &'a str, index: u64) -> Self {
        TokenMessage {
            request_id,
            kind: "token",
            token,
            index,
        }
    }
}

impl<'a> DoneMessage<'a> {
    /// A done message.
    pub fn new(request_id: &'a str, total_tokens: u64, latency_ms: u64) -> Self {
        DoneMessage {
            request_id,
            kind: "done",
            total_tokens,
            latency_ms,
            prompt_tokens: None,
            cached_tokens: None,
        }
    }

    /// With the prompt's tokens and of those the cached ones, when known.
    pub fn with_usage(mut self, usage: Option<(u64, u64)>) -> Self {
        if let Some((prompt, cached)) = usage {
            self.prompt_tokens = Some(prompt);
            self.cached_tokens = Some(cached);
        }
        self
    }
}

impl<'a> ErrorMessage<'a> {
    /// An error message for a known request.
    pub fn new(request_id: &'a str, code: ErrorCode, error: &'a str) -> Self {
        ErrorMessage {
            request_id: Some(request_id),
            kind: "error",
            error,
            code,
        }
    }

    /// An error message for a message whose request id could not be read.
    pub fn anonymous(code: ErrorCode, error: &'a str) -> Self {
        ErrorMessage {
            request_id: None,
            kind: "error",
            error,
            code,
        }
    }
}

/// A message on `response.{requestId}`, as a client decodes it.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum StreamMessage {
    /// A token.
    #[serde(rename_all = "camelCase")]
    Token {
        /// The request.
        request_id: String,
        /// The token's text.
        token: String,
        /// Position in the stream.
        index: u64,
    },
    /// The successful end.
    #[serde(rename_all = "camelCase")]
    Done {
        /// The request.
        request_id: String,
        /// Tokens sent.
        total_tokens: u64,
        /// Milliseconds from receipt to the end.
        latency_ms: u64,
        /// Tokens of the prompt, when the worker's engine stated them.
        #[serde(default)]
        prompt_tokens: Option<u64>,
        /// Of those, the ones its prefix cache held.
        #[serde(default)]
        cached_tokens: Option<u64>,
    },
    /// The failed end.
    #[serde(rename_all = "camelCase")]
    Error {
        /// The request, when it could be read.
        #[serde(default)]
        request_id: Option<String>,
        /// Human-readable reason.
        error: String,
        /// Machine-readable code; any string, since other workers use their own.
        code: String,
    },
}

impl StreamMessage {
    /// Whether this message ends its stream.
    pub fn is_terminal(&self) -> bool {
        !matches!(self, StreamMessage::Token { .. })
    }
}

/// Why a request failed: one stable string per cause, in SCREAMING_SNAKE case on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    /// The message is not a valid inference request: bad JSON, a missing field, a value out of
    /// range. The error text names the field, the value and the limit.
    InvalidRequest,
    /// The message or its prompt exceeds a size limit.
    PayloadTooLarge,
    /// A request with this id is already in flight (waiting or running); the first one is not
    /// disturbed. Ids of finished requests are not remembered. Only ever sent on a message's
    /// reply subject.
    DuplicateRequest,
    /// The worker does not serve the requested model.
    ModelNotFound,
    /// The model exists but could not be loaded.
    ModelLoadFailed,
    /// The request queue is full; try another worker or later.
    QueueFull,
    /// The worker is short of a resource (memory) to take the request.
    ResourceLimitExceeded,
    /// The request ran past its deadline.
    Timeout,
    /// The request was cancelled by a `cancel` message.
    Cancelled,
    /// The engine failed the generation.
    EngineError,
    /// The engine process died or stopped answering during the request.
    EngineCrashed,
    /// The worker is stopping and did not run (or finish) the request.
    WorkerShutdown,
    /// The worker's link to the message server was lost while the response streamed, so some
    /// of its tokens may never have arrived: the answer is incomplete. Sent once the link is
    /// back; sending the request again is safe.
    StreamInterrupted,
    /// An internal fault of the worker; a bug.
    InternalError,
}

impl ErrorCode {
    /// Every code, for documentation and tests.
    pub const ALL: [ErrorCode; 14] = [
        ErrorCode::InvalidRequest,
        ErrorCode::PayloadTooLarge,
        ErrorCode::DuplicateRequest,
        ErrorCode::ModelNotFound,
        ErrorCode::ModelLoadFailed,
        ErrorCode::QueueFull,
        ErrorCode::ResourceLimitExceeded,
        ErrorCode::Timeout,
        ErrorCode::Cancelled,
        ErrorCode::EngineError,
        ErrorCode::EngineCrashed,
        ErrorCode::WorkerShutdown,
        ErrorCode::StreamInterrupted,
        ErrorCode::InternalError,
    ];

    /// The wire string.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "INVALID_REQUEST",
            ErrorCode::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            ErrorCode::DuplicateRequest => "DUPLICATE_REQUEST",
            ErrorCode::ModelNotFound => "MODEL_NOT_FOUND",
            ErrorCode::ModelLoadFailed => "MODEL_LOAD_FAILED",
            ErrorCode::QueueFull => "QUEUE_FULL",
            ErrorCode::ResourceLimitExceeded => "RESOURCE_LIMIT_EXCEEDED",
            ErrorCode::Timeout => "TIMEOUT",
            ErrorCode::Cancelled => "CANCELLED",
            ErrorCode::EngineError => "ENGINE_ERROR",
            ErrorCode::EngineCrashed => "ENGINE_CRASHED",
            ErrorCode::WorkerShutdown => "WORKER_SHUTDOWN",
            ErrorCode::StreamInterrupted => "STREAM_INTERRUPTED",
            ErrorCode::InternalError => "INTERNAL_ERROR",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Serializes a wire message to JSON bytes.
///
/// The wire types hold only strings, numbers, booleans, vectors and string-keyed maps, which
/// always serialize; the error arm exists because serde's signature has one.
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(message)
}

/// Appends `message` to `buffer` as [`encode`] writes it; on an error `buffer` may hold part
/// of it.
pub fn encode_into<T: Serialize>(
    buffer: &mut Vec<u8>,
    message: &T,
) -> Result<(), serde_json::Error> {
    serde_json::to_writer(buffer, message)
}
