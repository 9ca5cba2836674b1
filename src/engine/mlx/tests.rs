// Goal: the supervisor restarts a runtime that exits while the engine serves, and never one
// that exits once the engine is stopping: then the exit is the end of its run, not a crash. A
// model is loaded with its tier's batch size within the runtime's live-stream bound, the
// catalog says so, and the load's answer is the model's figure, also after the runtime ends.
// Method: a stand-in runtime, a Python script given as the interpreter, that prints the
// readiness line, answers `runtime/info` (a bound of 6 live streams), `load_model` (noting its
// parameters in a file, answering a batch of 1) and `shutdown`, exits on any other call (the
// crash), and notes each start in a file; the engine's health is awaited, never slept on.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::*;
use crate::clock::SystemClock;

/// How long any one awaited event may take.
const PATIENCE: Duration = Duration::from_secs(20);

/// The stand-in runtime; `{starts}` is the file each start appends its pid and time to. The
/// start whose number `{die_at}` holds (when it exists) kills itself before it is ready.
const FAKE_RUNTIME: &str = r#"#!/usr/bin/env python3
import json, os, sys, time
with open("{starts}", "a") as f:
    f.write(f"{os.getpid()} {time.time()}\n")
if os.path.exists("{die_at}"):
    with open("{starts}") as f:
        start = len(f.read().splitlines())
    with open("{die_at}") as f:
        if str(start) == f.read().strip():
            sys.stderr.write("dying while starting\n")
            sys.stderr.flush()
            os.kill(os.getpid(), 9)
sys.stderr.write("MLX Runtime ready\n")
sys.stderr.flush()
for line in sys.stdin:
    call = json.loads(line)
    method = call.get("method")
    if method == "runtime/info":
        result = {"version": "fake", "mlx_supported": True, "capabilities": [],
                  "limits": {"streams_live_max": 6}}
    elif method == "load_model":
        with open("{loads}", "a") as f:
            f.write(json.dumps(call["params"]) + "\n")
        result = {"model_id": call["params"]["model_id"], "context_length": 64,
                  "parameter_count": 1000, "batch_size": 1, "batched": False}
    elif method == "shutdown":
        result = {}
    else:
        sys.exit(3)
    sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": call["id"], "result": result}) + "\n")
    sys.stdout.flush()
    if method == "shutdown":
        sys.exit(0)
"#;

/// A directory with the stand-in runtime, and the engine configuration that runs it.
struct Fake {
    dir: tempfile::TempDir,
}

impl Fake {
    fn new() -> Fake {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("python");
        let starts = dir.path().join("starts");
        let loads = dir.path().join("loads");
        std::fs::write(
            &script,
            FAKE_RUNTIME
                .replace("{starts}", starts.to_str().unwrap())
                .replace("{loads}", loads.to_str().unwrap())
                .replace("{die_at}", dir.path().join("die_at").to_str().unwrap()),
        )
        .unwrap();
        let model = dir.path().join("models/org/m");
        std::fs::create_dir_all(&model).unwrap();
        std::fs::write(model.join("config.json"), "{}").unwrap();
        std::fs::write(model.join("model.safetensors"), "weights").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::create_dir(dir.path().join("mlx_runtime")).unwrap();
        Fake { dir }
    }

    fn config(&self) -> EngineConfig {
        let mut config = crate::config::from_yaml("", Path::new("defaults.yaml"))
            .unwrap()
            .engine;
        config.python = self.dir.path().join("python");
        config.runtime_dir = self.dir.path().to_owned();
        config.model_dirs = vec![self.dir.path().join("models")];
        config.restart_window = Duration::from_secs(60);
        config
    }

    /// Makes the runtime's start number `n` (from 1) kill itself before it is ready.
    fn die_at_start(&self, n: usize) {
        std::fs::write(self.dir.path().join("die_at"), n.to_string()).unwrap();
    }

