//! The Prometheus text exposition (format 0.0.4) of the worker's figures. Pure: it renders a
//! [`MetricsView`] gathered by the worker through `prometheus-client`'s encoder, which names,
//! escapes and formats every sample; names carry their unit (`_seconds`, `_total`).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet, prometheus_text,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use std::collections::BTreeMap;

use super::models::ModelLoad;
use super::telemetry::HistogramReading;
use super::{Outcome, Snapshot};

/// The `Content-Type` of [`render`]'s text: the Prometheus text format, version 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// The prefix of every metric name.
const PREFIX: &str = "mlx_worker";

/// Everything `/metrics` shows, read at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MetricsView {
    /// The worker id (a label of `mlx_worker_info`).
    pub worker_id: String,
    /// The crate version.
    pub version: String,
    /// The lifecycle state's name.
    pub lifecycle: String,
    /// Whether the worker takes work.
    pub ready: bool,
    /// The collector's reading.
    pub snapshot: Snapshot,
    /// Requests running.
    pub running: usize,
    /// Requests waiting.
    pub queued: usize,
    /// Bound of the queue.
    pub queue_capacity: usize,
    /// Requests that may run at once.
    pub inflight_capacity: usize,
    /// Inbound messages dropped because their request id was unreadable.
    pub unreadable: u64,
    /// Duplicates of in-flight request ids.
    pub duplicates: u64,
    /// Unreadable cancel messages.
    pub bad_cancels: u64,
    /// Work-queue messages handed back for want of a free slot.
    pub handed_back: u64,
    /// Reconnects to the message server.
    pub reconnects: u64,
    /// Heartbeats published.
    pub heartbeats_sent: u64,
    /// Registrations published.
    pub registrations_sent: u64,
    /// Registrations and heartbeats for this worker's id published by another process.
    pub id_conflicts: u64,
    /// Engine restarts.
    pub engine_restarts: u64,
    /// Receipt to terminal.
    pub request_duration: HistogramReading,
    /// Receipt to first token.
    pub time_to_first_token: HistogramReading,
    /// Between consecutive tokens.
    pub inter_token: HistogramReading,
    /// Batching figures by model id.
    pub models: BTreeMap<String, ModelLoad>,
    /// Models unloaded: (model, reason, times).
    pub model_unloads: Vec<(String, &'static str, u64)>,
}

fn outcome_label(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Success => "success",
        Outcome::Failed(_) => "error",
        Outcome::Undeliverable => "undeliverable",
    }
}

/// Renders the view.
pub fn render(v: &MetricsView) -> String {
    let mut registry = Registry::with_prefix(PREFIX);
    registry.register_collector(Box::new(Exposition(v.clone())));
    let mut out = String::with_capacity(8 * 1024);
    prometheus_text::encode(&mut out, &registry)
        .expect("encoding into a String fails only on a write error, and a String has none");
    out
}

/// The view as the encoder reads it: one descriptor per metric, in a fixed order.
#[derive(Debug)]
struct Exposition(MetricsView);

impl Collector for Exposition {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let v = &self.0;
        encode_outcomes(v, &mut encoder)?;
        encode_load(v, &mut encoder)?;
        encode_presence(v, &mut encoder)?;
        encode_latencies(v, &mut encoder)?;
        encode_models(v, &mut encoder)
    }
}

/// Identity, readiness, and how requests ended.
fn encode_outcomes(v: &MetricsView, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    let identity = [
        ("worker_id", v.worker_id.as_str()),
        ("version", v.version.as_str()),
        ("lifecycle", v.lifecycle.as_str()),
    ];
    family(
        e,
        "info",
        "Worker identity (always 1).",
        [(identity, ConstGauge::new(1u32))],
    )?;
    single(
        e,
        "ready",
        "1 when the worker takes work.",
        ConstGauge::new(u32::from(v.ready)),
    )?;
    let mut by_label: std::collections::BTreeMap<(&str, &str), u64> = Default::default();
    for ((model, outcome), n) in &v.snapshot.by_model_outcome {
        *by_label
            .entry((model, outcome_label(*outcome)))
            .or_default() += n;
    }
    family(
        e,
        "requests",
        "Requests finished, by model and outcome.",
        by_label.into_iter().map(|((model, outcome), n)| {
            (
                [("model", model), ("outcome", outcome)],
                ConstCounter::new(n),
            )
        }),
    )?;
    family(
        e,
        "errors",
        "Requests that ended with an error, by code.",
        v.snapshot
            .errors_by_code
            .iter()
            .map(|(code, n)| ([("code", code.as_str())], ConstCounter::new(*n))),
    )?;
    let counter = ConstCounter::new;
    single(
        e,
        "undeliverable",
        "Requests whose terminal message could not be delivered.",
        counter(v.snapshot.undeliverable),
    )?;
    single(
        e,
        "tokens_generated",
        "Tokens sent to clients.",
        counter(v.snapshot.tokens_total),
    )?;
    Ok(())
}

