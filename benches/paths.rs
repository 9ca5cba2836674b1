//! The worker's hot pure paths, each on its own, with no I/O:
//!
//! - decoding and validating an inference request (`protocol::request::decode_request`),
//!   once for a typical request and once for a request at the prompt-size bound;
//! - recording a finished request in the metrics collector (`metrics::Collector::record`)
//!   with a full window, and reading every figure back (`Collector::snapshot`, which sorts the
//!   window for the percentiles);
//! - the admission decision (`scheduler::Scheduler::admit`, then `finish`) when the request
//!   starts at once, and when it is refused because the queue is full.
//!
//! The per-token path (encode, publish) is in `benches/token.rs`; the whole worker under load
//! is `benches/load/`.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Duration;

use tokio::time::Instant;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use mlx_worker::limits::{METRICS_WINDOW_REQUESTS, PROMPT_BYTES_MAX};
use mlx_worker::metrics::{Collector, Outcome, RequestRecord};
use mlx_worker::plan::{ModelTier, SchedulerLimits, TierLimit};
use mlx_worker::protocol::Priority;
use mlx_worker::protocol::request::{RequestLimits, decode_request};
use mlx_worker::scheduler::{Admission, Scheduler};

fn request_json(prompt: &str) -> Vec<u8> {
    serde_json::json!({
        "requestId": "3f1c1d52-8a0b-4b8e-9d7e-2f5d0c1b6a90",
        "modelId": "mlx-community/Llama-3.2-3B-Instruct-4bit",
        "prompt": prompt,
        "maxTokens": 256,
        "temperature": 0.7,
        "topP": 0.9,
        "priority": "medium",
        "timeoutMs": 30000
    })
    .to_string()
    .into_bytes()
}

fn decode(c: &mut Criterion) {
    let limits = RequestLimits::default();
    let typical = request_json("Explain the difference between a mutex and a semaphore.");
    // The largest prompt a request may carry that still fits one NATS message.
    let big_prompt = "x".repeat(PROMPT_BYTES_MAX.min(limits.payload_bytes_max - 512));
    let big = request_json(&big_prompt);
    for (name, payload) in [("typical", &typical), ("prompt at the bound", &big)] {
        assert!(
            decode_request(payload, &limits).is_ok(),
            "the bench input must be a valid request"
        );
        c.bench_function(&format!("decode request ({name})"), |b| {
            b.iter(|| decode_request(black_box(payload), &limits))
        });
    }
}

fn record(i: u64, now: Instant) -> RequestRecord {
    RequestRecord {
        model: format!("model-{}", i % 4),
        outcome: if i.is_multiple_of(10) {
            Outcome::Failed(mlx_worker::protocol::ErrorCode::Timeout)
        } else {
            Outcome::Success
        },
        latency: Duration::from_micros(1_000 + (i * 7_919) % 50_000),
        time_to_first_token: Some(Duration::from_micros(100 + (i * 104_729) % 5_000)),
        tokens: 64,
        finished_at: now,
    }
}

fn full_collector(now: Instant) -> Collector {
    let mut collector = Collector::default();
    for i in 0..METRICS_WINDOW_REQUESTS as u64 {
        collector.record(record(i, now));
    }
    collector
}

fn metrics(c: &mut Criterion) {
    // The clock is read once: these are figures of the collector, not of the clock.
    #[allow(clippy::disallowed_methods)] // a bench input, not the worker's time
    let now = Instant::now();
    let mut collector = full_collector(now);
    let mut i = 0u64;
    c.bench_function("metrics: record a finished request (window full)", |b| {
        b.iter_batched(
            || {
                i += 1;
                record(i, now)
            },
            |r| collector.record(black_box(r)),
            BatchSize::SmallInput,
        )
    });
    let collector = full_collector(now);
    c.bench_function(
        &format!("metrics: snapshot with percentiles ({METRICS_WINDOW_REQUESTS} requests)"),
        |b| b.iter(|| black_box(&collector).snapshot()),
    );
}

/// The model of the benched requests.
const MODEL: &str = "mlx-community/Llama-3.2-3B-Instruct-4bit";

fn limits(queue_depth: usize) -> SchedulerLimits {
    SchedulerLimits {
        inflight_max: 8,
        queue_depth_max: queue_depth,
        tiers: [ModelTier::Small, ModelTier::Medium]
            .into_iter()
            .map(|t| {
                (
                    t,
                    TierLimit {
                        max_concurrent: 8,
                        queue_depth,
                    },
                )
            })
            .collect::<BTreeMap<_, _>>(),
        models: BTreeMap::new(),
    }
}

fn admission(c: &mut Criterion) {
    let mut idle = Scheduler::new(limits(16));
    c.bench_function("admission: start at once, then finish", |b| {
        b.iter(|| {
            let decision = idle.admit(
                black_box("req-1".to_owned()),
                ModelTier::Small,
                MODEL,
                Priority::Medium,
            );
            let next = idle.finish(ModelTier::Small, MODEL);
            (decision, next)
        })
    });

    // Every slot running and the queue at its bound: the next request is refused.
    let mut full = Scheduler::new(limits(16));
    for i in 0..(8 + 16) {
        let _ = full.admit(format!("req-{i}"), ModelTier::Small, MODEL, Priority::Low);
    }
    assert!(matches!(
        full.admit("probe".to_owned(), ModelTier::Small, MODEL, Priority::High),
        Admission::Full { .. }
    ));
    c.bench_function("admission: refuse with the queue full", |b| {
        b.iter(|| {
            full.admit(
                black_box("req-x".to_owned()),
                ModelTier::Small,
                MODEL,
                Priority::High,
            )
        })
    });
}

criterion_group!(benches, decode, metrics, admission);
criterion_main!(benches);
