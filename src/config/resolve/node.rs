//! The worker node, from the `worker` and `discovery` sections (and the tier limits the
//! `runtime` section may carry): identity, labels, timings, admission bounds, request limits
//! and defaults.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::{bounded, invalid, millis, millis_or};
use crate::config::raw::{
    RawDefaults, RawDiscovery, RawLimits, RawModelSubjects, RawModelSubjectsMode, RawRuntime,
    RawTierLimit, RawWorker,
};
use crate::config::setting::IP_ADDR;
use crate::config::{
    ConfigError, DEFAULT_DEGRADED_ERROR_RATIO, DEFAULT_DRAIN_TIMEOUT, DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_HTTP_BIND_ADDRESS, DEFAULT_KEEP_ALIVE, DEFAULT_LATE_SUBSCRIBER_WAIT,
    DEFAULT_MAX_TOKENS, DEFAULT_MODEL_RESCAN, DEFAULT_PORT, DEFAULT_PRIORITY, DEFAULT_QUEUE_DEPTH,
    DEFAULT_REQUEST_TIMEOUT, DEFAULT_REREGISTER_EVERY_HEARTBEATS, DEFAULT_STATE_DIR,
    DEFAULT_TEMPERATURE, DEFAULT_TOP_P, DEFAULT_WORK_QUEUE_ACK_WAIT, DEFAULT_WORK_QUEUE_BYTES,
    DEFAULT_WORK_QUEUE_MAX_DELIVER, DEFAULT_WORK_QUEUE_MESSAGES, DEFAULT_WORK_QUEUE_STREAM,
    DEFAULT_WORK_QUEUE_SUBJECT, GenerationDefaults, ModelSubjects, NodeConfig, WorkQueueConfig,
};
use crate::limits::{
    DRAIN_TIMEOUT_MAX, HEARTBEAT_INTERVAL_MIN, INFLIGHT_REQUESTS_MAX, KEEP_ALIVE_MAX,
    LATE_SUBSCRIBER_MIN_DELAY_MAX, LATE_SUBSCRIBER_WAIT_MAX, MAX_TOKENS_MAX,
    MODEL_MEMORY_BYTES_MAX, MODEL_RESCAN_MAX, NATS_PAYLOAD_BYTES_MAX, PROMPT_BYTES_MAX,
    QUEUE_DEPTH_MAX, REQUEST_TIMEOUT_MAX, TAG_BYTES_MAX, TAGS_MAX, WORK_QUEUE_BYTES_MAX,
    WORK_QUEUE_MESSAGES_MAX,
};
use crate::plan::{ModelTier, TierLimit, UnknownTier};
use crate::protocol::request::RequestLimits;
use crate::protocol::subject::check_token;

pub(super) fn resolve_node(
    w: &RawWorker,
    d: &RawDiscovery,
    r: &RawRuntime,
    m: &RawModelSubjects,
) -> Result<NodeConfig, ConfigError> {
    if let Some(id) = &w.worker_id {
        check_token(id).map_err(|e| invalid("worker.workerId", format!("{id:?} {e}")))?;
    }
    let tags = tags(w)?;
    let priority = priority(w)?;
    let tier_limits = tiers(w, r)?;
    let request_limits = request_limits(&w.limits)?;
    let generation_defaults = generation_defaults(&w.defaults, &request_limits)?;
    let degraded_error_ratio = degraded_error_ratio(w)?;
    let reregister_every = reregister_every(w)?;
    let request_timeout = millis_or(
        "worker.requestTimeoutMs",
        w.request_timeout_ms,
        DEFAULT_REQUEST_TIMEOUT,
        Duration::from_millis(1),
        REQUEST_TIMEOUT_MAX,
    )?;
    let model_subjects = model_subjects(m, request_timeout)?;
    Ok(NodeConfig {
        worker_id: w.worker_id.clone(),
        state_dir: w
            .state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
        port: w.port.unwrap_or(DEFAULT_PORT),
        http_bind_address: http_bind_address(w)?,
        tags,
        priority,
        heartbeat_interval: heartbeat_interval(d)?,
        reregister_every,
        request_timeout,
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
        late_subscriber_min_delay: millis_or(
            "worker.lateSubscriberMinDelayMs",
            w.late_subscriber_min_delay_ms,
            Duration::ZERO,
            Duration::ZERO,
            LATE_SUBSCRIBER_MIN_DELAY_MAX,
        )?,
        model_rescan: Some(millis_or(
            "worker.modelRescanMs",
            w.model_rescan_ms,
            DEFAULT_MODEL_RESCAN,
            Duration::ZERO,
            MODEL_RESCAN_MAX,
        )?)
        .filter(|d| !d.is_zero()),
        keep_alive: Some(millis_or(
            "worker.keepAliveMs",
            w.keep_alive_ms,
            DEFAULT_KEEP_ALIVE,
            Duration::ZERO,
            KEEP_ALIVE_MAX,
        )?)
        .filter(|d| !d.is_zero()),
        model_memory_bytes: w
            .model_memory_bytes
            .map(|n| bounded("worker.modelMemoryBytes", n, 1, MODEL_MEMORY_BYTES_MAX))
            .transpose()?,
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
        tier_limits,
        request_limits,
        generation_defaults,
        degraded_error_ratio,
        model_subjects,
    })
}

