// Goal: one broken model does not take the worker out of routing: a model whose load fails is
// withdrawn from the next registration and recorded with its reason in `$SRV.INFO`, while the
// worker's heartbeat stays `online` and its good model serves; a model added to the model
// directory shows in a registration within one rescan and serves, and one deleted goes.
// Method: a real runtime over a model directory of the test's own: the tiny model, and a
// "model" whose weights are not safetensors (a config and garbage bytes); an in-process worker
// rescanning every 300 ms on a real nats-server; registrations and heartbeats awaited.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use mlx_worker::engine::Engine;
use mlx_worker::engine::mlx::MlxEngine;
use mlx_worker::protocol::{WorkerRegistration, WorkerStatus};
use mlx_worker::transport::Subscription;
use serde_json::json;

use crate::engine::{engine_config, started};
use testkit::runtime::TINY;
use testkit::*;

const BROKEN: &str = "broken/model";
const ADDED: &str = "added/tiny";

fn copy_model(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// A model directory of the tiny model and a "model" whose weights are not safetensors, the
/// tiny model's own directory, and a runtime serving the first.
async fn tiny_and_broken() -> (tempfile::TempDir, std::path::PathBuf, Arc<MlxEngine>) {
    let models = tempfile::tempdir().unwrap();
    let mut config = engine_config();
    let tiny = config.model_dirs[0].join(TINY);
    copy_model(&tiny, &models.path().join(TINY));
    let broken = models.path().join(BROKEN);
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::copy(tiny.join("config.json"), broken.join("config.json")).unwrap();
    std::fs::write(broken.join("model.safetensors"), b"these are not weights").unwrap();
    config.model_dirs = vec![models.path().to_owned()];
    (models, tiny, started(config).await)
}

/// The next registration of the worker for which `pred` holds.
async fn next_registration(
    registrations: &mut Subscription,
    what: &str,
    pred: impl Fn(&WorkerRegistration) -> bool,
) -> WorkerRegistration {
    within(what, async {
        while let Some(msg) = registrations.next().await {
            let reg: WorkerRegistration = serde_json::from_slice(&msg.payload).unwrap();
            if reg.worker_id == "health" && pred(&reg) {
                return reg;
            }
        }
        panic!("the registrations ended");
    })
    .await
}

fn request(id: &str, model: &str) -> serde_json::Value {
    json!({"requestId": id, "modelId": model, "prompt": "Hello", "maxTokens": 4, "temperature": 0})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_model_is_withdrawn_while_the_worker_serves_and_added_models_appear() {
    let (models, tiny, engine) = tiny_and_broken().await;
    let broken = models.path().join(BROKEN);
    let server = NatsServer::start().await;
    let client = Controller::connect(&server.url()).await;
    let mut registrations = client.subscribe("worker.register").await;
    let worker = RunningWorker::start(
        "health",
        &test_config(&server.url(), "  modelRescanMs: 300\n"),
        engine.clone(),
        vec![],
    )
    .await;
    let first = next_registration(&mut registrations, "a registration", |_| true).await;
    let mut both = first.skills.available_models.clone();
    both.sort();
    assert_eq!(both, [BROKEN, TINY]);

    let failed = client.infer("health", request("b-1", BROKEN)).await;
    assert_eq!(error_code(&failed), "MODEL_LOAD_FAILED");
    let reg = next_registration(
        &mut registrations,
        "a registration without the broken model",
        |r| !r.skills.available_models.iter().any(|m| m == BROKEN),
    )
    .await;
    assert_eq!(reg.skills.available_models, [TINY]);
    assert_eq!(reg.status, WorkerStatus::Online);
    // Asked again, it is refused at once with the load's reason, without a load.
    let again = client.infer("health", request("b-2", BROKEN)).await;
    assert!(
        format!("{again:?}").contains("withdrawn after 1 failed load"),
        "{again:?}"
    );
    // The good model serves, and the worker stays online.
    assert_complete(&client.infer("health", request("t-1", TINY)).await, 4);
    client
        .heartbeat_where("health", |hb| hb.status == WorkerStatus::Online)
        .await;
    let info = within(
        "$SRV.INFO",
        client
            .nats
            .request("$SRV.INFO.mlx-worker.health", Bytes::new()),
    )
    .await
    .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.payload).unwrap();
    let withdrawn = &info["withdrawnModels"][BROKEN];
    assert_eq!(withdrawn["failures"], 1, "{info}");
    assert!(
        withdrawn["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{info}"
    );

    // A model copied in shows within one rescan, and serves, on its subject too.
    copy_model(&tiny, &models.path().join(ADDED));
    next_registration(
        &mut registrations,
        "a registration with the added model",
        |r| r.skills.available_models.iter().any(|m| m == ADDED),
    )
    .await;
    assert_complete(&client.infer("health", request("a-1", ADDED)).await, 4);
    // A model deleted goes, and so does the broken one's record.
    std::fs::remove_dir_all(&broken).unwrap();
    std::fs::remove_dir_all(models.path().join(ADDED)).unwrap();
    let reg = next_registration(
        &mut registrations,
        "a registration without the deleted model",
        |r| !r.skills.available_models.iter().any(|m| m == ADDED),
    )
    .await;
    assert_eq!(reg.skills.available_models, [TINY]);
    let refused = client.infer("health", request("a-2", ADDED)).await;
    assert_eq!(error_code(&refused), "MODEL_NOT_FOUND");
    worker.stop().await;
    engine.shutdown(std::time::Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_preload_leaves_its_model_unadvertised() {
    let (_models, _, engine) = tiny_and_broken().await;
    let server = NatsServer::start().await;
    let client = Controller::connect(&server.url()).await;
    let mut registrations = client.subscribe("worker.register").await;
    let worker = RunningWorker::start(
        "health",
        &test_config(&server.url(), ""),
        engine.clone(),
        vec![BROKEN.to_owned(), TINY.to_owned()],
    )
    .await;
    within("the preload's end", worker.observer.preload_ended()).await;
    let reg = next_registration(
        &mut registrations,
        "a registration after the preload",
        |r| !r.skills.available_models.iter().any(|m| m == BROKEN),
    )
    .await;
    assert_eq!(reg.skills.available_models, [TINY]);
    assert_eq!(reg.status, WorkerStatus::Online);
    assert!(worker.observer.is_ready(), "the failed preload ended too");
    worker.stop().await;
    engine.shutdown(std::time::Duration::from_secs(5)).await;
}
