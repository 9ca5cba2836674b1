//! The bench's parts, each a figure against the floor measured beside it in the same run,
//! and the statistics that sum them up. The traffic itself is `harness`'s.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use mlx_worker::clock::SystemClock;
use mlx_worker::engine::Engine;
use mlx_worker::engine::mlx::MlxEngine;
use mlx_worker::limits::MAX_TOKENS_MAX;
use mlx_worker::metrics::Percentiles;
use mlx_worker::plan::recommendation::BatchSizes;
use serde_json::json;

use crate::harness::{
    PACE, RawEcho, SIM_MODEL, TINY_MODEL, client, engine_stream, engine_tokens, first_token,
    raw_tokens, repo, rss_kib, sim_engine, start_worker, stream_client, worker_stream,
    worker_tokens,
};

/// The `p`-th percentile (nearest rank) of `samples`.
pub(crate) fn percentile<T: Copy + PartialOrd>(samples: &mut [T], p: usize) -> T {
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let i = (samples.len() * p).div_ceil(100).clamp(1, samples.len()) - 1;
    samples[i]
}

/// The p50 and p99, in µs, of how much longer `a` took than `b`, round by round: `a[i]` and
/// `b[i]` were measured in the same round, and the percentiles are those of the differences
/// (negative where `b` was the slower), never a difference of two percentiles.
pub(crate) fn overhead_percentiles(a: &[Duration], b: &[Duration]) -> (f64, f64) {
    assert_eq!(a.len(), b.len(), "paired samples come one per round");
    let mut differences: Vec<f64> = a
        .iter()
        .zip(b)
        .map(|(a, b)| (a.as_secs_f64() - b.as_secs_f64()) * 1e6)
        .collect();
    (
        percentile(&mut differences, 50),
        percentile(&mut differences, 99),
    )
}

/// Checks [`overhead_percentiles`] on rounds whose floor has a heavy tail that the other side
/// does not share: every round costs 200 µs more than its floor but five, whose floor was
/// slow, so the p50 and p99 of the overhead are both 200 µs.
pub(crate) fn check_overhead_percentiles() {
    let us = Duration::from_micros;
    let floor: Vec<Duration> = (0..100)
        .map(|i| us(if i % 20 == 0 { 1000 } else { 100 }))
        .collect();
    let worker = vec![us(300); 100];
    let (p50, p99) = overhead_percentiles(&worker, &floor);
    assert!(
        (p50 - 200.0).abs() < 1e-6 && (p99 - 200.0).abs() < 1e-6,
        "overhead p50 {p50:.0} µs, p99 {p99:.0} µs; expected 200 and 200"
    );
}

/// The median of `samples`.
pub(crate) fn median(mut samples: Vec<Duration>) -> Duration {
    percentile(&mut samples, 50)
}

/// One throughput measurement against its floor.
pub(crate) struct Row {
    pub(crate) streams: usize,
    pub(crate) tokens: usize,
    pub(crate) floor: Duration,
    pub(crate) worker: Duration,
}

impl Row {
    pub(crate) fn floor_rate(&self) -> f64 {
        self.tokens as f64 / self.floor.as_secs_f64()
    }
    pub(crate) fn worker_rate(&self) -> f64 {
        self.tokens as f64 / self.worker.as_secs_f64()
    }
    pub(crate) fn floor_us(&self) -> f64 {
        self.floor.as_secs_f64() * 1e6 / self.tokens as f64
    }
    pub(crate) fn worker_us(&self) -> f64 {
        self.worker.as_secs_f64() * 1e6 / self.tokens as f64
    }
    pub(crate) fn ratio(&self) -> f64 {
        self.worker.as_secs_f64() / self.floor.as_secs_f64()
    }
}

/// The real runtime's figures: per-token times, direct and through the worker.
pub(crate) struct EndToEnd {
    /// Rounds, each one generation direct and one through the worker.
    pub(crate) rounds: usize,
    /// Token gaps counted on each path.
    pub(crate) gaps: usize,
    /// Tokens per generation.
    pub(crate) tokens: usize,
    /// The runtime alone: median gap between consecutive tokens, µs.
    pub(crate) direct_us: f64,
    /// Through the worker and NATS, as the client receives them: median gap, µs.
    pub(crate) through_us: f64,
}

