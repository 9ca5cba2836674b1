//! The load bench: a real nats-server, one worker over the production `NatsTransport`, and in
//! the same run the floor each figure is divided by:
//!
//! - **zero-latency engine** (the simulated engine, no delay): tokens/s and µs per token through
//!   the worker at 1, 8, 64 and 512 concurrent streams, against a plain async-nats client
//!   publishing the same token messages with no worker (the raw floor);
//! - **paced engine** (the simulated engine, 1 ms before each token): the same concurrencies,
//!   against the same engine driven directly with no worker and no NATS;
//! - **request overhead**: request sent → first token, against a raw request/reply round trip
//!   between two clients, with the late-subscriber check on and off;
//! - **start to registered** and **memory per in-flight stream**;
//! - **end to end with the real MLX runtime** and the tiny model (when `ci/setup.sh` has made
//!   them): time per token through the worker against the runtime's own time per token, the
//!   same runtime driven directly.
//!
//! Run: `cargo bench --bench load` (needs nats-server on PATH; `ci/setup.sh` installs it).
//! Writes `docs/benchmarks/load.md` and `docs/benchmarks/load.svg`. With `-- --test` (as
//! `cargo bench -- --test` passes), or without `--bench` (as `cargo test --benches` runs it), it runs
//! every part at a tiny size and writes nothing.
//! Each throughput figure is the median of several rounds, floor and worker alternating.

#![allow(clippy::unwrap_used, clippy::disallowed_methods)] // A bench: failures are loud; it times.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use mlx_worker::client::{Client, Target};
use mlx_worker::clock::SystemClock;
use mlx_worker::config;
use mlx_worker::engine::mlx::MlxEngine;
use mlx_worker::engine::{Engine, GenerateRequest, TokenEvent};
use mlx_worker::limits::MAX_TOKENS_MAX;
use mlx_worker::metrics::Percentiles;
use mlx_worker::protocol::{InferenceRequest, StreamMessage, TokenMessage, encode};
use mlx_worker::transport::Transport;
use mlx_worker::transport::nats::NatsTransport;
use mlx_worker_sim::{SimEngine, SimEngineConfig};
use serde_json::json;
use testkit::nats::nats_server_version;
use testkit::{NatsServer, RunningWorker};

/// The simulated engine's model.
const SIM_MODEL: &str = "sim/tiny";
/// The model `ci/setup.sh` generates for the real runtime.
const TINY_MODEL: &str = testkit::runtime::TINY;
/// The paced engine's delay before each token.
const PACE: Duration = Duration::from_millis(1);
/// Messages a bench client's subscription may buffer (async-nats' default is 65,536).
const CLIENT_BUFFER: usize = 1 << 20;

async fn client(url: &str) -> async_nats::Client {
    async_nats::ConnectOptions::new()
        .subscription_capacity(CLIENT_BUFFER)
        .connect(url)
        .await
        .unwrap()
}

fn percentile(samples: &mut [Duration], p: usize) -> Duration {
    samples.sort_unstable();
    let i = (samples.len() * p).div_ceil(100).clamp(1, samples.len()) - 1;
    samples[i]
}

