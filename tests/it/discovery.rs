// Goal: a model in a Hugging Face cache, as huggingface-cli and mlx_lm leave it, is found,
// named `org/name`, sized by its real files and served by the worker binary with the real
// runtime, from the second of two model directories; the first directory's copy of an id wins.
// Method: a cache tree built in a temporary directory from the tiny model of `models/` (each
// file a blob, each snapshot name a relative symbolic link into `blobs/`, `refs/main` naming
// the newer of two snapshots, a repository of the first directory's id beside it); then
// `mlx-worker models` on both directories, and `mlx-worker run` on a real nats-server,
// compared with the same model served from `models/`. Nothing is downloaded.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use mlx_worker::protocol::{StreamMessage, WorkerRegistration};
use serde_json::{Value, json};

use testkit::runtime::TINY;
use testkit::*;

/// The id the cache gives the tiny model's copy.
const CACHED: &str = "test-org/tiny-llama-0.1";
/// The revision `refs/main` names.
const REV: &str = "9a1f0c3e5b7d2468ace13579bdf02468ace13579";

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A cache repository `models--{org}--{name}` below `hub` holding the files of the model at
/// `model` in its `main` snapshot (and `config.json` alone in an older one); the bytes of the
/// files the main snapshot reaches.
fn cache_repo(hub: &Path, org: &str, name: &str, model: &Path) -> u64 {
    let repo = hub.join(format!("models--{org}--{name}"));
    let main = repo.join("snapshots").join(REV);
    let old = repo.join("snapshots/0000000000000000000000000000000000000000");
    for dir in [
        repo.join("blobs"),
        repo.join("refs"),
        main.clone(),
        old.clone(),
    ] {
        fs::create_dir_all(dir).unwrap();
    }
    fs::write(repo.join("refs/main"), REV).unwrap();
    let mut bytes = 0;
    let mut names: Vec<_> = fs::read_dir(model)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    for (i, name) in names.iter().enumerate() {
        // Blobs are named by their hash; any 40 hex digits do here.
        let blob = format!("{:040x}", i + 1);
        let len = fs::copy(model.join(name), repo.join("blobs").join(&blob)).unwrap();
        bytes += len;
        let target = format!("../../blobs/{blob}");
        std::os::unix::fs::symlink(&target, main.join(name)).unwrap();
        if name == "config.json" {
            std::os::unix::fs::symlink(&target, old.join(name)).unwrap();
        }
    }
    bytes
}

/// `mlx-worker models` with these flags, run from the repository root: its JSON.
async fn models(args: &[&str]) -> Value {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_mlx-worker"))
        .current_dir(repo_root())
        .arg("models")
        .args(args)
        .stderr(Stdio::inherit())
        .output();
    let out = within("mlx-worker models", out).await.unwrap();
    assert!(out.status.success(), "{:?}", out.status);
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The text of a stream's tokens, which must end `done`.
fn completed_text(stream: &[StreamMessage]) -> String {
    assert_done(stream);
    stream_text(stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_in_a_hugging_face_cache_is_listed_as_org_name_and_served() {
    let tiny = repo_root().join("models").join(TINY);
    let cache = tempfile::tempdir().unwrap();
    let hub = cache.path().join("hub");
    let cached_bytes = cache_repo(&hub, "test-org", "tiny-llama-0.1", &tiny);
    // The first directory has this id: its copy serves, the cache's is skipped.
    cache_repo(&hub, "mlx-worker", "tiny-llama", &tiny);
    let dirs = format!("models:{}", hub.display());
    let snapshot = hub
        .join("models--test-org--tiny-llama-0.1/snapshots")
        .join(REV);

    let listed = models(&["--model-dir", &dirs]).await;
    assert_eq!(
        listed["modelDirs"],
        json!(["models", hub.display().to_string()])
    );
    let by_id: BTreeMap<&str, &Value> = listed["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["modelId"].as_str().unwrap(), m))
        .collect();
    assert_eq!(by_id.keys().copied().collect::<Vec<_>>(), [TINY, CACHED]);
    let cached = by_id[CACHED];
    assert_eq!(cached["path"], json!(snapshot.display().to_string()));
    assert_eq!(cached["sizeBytes"], json!(cached_bytes));
    assert!(cached_bytes > 400_000, "the weights count: {cached_bytes}");
    assert_eq!(cached["parameterCount"], by_id[TINY]["parameterCount"]);
    assert_eq!(by_id[TINY]["path"], json!(format!("models/{TINY}")));

    let server = NatsServer::start().await;
    let client = Controller::connect(&server.url()).await;
    let mut registrations = client.subscribe("worker.register").await;
    let binary = WorkerProcess::spawn(
        &worker_binary!(),
        &[
            "--nats-url",
            &server.url(),
            "--worker-id",
            "hf",
            "--model-dir",
            &dirs,
            "--preload",
            &format!("{CACHED},{TINY}"),
            "--heartbeat-interval-ms",
            "200",
        ],
    );
    let msg = within("the registration", registrations.next())
        .await
        .unwrap();
    let reg: WorkerRegistration = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(reg.skills.available_models, [TINY, CACHED]);
    assert_eq!(
        reg.skills.model_paths[CACHED],
        snapshot.display().to_string()
    );
    assert_eq!(reg.skills.model_paths[TINY], format!("models/{TINY}"));
    let tiny_bytes = by_id[TINY]["sizeBytes"].as_u64().unwrap();
    assert_eq!(reg.skills.total_model_size, cached_bytes + tiny_bytes);
    client
        .heartbeat_where("hf", |hb| {
            hb.metrics.models_loaded.contains(&CACHED.to_owned())
                && hb.metrics.models_loaded.contains(&TINY.to_owned())
        })
        .await;

    // The cache's copy generates what the same weights do from the first directory.
    let request = |id: &str, model: &str| json!({"requestId": id, "modelId": model, "prompt": "Hello world", "maxTokens": 12, "temperature": 0});
    let from_cache = completed_text(&client.infer("hf", request("hf-1", CACHED)).await);
    let from_models = completed_text(&client.infer("hf", request("hf-2", TINY)).await);
    assert!(!from_cache.is_empty());
    assert_eq!(from_cache, from_models);
    assert_eq!(binary.terminate().await, 0);
}
