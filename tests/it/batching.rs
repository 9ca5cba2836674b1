// Goal: each model's batching figures tell the truth under a known load, on all three faces: a
// model the engine runs two at a time, with two requests running and three waiting in the
// worker's queue, shows running 2, queued 3, batch size 2 and a full batch on `/metrics`, in
// the heartbeat and in `$SRV.STATS`; once the work is done, `/metrics`' counters hold exactly
// the prompt tokens, prefill time, generated tokens and decode time of the streams that
// completed, and a heartbeat shows their rates. The heartbeat, with these figures, still keeps
// the existing controller's schema.
// Method: a worker (simulated engine, two live streams of its model at most, 5 ms a token, its
// figures scripted: a prompt's words are its tokens, the first token's latency its prefill) on
// a real nats-server. Two requests hang after their first token, three more wait behind them;
// cancelling the two lets the three run. `/metrics` is read with a Prometheus text-format
// parser, `$SRV.STATS` with async-nats' service types, heartbeats as raw JSON held to the
// controller's schema. Figures are read in a bounded poll, since a figure changing is no event
// one could await.

use std::sync::Arc;
use std::time::Duration;

use async_nats::service::Stats;
use bytes::Bytes;
use mlx_worker::metrics::prometheus::render;
use mlx_worker::protocol::WorkerHeartbeat;
use mlx_worker::transport::Subscription;
use mlx_worker::worker::Observer;
use mlx_worker_sim::{Fault, SimEngine, SimEngineConfig};
use prometheus_parse::Scrape;
use serde_json::{Value, json};

use crate::http::{parse_prometheus, sample};
use testkit::schema::check_heartbeat;
use testkit::*;

/// The worker's id: a UUID, as the controller's schema wants it.
const WORKER: &str = "7d4e2f1a-3b5c-4d6e-8f90-a1b2c3d4e5f6";
const MODEL: &str = "sim/tiny";
/// Each request's prompt: three words, so three prompt tokens to the simulated engine.
const PROMPT: &str = "one two three";
const MAX_TOKENS: u64 = 4;
/// The simulated engine's time per token: each stream's prefill, and a quarter of its decode.
const TOKEN_LATENCY: Duration = Duration::from_millis(5);

fn request(id: &str) -> Value {
    json!({"requestId": id, "modelId": MODEL, "prompt": PROMPT, "maxTokens": MAX_TOKENS})
}

/// `/metrics` as a scraper reads it.
fn scrape(worker: &Observer) -> Scrape {
    parse_prometheus(&render(&worker.metrics()))
}

/// The sample `name` of the model.
fn of_model(scrape: &Scrape, name: &str) -> Option<f64> {
    sample(scrape, name, &[("model", MODEL)])
}