fn median(mut samples: Vec<Duration>) -> Duration {
    percentile(&mut samples, 50)
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Whether a stream message is a token (looked at, not decoded).
fn is_token(payload: &[u8]) -> bool {
    const TOKEN: &[u8] = br#""type":"token""#;
    payload.windows(TOKEN.len()).any(|w| w == TOKEN)
}

/// Raw floor: `n` token messages published by one connection, read by another.
async fn raw_tokens(url: &str, n: usize) -> Duration {
    let publisher = client(url).await;
    let subscriber = client(url).await;
    let mut sub = subscriber.subscribe("response.raw").await.unwrap();
    subscriber.flush().await.unwrap();
    let _ = publisher.request("bench.sync", Bytes::new()).await;
    let payload = Bytes::from(
        encode(&TokenMessage::new(
            "3f1c1d52-8a0b-4b8e-9d7e-2f5d0c1b6a90",
            " tok1",
            1,
        ))
        .unwrap(),
    );
    let start = Instant::now();
    let reader = tokio::spawn(async move {
        for _ in 0..n {
            assert!(is_token(&sub.next().await.unwrap().payload));
        }
    });
    for _ in 0..n {
        publisher
            .publish("response.raw", payload.clone())
            .await
            .unwrap();
    }
    reader.await.unwrap();
    start.elapsed()
}

/// Raw round trip: a message from one connection to another and back, `n` times.
async fn raw_round_trips(url: &str, n: usize) -> Vec<Duration> {
    let a = client(url).await;
    let b = client(url).await;
    let mut echo = b.subscribe("bench.echo").await.unwrap();
    b.flush().await.unwrap();
    tokio::spawn(async move {
        while let Some(m) = echo.next().await {
            if let Some(reply) = m.reply {
                b.publish(reply, m.payload).await.unwrap();
            }
        }
    });
    let _ = a.request("bench.echo", Bytes::new()).await;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        a.request("bench.echo", Bytes::from_static(b"x"))
            .await
            .unwrap();
        out.push(t.elapsed());
    }
    out
}

/// The worker's configuration for every bench worker: room for 512 streams and a deep queue.
fn worker_config(url: &str, late_wait_ms: u64) -> config::WorkerConfig {
    let yaml = format!(
        "nats:\n  serverUrl: {url}\nworker:\n  port: 0\n  maxConcurrent: 512\n  lateSubscriberWaitMs: {late_wait_ms}\n  requestQueue:\n    maxDepth: 10000\n  tierLimits:\n    '<3B': {{ maxConcurrent: 512, queueDepth: 10000 }}\n"
    );
    config::from_yaml(&yaml, Path::new("bench.yaml")).unwrap()
}

/// Starts a bench worker over `engine` ([`worker_config`]) and waits for its registration.
async fn start_worker(
    url: &str,
    id: &str,
    late_wait_ms: u64,
    engine: Arc<dyn Engine>,
    preload: Vec<String>,
) -> RunningWorker {
    RunningWorker::start(id, &worker_config(url, late_wait_ms), engine, preload).await
}

fn sim_engine(token_latency: Duration) -> Arc<dyn Engine> {
    Arc::new(SimEngine::new(SimEngineConfig {
        token_latency,
        ..SimEngineConfig::default()
    }))
}

/// `streams` requests of `tokens` each at once; returns the time until every `done` arrived.
async fn worker_tokens(
    url: &str,
    worker: &str,
    model: &str,
    streams: usize,
    tokens: u32,
    tag: &str,
) -> Duration {
    let client = client(url).await;
    // Request ids cannot hold `.`, so one wildcard subscription takes every stream's messages.
    let mut responses = client.subscribe("response.>").await.unwrap();
    let mine = format!("response.{tag}-");
    let _ = client.request("bench.sync", Bytes::new()).await;
    let start = Instant::now();
    for s in 0..streams {
        let body = json!({"requestId": format!("{tag}-{s}"), "modelId": model, "prompt": "x", "maxTokens": tokens});
        client
            .publish(
                format!("worker.{worker}.inference"),
                body.to_string().into(),
            )
            .await
            .unwrap();
    }
    client.flush().await.unwrap();
    let mut done = 0;
    while done < streams {
        let m = responses.next().await.unwrap();
        // Only the terminal messages are decoded, so the client costs what the raw floor's
        // reader costs: one look at each message.
        if !m.subject.as_str().starts_with(&mine) || is_token(&m.payload) {
            continue;
        }
        let msg: StreamMessage = serde_json::from_slice(&m.payload).unwrap();
        match msg {
            StreamMessage::Done { .. } => done += 1,
            StreamMessage::Error { error, .. } => panic!("{error}"),
            StreamMessage::Token { .. } => {}
        }
    }
    start.elapsed()
}