/// The model subjects' mode and, for `jetstream`, its stream and consumers.
fn model_subjects(
    m: &RawModelSubjects,
    request_timeout: Duration,
) -> Result<ModelSubjects, ConfigError> {
    if m.mode != Some(RawModelSubjectsMode::Jetstream) {
        // A work-queue setting would have no effect: say so rather than ignore it.
        let set = [
            ("stream", m.stream.is_some()),
            ("subjects", m.subjects.is_some()),
            ("replicas", m.replicas.is_some()),
            ("maxMessages", m.max_messages.is_some()),
            ("maxBytes", m.max_bytes.is_some()),
            ("maxAgeMs", m.max_age_ms.is_some()),
            ("ackWaitMs", m.ack_wait_ms.is_some()),
            ("maxDeliver", m.max_deliver.is_some()),
        ];
        if let Some((key, _)) = set.iter().find(|(_, set)| *set) {
            return Err(invalid(
                &format!("modelSubjects.{key}"),
                "is a setting of the work queue, which only modelSubjects.mode: jetstream uses",
            ));
        }
        return Ok(ModelSubjects::QueueGroup);
    }
    let stream = m
        .stream
        .clone()
        .unwrap_or_else(|| DEFAULT_WORK_QUEUE_STREAM.to_owned());
    if stream.is_empty()
        || stream.len() > 64
        || !stream
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(invalid(
            "modelSubjects.stream",
            format!("{stream:?} must be 1 to 64 letters, digits, '-' or '_'"),
        ));
    }
    let subjects = m
        .subjects
        .clone()
        .unwrap_or_else(|| vec![DEFAULT_WORK_QUEUE_SUBJECT.to_owned()]);
    if subjects.is_empty() || subjects.len() > 16 {
        return Err(invalid(
            "modelSubjects.subjects",
            format!("has {} subjects, must have 1 to 16", subjects.len()),
        ));
    }
    for subject in &subjects {
        if !subject.starts_with("inference.")
            || subject.split('.').any(str::is_empty)
            || subject.contains(char::is_whitespace)
        {
            return Err(invalid(
                "modelSubjects.subjects",
                format!("{subject:?} is not a subject under inference."),
            ));
        }
    }
    let max_age_default = request_timeout + Duration::from_secs(60);
    Ok(ModelSubjects::JetStream(WorkQueueConfig {
        stream,
        subjects,
        replicas: bounded("modelSubjects.replicas", m.replicas.unwrap_or(1), 1, 5)?,
        max_messages: bounded(
            "modelSubjects.maxMessages",
            m.max_messages.unwrap_or(DEFAULT_WORK_QUEUE_MESSAGES),
            1,
            WORK_QUEUE_MESSAGES_MAX,
        )?,
        max_bytes: bounded(
            "modelSubjects.maxBytes",
            m.max_bytes.unwrap_or(DEFAULT_WORK_QUEUE_BYTES),
            1 << 20,
            WORK_QUEUE_BYTES_MAX,
        )?,
        max_age: millis_or(
            "modelSubjects.maxAgeMs",
            m.max_age_ms,
            max_age_default,
            Duration::from_secs(1),
            REQUEST_TIMEOUT_MAX + Duration::from_secs(60),
        )?,
        ack_wait: millis_or(
            "modelSubjects.ackWaitMs",
            m.ack_wait_ms,
            DEFAULT_WORK_QUEUE_ACK_WAIT,
            Duration::from_millis(500),
            Duration::from_secs(600),
        )?,
        max_deliver: bounded(
            "modelSubjects.maxDeliver",
            m.max_deliver.unwrap_or(DEFAULT_WORK_QUEUE_MAX_DELIVER),
            1,
            100,
        )?,
    }))
}

