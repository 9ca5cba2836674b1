//! The worker's configuration: one YAML file, then `MLX_WORKER_*` environment variables, then
//! command-line flags, resolved into one validated [`WorkerConfig`] before anything starts.
//!
//! The file format is the existing mlx-serving `cluster.yaml` (camelCase keys), with the
//! snake_case spellings accepted as aliases and a top-level `cluster:` wrapper allowed. Sections
//! that only the controller reads (`controller`, `workers`, `loadBalancing`, `requestRouting`)
//! are accepted and ignored, so one file serves both; any other unknown key is an error naming
//! the key and its line. Of `controller`, the worker reads only where the controller listens,
//! to refuse a worker port that the controller this file runs on the same host also binds. Environment variables and flags set individual [`Setting`]s, all
//! declared in one table (`setting.rs`) from which the variables, the flags ([`Flags`]) and
//! their help are derived.
//!
//! Inside: `raw` (the file as written), `parse` (YAML to raw), `overrides` (environment and
//! flags onto raw), `secrets` (secret and credential files), `resolve` (raw to the resolved
//! sections, one file each).
//!
//! This module is the only one that reads the process environment. It owns parsing and
//! validation; it does not start anything.

mod flags;
mod overrides;
mod parse;
mod raw;
mod resolve;
mod secrets;
mod setting;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::plan::{ModelTier, Settings, TierLimit};
use crate::protocol::request::RequestLimits;

use raw::RawConfig;

pub use flags::Flags;
pub use overrides::{
    ENV_CONFIG_FILE, ENV_PREFIX, Origin, Override, environment_overrides, read_environment,
};
pub use setting::Setting;

/// Default heartbeat interval (the existing controller's).
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(5000);
/// Default number of heartbeats between two periodic re-registrations: every heartbeat. The
/// controller drops heartbeats from workers it does not know, so a restarted controller routes
/// to a worker only once it hears its registration; re-registering with every heartbeat bounds
/// that by one heartbeat interval, for one more small message per interval.
pub const DEFAULT_REREGISTER_EVERY_HEARTBEATS: u32 = 1;
/// Default deadline of one request, from receipt to its terminal message.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// Default time a drain waits for running and queued requests.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Default longest wait for a listener on `response.{requestId}` before the first message.
pub const DEFAULT_LATE_SUBSCRIBER_WAIT: Duration = Duration::from_secs(2);
/// Default time a model may go unused before it is unloaded (Ollama's default keep-alive).
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(300);
/// Default period of the model directories' rescan.
pub const DEFAULT_MODEL_RESCAN: Duration = Duration::from_secs(60);
/// Default NATS server when none is configured and the embedded server is used.
pub const DEFAULT_EMBEDDED_PORT: u16 = 4222;
/// Default NATS client ping interval: a dead link is noticed within two of these.
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(5);
/// Default upper bound of the NATS reconnect backoff (the existing `reconnectTimeWait`).
pub const DEFAULT_RECONNECT_WAIT: Duration = Duration::from_millis(2000);
/// Default worker HTTP port (metrics and health).
pub const DEFAULT_PORT: u16 = 8080;
/// Default address the HTTP port listens on: every IPv4 address, as the registration
/// announces the host's address to the cluster and scrapers and probes come from other hosts.
pub const DEFAULT_HTTP_BIND_ADDRESS: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
/// Default operator priority (the controller's own default).
pub const DEFAULT_PRIORITY: u8 = 50;
/// Default queue bound.
pub const DEFAULT_QUEUE_DEPTH: usize = 100;
/// Default `maxTokens` when a request sets none (the existing worker's).
pub const DEFAULT_MAX_TOKENS: u32 = 100;
/// Default temperature when a request sets none.
pub const DEFAULT_TEMPERATURE: f64 = 0.7;
/// Default top-p when a request sets none.
pub const DEFAULT_TOP_P: f64 = 0.9;
/// Default directory scanned for models (the existing worker's, relative to the working dir).
pub const DEFAULT_MODEL_DIR: &str = "model";
/// Default directory holding the worker's persistent state (its generated id).
pub const DEFAULT_STATE_DIR: &str = ".state";
/// Default Python interpreter for the MLX runtime: the project-local venv.
pub const DEFAULT_PYTHON: &str = ".venv/bin/python";
/// Default directory of the MLX runtime package.
pub const DEFAULT_RUNTIME_DIR: &str = "runtime";
/// Default time the MLX runtime has to become ready.
pub const DEFAULT_ENGINE_STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Default deadline of one JSON-RPC call that is not a model load.
pub const DEFAULT_ENGINE_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Default deadline of one model load.
pub const DEFAULT_MODEL_LOAD_TIMEOUT: Duration = Duration::from_secs(300);
/// Default restarts of the MLX runtime allowed per restart window.
pub const DEFAULT_ENGINE_RESTARTS_MAX: u32 = 5;
/// Default restart window.
pub const DEFAULT_ENGINE_RESTART_WINDOW: Duration = Duration::from_secs(300);
/// Default of `runtime.batching`: the runtime decodes a model's streams together.
pub const DEFAULT_BATCHING: bool = true;
/// Default prompt tokens of one prefill step (the runtime's own default).
pub const DEFAULT_PREFILL_STEP_SIZE: usize = 512;
/// Default of `runtime.prefixCache`: each model keeps its prompts' KV caches.
pub const DEFAULT_PREFIX_CACHE: bool = true;
/// Whether a model load includes its warm-up generations, by default.
pub const DEFAULT_WARM_UP: bool = true;
/// Default time a session's prefix cache entry stays pinned: the controller's session-affinity
/// TTL.
pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(30 * 60);
/// Default share of failed requests in the recent window above which the worker is degraded.
pub const DEFAULT_DEGRADED_ERROR_RATIO: f64 = 0.5;

