//! The model-subjects part: requests addressed to a model (`inference.{model}`) through the
//! JetStream work queue against the same requests through the queue group, in one run, on one
//! JetStream-enabled nats-server, each mode with its own worker over the zero-latency simulated
//! engine (so the figures are the path's, not generation's): the time from send to the `done`
//! of one request at a time (p50, p99), and requests per second with [`CONCURRENT`] in flight.
//! The queue group is the floor the work queue is divided by.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mlx_worker::client::{Client, Target};
use mlx_worker::clock::SystemClock;
use mlx_worker::protocol::StreamMessage;
use mlx_worker::transport::Transport;
use mlx_worker::transport::nats::NatsTransport;
use testkit::{NatsOptions, NatsServer, RunningWorker};

use crate::harness::{SIM_MODEL, Sampling, sampled_request, sim_engine, worker_config_with};
use crate::measurement::percentile;

/// Requests in flight for the throughput figure.
pub(crate) const CONCURRENT: usize = 32;
/// Tokens each request asks for.
const MAX_TOKENS: u32 = 4;
/// Longest a request may take.
const PATIENCE: Duration = Duration::from_secs(30);

/// One mode's figures.
pub(crate) struct FleetRow {
    pub(crate) label: &'static str,
    pub(crate) p50: Duration,
    pub(crate) p99: Duration,
    pub(crate) per_second: f64,
    /// Requests sent one at a time, and with [`CONCURRENT`] in flight.
    pub(crate) sequential: usize,
    pub(crate) concurrent: usize,
}

/// The part's figures: the queue group's row, then the work queue's.
pub(crate) struct Fleet {
    pub(crate) rows: Vec<FleetRow>,
}

/// Both modes, one after the other on one server; `quick`: a few requests.
pub(crate) async fn fleet(quick: bool) -> Fleet {
    let store = tempfile::tempdir().unwrap();
    let server = NatsServer::start_with(NatsOptions::new().jetstream(store.path())).await;
    let url = server.url();
    let (sequential, concurrent) = if quick { (10, 64) } else { (1000, 10_000) };
    let mut rows = Vec::new();
    for (label, mode) in [
        ("queue group", "queue-group"),
        ("JetStream work queue", "jetstream"),
    ] {
        let config =
            worker_config_with(&url, 0, &format!("modelSubjects:\n  mode: {mode}\n")).unwrap();
        let id = format!("bench-{mode}");
        let worker = RunningWorker::start(&id, &config, sim_engine(Duration::ZERO), vec![]).await;
        let transport = NatsTransport::connect(&config.nats).await.unwrap();
        transport
            .connection()
            .wait_for(|c| c.connected)
            .await
            .unwrap();
        let client = Client::new(Arc::new(transport), Arc::new(SystemClock))
            .with_model_subjects(&config.node.model_subjects);
        // Warm the path (the consumer's first pull, the subscriptions) before timing it.
        for n in 0..5 {
            one(&client, &format!("{mode}-warm-{n}")).await;
        }
        let mut times = Vec::with_capacity(sequential);
        for n in 0..sequential {
            times.push(one(&client, &format!("{mode}-seq-{n}")).await);
        }
        let started = Instant::now();
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut senders = tokio::task::JoinSet::new();
        for _ in 0..CONCURRENT {
            let (client, next) = (client.clone(), next.clone());
            senders.spawn(async move {
                loop {
                    let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if n >= concurrent {
                        return;
                    }
                    one(&client, &format!("{mode}-con-{n}")).await;
                }
            });
        }
        while let Some(joined) = senders.join_next().await {
            joined.unwrap();
        }
        let elapsed = started.elapsed();
        worker.stop().await;
        rows.push(FleetRow {
            label,
            p50: percentile(&mut times, 50),
            p99: percentile(&mut times, 99),
            per_second: concurrent as f64 / elapsed.as_secs_f64(),
            sequential,
            concurrent,
        });
    }
    Fleet { rows }
}

/// One request to the model's subject, read to its `done`; the time from send to it.
async fn one(client: &Client, id: &str) -> Duration {
    let request = sampled_request(id, SIM_MODEL, "Hello", MAX_TOKENS, Sampling::GREEDY);
    let started = Instant::now();
    let mut stream = client
        .send(&Target::Model(SIM_MODEL.to_owned()), &request)
        .await
        .unwrap();
    let messages = stream.collect(PATIENCE, Duration::ZERO).await.unwrap();
    assert!(
        matches!(messages.last(), Some(StreamMessage::Done { .. })),
        "{id}: {messages:?}"
    );
    started.elapsed()
}

/// The part's Markdown.
pub(crate) fn markdown(header: String, f: &Fleet) -> String {
    use std::fmt::Write;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut md = String::new();
    writeln!(
        md,
        "# Model subjects: JetStream work queue against the queue group\n\n{header} \
         Requests to `inference.{{model}}` through each `modelSubjects.mode`, each with its own \
         worker over the zero-latency simulated engine ({MAX_TOKENS} tokens a request), so the \
         figures are the path's: the library client subscribes to the response subject, \
         publishes (into the work queue: a JetStream publish, answered once the stream stored \
         it), and reads to `done`. One request at a time for the latency, {CONCURRENT} in flight \
         for the throughput. The queue group is the floor.\n"
    )
    .unwrap();
    writeln!(
        md,
        "| mode | send → done p50 | p99 | requests/s ({CONCURRENT} in flight) | requests |\n|---|---:|---:|---:|---:|"
    )
    .unwrap();
    for r in &f.rows {
        writeln!(
            md,
            "| {} | {:.2} ms | {:.2} ms | {:.0} | {} + {} |",
            r.label,
            ms(r.p50),
            ms(r.p99),
            r.per_second,
            r.sequential,
            r.concurrent
        )
        .unwrap();
    }
    if let [floor, queue] = f.rows.as_slice() {
        writeln!(
            md,
            "\nWork queue against queue group: p50 {:.2}×, p99 {:.2}×, throughput {:.2}×; per \
             request the work queue adds {:.2} ms at p50 (the stream's store and acknowledgement, \
             the pull, the start's acknowledgement).",
            queue.p50.as_secs_f64() / floor.p50.as_secs_f64(),
            queue.p99.as_secs_f64() / floor.p99.as_secs_f64(),
            queue.per_second / floor.per_second,
            ms(queue.p50.saturating_sub(floor.p50))
        )
        .unwrap();
    }
    md
}
