//! The configuration file as written, before validation: every key optional, camelCase with
//! snake_case aliases, unknown keys rejected. `parse` reads it, `overrides` changes single
//! values, and `resolve` turns it into the checked [`WorkerConfig`](super::WorkerConfig).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;
use serde::de::IgnoredAny;

/// The whole file. A top-level `cluster:` wrapper (the product requirements' layout) holds the same keys.
#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub(super) struct RawConfig {
    pub(super) cluster: Option<Box<RawConfig>>,
    /// `controller`, `worker` or `both`: which roles the file's owner runs on this host; a
    /// worker refuses a file that runs only the controller.
    pub(super) mode: Option<RawMode>,
    pub(super) nats: RawNats,
    pub(super) worker: RawWorker,
    pub(super) discovery: RawDiscovery,
    pub(super) runtime: RawRuntime,
    pub(super) logging: RawLogging,
    #[serde(alias = "model_subjects")]
    pub(super) model_subjects: RawModelSubjects,
    // Sections only the controller reads; of `controller`, the worker reads what tells whether
    // the two would bind one port on this host.
    pub(super) controller: Option<Foreign<RawController>>,
    pub(super) workers: Option<IgnoredAny>,
    pub(super) load_balancing: Option<IgnoredAny>,
    // The existing controller's shipped file spells this section in snake_case, and its
    // loader drops it; a file may carry both spellings.
    #[serde(rename = "load_balancing")]
    pub(super) load_balancing_snake: Option<IgnoredAny>,
    pub(super) request_routing: Option<IgnoredAny>,
}

/// The controller's section, of which the worker reads only where the controller's HTTP server
/// listens. Any other key, and any value the worker cannot read, is the controller's to judge.
#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(super) struct RawController {
    pub(super) enabled: Option<Foreign<bool>>,
    #[serde(alias = "bind_address")]
    pub(super) bind_address: Option<Foreign<String>>,
    pub(super) port: Option<Foreign<u16>>,
    #[serde(alias = "dashboard_port")]
    pub(super) dashboard_port: Option<Foreign<u16>>,
}

/// A value in a section another program validates: the value, or `Unreadable` when it is not
/// of the type the worker expects, which is no error of the worker's.
#[derive(Debug, PartialEq)]
pub(super) enum Foreign<T> {
    Value(T),
    Unreadable,
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Foreign<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either<T> {
            Value(T),
            Other(IgnoredAny),
        }
        Ok(match Either::deserialize(d)? {
            Either::Value(v) => Foreign::Value(v),
            Either::Other(_) => Foreign::Unreadable,
        })
    }
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawMode {
    Controller,
    Worker,
    Both,
}

/// How requests addressed to a model (`inference.{model}`) reach the workers.
#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub(super) struct RawModelSubjects {
    pub(super) mode: Option<RawModelSubjectsMode>,
    pub(super) stream: Option<String>,
    pub(super) subjects: Option<Vec<String>>,
    pub(super) replicas: Option<usize>,
    #[serde(alias = "max_messages")]
    pub(super) max_messages: Option<u64>,
    #[serde(alias = "max_bytes")]
    pub(super) max_bytes: Option<u64>,
    #[serde(alias = "max_age_ms")]
    pub(super) max_age_ms: Option<u64>,
    #[serde(alias = "ack_wait_ms")]
    pub(super) ack_wait_ms: Option<u64>,
    #[serde(alias = "max_deliver")]
    pub(super) max_deliver: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(super) enum RawModelSubjectsMode {
    QueueGroup,
    #[serde(alias = "jetStream")]
    Jetstream,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawNatsMode {
    Embedded,
    External,
}

#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub(super) struct RawNats {
    pub(super) mode: Option<RawNatsMode>,
    #[serde(alias = "server_url")]
    pub(super) server_url: Option<String>,
    pub(super) servers: Option<Vec<String>>,
    pub(super) name: Option<String>,
    pub(super) user: Option<String>,
    pub(super) password: Option<String>,
    pub(super) token: Option<String>,
    /// Secrets may also come from files (mode 0600), so they stay out of the configuration.
    #[serde(alias = "password_file")]
    pub(super) password_file: Option<PathBuf>,
    #[serde(alias = "token_file")]
    pub(super) token_file: Option<PathBuf>,
    #[serde(alias = "nkey_seed_file")]
    pub(super) nkey_seed_file: Option<PathBuf>,
    #[serde(alias = "creds_file")]
    pub(super) creds_file: Option<PathBuf>,
    pub(super) tls: RawTls,
    pub(super) embedded: RawEmbedded,
    pub(super) reconnect: Option<bool>,
    #[serde(alias = "max_reconnect_attempts")]
    pub(super) max_reconnect_attempts: Option<i64>,
    #[serde(alias = "reconnect_time_wait")]
    pub(super) reconnect_time_wait: Option<u64>,
    #[serde(alias = "ping_interval_ms")]
    pub(super) ping_interval_ms: Option<u64>,
}

