//! The load bench: a real nats-server, one worker over the production `NatsTransport` with the
//! simulated engine (zero latency), and in the same run the raw floor — a plain async-nats
//! client publishing the same token messages with no worker — so every figure is a ratio.
//!
//! Run: `cargo bench --bench load` (needs nats-server on PATH; `ci/setup.sh` installs it).
//! Writes `docs/benchmarks/load.md` and `docs/benchmarks/load.svg`. With `-- --test` (as
//! `cargo bench -- --test` passes) it runs a tiny version and writes nothing.

#![allow(clippy::unwrap_used, clippy::disallowed_methods)] // A bench: failures are loud; it times.

use std::fmt::Write as _;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use mlx_worker::clock::SystemClock;
use mlx_worker::config;
use mlx_worker::identity::Identity;
use mlx_worker::protocol::{StreamMessage, TokenMessage, encode};
use mlx_worker::transport::nats::NatsTransport;
use mlx_worker::worker::{Deps, Worker};
use mlx_worker_sim::{SimEngine, SimEngineConfig, SimProbe};
use serde_json::json;

struct Server(Child, u16);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_server() -> Server {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new("nats-server")
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server on PATH (run ci/setup.sh)");
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Server(child, port);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("nats-server did not start");
}

fn percentile(samples: &mut [Duration], p: usize) -> Duration {
    samples.sort_unstable();
    let i = (samples.len() * p).div_ceil(100).clamp(1, samples.len()) - 1;
    samples[i]
}

