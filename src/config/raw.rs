//! The configuration file as written, before validation: every key optional, camelCase with
//! snake_case aliases, unknown keys rejected. [`RawConfig::resolve`] turns it into the checked
//! [`WorkerConfig`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::IgnoredAny;

use super::{
    ConfigError, DEFAULT_DEGRADED_ERROR_RATIO, DEFAULT_DRAIN_TIMEOUT, DEFAULT_EMBEDDED_PORT,
    DEFAULT_ENGINE_CALL_TIMEOUT, DEFAULT_ENGINE_RESTART_WINDOW, DEFAULT_ENGINE_RESTARTS_MAX,
    DEFAULT_ENGINE_STARTUP_TIMEOUT, DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_LATE_SUBSCRIBER_WAIT,
    DEFAULT_MAX_TOKENS, DEFAULT_MODEL_DIR, DEFAULT_MODEL_LOAD_TIMEOUT, DEFAULT_PING_INTERVAL,
    DEFAULT_PORT, DEFAULT_PRIORITY, DEFAULT_PYTHON, DEFAULT_QUEUE_DEPTH, DEFAULT_RECONNECT_WAIT,
    DEFAULT_REQUEST_TIMEOUT, DEFAULT_REREGISTER_EVERY_HEARTBEATS, DEFAULT_RUNTIME_DIR,
    DEFAULT_STATE_DIR, DEFAULT_TEMPERATURE, DEFAULT_TOP_P, EmbeddedNats, EngineConfig,
    GenerationDefaults, LogFormat, LoggingConfig, NatsAuth, NatsConfig, NatsTls, NodeConfig,
    Override, Secret, Setting, TierLimit, WorkerConfig,
};
use crate::limits::{
    CONFIG_BYTES_MAX, DRAIN_TIMEOUT_MAX, HEARTBEAT_INTERVAL_MIN, INFLIGHT_REQUESTS_MAX,
    LATE_SUBSCRIBER_WAIT_MAX, MAX_TOKENS_MAX, NATS_PAYLOAD_BYTES_MAX, PROMPT_BYTES_MAX,
    QUEUE_DEPTH_MAX, REQUEST_TIMEOUT_MAX, SECRET_FILE_BYTES_MAX, TAG_BYTES_MAX, TAGS_MAX,
};
use crate::protocol::request::RequestLimits;
use crate::protocol::subject::check_token;
use crate::tier::ModelTier;

/// The whole file. A top-level `cluster:` wrapper (the product requirements' layout) holds the same keys.
#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub(crate) struct RawConfig {
    cluster: Option<Box<RawConfig>>,
    /// `controller`, `worker` or `both`: which roles the file's owner runs; the worker runs
    /// whatever it says.
    mode: Option<RawMode>,
    nats: RawNats,
    worker: RawWorker,
    discovery: RawDiscovery,
    runtime: RawRuntime,
    logging: RawLogging,
    // Sections only the controller reads.
    controller: Option<IgnoredAny>,
    workers: Option<IgnoredAny>,
    load_balancing: Option<IgnoredAny>,
    // The existing controller's shipped file spells this section in snake_case, and its
    // loader drops it; a file may carry both spellings.
    #[serde(rename = "load_balancing")]
    load_balancing_snake: Option<IgnoredAny>,
    request_routing: Option<IgnoredAny>,
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawMode {
    Controller,
    Worker,
    Both,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawNatsMode {
    Embedded,
    External,
}

#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct RawNats {
    mode: Option<RawNatsMode>,
    #[serde(alias = "server_url")]
    server_url: Option<String>,
    servers: Option<Vec<String>>,
    name: Option<String>,
    user: Option<String>,
    password: Option<String>,
    token: Option<String>,
    /// Secrets may also come from files (mode 0600), so they stay out of the configuration.
    #[serde(alias = "password_file")]
    password_file: Option<PathBuf>,
    #[serde(alias = "token_file")]
    token_file: Option<PathBuf>,
    #[serde(alias = "nkey_seed_file")]
    nkey_seed_file: Option<PathBuf>,
    #[serde(alias = "creds_file")]
    creds_file: Option<PathBuf>,
    tls: RawTls,
    embedded: RawEmbedded,
    reconnect: Option<bool>,
    #[serde(alias = "max_reconnect_attempts")]
    max_reconnect_attempts: Option<i64>,
    #[serde(alias = "reconnect_time_wait")]
    reconnect_time_wait: Option<u64>,
    #[serde(alias = "ping_interval_ms")]
    ping_interval_ms: Option<u64>,
}