/// The address the HTTP port listens on, read as the environment's and the flags' are.
fn http_bind_address(w: &RawWorker) -> Result<IpAddr, ConfigError> {
    w.http_bind_address
        .as_deref()
        .map_or(Ok(DEFAULT_HTTP_BIND_ADDRESS), |text| {
            IP_ADDR
                .read(text)
                .map_err(|reason| invalid("worker.httpBindAddress", reason))
        })
}

/// The operator's labels: at most [`TAGS_MAX`], each 1 to [`TAG_BYTES_MAX`] bytes.
fn tags(w: &RawWorker) -> Result<Vec<String>, ConfigError> {
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
    Ok(tags)
}

fn priority(w: &RawWorker) -> Result<u8, ConfigError> {
    let priority = w.priority.unwrap_or(DEFAULT_PRIORITY);
    if priority > 100 {
        return Err(invalid(
            "worker.priority",
            format!("is {priority}, must be between 0 and 100"),
        ));
    }
    Ok(priority)
}

fn heartbeat_interval(d: &RawDiscovery) -> Result<Duration, ConfigError> {
    match d.heartbeat_interval_ms {
        // The existing controller treats 0 as "use the default".
        None | Some(0) => Ok(DEFAULT_HEARTBEAT_INTERVAL),
        Some(ms) => millis(
            "discovery.heartbeatIntervalMs",
            ms,
            HEARTBEAT_INTERVAL_MIN,
            Duration::from_secs(3600),
        ),
    }
}

/// Per-tier limits: the existing runtime's `modelConcurrencyLimiter` first (unless disabled),
/// then `worker.tierLimits`, which wins for a tier both name.
fn tiers(w: &RawWorker, r: &RawRuntime) -> Result<BTreeMap<ModelTier, TierLimit>, ConfigError> {
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
    Ok(tiers)
}

fn tier_limits(
    key: &str,
    map: &BTreeMap<String, RawTierLimit>,
    out: &mut BTreeMap<ModelTier, TierLimit>,
) -> Result<(), ConfigError> {
    for (name, raw) in map {
        let tier: ModelTier = name
            .parse()
            .map_err(|e: UnknownTier| invalid(key, e.to_string()))?;
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

/// Bounds on inbound requests; the configuration may lower the hard limits, never raise them.
fn request_limits(limits: &RawLimits) -> Result<RequestLimits, ConfigError> {
    Ok(RequestLimits {
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
    })
}

/// Sampling defaults, each within what a request itself could ask for.
fn generation_defaults(
    d: &RawDefaults,
    limits: &RequestLimits,
) -> Result<GenerationDefaults, ConfigError> {
    let defaults = GenerationDefaults {
        max_tokens: d.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        temperature: d.temperature.unwrap_or(DEFAULT_TEMPERATURE),
        top_p: d.top_p.unwrap_or(DEFAULT_TOP_P),
    };
    if !(1..=limits.max_tokens_max).contains(&defaults.max_tokens) {
        return Err(invalid(
            "worker.defaults.maxTokens",
            format!(
                "is {}, must be between 1 and {}",
                defaults.max_tokens, limits.max_tokens_max
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
    Ok(defaults)
}

fn degraded_error_ratio(w: &RawWorker) -> Result<f64, ConfigError> {
    let ratio = w
        .degraded_error_ratio
        .unwrap_or(DEFAULT_DEGRADED_ERROR_RATIO);
    if !(ratio > 0.0 && ratio <= 1.0) {
        return Err(invalid(
            "worker.degradedErrorRatio",
            format!("is {ratio}, must be greater than 0 and at most 1"),
        ));
    }
    Ok(ratio)
}

fn reregister_every(w: &RawWorker) -> Result<u32, ConfigError> {
    let every = w
        .reregister_every_heartbeats
        .unwrap_or(DEFAULT_REREGISTER_EVERY_HEARTBEATS);
    if every == 0 {
        return Err(invalid(
            "worker.reregisterEveryHeartbeats",
            "is 0, must be at least 1",
        ));
    }
    Ok(every)
}