/// Waits until `/metrics` shows the model with `running` requests running and `queued`
/// waiting.
async fn model_load_reaches(worker: &Observer, running: f64, queued: f64) -> Scrape {
    within(&format!("{running} running and {queued} queued"), async {
        loop {
            let s = scrape(worker);
            let now = (
                of_model(&s, "mlx_worker_model_requests_running"),
                of_model(&s, "mlx_worker_model_requests_queued"),
            );
            if now == (Some(running), Some(queued)) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

/// The next heartbeat of the worker on `sub` whose entry for the model satisfies `pred`: raw,
/// and decoded.
async fn heartbeat_where(
    sub: &mut Subscription,
    pred: impl Fn(&Value) -> bool,
) -> (Value, WorkerHeartbeat) {
    within("a matching heartbeat", async {
        loop {
            let msg = sub.next().await.expect("heartbeat subscription open");
            let raw: Value = serde_json::from_slice(&msg.payload).expect("heartbeat is JSON");
            let entry = model_entry(&raw["metrics"]["models"]);
            if raw["workerId"] == WORKER && entry.is_some_and(&pred) {
                let decoded = serde_json::from_value(raw.clone()).expect("heartbeat decodes");
                return (raw, decoded);
            }
        }
    })
    .await
}

/// The model's entry in a `models` list.
fn model_entry(models: &Value) -> Option<&Value> {
    models.as_array()?.iter().find(|m| m["modelId"] == MODEL)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_model_batching_figures_follow_a_known_load() {
    let server = NatsServer::start().await;
    let client = Controller::connect(&server.url()).await;
    // Room for everything in the worker: only the engine's two streams hold requests back.
    let config = test_config(
        &server.url(),
        "  maxConcurrent: 8\n  requestQueue:\n    maxDepth: 8\n  tierLimits:\n    \"<3B\":\n      \
         maxConcurrent: 8\n      queueDepth: 8\n",
    );
    let sim = SimEngine::new(SimEngineConfig {
        token_latency: TOKEN_LATENCY,
        streams_max: [(MODEL.to_owned(), 2)].into(),
        ..SimEngineConfig::default()
    });
    let worker = RunningWorker::start(WORKER, &config, Arc::new(sim.clone()), vec![]).await;
    let observer = worker.observer.clone();

    let idle = scrape(&observer);
    assert_eq!(of_model(&idle, "mlx_worker_model_requests_running"), None);
    assert!(
        idle.docs.contains_key("mlx_worker_model_batch_occupancy"),
        "the per-model metrics are described before any model has figures"
    );

    // Two requests start and hang after their first token; three wait behind them.
    sim.inject(Fault::HangAfter(1));
    sim.inject(Fault::HangAfter(1));
    let mut hung = Vec::new();
    for id in ["b-0", "b-1"] {
        let mut stream = client.subscribe_response(id).await;
        client.send(WORKER, &request(id)).await;
        stream.next(PATIENCE).await.unwrap();
        hung.push(stream);
    }
    let mut waiting = Vec::new();
    for id in ["b-2", "b-3", "b-4"] {
        waiting.push(client.subscribe_response(id).await);
        client.send(WORKER, &request(id)).await;
    }

    let busy = model_load_reaches(&observer, 2.0, 3.0).await;
    assert_eq!(of_model(&busy, "mlx_worker_model_batch_size"), Some(2.0));
    assert_eq!(
        of_model(&busy, "mlx_worker_model_batch_occupancy"),
        Some(1.0)
    );
    assert_eq!(
        of_model(&busy, "mlx_worker_model_streams_completed_total"),
        Some(0.0)
    );
    assert_eq!(
        sample(&busy, "mlx_worker_requests_in_flight", &[]),
        Some(2.0)
    );
    assert_eq!(sample(&busy, "mlx_worker_queue_depth", &[]), Some(3.0));

    let mut heartbeats = client.subscribe("worker.heartbeat").await;
    let (raw, heartbeat) =
        heartbeat_where(&mut heartbeats, |m| m["running"] == 2 && m["queued"] == 3).await;
    assert_eq!(check_heartbeat(&raw), Ok(()), "{raw}");
    let entry = &heartbeat.metrics.models[0];
    assert_eq!(heartbeat.metrics.models.len(), 1, "{raw}");
    assert_eq!(
        (entry.running, entry.queued, entry.batch_size),
        (2, 3, 2),
        "{raw}"
    );
    assert_eq!(entry.batch_occupancy, 1.0);
    assert_eq!(heartbeat.metrics.active_requests, 5);

    let reply = within(
        "$SRV.STATS",
        client
            .nats
            .request(format!("$SRV.STATS.mlx-worker.{WORKER}"), Bytes::new()),
    )
    .await
    .unwrap();
    let stats: Stats = serde_json::from_slice(&reply.payload).unwrap();
    let data = stats.endpoints[0]
        .data
        .as_ref()
        .expect("the worker's figures");
    let entry = model_entry(&data["models"]).unwrap_or_else(|| panic!("no {MODEL} in {data}"));
    assert_eq!(
        (&entry["running"], &entry["queued"], &entry["batchSize"]),
        (&json!(2), &json!(3), &json!(2)),
        "{data}"
    );
    assert_eq!(entry["batchOccupancy"], 1.0);

    // Cancelling the two lets the three waiting ones run, two at a time.
    for (id, stream) in ["b-0", "b-1"].into_iter().zip(&mut hung) {
        client.cancel(WORKER, id).await;
        assert_eq!(error_code(&collect_stream(stream).await), "CANCELLED");
    }
    for stream in &mut waiting {
        assert_complete(&collect_stream(stream).await, MAX_TOKENS);
    }
    let done = model_load_reaches(&observer, 0.0, 0.0).await;
    assert_eq!(sim.live_peak(MODEL), 2);
    // Only the three streams that completed count.
    let counter = |name: &str| of_model(&done, name).unwrap_or_else(|| panic!("no {name}"));
    let completed = 3.0;
    assert_eq!(
        counter("mlx_worker_model_streams_completed_total"),
        completed
    );
    assert_eq!(
        counter("mlx_worker_model_prompt_tokens_total"),
        completed * 3.0
    );
    assert_eq!(
        counter("mlx_worker_model_generated_tokens_total"),
        completed * MAX_TOKENS as f64
    );
    let latency = TOKEN_LATENCY.as_secs_f64();
    let close = |name: &str, expected: f64| {
        let got = counter(name);
        assert!(
            (got - expected).abs() < 1e-9,
            "{name}: {got}, not {expected}"
        );
    };
    close("mlx_worker_model_prompt_seconds_total", completed * latency);
    close(
        "mlx_worker_model_decode_seconds_total",
        completed * (MAX_TOKENS - 1) as f64 * latency,
    );
    assert_eq!(counter("mlx_worker_model_batch_size"), 2.0, "still loaded");
    assert_eq!(counter("mlx_worker_model_batch_occupancy"), 0.0);

    // The heartbeat whose interval holds completions (it is on the subscription, taken before
    // they happened) shows their rates, and their mean prefill.
    let (raw, heartbeat) = heartbeat_where(&mut heartbeats, |m| {
        m["generationTokensPerSecond"].as_f64() > Some(0.0)
    })
    .await;
    assert_eq!(check_heartbeat(&raw), Ok(()), "{raw}");
    let entry = &heartbeat.metrics.models[0];
    // Each stream has three prompt tokens and four generated ones, all counted in the interval
    // it completes in (the two rates are rounded to hundredths).
    let (prompt, generated) = (
        entry.prompt_tokens_per_second,
        entry.generation_tokens_per_second,
    );
    assert!((generated * 3.0 - prompt * 4.0).abs() < 0.05, "{raw}");
    assert_eq!(entry.avg_prefill_ms, 5.0, "{raw}");
    worker.stop().await;
}