#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct RawTls {
    required: Option<bool>,
    #[serde(alias = "ca_file")]
    ca_file: Option<PathBuf>,
    #[serde(alias = "cert_file")]
    cert_file: Option<PathBuf>,
    #[serde(alias = "key_file")]
    key_file: Option<PathBuf>,
}

#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct RawEmbedded {
    port: Option<u16>,
    // Monitoring, JetStream and log level of the embedded server are the controller
    // tooling's concern; the worker's embedded server is a plain loopback broker.
    #[serde(alias = "http_port")]
    http_port: Option<IgnoredAny>,
    jetstream: Option<IgnoredAny>,
    #[serde(alias = "log_level")]
    log_level: Option<IgnoredAny>,
}

#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct RawWorker {
    #[serde(alias = "worker_id")]
    worker_id: Option<String>,
    port: Option<u16>,
    tags: Option<Vec<String>>,
    priority: Option<u8>,
    #[serde(alias = "state_dir")]
    state_dir: Option<PathBuf>,
    #[serde(alias = "model_dir")]
    model_dir: Option<PathBuf>,
    #[serde(alias = "max_concurrent")]
    max_concurrent: Option<usize>,
    #[serde(alias = "request_timeout_ms")]
    request_timeout_ms: Option<u64>,
    #[serde(alias = "drain_timeout_ms")]
    drain_timeout_ms: Option<u64>,
    #[serde(alias = "late_subscriber_wait_ms")]
    late_subscriber_wait_ms: Option<u64>,
    #[serde(alias = "reregister_every_heartbeats")]
    reregister_every_heartbeats: Option<u32>,
    #[serde(alias = "degraded_error_ratio")]
    degraded_error_ratio: Option<f64>,
    #[serde(alias = "tier_limits")]
    tier_limits: Option<BTreeMap<String, RawTierLimit>>,
    limits: RawLimits,
    defaults: RawDefaults,
    #[serde(alias = "pre_warming")]
    pre_warming: RawPreWarming,
    #[serde(alias = "request_queue")]
    request_queue: RawRequestQueue,
    // The existing worker's memory guard and batcher: accepted so its files load. The worker
    // bounds its work by the scheduler's limits instead.
    #[serde(alias = "resource_limits")]
    resource_limits: Option<IgnoredAny>,
    #[serde(alias = "continuous_batching")]
    continuous_batching: Option<IgnoredAny>,
}

#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct RawTierLimit {
    #[serde(alias = "max_concurrent")]
    max_concurrent: Option<usize>,
    #[serde(alias = "queue_depth")]
    queue_depth: Option<usize>,
    #[serde(alias = "queue_timeout_ms")]
    queue_timeout_ms: Option<IgnoredAny>,
}

#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct RawLimits {
    #[serde(alias = "prompt_bytes_max")]
    prompt_bytes_max: Option<usize>,
    #[serde(alias = "max_tokens_max")]
    max_tokens_max: Option<u32>,
    #[serde(alias = "payload_bytes_max")]
    payload_bytes_max: Option<usize>,
}

#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct RawDefaults {
    #[serde(alias = "max_tokens")]
    max_tokens: Option<u32>,
    temperature: Option<f64>,
    #[serde(alias = "top_p")]
    top_p: Option<f64>,
}

#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct RawPreWarming {
    enabled: Option<bool>,
    models: Option<Vec<RawPreWarmModel>>,
    #[serde(alias = "timeout_per_model_ms")]
    timeout_per_model_ms: Option<u64>,
    parallel: Option<bool>,
    #[serde(alias = "register_when")]
    register_when: Option<IgnoredAny>,
}

/// A model to preload: either a bare id or the existing `{model, priority}` form.
#[derive(Debug, PartialEq, Deserialize)]
#[serde(untagged)]
enum RawPreWarmModel {
    Id(String),
    Entry {
        model: String,
        priority: Option<IgnoredAny>,
    },
}

impl RawPreWarmModel {
    fn id(&self) -> &str {
        match self {
            RawPreWarmModel::Id(id) | RawPreWarmModel::Entry { model: id, .. } => id,
        }
    }
}