/// The whole resolved configuration. Components receive their own section by value.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerConfig {
    /// The NATS connection.
    pub nats: NatsConfig,
    /// The worker node: identity, heartbeats, admission, timeouts.
    pub node: NodeConfig,
    /// The MLX engine and the models on disk.
    pub engine: EngineConfig,
    /// Logs.
    pub logging: LoggingConfig,
}

/// A string that must never be printed: `Debug` shows `"<redacted>"`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the one place that hands it to a client library.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

/// How the worker reaches NATS.
#[derive(Clone, Debug, PartialEq)]
pub struct NatsConfig {
    /// Server URLs; more than one for a cluster.
    pub servers: Vec<String>,
    /// When set, the worker starts its own `nats-server` on this port before connecting.
    pub embedded: Option<EmbeddedNats>,
    /// Connection name shown by the server.
    pub name: String,
    /// Credentials.
    pub auth: NatsAuth,
    /// TLS settings.
    pub tls: NatsTls,
    /// Upper bound of the reconnect backoff.
    pub reconnect_wait_max: Duration,
    /// Reconnect attempts before giving up; `None` retries forever.
    pub max_reconnect_attempts: Option<usize>,
    /// Client ping interval.
    pub ping_interval: Duration,
}

impl NatsConfig {
    /// This configuration for the connection of a helper command (`infer`, `watch`) on `host`:
    /// named `<name>-<command>@<host>` (`mlx-worker-watch@studio-a`), so that a server's
    /// connection list tells it from the workers, which connect as `<name>`.
    pub fn for_command(&self, command: &str, host: &str) -> NatsConfig {
        NatsConfig {
            name: format!("{}-{command}@{host}", self.name),
            ..self.clone()
        }
    }
}

/// The embedded `nats-server` the worker starts itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmbeddedNats {
    /// Client port, on the loopback interface.
    pub port: u16,
}

/// NATS credentials.
#[derive(Clone, Debug, PartialEq)]
pub enum NatsAuth {
    /// No authentication.
    None,
    /// User and password.
    UserPassword {
        /// The user.
        user: String,
        /// The password.
        password: Secret,
    },
    /// A bearer token.
    Token(Secret),
    /// An NKey seed (the user signs the server's nonce with it).
    NKey(Secret),
    /// A `.creds` file holding a user JWT and its NKey seed.
    CredsFile(PathBuf),
}

/// TLS to the message server.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NatsTls {
    /// Refuse a server that does not offer TLS (also implied by `tls://` URLs).
    pub required: bool,
    /// A CA certificate (PEM) to trust besides the system's roots.
    pub ca_file: Option<PathBuf>,
    /// A client certificate and its key (PEM), for servers that verify clients.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// Sampling defaults for requests that leave a field out.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GenerationDefaults {
    /// `maxTokens` default.
    pub max_tokens: u32,
    /// `temperature` default.
    pub temperature: f64,
    /// `topP` default.
    pub top_p: f64,
}