/// `streams` generations of `tokens` each at once on `engine` itself, no worker, no NATS;
/// returns the time until every one ended and the tokens produced.
async fn engine_tokens(
    engine: &Arc<dyn Engine>,
    model: &str,
    streams: usize,
    tokens: u32,
    tag: &str,
) -> (Duration, usize) {
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(streams);
    for s in 0..streams {
        let mut rx = engine
            .generate(GenerateRequest {
                stream_id: format!("{tag}-{s}"),
                model_id: model.to_owned(),
                prompt: "x".to_owned(),
                max_tokens: tokens,
                temperature: 0.0,
                top_p: 1.0,
            })
            .await
            .unwrap();
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while let Some(event) = rx.recv().await {
                match event {
                    TokenEvent::Token(_) => n += 1,
                    TokenEvent::Finished(_) => return n,
                    TokenEvent::Failed(err) => panic!("{err}"),
                }
            }
            panic!("the generation ended without an end event");
        }));
    }
    let mut produced = 0;
    for t in tasks {
        produced += t.await.unwrap();
    }
    (start.elapsed(), produced)
}

/// The library's client over its own `NatsTransport`.
async fn stream_client(url: &str) -> Client {
    let nats = worker_config(url, 0).nats;
    let transport = NatsTransport::connect(&nats).await.unwrap();
    let mut connection = transport.connection();
    connection.wait_for(|c| c.connected).await.unwrap();
    Client::new(Arc::new(transport), Arc::new(SystemClock))
}

/// A request as the bench sends it.
fn request(id: &str, model: &str, prompt: &str, max_tokens: u32) -> InferenceRequest {
    InferenceRequest {
        request_id: id.to_owned(),
        model_id: model.to_owned(),
        prompt: prompt.to_owned(),
        max_tokens: Some(max_tokens),
        temperature: Some(0.0),
        top_p: None,
        session_id: None,
        stream: None,
        priority: None,
        timeout_ms: None,
    }
}

/// Longest a bench waits for any one message of a stream.
const PATIENCE: Duration = Duration::from_secs(60);

/// Receipt → first token, one request at a time, `n` times (the client subscribes first).
async fn first_token_latencies(url: &str, worker: &str, n: usize, tag: &str) -> Vec<Duration> {
    let client = stream_client(url).await;
    let target = Target::Worker(worker.to_owned());
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("{tag}-{i}");
        let mut stream = client
            .send(&target, &request(&id, SIM_MODEL, "x", 1))
            .await
            .unwrap();
        let first = stream.next(PATIENCE).await.unwrap();
        out.push(first.at - stream.sent_at());
        stream.collect(PATIENCE, Duration::ZERO).await.unwrap(); // done
    }
    out
}

/// The gaps between consecutive token arrivals.
fn gaps(arrivals: &[Instant]) -> Vec<Duration> {
    arrivals.windows(2).map(|w| w[1] - w[0]).collect()
}

/// One request through the worker: (tokens, gaps between token arrivals).
async fn worker_stream(
    client: &Client,
    worker: &str,
    model: &str,
    id: &str,
    tokens: u32,
) -> (usize, Vec<Duration>) {
    let mut stream = client
        .send(
            &Target::Worker(worker.to_owned()),
            &request(id, model, "Hello world", tokens),
        )
        .await
        .unwrap();
    let mut arrivals = Vec::new();
    loop {
        let arrival = stream.next(PATIENCE).await.unwrap();
        match arrival.message {
            StreamMessage::Token { .. } => arrivals.push(arrival.at.into_std()),
            StreamMessage::Done { .. } => return (arrivals.len(), gaps(&arrivals)),
            StreamMessage::Error { error, .. } => panic!("{error}"),
        }
    }
}