#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct RawRequestQueue {
    // The worker always queues, within `maxDepth`; a full queue always rejects.
    enabled: Option<IgnoredAny>,
    #[serde(alias = "max_depth")]
    max_depth: Option<usize>,
    #[serde(alias = "reject_when_full")]
    reject_when_full: Option<IgnoredAny>,
    #[serde(alias = "priority_levels")]
    priority_levels: Option<IgnoredAny>,
}

#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct RawDiscovery {
    #[serde(alias = "heartbeat_interval_ms")]
    heartbeat_interval_ms: Option<u64>,
    // Read by the controller only.
    enabled: Option<IgnoredAny>,
    #[serde(alias = "offline_timeout_ms")]
    offline_timeout_ms: Option<IgnoredAny>,
    #[serde(alias = "controller_ip")]
    controller_ip: Option<IgnoredAny>,
}

#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct RawRuntime {
    #[serde(alias = "python_path", alias = "python")]
    python_path: Option<PathBuf>,
    #[serde(alias = "runtime_dir")]
    runtime_dir: Option<PathBuf>,
    #[serde(alias = "startup_timeout_ms")]
    startup_timeout_ms: Option<u64>,
    #[serde(alias = "call_timeout_ms")]
    call_timeout_ms: Option<u64>,
    #[serde(alias = "load_timeout_ms")]
    load_timeout_ms: Option<u64>,
    #[serde(alias = "max_restarts", alias = "restartsMax")]
    max_restarts: Option<u32>,
    #[serde(alias = "restart_window_ms")]
    restart_window_ms: Option<u64>,
    #[serde(alias = "model_concurrency_limiter")]
    model_concurrency_limiter: RawLimiter,
}

#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct RawLimiter {
    enabled: Option<bool>,
    #[serde(alias = "tier_limits")]
    tier_limits: Option<BTreeMap<String, RawTierLimit>>,
}

#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct RawLogging {
    level: Option<String>,
    format: Option<RawLogFormat>,
    file: Option<IgnoredAny>,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawLogFormat {
    Json,
    Text,
}

/// Reads and parses a config file.
pub(crate) fn read_file(path: &Path) -> Result<RawConfig, ConfigError> {
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
pub(crate) fn parse(text: &str, path: &Path) -> Result<RawConfig, ConfigError> {
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

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        reason: reason.into(),
    }
}

fn millis(key: &str, ms: u64, min: Duration, max: Duration) -> Result<Duration, ConfigError> {
    let d = Duration::from_millis(ms);
    if d < min || d > max {
        return Err(invalid(
            key,
            format!(
                "is {ms} ms, must be between {} and {} ms",
                min.as_millis(),
                max.as_millis()
            ),
        ));
    }
    Ok(d)
}

fn millis_or(
    key: &str,
    ms: Option<u64>,
    default: Duration,
    min: Duration,
    max: Duration,
) -> Result<Duration, ConfigError> {
    ms.map_or(Ok(default), |ms| millis(key, ms, min, max))
}

fn bounded(key: &str, value: usize, min: usize, max: usize) -> Result<usize, ConfigError> {
    if value < min || value > max {
        return Err(invalid(
            key,
            format!("is {value}, must be between {min} and {max}"),
        ));
    }
    Ok(value)
}

fn comma_list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