    /// When each start began, seconds since the epoch.
    fn start_times(&self) -> Vec<f64> {
        std::fs::read_to_string(self.dir.path().join("starts"))
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.split_whitespace().nth(1)?.parse().ok())
            .collect()
    }

    /// How many times the runtime started.
    fn starts(&self) -> usize {
        std::fs::read_to_string(self.dir.path().join("starts"))
            .unwrap_or_default()
            .lines()
            .count()
    }

    /// The parameters of each `load_model` the runtime was sent.
    fn loads(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("loads"))
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    async fn engine(&self) -> MlxEngine {
        self.engine_with(BatchSizes::default()).await
    }

    async fn engine_with(&self, batch_sizes: BatchSizes) -> MlxEngine {
        let started = MlxEngine::start(self.config(), batch_sizes, Arc::new(SystemClock));
        timeout(PATIENCE, started)
            .await
            .expect("the stand-in runtime starts in time")
            .expect("the stand-in runtime starts (python3 is needed on PATH)")
    }
}

/// Makes the stand-in runtime exit: any call but `runtime/info` and `shutdown` does.
async fn crash(engine: &MlxEngine) {
    let outcome = timeout(PATIENCE, engine.active_streams()).await.unwrap();
    assert!(
        matches!(outcome, Err(EngineError::Crashed { .. })),
        "{outcome:?}"
    );
}

/// Makes the stand-in runtime exit and waits until its second start is up.
async fn crash_and_restart(fake: &Fake, engine: &MlxEngine) {
    let mut health = engine.health();
    crash(engine).await;
    timeout(
        PATIENCE,
        health.wait_for(|h| matches!(h, EngineHealth::Up { .. }) && fake.starts() == 2),
    )
    .await
    .expect("the runtime is back in time")
    .unwrap();
}

#[tokio::test]
async fn a_runtime_that_exits_while_serving_is_restarted() {
    let fake = Fake::new();
    let engine = fake.engine().await;
    crash_and_restart(&fake, &engine).await;
    engine.shutdown(Duration::from_secs(5)).await;
    assert_eq!(*engine.health().borrow(), EngineHealth::Down);
    assert_eq!(fake.starts(), 2);
}

#[tokio::test]
async fn a_runtime_that_exits_once_stopping_began_is_not_restarted() {
    let fake = Fake::new();
    let engine = fake.engine().await;
    let mut health = engine.health();
    engine.begin_stop();
    crash(&engine).await;
    let after = timeout(
        PATIENCE,
        health.wait_for(|h| !matches!(h, EngineHealth::Up { .. })),
    )
    .await
    .expect("the health changes in time")
    .unwrap()
    .clone();
    assert_eq!(after, EngineHealth::Down);
    let refused = engine.active_streams().await;
    assert!(
        matches!(&refused, Err(EngineError::Unavailable { reason }) if reason.contains("stopping")),
        "{refused:?}"
    );
    engine.shutdown(Duration::from_secs(5)).await;
    assert_eq!(*engine.health().borrow(), EngineHealth::Down);
    assert_eq!(fake.starts(), 1);
}

