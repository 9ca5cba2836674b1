//! The settings table: every value the environment or a flag can set, declared once.
//!
//! Each row names the setting, the file key it overrides, its `MLX_WORKER_*` variable, its
//! flag (if it has one), the kind of value it takes, its help text and where the value goes in
//! the [`RawConfig`]. Everything else is derived from the rows: [`Setting`] and its accessors,
//! the environment lookup, the flags of every command (built at run time from
//! [`Setting::ALL`]) and the conversion of an override's text into a value. Adding a setting
//! is adding a row.

use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;

use serde::de::{DeserializeOwned, IntoDeserializer};

use super::raw::{
    RawConfig, RawLogFormat, RawModelDirs, RawModelSubjectsMode, RawNatsMode, RawPreWarmModel,
};
use super::resolve::comma_list;

/// The kind of value a setting takes: how its text is read, and what it is called in
/// messages and help.
pub(super) struct Kind<T> {
    /// The placeholder in `--help` (`--port <PORT>`).
    value_name: &'static str,
    /// What a valid value is, for "… is not {what}".
    what: &'static str,
    /// Whether the value must never be shown, in messages or anywhere else.
    secret: bool,
    /// The value, or `None` when the text is not one.
    parse: fn(&str) -> Option<T>,
}

impl<T> Kind<T> {
    /// A kind whose values may be shown.
    const fn plain(
        value_name: &'static str,
        what: &'static str,
        parse: fn(&str) -> Option<T>,
    ) -> Self {
        Kind {
            value_name,
            what,
            secret: false,
            parse,
        }
    }

    /// Reads `text` as a value; the error is the reason, for a message.
    pub(super) fn read(&self, text: &str) -> Result<T, String> {
        (self.parse)(text).ok_or_else(|| {
            let shown = if self.secret {
                "<redacted>".to_owned()
            } else {
                format!("{text:?}")
            };
            format!("{shown} is not {}", self.what)
        })
    }

    /// Reads `text` and hands the value to `set`; the error is the reason, for a message.
    fn apply(
        &self,
        raw: &mut RawConfig,
        text: &str,
        set: impl FnOnce(&mut RawConfig, T),
    ) -> Result<(), String> {
        set(raw, self.read(text)?);
        Ok(())
    }
}

/// Text, trimmed.
const TEXT: Kind<String> = Kind::plain("TEXT", "text", |v| Some(v.trim().to_owned()));

/// A secret, exactly as given (a password may begin or end with a space).
const SECRET: Kind<String> = Kind {
    value_name: "SECRET",
    what: "a secret",
    secret: true,
    parse: |v| Some(v.to_owned()),
};

/// A file or directory.
const PATH: Kind<PathBuf> = Kind::plain("PATH", "a path", |v| Some(PathBuf::from(v.trim())));

/// Paths separated by `:`, as in `PATH`; split when the configuration is resolved, as the
/// file's text is.
const PATHS: Kind<String> = Kind::plain("PATHS", "paths", |v| Some(v.trim().to_owned()));

/// A comma-separated list; empty items are dropped.
const LIST: Kind<Vec<String>> =
    Kind::plain("LIST", "a comma-separated list", |v| Some(comma_list(v)));

const PORT: Kind<u16> = Kind::plain("PORT", "a port number", parse_trimmed);
/// An IP address, as the file spells it too (no brackets, no port, no host name).
pub(super) const IP_ADDR: Kind<IpAddr> = Kind::plain(
    "ADDR",
    "an IP address (an IPv4 or IPv6 literal such as 127.0.0.1 or ::1)",
    parse_trimmed,
);
const COUNT: Kind<usize> = Kind::plain("N", "a positive integer", parse_trimmed);
const MILLIS: Kind<u64> = Kind::plain("MS", "milliseconds", parse_trimmed);
const PRIORITY: Kind<u8> = Kind::plain("0-100", "an integer 0 to 100", parse_trimmed);
/// `true` or `false`, as the file spells them.
const BOOL: Kind<bool> = Kind::plain("true|false", "true or false", parse_trimmed);
/// A number of tokens.
const TOKENS: Kind<usize> = Kind::plain("TOKENS", "a number of tokens", parse_trimmed);
const BYTES: Kind<u64> = Kind::plain("BYTES", "a number of bytes", parse_trimmed);
const NATS_MODE: Kind<RawNatsMode> =
    Kind::plain("embedded|external", "embedded or external", parse_choice);