/// The worker node.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeConfig {
    /// Configured id; when `None` the worker generates one and keeps it in `state_dir`.
    pub worker_id: Option<String>,
    /// Where the generated worker id is kept across restarts.
    pub state_dir: PathBuf,
    /// HTTP port for metrics and health; 0 lets the system choose.
    pub port: u16,
    /// Address the HTTP port listens on; an unspecified address (`0.0.0.0`, `::`) is every
    /// address of its family.
    pub http_bind_address: IpAddr,
    /// Operator labels sent in the registration.
    pub tags: Vec<String>,
    /// Operator priority, 0–100, sent in the registration.
    pub priority: u8,
    /// Heartbeat period.
    pub heartbeat_interval: Duration,
    /// Re-register every this many heartbeats (and after every reconnect).
    pub reregister_every: u32,
    /// Deadline of a request from receipt, unless the request asks for less.
    pub request_timeout: Duration,
    /// Time a drain waits for running and queued requests.
    pub drain_timeout: Duration,
    /// Longest wait for a listener before the first message of a stream.
    pub late_subscriber_wait: Duration,
    /// Shortest time from a request's receipt to the first message of its stream, whoever
    /// listens (a tap on `response.>` passes the listener check for everybody).
    pub late_subscriber_min_delay: Duration,
    /// How often the model directories are scanned again (added and deleted models show in
    /// the next registration; withdrawn models due for a retry are loaded again); `None`:
    /// never (`worker.modelRescanMs: 0`).
    pub model_rescan: Option<Duration>,
    /// How long a model may go unused before it is unloaded (`worker.keepAliveMs`); `None`:
    /// models stay loaded. Preloaded models always stay.
    pub keep_alive: Option<Duration>,
    /// The bytes the loaded models' weights may take (`worker.modelMemoryBytes`); `None`: the
    /// memory the hardware plan makes available. A load beyond it evicts idle models, least
    /// recently used first, or is refused with `RESOURCE_LIMIT_EXCEEDED`.
    pub model_memory_bytes: Option<u64>,
    /// Requests running at once; `None` takes the hardware recommendation.
    pub inflight_max: Option<usize>,
    /// Requests waiting at most.
    pub queue_depth_max: usize,
    /// Per-tier overrides of the hardware recommendation.
    pub tier_limits: BTreeMap<ModelTier, TierLimit>,
    /// Bounds on inbound requests.
    pub request_limits: RequestLimits,
    /// Defaults for fields a request leaves out.
    pub generation_defaults: GenerationDefaults,
    /// Share of failed requests in the recent window above which the worker reports degraded.
    pub degraded_error_ratio: f64,
    /// How requests addressed to a model reach the worker (`modelSubjects`).
    pub model_subjects: ModelSubjects,
}

/// How requests addressed to a model (`inference.{model}`) reach the workers that serve it.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum ModelSubjects {
    /// One core-NATS queue group per model subject: at most once, blind to capacity, on any
    /// server. The default, as it needs nothing of the server and is what clients of the
    /// existing cluster publish to.
    #[default]
    QueueGroup,
    /// A JetStream work-queue stream: requests wait in the stream and each worker pulls as
    /// many as it has free run slots.
    JetStream(WorkQueueConfig),
}

/// The JetStream work queue of the model subjects (`modelSubjects.*`).
#[derive(Clone, Debug, PartialEq)]
pub struct WorkQueueConfig {
    /// The stream's name (`modelSubjects.stream`).
    pub stream: String,
    /// The subjects the stream captures (`modelSubjects.subjects`).
    pub subjects: Vec<String>,
    /// Copies a cluster keeps (`modelSubjects.replicas`).
    pub replicas: usize,
    /// Messages the stream holds at most (`modelSubjects.maxMessages`).
    pub max_messages: u64,
    /// Bytes the stream holds at most (`modelSubjects.maxBytes`).
    pub max_bytes: u64,
    /// How long a message is kept at most (`modelSubjects.maxAgeMs`; default the request
    /// timeout and a minute, so a worker can still answer an expired one with `TIMEOUT`).
    pub max_age: Duration,
    /// How long a pulled, not started request stays with its worker before another may take
    /// it (`modelSubjects.ackWaitMs`).
    pub ack_wait: Duration,
    /// Deliveries of one message at most (`modelSubjects.maxDeliver`).
    pub max_deliver: u64,
}

/// Default work-queue stream name.
pub const DEFAULT_WORK_QUEUE_STREAM: &str = "MLX_INFERENCE";
/// Default subjects of the work-queue stream.
pub const DEFAULT_WORK_QUEUE_SUBJECT: &str = "inference.>";
/// Default bound of the work-queue stream's messages.
pub const DEFAULT_WORK_QUEUE_MESSAGES: u64 = 10_000;
/// Default bound of the work-queue stream's bytes.
pub const DEFAULT_WORK_QUEUE_BYTES: u64 = 256 << 20;
/// Default ack wait: how long a worker may hold a pulled request before starting it.
pub const DEFAULT_WORK_QUEUE_ACK_WAIT: Duration = Duration::from_secs(30);
/// Default deliveries of one work-queue message at most.
pub const DEFAULT_WORK_QUEUE_MAX_DELIVER: u64 = 5;

impl NodeConfig {
    /// What the plan takes of this configuration: the admission bounds and tier overrides.
    pub fn plan_settings(&self) -> Settings {
        Settings {
            inflight_max: self.inflight_max,
            queue_depth_max: self.queue_depth_max,
            tier_limits: self.tier_limits.clone(),
        }
    }
}