#[tokio::test]
async fn a_model_loads_with_its_batch_within_the_runtimes_bound_and_keeps_the_answered_one() {
    let fake = Fake::new();
    // The configuration asks 8 of every model; the runtime holds 6 live streams.
    let engine = fake.engine_with(BatchSizes::uniform(8)).await;
    let catalog = engine.catalog().await.unwrap();
    assert_eq!(catalog.models["org/m"].streams_max, Some(6));
    let loaded = engine.load("org/m").await.unwrap();
    assert_eq!(
        loaded.streams_max,
        Some(1),
        "the batch size the load answered"
    );
    assert_eq!(
        fake.loads(),
        [serde_json::json!({
            "batch_size": 6, "local_path": fake.dir.path().join("models/org/m").canonicalize().unwrap(),
            "model_id": "org/m", "prefill_step_size": 512
        })]
    );
    assert_eq!(engine.model_figures()["org/m"].batch_size, 1);
    // A loaded model is not loaded again.
    assert_eq!(engine.load("org/m").await.unwrap(), loaded);
    assert_eq!(fake.loads().len(), 1);
    // Once the runtime has ended, the model is no longer loaded; its record stays.
    crash_and_restart(&fake, &engine).await;
    assert_eq!(engine.model_figures()["org/m"].batch_size, 0);
    engine.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_model_of_any_model_directory_loads_from_its_place() {
    let fake = Fake::new();
    // A Hugging Face cache as the second directory: the snapshot's files link into blobs/.
    let hub = fake.dir.path().join("hub");
    let repo = hub.join("models--org--cached");
    let snapshot = repo.join("snapshots/abc");
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::write(repo.join("refs/main"), "abc").unwrap();
    for (name, blob) in [("config.json", "c0"), ("model.safetensors", "w0")] {
        std::fs::write(repo.join("blobs").join(blob), "{}").unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{blob}"), snapshot.join(name)).unwrap();
    }
    let mut config = fake.config();
    config.model_dirs.push(hub);
    let started = MlxEngine::start(config, BatchSizes::default(), Arc::new(SystemClock));
    let engine = timeout(PATIENCE, started).await.unwrap().unwrap();
    let catalog = engine.catalog().await.unwrap();
    assert_eq!(
        catalog.models.keys().collect::<Vec<_>>(),
        ["org/cached", "org/m"]
    );
    engine.load("org/cached").await.unwrap();
    engine.load("org/m").await.unwrap();
    let paths: Vec<String> = fake
        .loads()
        .iter()
        .map(|l| l["local_path"].as_str().unwrap().to_owned())
        .collect();
    let expected = [
        snapshot.canonicalize().unwrap(),
        fake.dir.path().join("models/org/m").canonicalize().unwrap(),
    ];
    assert_eq!(paths, expected.map(|p| p.display().to_string()));
    engine.shutdown(Duration::from_secs(5)).await;
}

/// A runtime that dies while it starts is seen at once, not at the start-up timeout, and
/// what it last wrote on stderr says why.
#[tokio::test]
async fn a_runtime_that_dies_while_starting_is_seen_at_once_with_its_last_words() {
    let fake = Fake::new();
    let mut config = fake.config();
    config.startup_timeout = Duration::from_secs(600);
    config.command = Some(
        [
            "sh",
            "-c",
            "echo 'Traceback (most recent call last):' >&2; \
             echo \"ModuleNotFoundError: No module named 'mlx'\" >&2; exit 3",
        ]
        .map(String::from)
        .to_vec(),
    );
    let started = MlxEngine::start(config, BatchSizes::default(), Arc::new(SystemClock));
    let outcome = timeout(PATIENCE, started)
        .await
        .expect("the failed start is reported long before the start-up timeout");
    let Err(StartError::Failed { reason }) = outcome else {
        panic!("the start did not fail as it should");
    };
    assert!(
        reason.contains("exited during its start-up")
            && reason.contains("exit status: 3")
            && reason.contains("No module named 'mlx'"),
        "{reason}"
    );
}

/// A restarted runtime killed before it is ready is seen at once and started again after the
/// restart delay, not after the start-up timeout.
#[tokio::test]
async fn a_runtime_killed_while_restarting_is_started_again_within_two_seconds() {
    let fake = Fake::new();
    let mut config = fake.config();
    config.startup_timeout = Duration::from_secs(600);
    let started = MlxEngine::start(config, BatchSizes::default(), Arc::new(SystemClock));
    let engine = timeout(PATIENCE, started).await.unwrap().unwrap();
    fake.die_at_start(2);
    let mut health = engine.health();
    crash(&engine).await;
    timeout(
        PATIENCE,
        health.wait_for(|h| matches!(h, EngineHealth::Up { .. }) && fake.starts() == 3),
    )
    .await
    .expect("the runtime is back long before the start-up timeout")
    .unwrap();
    let times = fake.start_times();
    let between = times[2] - times[1];
    assert!(
        between < 2.0,
        "the third start came {between:.2} s after the second, which died while starting"
    );
    engine.shutdown(Duration::from_secs(5)).await;
}
