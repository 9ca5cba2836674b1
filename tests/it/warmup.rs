// Goal: a preloaded model is warm before the worker says it is ready: the first request after
// preload comes about as fast as the steady state (the load ran the generations that compile
// MLX's kernels), and `/readyz` stays false until the preload has ended.
// Method: a real runtime whose temporary directory (where MLX on the CPU caches its compiled
// kernels) is a fresh empty one, set through `runtime.env`, so nothing is compiled before this
// worker's load; an in-process worker preloading the tiny model on a real nats-server. Time to
// first token: request sent → first token read, the first request against the median of the
// next ones (same run, same prompt shape, the worker's default sampling).

use std::time::Duration;

use mlx_worker::clock::{Clock, SystemClock};
use mlx_worker::engine::{Engine, EngineHealth};
use mlx_worker::protocol::StreamMessage;
use serde_json::json;

use crate::engine::{engine_config, started};
use testkit::runtime::TINY;
use testkit::*;

/// Requests after the first, for the steady state.
const STEADY: usize = 7;

async fn first_token_after(client: &Controller, id: &str) -> Duration {
    let mut stream = client.subscribe_response(id).await;
    let body =
        json!({"requestId": id, "modelId": TINY, "prompt": "Hello there, worker", "maxTokens": 4});
    client.send("warm", &body).await;
    let sent = SystemClock.now();
    let first = stream
        .next(PATIENCE)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        matches!(first.message, StreamMessage::Token { .. }),
        "{:?}",
        first.message
    );
    let elapsed = first.at.saturating_duration_since(sent);
    let rest = collect_stream(&mut stream).await;
    assert_done(&rest);
    elapsed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_request_after_preload_is_as_fast_as_the_steady_state() {
    let kernels = tempfile::tempdir().unwrap();
    let mut config = engine_config();
    config
        .env
        .insert("TMPDIR".to_owned(), kernels.path().display().to_string());
    let engine = started(config).await;
    let server = NatsServer::start().await;
    let client = Controller::connect(&server.url()).await;
    let worker = RunningWorker::start(
        "warm",
        &test_config(&server.url(), ""),
        engine.clone(),
        vec![TINY.to_owned()],
    )
    .await;
    // Registered, but not ready until the preload (load and warm-up) has ended.
    let loaded = |health: &EngineHealth| matches!(health, EngineHealth::Up { loaded } if loaded.iter().any(|m| m == TINY));
    assert!(
        !worker.observer.is_ready() || loaded(&engine.health().borrow()),
        "ready before its preloaded model was loaded"
    );
    client
        .heartbeat_where("warm", |hb| {
            hb.metrics.models_loaded.contains(&TINY.to_owned())
        })
        .await;
    let mut health = engine.health();
    within("the preload to end", health.wait_for(loaded))
        .await
        .unwrap();
    within("the preload's end", worker.observer.preload_ended()).await;
    assert!(worker.observer.is_ready());

    let first = first_token_after(&client, "warm-first").await;
    let mut steady = Vec::new();
    for n in 0..STEADY {
        steady.push(first_token_after(&client, &format!("warm-{n}")).await);
    }
    steady.sort();
    let median = steady[STEADY / 2];
    eprintln!("first request after preload: {first:?}; steady state p50 {median:?} over {STEADY}");
    assert!(
        first <= median * 3,
        "the first request took {first:?}, the steady state {median:?}"
    );
    worker.stop().await;
    engine.shutdown(Duration::from_secs(5)).await;
}