/// What runs and waits now, and what intake turned away.
fn encode_load(v: &MetricsView, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    let counter = ConstCounter::new;
    let gauge = ConstGauge::new;
    single(
        e,
        "requests_in_flight",
        "Requests running now.",
        gauge(v.running),
    )?;
    single(
        e,
        "queue_depth",
        "Requests waiting for a slot.",
        gauge(v.queued),
    )?;
    single(
        e,
        "queue_capacity",
        "Requests that may wait.",
        gauge(v.queue_capacity),
    )?;
    single(
        e,
        "inflight_capacity",
        "Requests that may run at once.",
        gauge(v.inflight_capacity),
    )?;
    family(
        e,
        "intake_rejected",
        "Inbound messages that never became requests, by reason.",
        [
            ("unreadable", v.unreadable),
            ("duplicate", v.duplicates),
            ("bad_cancel", v.bad_cancels),
        ]
        .map(|(reason, n)| ([("reason", reason)], counter(n))),
    )?;
    Ok(())
}

/// The link to the message server, announcements and engine restarts.
fn encode_presence(v: &MetricsView, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    let counter = ConstCounter::new;
    single(
        e,
        "reconnects",
        "Reconnects to the message server.",
        counter(v.reconnects),
    )?;
    single(
        e,
        "heartbeats_sent",
        "Heartbeats published.",
        counter(v.heartbeats_sent),
    )?;
    single(
        e,
        "registrations_sent",
        "Registrations published.",
        counter(v.registrations_sent),
    )?;
    single(
        e,
        "id_conflicts",
        "Registrations and heartbeats for this worker's id that another process published.",
        counter(v.id_conflicts),
    )?;
    single(
        e,
        "engine_restarts",
        "Times the engine restarted after a failure.",
        counter(v.engine_restarts),
    )?;
    single(
        e,
        "work_queue_handed_back",
        "Work-queue requests handed back to the queue because no slot was free when they came.",
        counter(v.handed_back),
    )?;
    Ok(())
}

/// The latency histograms.
fn encode_latencies(v: &MetricsView, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    single(
        e,
        "request_duration_seconds",
        "Receipt of a request to its terminal message.",
        Histogram(&v.request_duration),
    )?;
    single(
        e,
        "time_to_first_token_seconds",
        "Receipt of a request to its first token.",
        Histogram(&v.time_to_first_token),
    )?;
    single(
        e,
        "inter_token_seconds",
        "Time between two tokens of one stream.",
        Histogram(&v.inter_token),
    )
}

/// The batching figures of each model: gauges of what runs and waits now, and the engine's
/// counters, from which a scraper takes rates (`rate(…_total[1m])`).
fn encode_models(v: &MetricsView, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    let gauge = ConstGauge::new;
    let counter = ConstCounter::new;
    family(
        e,
        "model_unloads",
        "Models unloaded, by reason: idle (past worker.keepAliveMs) or evicted (to fit another \
         model within worker.modelMemoryBytes).",
        v.model_unloads
            .iter()
            .map(|(m, r, n)| ([("model", m.as_str()), ("reason", *r)], counter(*n))),
    )?;
    family(
        e,
        "model_requests_running",
        "Requests of the model the worker started (handed to the engine).",
        by_model(v, |m| gauge(m.running)),
    )?;
    family(
        e,
        "model_requests_queued",
        "Requests of the model waiting in the worker's queue.",
        by_model(v, |m| gauge(m.queued)),
    )?;
    family(
        e,
        "model_batch_size",
        "Streams of the model the engine decodes together (0: not loaded).",
        by_model(v, |m| gauge(m.engine.batch_size)),
    )?;
    family(
        e,
        "model_batch_occupancy",
        "Share of the model's batch its running requests fill, 0 to 1 (0: not loaded).",
        by_model(v, |m| ConstGauge::new(m.occupancy())),
    )?;
    family(
        e,
        "model_prompt_tokens",
        "Prompt tokens of the model's completed streams; its rate() is the prompt tokens/s.",
        by_model(v, |m| counter(m.engine.prompt_tokens)),
    )?;
    family(
        e,
        "model_prompt_seconds",
        "Prefill time of the model's completed streams; its rate() over the rate() of \
         mlx_worker_model_streams_completed_total is the mean prefill time.",
        by_model(v, |m| ConstCounter::new(m.engine.prompt_seconds)),
    )?;
    family(
        e,
        "model_generated_tokens",
        "Tokens the model's completed streams generated; its rate() is the generation tokens/s.",
        by_model(v, |m| counter(m.engine.generated_tokens)),
    )?;
    family(
        e,
        "model_decode_seconds",
        "Decode time (total less prefill) of the model's completed streams; the rate() of \
         mlx_worker_model_generated_tokens_total over its rate() is a stream's decode tokens/s.",
        by_model(v, |m| ConstCounter::new(m.engine.decode_seconds)),
    )?;
    family(
        e,
        "model_streams_completed",
        "Streams of the model the engine completed.",
        by_model(v, |m| counter(m.engine.streams_completed)),
    )?;
    encode_prefix_caches(v, e)
}