impl RawConfig {
    /// Applies one environment or flag override.
    pub(crate) fn apply(&mut self, o: &Override) -> Result<(), ConfigError> {
        let fail = |reason: String| ConfigError::Override {
            origin: o.origin.clone(),
            key: o.setting.key(),
            reason,
        };
        let shown = if o.setting.is_secret() {
            "<redacted>".to_owned()
        } else {
            format!("{:?}", o.value)
        };
        let number = |what: &str| fail(format!("{shown} is not {what}"));
        let v = o.value.trim();
        let n = &mut self.nats;
        let w = &mut self.worker;
        match o.setting {
            Setting::NatsUrl => n.servers = Some(comma_list(v)),
            Setting::NatsMode => {
                n.mode = Some(match v {
                    "embedded" => RawNatsMode::Embedded,
                    "external" => RawNatsMode::External,
                    _ => return Err(fail(format!("{shown} is not embedded or external"))),
                })
            }
            Setting::NatsEmbeddedPort => {
                n.embedded.port = Some(v.parse().map_err(|_| number("a port number"))?)
            }
            Setting::NatsUser => n.user = Some(v.to_owned()),
            Setting::NatsPassword => n.password = Some(o.value.clone()),
            Setting::NatsToken => n.token = Some(o.value.clone()),
            Setting::NatsNkeySeedFile => n.nkey_seed_file = Some(PathBuf::from(v)),
            Setting::NatsCredsFile => n.creds_file = Some(PathBuf::from(v)),
            Setting::WorkerId => w.worker_id = Some(v.to_owned()),
            Setting::Port => w.port = Some(v.parse().map_err(|_| number("a port number"))?),
            Setting::Tags => w.tags = Some(comma_list(v)),
            Setting::Priority => {
                w.priority = Some(v.parse().map_err(|_| number("an integer 0 to 100"))?)
            }
            Setting::StateDir => w.state_dir = Some(PathBuf::from(v)),
            Setting::ModelDir => w.model_dir = Some(PathBuf::from(v)),
            Setting::Preload => {
                w.pre_warming.enabled = Some(true);
                w.pre_warming.models =
                    Some(comma_list(v).into_iter().map(RawPreWarmModel::Id).collect());
            }
            Setting::MaxConcurrent => {
                w.max_concurrent = Some(v.parse().map_err(|_| number("a positive integer"))?)
            }
            Setting::QueueDepth => {
                w.request_queue.max_depth =
                    Some(v.parse().map_err(|_| number("a positive integer"))?)
            }
            Setting::RequestTimeoutMs => {
                w.request_timeout_ms = Some(v.parse().map_err(|_| number("milliseconds"))?)
            }
            Setting::DrainTimeoutMs => {
                w.drain_timeout_ms = Some(v.parse().map_err(|_| number("milliseconds"))?)
            }
            Setting::HeartbeatIntervalMs => {
                self.discovery.heartbeat_interval_ms =
                    Some(v.parse().map_err(|_| number("milliseconds"))?)
            }
            Setting::Python => self.runtime.python_path = Some(PathBuf::from(v)),
            Setting::RuntimeDir => self.runtime.runtime_dir = Some(PathBuf::from(v)),
            Setting::LogLevel => self.logging.level = Some(v.to_owned()),
            Setting::LogFormat => {
                self.logging.format = Some(match v {
                    "json" => RawLogFormat::Json,
                    "text" => RawLogFormat::Text,
                    _ => return Err(fail(format!("{shown} is not json or text"))),
                })
            }
        }
        Ok(())
    }

    /// Validates every value and builds the resolved configuration.
    pub(crate) fn resolve(self) -> Result<WorkerConfig, ConfigError> {
        let _ = self.mode;
        Ok(WorkerConfig {
            nats: resolve_nats(self.nats)?,
            node: resolve_node(&self.worker, &self.discovery, &self.runtime)?,
            engine: resolve_engine(&self.worker, self.runtime)?,
            logging: resolve_logging(self.logging)?,
        })
    }
}

/// A secret given inline or in a file (trimmed); both at once is an error.
fn secret_from(
    key: &str,
    inline: Option<String>,
    file: Option<&Path>,
) -> Result<Option<String>, ConfigError> {
    match (inline, file) {
        (Some(_), Some(_)) => Err(invalid(key, "is given both inline and as a file")),
        (Some(v), None) => Ok(Some(v)),
        (None, Some(path)) => read_secret_file(key, path).map(Some),

        (None, None) => Ok(None),
    }
}

/// Reads a secret file of at most [`SECRET_FILE_BYTES_MAX`] bytes. Only a regular file is
/// read: a device (`/dev/zero`), a pipe or a socket would not end, or not report its size;
/// the read itself is bounded too, since some regular files (`/proc`) report size 0.
fn read_secret_file(key: &str, path: &Path) -> Result<String, ConfigError> {
    use std::io::Read as _;
    let cannot = |e: std::io::Error| invalid(key, format!("cannot read {}: {e}", path.display()));
    let too_big = || {
        invalid(
            key,
            format!("{} is over {SECRET_FILE_BYTES_MAX} bytes", path.display()),
        )
    };
    let meta = std::fs::metadata(path).map_err(cannot)?;
    if !meta.is_file() {
        return Err(invalid(
            key,
            format!("{} is not a regular file", path.display()),
        ));
    }
    if meta.len() > SECRET_FILE_BYTES_MAX {
        return Err(too_big());
    }
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(SECRET_FILE_BYTES_MAX + 1).read_to_string(&mut text))
        .map_err(cannot)?;
    if text.len() as u64 > SECRET_FILE_BYTES_MAX {
        return Err(too_big());
    }
    Ok(text.trim().to_owned())
}