const MODEL_SUBJECTS_MODE: Kind<RawModelSubjectsMode> = Kind::plain(
    "queue-group|jetstream",
    "queue-group or jetstream",
    parse_choice,
);
const LOG_FORMAT: Kind<RawLogFormat> = Kind::plain("text|json", "json or text", parse_choice);

/// A number or an address (anything `FromStr` reads), trimmed.
fn parse_trimmed<T: FromStr>(v: &str) -> Option<T> {
    v.trim().parse().ok()
}

/// One of the names the file accepts for `T` (its serde spelling), trimmed.
fn parse_choice<T: DeserializeOwned>(v: &str) -> Option<T> {
    let text: serde::de::value::StrDeserializer<'_, serde::de::value::Error> =
        v.trim().into_deserializer();
    T::deserialize(text).ok()
}

/// Declares [`Setting`] and derives its accessors from one row per setting.
macro_rules! settings {
    ($(
        $name:ident {
            key: $key:literal,
            env: $env:literal,
            flag: $flag:expr,
            kind: $kind:expr,
            help: $help:literal,
            set: $set:expr $(,)?
        }
    ),* $(,)?) => {
        /// A value that can be set from the environment or a flag (see the settings table).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Setting {
            $(
                #[doc = concat!("`", $key, "`: ", $help, ".")]
                $name,
            )*
        }

        impl Setting {
            /// Every setting, in table order.
            pub const ALL: [Setting; [$(Setting::$name),*].len()] = [$(Setting::$name),*];

            /// The environment variable's name without the `MLX_WORKER_` prefix.
            pub fn env_suffix(self) -> &'static str {
                match self {
                    $(Setting::$name => $env,)*
                }
            }

            /// The configuration key the setting overrides, for messages and docs.
            pub fn key(self) -> &'static str {
                match self {
                    $(Setting::$name => $key,)*
                }
            }

            /// The command-line flag (`--port`), if the setting has one.
            pub fn flag(self) -> Option<&'static str> {
                match self {
                    $(Setting::$name => $flag,)*
                }
            }

            /// One line of help.
            pub fn help(self) -> &'static str {
                match self {
                    $(Setting::$name => $help,)*
                }
            }

            /// The value's placeholder in help (`PORT`, `MS`, `PATH`, …).
            pub fn value_name(self) -> &'static str {
                match self {
                    $(Setting::$name => $kind.value_name,)*
                }
            }

            /// Whether the value is a secret that must not appear in messages.
            pub fn is_secret(self) -> bool {
                match self {
                    $(Setting::$name => $kind.secret,)*
                }
            }

            /// Reads `text` as this setting's value and sets it in `raw`; the error is the
            /// reason the text is not a value.
            pub(super) fn apply(self, raw: &mut RawConfig, text: &str) -> Result<(), String> {
                match self {
                    $(Setting::$name => $kind.apply(raw, text, $set),)*
                }
            }
        }
    };
}