#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub(super) struct RawTls {
    pub(super) required: Option<bool>,
    #[serde(alias = "ca_file")]
    pub(super) ca_file: Option<PathBuf>,
    #[serde(alias = "cert_file")]
    pub(super) cert_file: Option<PathBuf>,
    #[serde(alias = "key_file")]
    pub(super) key_file: Option<PathBuf>,
}

#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub(super) struct RawEmbedded {
    pub(super) port: Option<u16>,
    // Monitoring, JetStream and log level of the embedded server are the controller
    // tooling's concern; the worker's embedded server is a plain loopback broker.
    #[serde(alias = "http_port")]
    pub(super) http_port: Option<IgnoredAny>,
    pub(super) jetstream: Option<IgnoredAny>,
    #[serde(alias = "log_level")]
    pub(super) log_level: Option<IgnoredAny>,
}

#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub(super) struct RawWorker {
    #[serde(alias = "worker_id")]
    pub(super) worker_id: Option<String>,
    pub(super) port: Option<u16>,
    #[serde(alias = "http_bind_address")]
    pub(super) http_bind_address: Option<String>,
    pub(super) tags: Option<Vec<String>>,
    pub(super) priority: Option<u8>,
    #[serde(alias = "state_dir")]
    pub(super) state_dir: Option<PathBuf>,
    #[serde(alias = "model_dir")]
    pub(super) model_dir: Option<RawModelDirs>,
    #[serde(alias = "max_concurrent")]
    pub(super) max_concurrent: Option<usize>,
    #[serde(alias = "request_timeout_ms")]
    pub(super) request_timeout_ms: Option<u64>,
    #[serde(alias = "drain_timeout_ms")]
    pub(super) drain_timeout_ms: Option<u64>,
    #[serde(alias = "late_subscriber_wait_ms")]
    pub(super) late_subscriber_wait_ms: Option<u64>,
    #[serde(alias = "late_subscriber_min_delay_ms")]
    pub(super) late_subscriber_min_delay_ms: Option<u64>,
    #[serde(alias = "model_rescan_ms")]
    pub(super) model_rescan_ms: Option<u64>,
    #[serde(alias = "keep_alive_ms")]
    pub(super) keep_alive_ms: Option<u64>,
    #[serde(alias = "model_memory_bytes")]
    pub(super) model_memory_bytes: Option<u64>,
    #[serde(alias = "reregister_every_heartbeats")]
    pub(super) reregister_every_heartbeats: Option<u32>,
    #[serde(alias = "degraded_error_ratio")]
    pub(super) degraded_error_ratio: Option<f64>,
    #[serde(alias = "tier_limits")]
    pub(super) tier_limits: Option<BTreeMap<String, RawTierLimit>>,
    pub(super) limits: RawLimits,
    pub(super) defaults: RawDefaults,
    #[serde(alias = "pre_warming")]
    pub(super) pre_warming: RawPreWarming,
    #[serde(alias = "request_queue")]
    pub(super) request_queue: RawRequestQueue,
    // The existing worker's memory guard and batcher: accepted so its files load. The worker
    // bounds its work by the scheduler's limits instead.
    #[serde(alias = "resource_limits")]
    pub(super) resource_limits: Option<IgnoredAny>,
    #[serde(alias = "continuous_batching")]
    pub(super) continuous_batching: Option<IgnoredAny>,
}

#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub(super) struct RawTierLimit {
    #[serde(alias = "max_concurrent")]
    pub(super) max_concurrent: Option<usize>,
    #[serde(alias = "queue_depth")]
    pub(super) queue_depth: Option<usize>,
    #[serde(alias = "queue_timeout_ms")]
    pub(super) queue_timeout_ms: Option<IgnoredAny>,
}

#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub(super) struct RawLimits {
    #[serde(alias = "prompt_bytes_max")]
    pub(super) prompt_bytes_max: Option<usize>,
    #[serde(alias = "max_tokens_max")]
    pub(super) max_tokens_max: Option<u32>,
    #[serde(alias = "payload_bytes_max")]
    pub(super) payload_bytes_max: Option<usize>,
}