fn readable(key: &str, path: &Path) -> Result<(), ConfigError> {
    std::fs::metadata(path)
        .map(|_| ())
        .map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))
}

fn resolve_nats(n: RawNats) -> Result<NatsConfig, ConfigError> {
    let given: Vec<String> = match (n.servers, n.server_url) {
        (Some(list), _) => list,
        (None, Some(url)) => comma_list(&url),
        (None, None) => Vec::new(),
    };
    let embedded = match n.mode {
        Some(RawNatsMode::Embedded) => true,
        Some(RawNatsMode::External) => false,
        None => given.is_empty(),
    };
    let (servers, embedded) = if embedded {
        let port = n.embedded.port.unwrap_or(DEFAULT_EMBEDDED_PORT);
        if port == 0 {
            return Err(invalid("nats.embedded.port", "must not be 0"));
        }
        (
            vec![format!("nats://127.0.0.1:{port}")],
            Some(EmbeddedNats { port }),
        )
    } else {
        if given.is_empty() {
            return Err(invalid(
                "nats.serverUrl",
                "is required when nats.mode is external",
            ));
        }
        (given, None)
    };
    for url in &servers {
        if url.is_empty() || url.chars().any(char::is_whitespace) {
            return Err(invalid("nats.serverUrl", format!("{url:?} is not a URL")));
        }
    }
    let password = secret_from("nats.password", n.password, n.password_file.as_deref())?;
    let token = secret_from("nats.token", n.token, n.token_file.as_deref())?;
    let nkey = secret_from("nats.nkeySeedFile", None, n.nkey_seed_file.as_deref())?;
    let methods = [
        n.user.is_some() || password.is_some(),
        token.is_some(),
        nkey.is_some(),
        n.creds_file.is_some(),
    ];
    if methods.iter().filter(|m| **m).count() > 1 {
        return Err(invalid(
            "nats",
            "choose one of user and password, token, nkeySeedFile or credsFile",
        ));
    }
    let auth = match (n.user, password, token, nkey, n.creds_file) {
        (Some(user), Some(password), ..) => NatsAuth::UserPassword {
            user,
            password: Secret::new(password),
        },
        (Some(_), None, ..) | (None, Some(_), ..) => {
            return Err(invalid(
                "nats.user",
                "user and password must be set together",
            ));
        }
        (None, None, Some(token), ..) => NatsAuth::Token(Secret::new(token)),
        (None, None, None, Some(seed), _) => NatsAuth::NKey(Secret::new(seed)),
        (None, None, None, None, Some(path)) => {
            readable("nats.credsFile", &path)?;
            NatsAuth::CredsFile(path)
        }
        (None, None, None, None, None) => NatsAuth::None,
    };
    let tls = match (n.tls.cert_file, n.tls.key_file) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        _ => {
            return Err(invalid(
                "nats.tls",
                "certFile and keyFile must be set together",
            ));
        }
    };
    if let Some(ca) = &n.tls.ca_file {
        readable("nats.tls.caFile", ca)?;
    }
    if let Some((cert, key)) = &tls {
        readable("nats.tls.certFile", cert)?;
        readable("nats.tls.keyFile", key)?;
    }
    let tls = NatsTls {
        required: n.tls.required.unwrap_or(false)
            || servers.iter().any(|s| s.starts_with("tls://")),
        ca_file: n.tls.ca_file,
        client_cert: tls,
    };
    let max_reconnect_attempts = match (n.reconnect, n.max_reconnect_attempts) {
        (Some(false), _) => Some(0),
        (_, None) => None,
        (_, Some(a)) if a < 0 => None,
        (_, Some(0)) => {
            return Err(invalid(
                "nats.maxReconnectAttempts",
                "is 0, must be positive (or -1 for no limit)",
            ));
        }
        (_, Some(a)) => Some(usize::try_from(a).unwrap_or(usize::MAX)),
    };
    let name = n.name.unwrap_or_else(|| "mlx-worker".to_owned());
    Ok(NatsConfig {
        servers,
        embedded,
        name,
        auth,
        tls,
        reconnect_wait_max: millis_or(
            "nats.reconnectTimeWait",
            n.reconnect_time_wait,
            DEFAULT_RECONNECT_WAIT,
            Duration::from_millis(10),
            Duration::from_secs(60),
        )?,
        max_reconnect_attempts,
        ping_interval: millis_or(
            "nats.pingIntervalMs",
            n.ping_interval_ms,
            DEFAULT_PING_INTERVAL,
            Duration::from_millis(100),
            Duration::from_secs(60),
        )?,
    })
}