settings! {
    NatsUrl {
        key: "nats.serverUrl",
        env: "NATS_URL",
        flag: Some("--nats-url"),
        kind: LIST,
        help: "NATS server URL(s), comma-separated",
        set: |c, v| c.nats.servers = Some(v),
    },
    NatsMode {
        key: "nats.mode",
        env: "NATS_MODE",
        flag: Some("--nats-mode"),
        kind: NATS_MODE,
        help: "`embedded` (start a local nats-server) or `external`",
        set: |c, v| c.nats.mode = Some(v),
    },
    NatsEmbeddedPort {
        key: "nats.embedded.port",
        env: "NATS_EMBEDDED_PORT",
        flag: Some("--nats-embedded-port"),
        kind: PORT,
        help: "Port of the embedded nats-server",
        set: |c, v| c.nats.embedded.port = Some(v),
    },
    NatsUser {
        key: "nats.user",
        env: "NATS_USER",
        flag: None,
        kind: TEXT,
        help: "NATS user, with a password",
        set: |c, v| c.nats.user = Some(v),
    },
    NatsPassword {
        key: "nats.password",
        env: "NATS_PASSWORD",
        flag: None,
        kind: SECRET,
        help: "NATS password (never logged)",
        set: |c, v| c.nats.password = Some(v),
    },
    NatsToken {
        key: "nats.token",
        env: "NATS_TOKEN",
        flag: None,
        kind: SECRET,
        help: "NATS token (never logged)",
        set: |c, v| c.nats.token = Some(v),
    },
    NatsNkeySeedFile {
        key: "nats.nkeySeedFile",
        env: "NATS_NKEY_SEED_FILE",
        flag: None,
        kind: PATH,
        help: "File holding the NKey seed to authenticate with",
        set: |c, v| c.nats.nkey_seed_file = Some(v),
    },
    NatsCredsFile {
        key: "nats.credsFile",
        env: "NATS_CREDS_FILE",
        flag: None,
        kind: PATH,
        help: "`.creds` file (user JWT and NKey seed) to authenticate with",
        set: |c, v| c.nats.creds_file = Some(v),
    },
    WorkerId {
        key: "worker.workerId",
        env: "ID",
        flag: Some("--worker-id"),
        kind: TEXT,
        help: "Worker id (default: generated once and kept in the state directory)",
        set: |c, v| c.worker.worker_id = Some(v),
    },
    Port {
        key: "worker.port",
        env: "PORT",
        flag: Some("--port"),
        kind: PORT,
        help: "HTTP port for metrics and health",
        set: |c, v| c.worker.port = Some(v),
    },
    HttpBindAddress {
        key: "worker.httpBindAddress",
        env: "HTTP_BIND_ADDRESS",
        flag: Some("--http-bind-address"),
        kind: IP_ADDR,
        help: "Address the HTTP port listens on (default 0.0.0.0: every IPv4 address)",
        set: |c, v| c.worker.http_bind_address = Some(v.to_string()),
    },
    Tags {
        key: "worker.tags",
        env: "TAGS",
        flag: None,
        kind: LIST,
        help: "Labels sent in the registration, comma-separated",
        set: |c, v| c.worker.tags = Some(v),
    },
    Priority {
        key: "worker.priority",
        env: "PRIORITY",
        flag: None,
        kind: PRIORITY,
        help: "Priority sent in the registration, 0 to 100",
        set: |c, v| c.worker.priority = Some(v),
    },
    StateDir {
        key: "worker.stateDir",
        env: "STATE_DIR",
        flag: None,
        kind: PATH,
        help: "Directory keeping the generated worker id",
        set: |c, v| c.worker.state_dir = Some(v),
    },
    ModelDir {
        key: "worker.modelDir",
        env: "MODEL_DIR",
        flag: Some("--model-dir"),
        kind: PATHS,
        help: "Directories scanned for models, `:`-separated, in order: the first to have a \
               model id serves it",
        set: |c, v| c.worker.model_dir = Some(RawModelDirs::Text(v)),
    },
    Preload {
        key: "worker.preWarming.models",
        env: "PRELOAD",
        flag: Some("--preload"),
        kind: LIST,
        help: "Models to load at start, comma-separated",
        set: |c, v| {
            c.worker.pre_warming.enabled = Some(true);
            c.worker.pre_warming.models = Some(v.into_iter().map(RawPreWarmModel::Id).collect());
        },
    },
    MaxConcurrent {
        key: "worker.maxConcurrent",
        env: "MAX_CONCURRENT",
        flag: Some("--max-concurrent"),
        kind: COUNT,
        help: "Requests run at once",
        set: |c, v| c.worker.max_concurrent = Some(v),
    },
    QueueDepth {
        key: "worker.requestQueue.maxDepth",
        env: "QUEUE_DEPTH",
        flag: Some("--queue-depth"),
        kind: COUNT,
        help: "Requests waiting at most",
        set: |c, v| c.worker.request_queue.max_depth = Some(v),
    },
    RequestTimeoutMs {
        key: "worker.requestTimeoutMs",
        env: "REQUEST_TIMEOUT_MS",
        flag: None,
        kind: MILLIS,
        help: "Deadline of a request from receipt, milliseconds",
        set: |c, v| c.worker.request_timeout_ms = Some(v),
    },
    DrainTimeoutMs {
        key: "worker.drainTimeoutMs",
        env: "DRAIN_TIMEOUT_MS",
        flag: None,
        kind: MILLIS,
        help: "Time a drain gives running and queued requests, milliseconds",
        set: |c, v| c.worker.drain_timeout_ms = Some(v),
    },
    ModelSubjectsMode {
        key: "modelSubjects.mode",
        env: "MODEL_SUBJECTS",
        flag: Some("--model-subjects"),
        kind: MODEL_SUBJECTS_MODE,
        help: "How requests to inference.{model} arrive: queue-group (core NATS) or jetstream \
               (a work-queue stream, pulled by free capacity)",
        set: |c, v| c.model_subjects.mode = Some(v),
    },
    ModelSubjectsAckWaitMs {
        key: "modelSubjects.ackWaitMs",
        env: "MODEL_SUBJECTS_ACK_WAIT_MS",
        flag: None,
        kind: MILLIS,
        help: "jetstream: how long a pulled request not yet started stays with a worker before \
               another may take it, milliseconds",
        set: |c, v| c.model_subjects.ack_wait_ms = Some(v),
    },
    ModelSubjectsReplicas {
        key: "modelSubjects.replicas",
        env: "MODEL_SUBJECTS_REPLICAS",
        flag: None,
        kind: COUNT,
        help: "jetstream: copies of the work-queue stream a cluster keeps (1 to 5)",
        set: |c, v| c.model_subjects.replicas = Some(v),
    },
    KeepAliveMs {
        key: "worker.keepAliveMs",
        env: "KEEP_ALIVE_MS",
        flag: Some("--keep-alive-ms"),
        kind: MILLIS,
        help: "How long a model may go unused before it is unloaded, milliseconds (0: never)",
        set: |c, v| c.worker.keep_alive_ms = Some(v),
    },
    ModelMemoryBytes {
        key: "worker.modelMemoryBytes",
        env: "MODEL_MEMORY_BYTES",
        flag: Some("--model-memory-bytes"),
        kind: BYTES,
        help: "Bytes the loaded models' weights may take (default: the memory the hardware plan \
               makes available)",
        set: |c, v| c.worker.model_memory_bytes = Some(v),
    },
    ModelRescanMs {
        key: "worker.modelRescanMs",
        env: "MODEL_RESCAN_MS",
        flag: Some("--model-rescan-ms"),
        kind: MILLIS,
        help: "How often the model directories are scanned again, milliseconds (0: never)",
        set: |c, v| c.worker.model_rescan_ms = Some(v),
    },
    LateSubscriberMinDelayMs {
        key: "worker.lateSubscriberMinDelayMs",
        env: "LATE_SUBSCRIBER_MIN_DELAY_MS",
        flag: None,
        kind: MILLIS,
        help: "Shortest time from a request's receipt to its first response message, milliseconds",
        set: |c, v| c.worker.late_subscriber_min_delay_ms = Some(v),
    },
    HeartbeatIntervalMs {
        key: "discovery.heartbeatIntervalMs",
        env: "HEARTBEAT_INTERVAL_MS",
        flag: Some("--heartbeat-interval-ms"),
        kind: MILLIS,
        help: "Heartbeat interval, milliseconds",
        set: |c, v| c.discovery.heartbeat_interval_ms = Some(v),
    },
    Python {
        key: "runtime.pythonPath",
        env: "PYTHON",
        flag: Some("--python"),
        kind: PATH,
        help: "Python interpreter for the MLX runtime",
        set: |c, v| c.runtime.python_path = Some(v),
    },
    RuntimeDir {
        key: "runtime.runtimeDir",
        env: "RUNTIME_DIR",
        flag: Some("--runtime-dir"),
        kind: PATH,
        help: "Directory holding the mlx_runtime package",
        set: |c, v| c.runtime.runtime_dir = Some(v),
    },
    Batching {
        key: "runtime.batching",
        env: "RUNTIME_BATCHING",
        flag: Some("--batching"),
        kind: BOOL,
        help: "Decode a model's streams together (false: one stream of a model at a time)",
        set: |c, v| c.runtime.batching = Some(v),
    },
    BatchSize {
        key: "runtime.batchSize",
        env: "RUNTIME_BATCH_SIZE",
        flag: Some("--batch-size"),
        kind: COUNT,
        help: "Streams of a model decoded together, 1 to 1024 (default: the hardware \
               recommendation for the model's tier)",
        set: |c, v| c.runtime.batch_size = Some(v),
    },
    PrefillStepSize {
        key: "runtime.prefillStepSize",
        env: "RUNTIME_PREFILL_STEP_SIZE",
        flag: Some("--prefill-step-size"),
        kind: TOKENS,
        help: "Prompt tokens of one prefill step, 16 to 8192",
        set: |c, v| c.runtime.prefill_step_size = Some(v),
    },
    WarmUp {
        key: "runtime.warmUp",
        env: "RUNTIME_WARM_UP",
        flag: Some("--warm-up"),
        kind: BOOL,
        help: "Run a few generations as part of each model load, so the first requests do not \
               wait for kernel compilation (false: loads answer sooner)",
        set: |c, v| c.runtime.warm_up = Some(v),
    },
    PrefixCache {
        key: "runtime.prefixCache",
        env: "RUNTIME_PREFIX_CACHE",
        flag: Some("--prefix-cache"),
        kind: BOOL,
        help: "Keep each model's prompt KV caches, so a prompt extending an earlier one is \
               prefilled only past it (false: every prompt prefilled whole)",
        set: |c, v| c.runtime.prefix_cache = Some(v),
    },
    PrefixCacheBytes {
        key: "runtime.prefixCacheBytes",
        env: "RUNTIME_PREFIX_CACHE_BYTES",
        flag: Some("--prefix-cache-bytes"),
        kind: BYTES,
        help: "Bytes each model's prefix cache may hold (default: a tenth of the host's memory, \
               64 MiB to 8 GiB)",
        set: |c, v| c.runtime.prefix_cache_bytes = Some(v),
    },
    SessionTtlMs {
        key: "runtime.sessionTtlMs",
        env: "RUNTIME_SESSION_TTL_MS",
        flag: Some("--session-ttl-ms"),
        kind: MILLIS,
        help: "Time a session's prefix cache entry is kept from eviction by other traffic, \
               milliseconds",
        set: |c, v| c.runtime.session_ttl_ms = Some(v),
    },
    LogLevel {
        key: "logging.level",
        env: "LOG_LEVEL",
        flag: Some("--log-level"),
        kind: TEXT,
        help: "Log level or filter (RUST_LOG wins when set)",
        set: |c, v| c.logging.level = Some(v),
    },
    LogFormat {
        key: "logging.format",
        env: "LOG_FORMAT",
        flag: Some("--log-format"),
        kind: LOG_FORMAT,
        help: "Log format: text or json",
        set: |c, v| c.logging.format = Some(v),
    },
}

#[cfg(test)]
mod tests;