#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub(super) struct RawDefaults {
    #[serde(alias = "max_tokens")]
    pub(super) max_tokens: Option<u32>,
    pub(super) temperature: Option<f64>,
    #[serde(alias = "top_p")]
    pub(super) top_p: Option<f64>,
}

#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub(super) struct RawPreWarming {
    pub(super) enabled: Option<bool>,
    pub(super) models: Option<Vec<RawPreWarmModel>>,
    #[serde(alias = "timeout_per_model_ms")]
    pub(super) timeout_per_model_ms: Option<u64>,
    pub(super) parallel: Option<bool>,
    #[serde(alias = "register_when")]
    pub(super) register_when: Option<IgnoredAny>,
}

/// The directories scanned for models: text (one path, as the existing worker's files give
/// it, or several separated by `:` as in `PATH`) or a list of paths.
#[derive(Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub(super) enum RawModelDirs {
    Text(String),
    List(Vec<PathBuf>),
}

/// A model to preload: either a bare id or the existing `{model, priority}` form.
#[derive(Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub(super) enum RawPreWarmModel {
    Id(String),
    Entry {
        model: String,
        priority: Option<IgnoredAny>,
    },
}

impl RawPreWarmModel {
    pub(super) fn id(&self) -> &str {
        match self {
            RawPreWarmModel::Id(id) | RawPreWarmModel::Entry { model: id, .. } => id,
        }
    }
}

#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub(super) struct RawRequestQueue {
    // The worker always queues, within `maxDepth`; a full queue always rejects.
    pub(super) enabled: Option<IgnoredAny>,
    #[serde(alias = "max_depth")]
    pub(super) max_depth: Option<usize>,
    #[serde(alias = "reject_when_full")]
    pub(super) reject_when_full: Option<IgnoredAny>,
    #[serde(alias = "priority_levels")]
    pub(super) priority_levels: Option<IgnoredAny>,
}

#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub(super) struct RawDiscovery {
    #[serde(alias = "heartbeat_interval_ms")]
    pub(super) heartbeat_interval_ms: Option<u64>,
    // Read by the controller only.
    pub(super) enabled: Option<IgnoredAny>,
    #[serde(alias = "offline_timeout_ms")]
    pub(super) offline_timeout_ms: Option<IgnoredAny>,
    #[serde(alias = "controller_ip")]
    pub(super) controller_ip: Option<IgnoredAny>,
}

#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub(super) struct RawRuntime {
    #[serde(alias = "python_path", alias = "python")]
    pub(super) python_path: Option<PathBuf>,
    #[serde(alias = "runtime_dir")]
    pub(super) runtime_dir: Option<PathBuf>,
    #[serde(alias = "startup_timeout_ms")]
    pub(super) startup_timeout_ms: Option<u64>,
    #[serde(alias = "call_timeout_ms")]
    pub(super) call_timeout_ms: Option<u64>,
    #[serde(alias = "load_timeout_ms")]
    pub(super) load_timeout_ms: Option<u64>,
    #[serde(alias = "max_restarts", alias = "restartsMax")]
    pub(super) max_restarts: Option<u32>,
    #[serde(alias = "restart_window_ms")]
    pub(super) restart_window_ms: Option<u64>,
    pub(super) batching: Option<bool>,
    #[serde(alias = "batch_size")]
    pub(super) batch_size: Option<usize>,
    #[serde(alias = "prefill_step_size")]
    pub(super) prefill_step_size: Option<usize>,
    #[serde(alias = "prefix_cache")]
    pub(super) prefix_cache: Option<bool>,
    #[serde(alias = "prefix_cache_bytes")]
    pub(super) prefix_cache_bytes: Option<u64>,
    #[serde(alias = "session_ttl_ms")]
    pub(super) session_ttl_ms: Option<u64>,
    #[serde(alias = "warm_up")]
    pub(super) warm_up: Option<bool>,
    /// The runtime's argv, replacing `pythonPath -m mlx_runtime`.
    pub(super) command: Option<Vec<String>>,
    /// Variables added to the runtime's environment.
    pub(super) env: Option<BTreeMap<String, String>>,
    #[serde(alias = "model_concurrency_limiter")]
    pub(super) model_concurrency_limiter: RawLimiter,
}

#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub(super) struct RawLimiter {
    pub(super) enabled: Option<bool>,
    #[serde(alias = "tier_limits")]
    pub(super) tier_limits: Option<BTreeMap<String, RawTierLimit>>,
}

#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub(super) struct RawLogging {
    pub(super) level: Option<String>,
    pub(super) format: Option<RawLogFormat>,
    /// A file the logs are appended to instead of stderr.
    pub(super) file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawLogFormat {
    Json,
    Text,
}
