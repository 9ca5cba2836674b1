// Goal: the collector's figures are right on known data, its window evicts the oldest, and its
// fault ratio is windowed in time so it clears by itself.
// Method: records built by hand with explicit instants; percentiles checked against values
// computed by the nearest-rank definition.

use std::time::Duration;

use crate::clock::{Clock, SystemClock};

use super::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn record(
    at: Instant,
    model: &str,
    outcome: Outcome,
    latency_ms: u64,
    tokens: u64,
) -> RequestRecord {
    RequestRecord {
        model: model.to_owned(),
        outcome,
        latency: ms(latency_ms),
        time_to_first_token: (tokens > 0).then(|| ms(latency_ms / 10)),
        tokens,
        finished_at: at,
    }
}

#[test]
fn percentiles_on_one_to_a_hundred_follow_nearest_rank() {
    let p = Percentiles::of((1..=100).rev().map(ms).collect());
    assert_eq!(p.count, 100);
    assert_eq!(p.min, ms(1));
    assert_eq!(p.max, ms(100));
    assert_eq!(p.p50, ms(50));
    assert_eq!(p.p95, ms(95));
    assert_eq!(p.p99, ms(99));
    assert_eq!(p.avg, Duration::from_micros(50_500));
}

#[test]
fn percentiles_of_few_samples_pick_real_samples() {
    let p = Percentiles::of(vec![ms(30), ms(10), ms(20)]);
    assert_eq!((p.p50, p.p95, p.p99), (ms(20), ms(30), ms(30)));
    assert_eq!(Percentiles::of(vec![]), Percentiles::default());
    let one = Percentiles::of(vec![ms(7)]);
    assert_eq!(
        (one.min, one.p50, one.p99, one.max),
        (ms(7), ms(7), ms(7), ms(7))
    );
}

#[test]
fn the_window_keeps_the_last_requests_and_lifetime_counters_keep_all() {
    let t0 = SystemClock.now();
    let mut c = Collector::with_capacity(3);
    for (i, latency) in [100, 200, 300, 400].into_iter().enumerate() {
        c.record(record(
            t0 + ms(i as u64 * 1000),
            "m",
            Outcome::Success,
            latency,
            10,
        ));
    }
    let s = c.snapshot();
    assert_eq!(s.total, 4);
    assert_eq!(s.successes, 4);
    assert_eq!(s.tokens_total, 40);
    // The 100 ms request was evicted.
    assert_eq!(s.latency.count, 3);
    assert_eq!(s.latency.min, ms(200));
    assert_eq!(s.latency.max, ms(400));
    assert_eq!(s.models["m"].requests, 3);
}

#[test]
fn errors_are_counted_by_code_and_per_model() {
    let t0 = SystemClock.now();
    let mut c = Collector::default();
    c.record(record(t0, "a", Outcome::Success, 100, 5));
    c.record(record(t0, "a", Outcome::Failed(ErrorCode::Timeout), 900, 2));
    c.record(record(t0, "b", Outcome::Failed(ErrorCode::QueueFull), 1, 0));
    c.record(record(t0, "b", Outcome::Failed(ErrorCode::QueueFull), 1, 0));
    c.record(record(t0, "b", Outcome::Undeliverable, 50, 3));
    let s = c.snapshot();
    assert_eq!(s.total, 5);
    assert_eq!(s.successes, 1);
    assert_eq!(s.errors_by_code[&ErrorCode::QueueFull], 2);
    assert_eq!(s.errors_by_code[&ErrorCode::Timeout], 1);
    assert_eq!(s.undeliverable, 1);
    assert_eq!(
        s.models["a"],
        ModelFigures {
            requests: 2,
            errors: 1,
            avg_latency: ms(100),
            tokens: 7
        }
    );
    assert_eq!(s.models["b"].errors, 3);
    // Latency percentiles count successes only.
    assert_eq!(s.latency.count, 1);
    // Time to first token counts every request that sent a token.
    assert_eq!(s.time_to_first_token.count, 3);
}

#[test]
fn throughput_is_measured_over_the_window_span() {
    let t0 = SystemClock.now();
    let mut c = Collector::default();
    // Two requests: the first starts at t0 (1 s latency), the last ends 4 s after t0.
    c.record(record(t0 + ms(1000), "m", Outcome::Success, 1000, 100));
    c.record(record(t0 + ms(4000), "m", Outcome::Success, 1000, 300));
    let s = c.snapshot();
    assert!(
        (s.tokens_per_second - 100.0).abs() < 1e-9,
        "{}",
        s.tokens_per_second
    );
    assert!(
        (s.requests_per_second - 0.5).abs() < 1e-9,
        "{}",
        s.requests_per_second
    );
}