fn tier_limits(
    key: &str,
    map: &BTreeMap<String, RawTierLimit>,
    out: &mut BTreeMap<ModelTier, TierLimit>,
) -> Result<(), ConfigError> {
    for (name, raw) in map {
        let tier: ModelTier = name
            .parse()
            .map_err(|e: crate::tier::UnknownTier| invalid(key, e.to_string()))?;
        let (Some(max_concurrent), queue_depth) = (raw.max_concurrent, raw.queue_depth) else {
            return Err(invalid(
                &format!("{key}.{name}.maxConcurrent"),
                "is required",
            ));
        };
        let max_concurrent = bounded(
            &format!("{key}.{name}.maxConcurrent"),
            max_concurrent,
            1,
            INFLIGHT_REQUESTS_MAX,
        )?;
        let queue_depth = bounded(
            &format!("{key}.{name}.queueDepth"),
            queue_depth.unwrap_or(DEFAULT_QUEUE_DEPTH),
            0,
            QUEUE_DEPTH_MAX,
        )?;
        out.insert(
            tier,
            TierLimit {
                max_concurrent,
                queue_depth,
            },
        );
    }
    Ok(())
}

fn resolve_node(
    w: &RawWorker,
    d: &RawDiscovery,
    r: &RawRuntime,
) -> Result<NodeConfig, ConfigError> {
    if let Some(id) = &w.worker_id {
        check_token(id).map_err(|e| invalid("worker.workerId", format!("{id:?} {e}")))?;
    }
    let tags = w.tags.clone().unwrap_or_default();
    if tags.len() > TAGS_MAX {
        return Err(invalid(
            "worker.tags",
            format!("has {} tags, limit {TAGS_MAX}", tags.len()),
        ));
    }
    if let Some(tag) = tags
        .iter()
        .find(|t| t.is_empty() || t.len() > TAG_BYTES_MAX)
    {
        return Err(invalid(
            "worker.tags",
            format!(
                "tag {tag:?} is {} bytes, must be 1 to {TAG_BYTES_MAX}",
                tag.len()
            ),
        ));
    }
    let priority = w.priority.unwrap_or(DEFAULT_PRIORITY);
    if priority > 100 {
        return Err(invalid(
            "worker.priority",
            format!("is {priority}, must be between 0 and 100"),
        ));
    }
    let mut tiers = BTreeMap::new();
    if r.model_concurrency_limiter.enabled != Some(false)
        && let Some(map) = &r.model_concurrency_limiter.tier_limits
    {
        tier_limits(
            "runtime.modelConcurrencyLimiter.tierLimits",
            map,
            &mut tiers,
        )?;
    }
    if let Some(map) = &w.tier_limits {
        tier_limits("worker.tierLimits", map, &mut tiers)?;
    }
    let limits = &w.limits;
    let request_limits = RequestLimits {
        payload_bytes_max: bounded(
            "worker.limits.payloadBytesMax",
            limits.payload_bytes_max.unwrap_or(NATS_PAYLOAD_BYTES_MAX),
            1024,
            NATS_PAYLOAD_BYTES_MAX,
        )?,
        prompt_bytes_max: bounded(
            "worker.limits.promptBytesMax",
            limits.prompt_bytes_max.unwrap_or(PROMPT_BYTES_MAX),
            1,
            PROMPT_BYTES_MAX,
        )?,
        max_tokens_max: {
            let v = limits.max_tokens_max.unwrap_or(MAX_TOKENS_MAX);
            if !(1..=MAX_TOKENS_MAX).contains(&v) {
                return Err(invalid(
                    "worker.limits.maxTokensMax",
                    format!("is {v}, must be between 1 and {MAX_TOKENS_MAX}"),
                ));
            }
            v
        },
        timeout_max: REQUEST_TIMEOUT_MAX,
    };
    let defaults = GenerationDefaults {
        max_tokens: w.defaults.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        temperature: w.defaults.temperature.unwrap_or(DEFAULT_TEMPERATURE),
        top_p: w.defaults.top_p.unwrap_or(DEFAULT_TOP_P),
    };
    if !(1..=request_limits.max_tokens_max).contains(&defaults.max_tokens) {
        return Err(invalid(
            "worker.defaults.maxTokens",
            format!(
                "is {}, must be between 1 and {}",
                defaults.max_tokens, request_limits.max_tokens_max
            ),
        ));
    }
    if !(0.0..=2.0).contains(&defaults.temperature) {
        return Err(invalid(
            "worker.defaults.temperature",
            format!("is {}, must be between 0 and 2", defaults.temperature),
        ));
    }
    if !(defaults.top_p > 0.0 && defaults.top_p <= 1.0) {
        return Err(invalid(
            "worker.defaults.topP",
            format!(
                "is {}, must be greater than 0 and at most 1",
                defaults.top_p
            ),
        ));
    }
    let degraded_error_ratio = w
        .degraded_error_ratio
        .unwrap_or(DEFAULT_DEGRADED_ERROR_RATIO);
    if !(degraded_error_ratio > 0.0 && degraded_error_ratio <= 1.0) {
        return Err(invalid(
            "worker.degradedErrorRatio",
            format!("is {degraded_error_ratio}, must be greater than 0 and at most 1"),
        ));
    }
    let reregister_every = w
        .reregister_every_heartbeats
        .unwrap_or(DEFAULT_REREGISTER_EVERY_HEARTBEATS);
    if reregister_every == 0 {
        return Err(invalid(
            "worker.reregisterEveryHeartbeats",
            "is 0, must be at least 1",
        ));
    }
    Ok(NodeConfig {
        worker_id: w.worker_id.clone(),
        state_dir: w
            .state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
        port: w.port.unwrap_or(DEFAULT_PORT),
        tags,
        priority,
        heartbeat_interval: match d.heartbeat_interval_ms {
            // The existing controller treats 0 as "use the default".
            None | Some(0) => DEFAULT_HEARTBEAT_INTERVAL,
            Some(ms) => millis(
                "discovery.heartbeatIntervalMs",
                ms,
                HEARTBEAT_INTERVAL_MIN,
                Duration::from_secs(3600),
            )?,
        },
        reregister_every,
        request_timeout: millis_or(
            "worker.requestTimeoutMs",
            w.request_timeout_ms,
            DEFAULT_REQUEST_TIMEOUT,
            Duration::from_millis(1),
            REQUEST_TIMEOUT_MAX,
        )?,
        drain_timeout: millis_or(
            "worker.drainTimeoutMs",
            w.drain_timeout_ms,
            DEFAULT_DRAIN_TIMEOUT,
            Duration::ZERO,
            DRAIN_TIMEOUT_MAX,
        )?,
        late_subscriber_wait: millis_or(
            "worker.lateSubscriberWaitMs",
            w.late_subscriber_wait_ms,
            DEFAULT_LATE_SUBSCRIBER_WAIT,
            Duration::ZERO,
            LATE_SUBSCRIBER_WAIT_MAX,
        )?,
        inflight_max: w
            .max_concurrent
            .map(|v| bounded("worker.maxConcurrent", v, 1, INFLIGHT_REQUESTS_MAX))
            .transpose()?,
        queue_depth_max: bounded(
            "worker.requestQueue.maxDepth",
            w.request_queue.max_depth.unwrap_or(DEFAULT_QUEUE_DEPTH),
            1,
            QUEUE_DEPTH_MAX,
        )?,
        tier_limits: tiers,
        request_limits,
        generation_defaults: defaults,
        degraded_error_ratio,
    })
}

fn resolve_engine(w: &RawWorker, r: RawRuntime) -> Result<EngineConfig, ConfigError> {
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
        model_dir: w
            .model_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_MODEL_DIR)),
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
    })
}

fn resolve_logging(l: RawLogging) -> Result<LoggingConfig, ConfigError> {
    // `file` is accepted and ignored, as the existing tools do: the worker logs to stderr and
    // the service manager (launchd, systemd) keeps the file.
    let _ = l.file;
    let level = l.level.unwrap_or_else(|| "info".to_owned());
    if level.trim().is_empty() {
        return Err(invalid("logging.level", "is empty"));
    }
    Ok(LoggingConfig {
        level,
        format: match l.format {
            Some(RawLogFormat::Json) => LogFormat::Json,
            Some(RawLogFormat::Text) | None => LogFormat::Text,
        },
    })
}