/// The MLX engine and the models it serves.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineConfig {
    /// Python interpreter that runs the runtime.
    pub python: PathBuf,
    /// Directory holding the `mlx_runtime` package.
    pub runtime_dir: PathBuf,
    /// Directories scanned for models, in order (`worker.modelDir`); the first to have a
    /// model id serves it. Never empty.
    pub model_dirs: Vec<PathBuf>,
    /// Models loaded at start.
    pub preload: Vec<String>,
    /// Time the runtime has to become ready.
    pub startup_timeout: Duration,
    /// Deadline of a JSON-RPC call other than a load.
    pub call_timeout: Duration,
    /// Deadline of a model load.
    pub load_timeout: Duration,
    /// Restarts allowed within `restart_window` before the worker gives up on the engine.
    pub restarts_max: u32,
    /// Window of the restart budget.
    pub restart_window: Duration,
    /// Whether a model's streams are decoded together; `false` loads every model with a batch
    /// size of 1 (one stream at a time, the serial baseline).
    pub batching: bool,
    /// The batch size asked for every model (`runtime.batchSize`); `None` asks each model its
    /// tier's figure of the hardware recommendation. The runtime's live-stream bound caps it.
    pub batch_size: Option<usize>,
    /// Prompt tokens of one prefill step.
    pub prefill_step_size: usize,
    /// Whether each model keeps a prefix cache of its prompts; `false` prefills every prompt
    /// whole.
    pub prefix_cache: bool,
    /// The bytes each model's prefix cache may hold (`runtime.prefixCacheBytes`); `None`: a
    /// share of the host's memory ([`crate::plan::prefix_cache_bytes_default`]).
    pub prefix_cache_bytes: Option<u64>,
    /// How long a session's prefix cache entry stays pinned against eviction by other traffic.
    pub session_ttl: Duration,
    /// Whether a model load includes a few generations (`runtime.warmUp`), so that MLX
    /// compiles its kernels before the model counts as loaded, not on its first requests.
    pub warm_up: bool,
    /// The runtime's argv (`runtime.command`), run as it is, instead of `python -m mlx_runtime`
    /// with `runtime_dir` on `PYTHONPATH`; `None` runs that default. Any program that speaks
    /// the runtime's JSON-RPC protocol on its standard input and output will do: the
    /// capabilities its `runtime/info` lists decide what the worker asks of it.
    pub command: Option<Vec<String>>,
    /// Variables added to the runtime's environment (`runtime.env`), after the ones the
    /// worker sets, so they can override them.
    pub env: BTreeMap<String, String>,
}

/// Log output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggingConfig {
    /// A `tracing` filter directive such as `info` or `mlx_worker=debug`.
    pub level: String,
    /// A file the log lines are appended to instead of stderr; it must open at start-up.
    pub file: Option<PathBuf>,
    /// Line format.
    pub format: LogFormat,
}

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable text.
    Text,
    /// One JSON object per line.
    Json,
}

/// Why the configuration could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is larger than [`crate::limits::CONFIG_BYTES_MAX`].
    #[error("config file {path} is {len} bytes, limit {limit}")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        len: u64,
        /// The limit.
        limit: usize,
    },
    /// The YAML is malformed or has an unknown or mistyped key.
    #[error("config file {path}: {message}")]
    Yaml {
        /// The file.
        path: PathBuf,
        /// The parser's message, with the line and column.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("config key {key}: {reason}")]
    Invalid {
        /// The dotted key.
        key: String,
        /// Why.
        reason: String,
    },
    /// An environment variable or flag could not be applied.
    #[error("{origin} ({key}): {reason}")]
    Override {
        /// Where it came from.
        origin: Origin,
        /// The key it sets.
        key: &'static str,
        /// Why.
        reason: String,
    },
    /// An `MLX_WORKER_*` environment variable names no setting.
    #[error("unknown environment variable {name}; known: {known}")]
    UnknownEnv {
        /// The variable.
        name: String,
        /// The known names.
        known: String,
    },
}

/// Resolves the configuration: the file (if any), then `env`, then `flags`, then validation.
pub fn load(
    file: Option<&Path>,
    env: &[Override],
    flags: &[Override],
) -> Result<WorkerConfig, ConfigError> {
    let mut raw = match file {
        Some(path) => parse::read_file(path)?,
        None => RawConfig::default(),
    };
    for o in env.iter().chain(flags) {
        raw.apply(o)?;
    }
    raw.resolve()
}

/// Parses YAML text (as if read from `path`) and validates it, with no overrides.
pub fn from_yaml(text: &str, path: &Path) -> Result<WorkerConfig, ConfigError> {
    parse::parse(text, path)?.resolve()
}
