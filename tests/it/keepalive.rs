// Goal: models stay loaded only while they earn it: a model unused for its keep-alive is
// unloaded (counted in /metrics) and loaded again by the next request (one loaded on the
// control subject, with no request, goes idle too); a load that would pass
// the model memory budget unloads the least recently used idle model first, and is refused
// with `RESOURCE_LIMIT_EXCEEDED`, naming the figures, when every loaded model is in use.
// Method: a real runtime over two copies of the tiny model; in-process workers on a real
// nats-server with a short keep-alive, or with a budget of one model's bytes; the engine's
// health (which models the runtime holds) awaited, never slept on.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use mlx_worker::engine::mlx::MlxEngine;
use mlx_worker::engine::{Engine, EngineHealth};
use mlx_worker::protocol::StreamMessage;
use serde_json::json;

use crate::engine::{engine_config, started};
use testkit::runtime::TINY;
use testkit::*;

const COPY: &str = "copy/tiny";

fn request(id: &str, model: &str, max_tokens: u32) -> serde_json::Value {
    json!({"requestId": id, "modelId": model, "prompt": "Hello", "maxTokens": max_tokens, "temperature": 0})
}

/// A model directory of two copies of the tiny model, and a runtime serving it.
async fn two_models(dir: &Path) -> Arc<MlxEngine> {
    let mut config = engine_config();
    let tiny = config.model_dirs[0].join(TINY);
    for model in [TINY, COPY] {
        let to = dir.join(model);
        std::fs::create_dir_all(&to).unwrap();
        for entry in std::fs::read_dir(&tiny).unwrap().flatten() {
            if entry.file_type().unwrap().is_file() {
                std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
            }
        }
    }
    config.model_dirs = vec![dir.to_owned()];
    started(config).await
}

fn loaded(health: &EngineHealth) -> Vec<String> {
    match health {
        EngineHealth::Up { loaded } => loaded.clone(),
        _ => Vec::new(),
    }
}

fn unloads(worker: &RunningWorker, model: &str, reason: &str) -> String {
    let metrics = mlx_worker::metrics::prometheus::render(&worker.observer.metrics());
    let line = format!("mlx_worker_model_unloads_total{{model=\"{model}\",reason=\"{reason}\"}}");
    metrics
        .lines()
        .find(|l| l.starts_with(&line))
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_model_is_unloaded_after_its_keep_alive_and_loaded_again_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let engine = two_models(dir.path()).await;
    let server = NatsServer::start().await;
    let client = Controller::connect(&server.url()).await;
    let worker = RunningWorker::start(
        "keep",
        &test_config(&server.url(), "  keepAliveMs: 400\n"),
        engine.clone(),
        vec![],
    )
    .await;
    let mut health = engine.health();
    assert_complete(&client.infer("keep", request("k-1", COPY, 4)).await, 4);
    assert!(loaded(&health.borrow()).contains(&COPY.to_owned()));
    within(
        "the idle model's unload",
        health.wait_for(|h| loaded(h).is_empty()),
    )
    .await
    .unwrap();
    assert_eq!(
        unloads(&worker, COPY, "idle"),
        format!("mlx_worker_model_unloads_total{{model=\"{COPY}\",reason=\"idle\"}} 1")
    );
    assert_complete(&client.infer("keep", request("k-2", COPY, 4)).await, 4);
    within(
        "the reloaded model's unload",
        health.wait_for(|h| loaded(h).is_empty()),
    )
    .await
    .unwrap();
    // A model loaded on the control subject, with no request at all, goes idle the same way.
    let answer = client.nats.request(
        "worker.keep.models",
        Bytes::from(json!({"op": "load", "modelId": TINY}).to_string()),
    );
    let answer = within("the control reply", answer).await.unwrap();
    let reply: serde_json::Value = serde_json::from_slice(&answer.payload).unwrap();
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(loaded(&health.borrow_and_update()), [TINY]);
    within(
        "the controlled model's unload",
        health.wait_for(|h| loaded(h).is_empty()),
    )
    .await
    .unwrap();
    worker.stop().await;
    engine.shutdown(std::time::Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_past_the_budget_evicts_the_idle_model_or_is_refused_naming_the_figures() {
    let dir = tempfile::tempdir().unwrap();
    let engine = two_models(dir.path()).await;
    let catalog = engine.catalog().await.unwrap();
    let one = catalog.models[TINY].size_bytes;
    // Room for one of the two copies, not both.
    let settings = format!("  modelMemoryBytes: {}\n", one + one / 2);
    let server = NatsServer::start().await;
    let client = Controller::connect(&server.url()).await;
    let worker = RunningWorker::start(
        "budget",
        &test_config(&server.url(), &settings),
        engine.clone(),
        vec![],
    )
    .await;
    let mut health = engine.health();
    assert_complete(&client.infer("budget", request("b-1", TINY, 4)).await, 4);
    assert_eq!(loaded(&health.borrow()), [TINY]);
    // The second copy takes the first one's place: that one is idle.
    assert_complete(&client.infer("budget", request("b-2", COPY, 4)).await, 4);
    assert_eq!(loaded(&health.borrow_and_update()), [COPY]);
    assert!(unloads(&worker, TINY, "evicted").ends_with(" 1"));
    // While the copy serves a long request, the first one cannot come back.
    let mut long = client.subscribe_response("b-long").await;
    client.send("budget", &request("b-long", COPY, 4000)).await;
    long.next(PATIENCE).await.unwrap();
    let refused = client.infer("budget", request("b-3", TINY, 4)).await;
    assert_eq!(error_code(&refused), "RESOURCE_LIMIT_EXCEEDED");
    let Some(StreamMessage::Error { error, .. }) = refused.last() else {
        panic!("{refused:?}")
    };
    assert!(
        error.contains(&one.to_string())
            && error.contains(COPY)
            && error.contains("modelMemoryBytes"),
        "{error}"
    );
    client.cancel("budget", "b-long").await;
    collect_stream(&mut long).await;
    worker.stop().await;
    engine.shutdown(std::time::Duration::from_secs(5)).await;
}