/// One generation on the engine itself: (non-empty tokens, gaps between them).
async fn engine_stream(
    engine: &Arc<dyn Engine>,
    model: &str,
    id: &str,
    tokens: u32,
) -> (usize, Vec<Duration>) {
    let mut rx = engine
        .generate(GenerateRequest {
            stream_id: id.to_owned(),
            model_id: model.to_owned(),
            prompt: "Hello world".to_owned(),
            max_tokens: tokens,
            temperature: 0.0,
            top_p: 1.0,
        })
        .await
        .unwrap();
    let mut arrivals = Vec::new();
    while let Some(event) = rx.recv().await {
        match event {
            // As the worker does, an empty piece (half a character) is not a token.
            TokenEvent::Token(text) if text.is_empty() => {}
            TokenEvent::Token(_) => arrivals.push(Instant::now()),
            TokenEvent::Finished(_) => return (arrivals.len(), gaps(&arrivals)),
            TokenEvent::Failed(err) => panic!("{err}"),
        }
    }
    panic!("the generation ended without an end event");
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// One throughput measurement against its floor.
struct Row {
    streams: usize,
    tokens: usize,
    floor: Duration,
    worker: Duration,
}

impl Row {
    fn floor_rate(&self) -> f64 {
        self.tokens as f64 / self.floor.as_secs_f64()
    }
    fn worker_rate(&self) -> f64 {
        self.tokens as f64 / self.worker.as_secs_f64()
    }
    fn floor_us(&self) -> f64 {
        self.floor.as_secs_f64() * 1e6 / self.tokens as f64
    }
    fn worker_us(&self) -> f64 {
        self.worker.as_secs_f64() * 1e6 / self.tokens as f64
    }
    fn ratio(&self) -> f64 {
        self.worker.as_secs_f64() / self.floor.as_secs_f64()
    }
}

/// The real runtime's figures: per-token times, direct and through the worker.
struct EndToEnd {
    rounds: usize,
    /// Token gaps counted on each path.
    gaps: usize,
    tokens: usize,
    direct_us: f64,
    through_us: f64,
}

struct Report {
    zero: Vec<Row>,
    paced: Vec<Row>,
    raw_rtt: Vec<Duration>,
    first: Vec<Duration>,
    first_nolate: Vec<Duration>,
    /// The worker's own receipt → first token published, from its metrics (check on, off).
    inside: Percentiles,
    inside_nolate: Percentiles,
    start_to_registered: Duration,
    held: usize,
    per_stream_kib: f64,
    e2e: Result<EndToEnd, String>,
}

const CONCURRENCY: [usize; 4] = [1, 8, 64, 512];

async fn zero_latency_rows(url: &str, quick: bool, rounds: usize) -> (Vec<Row>, Duration) {
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

async fn paced_rows(url: &str, quick: bool, rounds: usize) -> Vec<Row> {
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

async fn memory_per_stream(url: &str, quick: bool) -> (usize, f64) {
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
async fn end_to_end(url: &str, quick: bool) -> Result<EndToEnd, String> {
    let engine_config = testkit::runtime::engine_config(&repo(""))
        .map_err(|missing| format!("not measured: {missing}"))?;
    // One runtime process serves both paths, so the only difference is the worker and NATS.
    let served: Arc<dyn Engine> = Arc::new(
        MlxEngine::start(engine_config, Arc::new(SystemClock))
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

fn main() {
    // `cargo bench` passes `--bench`; without it (`cargo test --benches`) or with `--test`
    // (`cargo bench -- --test`) the bench only checks that every part still runs.
    let args: Vec<String> = std::env::args().collect();
    let quick = !args.iter().any(|a| a == "--bench") || args.iter().any(|a| a == "--test");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    // The worker's logs would cost what they measure: no subscriber takes them.
    let _ = tracing::subscriber::set_global_default(tracing::subscriber::NoSubscriber::default());
    let server = rt.block_on(NatsServer::start());
    let url = server.url();
    let _guard = rt.enter();
    let rounds = if quick { 1 } else { 5 };
    // `--profile <streams>`: only the zero-latency row at that concurrency, and `--profile e2e`
    // only the real runtime's part, for a profiler attached from outside (see
    // docs/benchmarks/load.md); prints the figures, writes nothing.
    if args
        .windows(2)
        .any(|w| w[0] == "--profile" && w[1] == "e2e")
    {
        match rt.block_on(end_to_end(&url, false)) {
            Ok(e) => eprintln!(
                "runtime alone {:.0} µs/token, through the worker {:.0} µs/token ({} gaps)",
                e.direct_us, e.through_us, e.gaps
            ),
            Err(why) => eprintln!("{why}"),
        }
        return;
    }
    if let Some(streams) = args
        .iter()
        .position(|a| a == "--profile")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse::<usize>().ok())
    {
        let row = rt.block_on(async {
            let worker =
                start_worker(&url, "bench", 2000, sim_engine(Duration::ZERO), vec![]).await;
            let tokens = (65_536 / streams).clamp(16, MAX_TOKENS_MAX as usize) as u32;
            let mut times = Vec::new();
            for r in 0..20 {
                let tag = format!("prof{r}");
                times.push(worker_tokens(&url, "bench", SIM_MODEL, streams, tokens, &tag).await);
            }
            worker.stop().await;
            (streams * tokens as usize, median(times))
        });
        eprintln!(
            "{streams} streams: {} tokens in {:?} (median of 20), {:.2} µs/token",
            row.0,
            row.1,
            row.1.as_secs_f64() * 1e6 / row.0 as f64
        );
        return;
    }
    // A hung bench is a failed bench.
    let report = rt
        .block_on(tokio::time::timeout(Duration::from_secs(900), async {
            // First, while the process's heap is fresh, so that its growth is the streams'.
            eprintln!("load bench: memory per stream");
            let (held, per_stream_kib) = memory_per_stream(&url, quick).await;
            eprintln!("load bench: zero-latency engine");
            let (zero, start_to_registered) = zero_latency_rows(&url, quick, rounds).await;
            eprintln!("load bench: paced engine");
            let paced = paced_rows(&url, quick, rounds).await;

            eprintln!("load bench: request overhead");
            // Request overhead: receipt→first token vs a raw round trip between two clients.
            let n = if quick { 20 } else { 1000 };
            let raw_rtt = raw_round_trips(&url, n).await;
            let late = start_worker(&url, "late", 2000, sim_engine(Duration::ZERO), vec![]).await;
            let first = first_token_latencies(&url, "late", n, "o").await;
            let inside = late.observer.metrics().await.snapshot.time_to_first_token;
            late.stop().await;
            let unprotected =
                start_worker(&url, "nolate", 0, sim_engine(Duration::ZERO), vec![]).await;
            let first_nolate = first_token_latencies(&url, "nolate", n, "n").await;
            let inside_nolate = unprotected
                .observer
                .metrics()
                .await
                .snapshot
                .time_to_first_token;
            unprotected.stop().await;

            eprintln!("load bench: end to end with the MLX runtime");
            let e2e = end_to_end(&url, quick).await;
            Report {
                zero,
                paced,
                raw_rtt,
                first,
                first_nolate,
                inside,
                inside_nolate,
                start_to_registered,
                held,
                per_stream_kib,
                e2e,
            }
        }))
        .expect("the load bench finished within 15 minutes");
    let md = markdown(report_md_header(quick), &report);
    eprintln!("{md}");
    if !quick {
        let dir = repo("docs/benchmarks");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("load.md"), &md).unwrap();
        std::fs::write(dir.join("load.svg"), svg(&report.zero)).unwrap();
    } else if let Err(why) = &report.e2e {
        eprintln!("end to end: {why}");
    }
}

fn report_md_header(quick: bool) -> String {
    format!(
        "One run of `cargo bench --bench load`{} on {} ({} CPUs), nats-server {} on loopback.",
        if quick { " -- --test (tiny sizes)" } else { "" },
        host(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        nats_server_version()
    )
}

fn markdown(header: String, r: &Report) -> String {
    let mut md = String::new();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let p = |v: &[Duration], q| us(percentile(&mut v.to_vec(), q));
    writeln!(md, "# Load bench\n\n{header} Every figure is a ratio to a floor measured in the same run; throughput figures are medians of rounds in which floor and worker alternate.\n").unwrap();
    writeln!(
        md,
        "## Zero-latency engine, against the raw async-nats floor\n"
    )
    .unwrap();
    writeln!(md, "The floor: one async-nats client publishes the same number of token messages to another, no worker.\n").unwrap();
    writeln!(md, "| streams | tokens | raw floor tokens/s | worker tokens/s | raw µs/token | worker µs/token | ratio (worker/raw time) |").unwrap();
    writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|").unwrap();
    for row in &r.zero {
        writeln!(
            md,
            "| {} | {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} |",
            row.streams,
            row.tokens,
            row.floor_rate(),
            row.worker_rate(),
            row.floor_us(),
            row.worker_us(),
            row.ratio()
        )
        .unwrap();
    }
    writeln!(
        md,
        "\n## Paced engine ({} ms before each token), against the engine alone\n",
        PACE.as_millis()
    )
    .unwrap();
    writeln!(
        md,
        "The floor: the same simulated engine driven directly, no worker and no NATS.\n"
    )
    .unwrap();
    writeln!(md, "| streams | tokens | engine alone tokens/s | through the worker tokens/s | ratio (worker/engine time) |").unwrap();
    writeln!(md, "|---:|---:|---:|---:|---:|").unwrap();
    for row in &r.paced {
        writeln!(
            md,
            "| {} | {} | {:.0} | {:.0} | {:.3} |",
            row.streams,
            row.tokens,
            row.floor_rate(),
            row.worker_rate(),
            row.ratio()
        )
        .unwrap();
    }
    let (raw50, raw99) = (p(&r.raw_rtt, 50), p(&r.raw_rtt, 99));
    let (w50, w99) = (p(&r.first, 50), p(&r.first, 99));
    let (n50, n99) = (p(&r.first_nolate, 50), p(&r.first_nolate, 99));
    writeln!(
        md,
        "\n## Request overhead ({} requests one at a time, zero-latency engine)\n",
        r.first.len()
    )
    .unwrap();
    writeln!(md, "| figure | p50 | p99 |").unwrap();
    writeln!(md, "|---|---:|---:|").unwrap();
    writeln!(
        md,
        "| raw request/reply round trip between two clients (µs) | {raw50:.0} | {raw99:.0} |"
    )
    .unwrap();
    writeln!(
        md,
        "| request sent → first token, late-subscriber check on (µs) | {w50:.0} | {w99:.0} |"
    )
    .unwrap();
    writeln!(
        md,
        "| request sent → first token, check off (µs) | {n50:.0} | {n99:.0} |"
    )
    .unwrap();
    writeln!(
        md,
        "| request overhead beyond a raw round trip, check on (µs) | {:.0} | {:.0} |",
        w50 - raw50,
        w99 - raw99
    )
    .unwrap();
    writeln!(
        md,
        "| request overhead beyond a raw round trip, check off (µs) | {:.0} | {:.0} |",
        n50 - raw50,
        n99 - raw99
    )
    .unwrap();
    writeln!(
        md,
        "| late-subscriber check's cost on the first token (µs) | {:.0} | {:.0} |",
        w50 - n50,
        w99 - n99
    )
    .unwrap();
    writeln!(md, "| inside the worker: message received → first token published, check on (µs) | {:.0} | {:.0} |", us(r.inside.p50), us(r.inside.p99)).unwrap();
    writeln!(md, "| inside the worker: message received → first token published, check off (µs) | {:.0} | {:.0} |", us(r.inside_nolate.p50), us(r.inside_nolate.p99)).unwrap();
    writeln!(md, "\n## Start, memory, end to end\n").unwrap();
    writeln!(
        md,
        "- start to registered (connect, subscribe, register): {:.1} ms",
        r.start_to_registered.as_secs_f64() * 1e3
    )
    .unwrap();
    writeln!(
        md,
        "- memory per in-flight stream ({} streams held open, RSS of the bench process): {:.1} KiB",
        r.held, r.per_stream_kib
    )
    .unwrap();
    match &r.e2e {
        Ok(e) => {
            let added = e.through_us - e.direct_us;
            let zero1 = r
                .zero
                .first()
                .map_or(0.0, |row| row.worker_us() - row.floor_us());
            writeln!(md, "- real MLX runtime, tiny model, {} rounds of {} tokens, one stream, median of {} gaps between consecutive tokens, rounds alternating on one runtime process: the runtime alone {:.0} µs; through the worker and NATS, as the client receives them, {:.0} µs; difference {:+.1} µs ({:+.2}% of the runtime's time per token)", e.rounds, e.tokens, e.gaps, e.direct_us, e.through_us, added, added / e.direct_us * 100.0).unwrap();
            writeln!(md, "- the worker's own cost per token at one stream (zero-latency row, worker minus raw floor): {zero1:.2} µs, {:.3}% of the runtime's time per token", zero1 / e.direct_us * 100.0).unwrap();
        }
        Err(why) => writeln!(md, "- real MLX runtime: {why}").unwrap(),
    }
    writeln!(
        md,
        "\n![tokens/s and µs per token against concurrency](load.svg)\n\nWhat bounds the figures that miss their targets, measured with a profiler: [profile.md](profile.md)."
    )
    .unwrap();
    md
}

fn host() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{} / {cpu}", std::env::consts::OS)
}

/// Two panels against the stream count: tokens/s (top) and µs per token (bottom), each with
/// the worker (solid) and the raw floor (dashed).
fn svg(rows: &[Row]) -> String {
    let (w, panel_h, pad) = (640.0, 260.0, 50.0);
    let h = 2.0 * panel_h;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>\n"
    );
    let x = |i: usize| pad + i as f64 * (w - 2.0 * pad) / (rows.len().max(2) - 1) as f64;
    let mut panel = |top: f64,
                     title: &str,
                     worker: &dyn Fn(&Row) -> f64,
                     floor: &dyn Fn(&Row) -> f64| {
        let max = rows
            .iter()
            .flat_map(|r| [worker(r), floor(r)])
            .fold(1e-9, f64::max);
        let y = |v: f64| top + panel_h - pad - v / max * (panel_h - 2.0 * pad);
        let line = |pick: &dyn Fn(&Row) -> f64| {
            rows.iter()
                .enumerate()
                .map(|(i, r)| format!("{:.1},{:.1}", x(i), y(pick(r))))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let base = top + panel_h - pad;
        s += &format!(
            "<line x1=\"{pad}\" y1=\"{base}\" x2=\"{}\" y2=\"{base}\" stroke=\"black\"/>\n",
            w - pad
        );
        s += &format!(
            "<line x1=\"{pad}\" y1=\"{}\" x2=\"{pad}\" y2=\"{base}\" stroke=\"black\"/>\n",
            top + pad
        );
        s += &format!(
            "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\" points=\"{}\"/>\n",
            line(worker)
        );
        s += &format!(
            "<polyline fill=\"none\" stroke=\"#999\" stroke-width=\"2\" stroke-dasharray=\"6 4\" points=\"{}\"/>\n",
            line(floor)
        );
        for (i, r) in rows.iter().enumerate() {
            s += &format!(
                "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{} streams</text>\n",
                x(i),
                base + 18.0,
                r.streams
            );
            s += &format!(
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#1f77b4\">{:.3}</text>\n",
                x(i),
                y(worker(r)) - 6.0,
                worker(r)
            );
        }
        s += &format!(
            "<text x=\"{pad}\" y=\"{}\">{title} (max {max:.2}); solid: through the worker, dashed: raw async-nats floor</text>\n",
            top + pad - 20.0
        );
    };
    panel(0.0, "thousand tokens/s", &|r| r.worker_rate() / 1e3, &|r| {
        r.floor_rate() / 1e3
    });
    panel(panel_h, "µs per token", &|r| r.worker_us(), &|r| {
        r.floor_us()
    });
    s += "</svg>\n";
    s
}