/// Request sent → first token, one request at a time, in rounds: each round one raw
/// request/reply round trip between two clients, one request to the worker with the
/// late-subscriber check on, and one to a worker with it off, so that each request has the
/// floor and the other path measured beside it.
pub(crate) struct Overhead {
    /// The raw round trip of each round.
    pub(crate) raw_rtt: Vec<Duration>,
    /// The first token with the check on, each round.
    pub(crate) first: Vec<Duration>,
    /// The first token with the check off, each round.
    pub(crate) first_nolate: Vec<Duration>,
    /// The worker's own receipt → first token published, from its metrics (check on).
    pub(crate) inside: Percentiles,
    /// The same, check off.
    pub(crate) inside_nolate: Percentiles,
}

/// Everything one run measured.
pub(crate) struct Report {
    /// Zero-latency engine against the raw floor, per concurrency.
    pub(crate) zero: Vec<Row>,
    /// Paced engine against the engine alone, per concurrency.
    pub(crate) paced: Vec<Row>,
    /// Request overhead.
    pub(crate) overhead: Overhead,
    /// Connect → registration seen.
    pub(crate) start_to_registered: Duration,
    /// Streams held open for the memory figure.
    pub(crate) held: usize,
    /// Memory per held stream, KiB.
    pub(crate) per_stream_kib: f64,
    /// The real runtime's figures, or why there are none.
    pub(crate) e2e: Result<EndToEnd, String>,
}

/// The concurrencies of the throughput rows.
const CONCURRENCY: [usize; 4] = [1, 8, 64, 512];

/// The zero-latency rows, and the first worker's start-to-registered time.
pub(crate) async fn zero_latency_rows(
    url: &str,
    quick: bool,
    rounds: usize,
) -> (Vec<Row>, Duration) {
    let worker = start_worker(url, "bench", 2000, sim_engine(Duration::ZERO), vec![]).await;
    let start_to_registered = worker.registered_after();
    let mut rows = Vec::new();
    for (i, &streams) in CONCURRENCY.iter().enumerate() {
        // About 64k tokens a row (4k when quick), 16 to `maxTokens`' bound a stream.
        let tokens = ((if quick { 4096 } else { 65_536 }) / streams)
            .clamp(16, MAX_TOKENS_MAX as usize) as u32;
        let total = streams * tokens as usize;
        let (mut floors, mut throughs) = (Vec::new(), Vec::new());
        for r in 0..rounds {
            floors.push(raw_tokens(url, total).await);
            let tag = format!("z{i}r{r}");
            throughs.push(worker_tokens(url, "bench", SIM_MODEL, streams, tokens, &tag).await);
        }
        rows.push(Row {
            streams,
            tokens: total,
            floor: median(floors),
            worker: median(throughs),
        });
    }
    worker.stop().await;
    (rows, start_to_registered)
}

/// The paced rows.
pub(crate) async fn paced_rows(url: &str, quick: bool, rounds: usize) -> Vec<Row> {
    let tokens: u32 = if quick { 20 } else { 200 };
    let direct = sim_engine(PACE);
    direct.load(SIM_MODEL).await.unwrap();
    let worker = start_worker(url, "paced", 2000, sim_engine(PACE), vec![]).await;
    let mut rows = Vec::new();
    for (i, &streams) in CONCURRENCY.iter().enumerate() {
        let total = streams * tokens as usize;
        let (mut floors, mut throughs) = (Vec::new(), Vec::new());
        for r in 0..rounds {
            let tag = format!("p{i}r{r}");
            let (floor, produced) = engine_tokens(&direct, SIM_MODEL, streams, tokens, &tag).await;
            assert_eq!(produced, total);
            floors.push(floor);
            throughs.push(worker_tokens(url, "paced", SIM_MODEL, streams, tokens, &tag).await);
        }
        rows.push(Row {
            streams,
            tokens: total,
            floor: median(floors),
            worker: median(throughs),
        });
    }
    worker.stop().await;
    rows
}