#[test]
fn the_fault_ratio_is_windowed_in_time_and_clears_by_itself() {
    let t0 = SystemClock.now();
    let mut c = Collector::default();
    for i in 0..4 {
        c.record(record(
            t0 + ms(i),
            "m",
            Outcome::Failed(ErrorCode::EngineCrashed),
            10,
            0,
        ));
    }
    c.record(record(t0 + ms(5), "m", Outcome::Success, 10, 1));
    // Client errors and load shedding are not faults.
    c.record(record(
        t0 + ms(6),
        "m",
        Outcome::Failed(ErrorCode::InvalidRequest),
        1,
        0,
    ));
    c.record(record(
        t0 + ms(7),
        "m",
        Outcome::Failed(ErrorCode::Cancelled),
        1,
        0,
    ));
    c.record(record(
        t0 + ms(8),
        "m",
        Outcome::Failed(ErrorCode::QueueFull),
        1,
        0,
    ));
    let period = Duration::from_secs(60);
    assert!((c.fault_ratio(t0 + ms(10), period, 5) - 0.5).abs() < 1e-9);
    // Too few samples in the period: no verdict.
    assert_eq!(c.fault_ratio(t0 + ms(10), period, 100), 0.0);
    // A minute later the faults have aged out, with no new traffic at all.
    assert_eq!(c.fault_ratio(t0 + ms(10) + period, period, 5), 0.0);
}

/// The window's figures taken afresh from its records, the way a reader would by hand.
fn figures_of(
    window: &[RequestRecord],
) -> (Percentiles, Percentiles, BTreeMap<String, ModelFigures>) {
    let latency = Percentiles::of(
        window
            .iter()
            .filter(|r| r.outcome == Outcome::Success)
            .map(|r| r.latency)
            .collect(),
    );
    let ttft = Percentiles::of(
        window
            .iter()
            .filter_map(|r| r.time_to_first_token)
            .collect(),
    );
    let mut models: BTreeMap<String, ModelFigures> = BTreeMap::new();
    for model in window.iter().map(|r| &r.model) {
        let of_model = window.iter().filter(|r| &r.model == model);
        let ok: Vec<Duration> = of_model
            .clone()
            .filter(|r| r.outcome == Outcome::Success)
            .map(|r| r.latency)
            .collect();
        let figures = ModelFigures {
            requests: of_model.clone().count(),
            errors: of_model
                .clone()
                .filter(|r| r.outcome != Outcome::Success)
                .count(),
            avg_latency: ok.iter().sum::<Duration>() / u32::try_from(ok.len().max(1)).unwrap_or(1),
            tokens: of_model.map(|r| r.tokens).sum(),
        };
        models.insert(model.clone(), figures);
    }
    (latency, ttft, models)
}

proptest::proptest! {
    /// Figures kept as requests enter and leave the window equal the figures taken afresh from
    /// the requests in it, whatever the order and however often the window turned over.
    #[test]
    fn the_window_figures_kept_on_the_way_equal_those_taken_afresh(
        capacity in 1usize..12,
        records in proptest::collection::vec((0usize..3, 0u8..4, 0u64..50, 0u64..5), 0..80),
    ) {
        let t0 = SystemClock.now();
        let mut c = Collector::with_capacity(capacity);
        let mut all = Vec::new();
        for (i, (model, outcome, latency, tokens)) in records.into_iter().enumerate() {
            let outcome = match outcome {
                0 | 1 => Outcome::Success,
                2 => Outcome::Failed(ErrorCode::Timeout),
                _ => Outcome::Undeliverable,
            };
            let at = t0 + ms(u64::try_from(i).unwrap_or(0) * 10);
            let r = record(at, ["a", "b", "c"][model], outcome, latency, tokens);
            c.record(r.clone());
            all.push(r);
            let window = &all[all.len().saturating_sub(capacity)..];
            let s = c.snapshot();
            let (latency, ttft, models) = figures_of(window);
            proptest::prop_assert_eq!(s.latency, latency);
            proptest::prop_assert_eq!(s.time_to_first_token, ttft);
            proptest::prop_assert_eq!(s.models, models);
        }
    }
}