/// Raw floor: `n` token messages published by one connection, read by another.
async fn raw_tokens(url: &str, n: usize) -> Duration {
    let publisher = async_nats::connect(url).await.unwrap();
    let subscriber = async_nats::connect(url).await.unwrap();
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
            sub.next().await.unwrap();
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
    let a = async_nats::connect(url).await.unwrap();
    let b = async_nats::connect(url).await.unwrap();
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

struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

async fn start_worker(url: &str, id: &str, late_wait_ms: u64) -> (Running, Duration) {
    let yaml = format!(
        "nats:\n  serverUrl: {url}\nworker:\n  port: 0\n  maxConcurrent: 512\n  lateSubscriberWaitMs: {late_wait_ms}\n  requestQueue:\n    maxDepth: 10000\n  tierLimits:\n    '<3B': {{ maxConcurrent: 512, queueDepth: 10000 }}\n"
    );
    let node = config::from_yaml(&yaml, std::path::Path::new("bench.yaml")).unwrap();
    let observer = async_nats::connect(url).await.unwrap();
    let mut registrations = observer.subscribe("worker.register").await.unwrap();
    let _ = observer.request("bench.sync", Bytes::new()).await;
    let start = Instant::now();
    let transport = Arc::new(NatsTransport::connect(&node.nats).await.unwrap());
    let deps = Deps {
        transport,
        engine: Arc::new(SimEngine::new(SimEngineConfig::default())),
        clock: Arc::new(SystemClock),
        hardware: Arc::new(SimProbe::new()),
    };
    let identity = Identity {
        worker_id: id.to_owned(),
        hostname: "bench".into(),
        ip: "127.0.0.1".into(),
        port: 0,
    };
    let worker = Worker::new(identity, node.node, vec![], deps);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        worker
            .run(async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    registrations.next().await.unwrap();
    (Running { stop, task }, start.elapsed())
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap();
    }
}

/// `streams` requests of `tokens` each at once; returns the time until every `done` arrived.
async fn worker_tokens(
    url: &str,
    worker: &str,
    streams: usize,
    tokens: u32,
    tag: &str,
) -> Duration {
    let client = async_nats::connect(url).await.unwrap();
    // Request ids cannot hold `.`, so one wildcard subscription takes every stream's messages.
    let mut responses = client.subscribe("response.>").await.unwrap();
    let _ = client.request("bench.sync", Bytes::new()).await;
    let start = Instant::now();
    for s in 0..streams {
        let body = json!({"requestId": format!("{tag}-{s}"), "modelId": "sim/tiny", "prompt": "x", "maxTokens": tokens});
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
        if !m.subject.as_str().starts_with(&format!("response.{tag}-")) {
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

/// Receipt → first token, one request at a time, `n` times (the client subscribes first).
async fn first_token_latencies(url: &str, worker: &str, n: usize, tag: &str) -> Vec<Duration> {
    let client = async_nats::connect(url).await.unwrap();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("{tag}-{i}");
        let mut sub = client.subscribe(format!("response.{id}")).await.unwrap();
        let _ = client.request("bench.sync", Bytes::new()).await;
        let body = json!({"requestId": id, "modelId": "sim/tiny", "prompt": "x", "maxTokens": 1});
        let t = Instant::now();
        client
            .publish(
                format!("worker.{worker}.inference"),
                body.to_string().into(),
            )
            .await
            .unwrap();
        sub.next().await.unwrap();
        out.push(t.elapsed());
        sub.next().await.unwrap(); // done
    }
    out
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

fn main() {
    let quick = std::env::args().any(|a| a == "--test");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let server = start_server();
    let url = format!("nats://127.0.0.1:{}", server.1);
    // A hung bench is a failed bench.
    let _guard = rt.enter();
    rt.block_on(tokio::time::timeout(Duration::from_secs(600), async {
        // Totals stay under the clients' subscription buffers (65,536 messages).
        let scale = if quick { 64 } else { 8 };
        let (worker, start_to_registered) = start_worker(&url, "bench", 2000).await;

        // Throughput against concurrency, each against the raw floor for the same token count.
        let mut rows = Vec::new();
        for (i, &(streams, tokens)) in [(1usize, 4096u32), (8, 4096), (64, 1024), (512, 128)]
            .iter()
            .enumerate()
        {
            let tokens = (tokens / scale).max(1);
            let total = streams * tokens as usize;
            let raw = raw_tokens(&url, total).await;
            let through = worker_tokens(&url, "bench", streams, tokens, &format!("t{i}")).await;
            rows.push((streams, total, raw, through));
        }

        // Request overhead: worker's receipt→first token vs a raw round trip between two clients.
        let n = if quick { 20 } else { 300 };
        let mut raw_rtt = raw_round_trips(&url, n).await;
        let mut first = first_token_latencies(&url, "bench", n, "o").await;
        worker.stop().await;
        let (unprotected, _) = start_worker(&url, "bench-nolate", 0).await;
        let mut first_nolate = first_token_latencies(&url, "bench-nolate", n, "n").await;
        unprotected.stop().await;

        // Memory per in-flight stream: streams held open by a slow engine.
        let slow_yaml = format!(
            "nats:\n  serverUrl: {url}\nworker:\n  port: 0\n  maxConcurrent: 512\n  requestQueue:\n    maxDepth: 10000\n  tierLimits:\n    '<3B': {{ maxConcurrent: 512, queueDepth: 10000 }}\n"
        );
        let node = config::from_yaml(&slow_yaml, std::path::Path::new("bench.yaml")).unwrap();
        let transport = Arc::new(NatsTransport::connect(&node.nats).await.unwrap());
        let slow = Worker::new(
            Identity { worker_id: "slow".into(), hostname: "b".into(), ip: "127.0.0.1".into(), port: 0 },
            node.node,
            vec![],
            Deps {
                transport,
                engine: Arc::new(SimEngine::new(SimEngineConfig {
                    token_latency: Duration::from_secs(5),
                    ..SimEngineConfig::default()
                })),
                clock: Arc::new(SystemClock),
                hardware: Arc::new(SimProbe::new()),
            },
        );
        let (stop_slow, stopped) = tokio::sync::oneshot::channel::<()>();
        let slow_task = tokio::spawn(async move {
            slow.run(async { let _ = stopped.await; }).await.unwrap();
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let held = if quick { 16 } else { 256 };
        let before = rss_kib();
        let client = async_nats::connect(&url).await.unwrap();
        let mut subs = Vec::new();
        for s in 0..held {
            subs.push(client.subscribe(format!("response.m-{s}")).await.unwrap());
        }
        let _ = client.request("bench.sync", Bytes::new()).await;
        for s in 0..held {
            let body = json!({"requestId": format!("m-{s}"), "modelId": "sim/tiny", "prompt": "x", "maxTokens": 2});
            client.publish("worker.slow.inference", body.to_string().into()).await.unwrap();
        }
        client.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let per_stream_kib = rss_kib().saturating_sub(before) as f64 / held as f64;
        let _ = stop_slow.send(());
        drop(subs);
        let _ = tokio::time::timeout(Duration::from_secs(20), slow_task).await;

        let p = |v: &mut Vec<Duration>, q| percentile(v, q).as_secs_f64() * 1e6;
        let (raw50, raw99) = (p(&mut raw_rtt, 50), p(&mut raw_rtt, 99));
        let (w50, w99) = (p(&mut first, 50), p(&mut first, 99));
        let (n50, n99) = (p(&mut first_nolate, 50), p(&mut first_nolate, 99));
        let mut md = String::new();
        writeln!(md, "# Load bench").unwrap();
        writeln!(md).unwrap();
        writeln!(md, "One run of `cargo bench --bench load` on {} ({} CPUs). nats-server on loopback, one worker with the simulated engine (no latency), and in the same run the raw floor: a plain async-nats client publishing the same token messages.", host(), std::thread::available_parallelism().map_or(0, |n| n.get())).unwrap();
        writeln!(md).unwrap();
        writeln!(md, "| streams | tokens | raw floor tokens/s | worker tokens/s | worker µs/token | raw µs/token | ratio (worker/raw time) |").unwrap();
        writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|").unwrap();
        for (streams, total, raw, through) in &rows {
            let raw_rate = *total as f64 / raw.as_secs_f64();
            let rate = *total as f64 / through.as_secs_f64();
            writeln!(
                md,
                "| {streams} | {total} | {raw_rate:.0} | {rate:.0} | {:.2} | {:.2} | {:.2} |",
                through.as_secs_f64() * 1e6 / *total as f64,
                raw.as_secs_f64() * 1e6 / *total as f64,
                through.as_secs_f64() / raw.as_secs_f64()
            )
            .unwrap();
        }
        writeln!(md).unwrap();
        writeln!(md, "| figure | p50 | p99 |").unwrap();
        writeln!(md, "|---|---:|---:|").unwrap();
        writeln!(md, "| raw round trip between two clients (µs) | {raw50:.0} | {raw99:.0} |").unwrap();
        writeln!(md, "| request sent → first token, late-subscriber check on (µs) | {w50:.0} | {w99:.0} |").unwrap();
        writeln!(md, "| request sent → first token, check off (µs) | {n50:.0} | {n99:.0} |").unwrap();
        writeln!(md, "| request overhead beyond a raw round trip, check on (µs) | {:.0} | {:.0} |", w50 - raw50, w99 - raw99).unwrap();
        writeln!(md, "| late-subscriber check's cost on the first token (µs) | {:.0} | {:.0} |", w50 - n50, w99 - n99).unwrap();
        writeln!(md).unwrap();
        writeln!(md, "- start to registered (connect, subscribe, register): {:.1} ms", start_to_registered.as_secs_f64() * 1e3).unwrap();
        writeln!(md, "- memory per in-flight stream ({held} streams held open): {per_stream_kib:.1} KiB").unwrap();
        writeln!(md).unwrap();
        writeln!(md, "![tokens/s and µs per token against concurrency](load.svg)").unwrap();
        eprintln!("{md}");
        if !quick {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/benchmarks");
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("load.md"), &md).unwrap();
            std::fs::write(dir.join("load.svg"), svg(&rows)).unwrap();
        }
    }))
    .expect("the load bench finished within 10 minutes");
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

/// One throughput measurement: streams, tokens, raw floor time, time through the worker.
type Row = (usize, usize, Duration, Duration);

/// Two lines against log2(streams): worker and raw tokens/s.
fn svg(rows: &[Row]) -> String {
    let (w, h, pad) = (640.0, 360.0, 50.0);
    let rate = |total: usize, d: &Duration| total as f64 / d.as_secs_f64();
    let max = rows
        .iter()
        .flat_map(|(_, t, r, th)| [rate(*t, r), rate(*t, th)])
        .fold(1.0, f64::max);
    let x = |i: usize| pad + i as f64 * (w - 2.0 * pad) / (rows.len().max(2) - 1) as f64;
    let y = |v: f64| h - pad - v / max * (h - 2.0 * pad);
    let line = |pick: &dyn Fn(&Row) -> f64| {
        rows.iter()
            .enumerate()
            .map(|(i, r)| format!("{:.1},{:.1}", x(i), y(pick(r))))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n"
    );
    s += &format!("<rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>\n");
    s += &format!(
        "<line x1=\"{pad}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n",
        h - pad,
        w - pad,
        h - pad
    );
    s += &format!(
        "<line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{}\" stroke=\"black\"/>\n",
        h - pad
    );
    s += &format!(
        "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\" points=\"{}\"/>\n",
        line(&|r| rate(r.1, &r.3))
    );
    s += &format!(
        "<polyline fill=\"none\" stroke=\"#999\" stroke-width=\"2\" stroke-dasharray=\"6 4\" points=\"{}\"/>\n",
        line(&|r| rate(r.1, &r.2))
    );
    for (i, r) in rows.iter().enumerate() {
        s += &format!(
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{} streams</text>\n",
            x(i),
            h - pad + 18.0,
            r.0
        );
    }
    s += &format!(
        "<text x=\"{pad}\" y=\"{}\">tokens/s (max {max:.0}); solid: through the worker, dashed: raw async-nats floor</text>\n",
        pad - 20.0
    );
    s += "</svg>\n";
    s
}
