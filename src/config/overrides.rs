//! Single values from the environment or flags, applied to the [`RawConfig`] read from the
//! file before it is resolved, so they go through the same checks as the file's values.

use std::path::PathBuf;

use super::raw::{RawConfig, RawLogFormat, RawNatsMode, RawPreWarmModel};
use super::resolve::comma_list;
use super::{ConfigError, Override, Setting};

impl RawConfig {
    /// Applies one environment or flag override.
    pub(super) fn apply(&mut self, o: &Override) -> Result<(), ConfigError> {
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
}