/// Streams held open, and the bench process's memory per stream, KiB.
pub(crate) async fn memory_per_stream(url: &str, quick: bool) -> (usize, f64) {
    // Streams held open by an engine that waits 5 s before each token.
    let slow = start_worker(
        url,
        "slow",
        2000,
        sim_engine(Duration::from_secs(5)),
        vec![],
    )
    .await;
    let held = if quick { 16 } else { 256 };
    let client = client(url).await;
    let mut subs = Vec::new();
    for s in 0..held {
        subs.push(client.subscribe(format!("response.m-{s}")).await.unwrap());
    }
    let _ = client.request("bench.sync", Bytes::new()).await;
    let before = rss_kib();
    for s in 0..held {
        let body = json!({"requestId": format!("m-{s}"), "modelId": SIM_MODEL, "prompt": "x", "maxTokens": 2});
        client
            .publish("worker.slow.inference", body.to_string().into())
            .await
            .unwrap();
    }
    client.flush().await.unwrap();
    // Every stream is running once the worker's $SRV.STATS says so.
    let stats = client;
    loop {
        let m = stats
            .request("$SRV.STATS.mlx-worker.slow", Bytes::new())
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        let running = v["endpoints"][0]["data"]["running"].as_u64().unwrap_or(0);
        if running as usize >= held {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let per_stream_kib = rss_kib().saturating_sub(before) as f64 / held as f64;
    drop(subs);
    // The slow streams end `WORKER_SHUTDOWN` at the drain deadline (30 s); only the figure
    // matters.
    slow.stop_within(Duration::from_secs(45)).await;
    (held, per_stream_kib)
}

/// The real runtime, direct and through the worker, rounds alternating.
pub(crate) async fn end_to_end(url: &str, quick: bool) -> Result<EndToEnd, String> {
    let engine_config = testkit::runtime::engine_config(&repo(""))
        .map_err(|missing| format!("not measured: {missing}"))?;
    // One runtime process serves both paths, so the only difference is the worker and NATS.
    let served: Arc<dyn Engine> = Arc::new(
        MlxEngine::start(engine_config, BatchSizes::default(), Arc::new(SystemClock))
            .await
            .map_err(|e| e.to_string())?,
    );
    let worker = start_worker(
        url,
        "e2e",
        2000,
        served.clone(),
        vec![TINY_MODEL.to_owned()],
    )
    .await;
    // The worker is serving once its preload has finished: a request answers.
    let client = stream_client(url).await;
    let tokens: u32 = if quick { 8 } else { 128 };
    let rounds = if quick { 2 } else { 40 };
    let _ = worker_stream(&client, "e2e", TINY_MODEL, "e2e-warm", tokens).await;
    let _ = engine_stream(&served, TINY_MODEL, "direct-warm", tokens).await;
    let (mut direct_gaps, mut through_gaps) = (Vec::new(), Vec::new());
    let mut counted = 0;
    for r in 0..rounds {
        let (n, d) = engine_stream(&served, TINY_MODEL, &format!("d-{r}"), tokens).await;
        let (m, w) = worker_stream(&client, "e2e", TINY_MODEL, &format!("w-{r}"), tokens).await;
        assert_eq!(
            n, m,
            "the same greedy generation, direct and through the worker"
        );
        direct_gaps.extend(d);
        through_gaps.extend(w);
        counted = n;
    }
    worker.stop().await;
    served.shutdown(Duration::from_secs(5)).await;
    // The same generation both ways: as many gaps on each side.
    if direct_gaps.is_empty() {
        return Err(
            "not measured: the tiny model ended every generation at its first token".into(),
        );
    }
    Ok(EndToEnd {
        rounds,
        gaps: direct_gaps.len(),
        tokens: counted,
        direct_us: median(direct_gaps).as_secs_f64() * 1e6,
        through_us: median(through_gaps).as_secs_f64() * 1e6,
    })
}

/// `n` rounds of [`Overhead`], on two zero-latency workers.
pub(crate) async fn request_overhead(url: &str, n: usize) -> Overhead {
    let echo = RawEcho::start(url).await;
    let late = start_worker(url, "late", 2000, sim_engine(Duration::ZERO), vec![]).await;
    let unprotected = start_worker(url, "nolate", 0, sim_engine(Duration::ZERO), vec![]).await;
    let client = stream_client(url).await;
    let (mut raw_rtt, mut first, mut first_nolate) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        raw_rtt.push(echo.round_trip().await);
        first.push(first_token(&client, "late", &format!("o-{i}")).await);
        first_nolate.push(first_token(&client, "nolate", &format!("n-{i}")).await);
    }
    let inside = late.observer.metrics().snapshot.time_to_first_token;
    let inside_nolate = unprotected.observer.metrics().snapshot.time_to_first_token;
    late.stop().await;
    unprotected.stop().await;
    Overhead {
        raw_rtt,
        first,
        first_nolate,
        inside,
        inside_nolate,
    }
}