/// Each model's prefix cache: the prompt tokens it held, its share of all prompt tokens, and
/// what it holds and evicted.
fn encode_prefix_caches(v: &MetricsView, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    family(
        e,
        "model_cached_tokens",
        "Prompt tokens of the model's completed streams found in its prefix cache (not \
         prefilled); its rate() over that of mlx_worker_model_prompt_tokens_total is the hit \
         ratio.",
        by_model(v, |m| ConstCounter::new(m.engine.cached_tokens)),
    )?;
    family(
        e,
        "model_prefix_cache_hit_ratio",
        "Share of the model's prompt tokens found in its prefix cache since start, 0 to 1.",
        by_model(v, |m| ConstGauge::new(m.cache_hit_ratio())),
    )?;
    family(
        e,
        "model_prefix_cache_bytes",
        "Bytes the model's prefix cache holds, as the runtime last said.",
        by_model(v, |m| ConstGauge::new(m.engine.cache.bytes)),
    )?;
    family(
        e,
        "model_prefix_cache_entries",
        "Entries of the model's prefix cache, as the runtime last said.",
        by_model(v, |m| ConstGauge::new(m.engine.cache.entries)),
    )?;
    family(
        e,
        "model_prefix_cache_evictions",
        "Entries the model's prefix cache evicted for room since the model was loaded.",
        by_model(v, |m| ConstCounter::new(m.engine.cache.evictions)),
    )
}

/// One sample per model, labelled with its id.
fn by_model<'a, M>(
    v: &'a MetricsView,
    sample: impl Fn(&ModelLoad) -> M + 'a,
) -> impl Iterator<Item = ([(&'static str, &'a str); 1], M)> + 'a {
    v.models
        .iter()
        .map(move |(model, load)| ([("model", model.as_str())], sample(load)))
}

/// One metric without labels.
fn single(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: impl EncodeMetric,
) -> Result<(), std::fmt::Error> {
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

/// One metric with a sample per label set; its `HELP` and `TYPE` lines are written even when
/// it has no samples yet, so the metric is always known to a scraper.
fn family<L: EncodeLabelSet, M: EncodeMetric + TypedMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, M)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, M::TYPE)?;
    for (labels, sample) in samples {
        sample.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A histogram reading as the encoder wants it.
struct Histogram<'a>(&'a HistogramReading);

impl EncodeMetric for Histogram<'_> {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let h = self.0;
        // The reading is cumulative; the encoder takes each bucket's own count.
        let mut below = 0;
        let buckets: Vec<(f64, u64)> = h
            .buckets
            .iter()
            .map(|&(bound, cumulative)| {
                let own = cumulative.saturating_sub(below);
                below = cumulative;
                (bound, own)
            })
            .collect();
        encoder.encode_histogram::<NoLabelSet>(h.sum, h.count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::super::telemetry::{Histogram, LATENCY_BUCKETS};
    use super::*;
    use crate::protocol::ErrorCode;

    #[test]
    fn the_exposition_is_pinned() {
        let h = Histogram::new(&LATENCY_BUCKETS);
        h.observe(Duration::from_millis(7));
        h.observe(Duration::from_millis(300));
        h.observe(Duration::from_secs(60));
        let view = MetricsView {
            worker_id: "w-1".to_owned(),
            version: "0.1.0".to_owned(),
            lifecycle: "ready".to_owned(),
            ready: true,
            snapshot: Snapshot {
                errors_by_code: BTreeMap::from([(ErrorCode::QueueFull, 2)]),
                tokens_total: 40,
                by_model_outcome: BTreeMap::from([
                    (("org/m\"x".to_owned(), Outcome::Success), 3),
                    (
                        ("org/m\"x".to_owned(), Outcome::Failed(ErrorCode::QueueFull)),
                        2,
                    ),
                ]),
                ..Snapshot::default()
            },
            running: 1,
            queue_capacity: 100,
            inflight_capacity: 8,
            request_duration: h.read(),
            models: BTreeMap::from([(
                "org/m\"x".to_owned(),
                ModelLoad {
                    running: 3,
                    queued: 2,
                    engine: crate::engine::ModelFigures {
                        batch_size: 4,
                        prompt_tokens: 120,
                        prompt_seconds: 0.75,
                        generated_tokens: 40,
                        decode_seconds: 2.5,
                        streams_completed: 5,
                        cached_tokens: 90,
                        cache: crate::engine::CacheState {
                            bytes: 4_194_304,
                            entries: 3,
                            evictions: 1,
                        },
                    },
                },
            )]),
            ..MetricsView::default()
        };
        insta::assert_snapshot!(render(&view));
    }
}
