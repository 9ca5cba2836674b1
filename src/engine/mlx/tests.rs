// Goal: the supervisor restarts a runtime that exits while the engine serves, and never one
// that exits once the engine is stopping: then the exit is the end of its run, not a crash.
// Method: a stand-in runtime, a Python script given as the interpreter, that prints the
// readiness line, answers `runtime/info` and `shutdown`, exits on any other call (the crash),
// and notes each start in a file; the engine's health is awaited, never slept on.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::*;
use crate::clock::SystemClock;

/// How long any one awaited event may take.
const PATIENCE: Duration = Duration::from_secs(20);

/// The stand-in runtime; `{starts}` is the file each start appends its pid to.
const FAKE_RUNTIME: &str = r#"#!/usr/bin/env python3
import json, os, sys
with open("{starts}", "a") as f:
    f.write(f"{os.getpid()}\n")
sys.stderr.write("MLX Runtime ready\n")
sys.stderr.flush()
for line in sys.stdin:
    call = json.loads(line)
    method = call.get("method")
    if method == "runtime/info":
        result = {"version": "fake", "mlx_supported": True, "capabilities": []}
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
        std::fs::write(
            &script,
            FAKE_RUNTIME.replace("{starts}", starts.to_str().unwrap()),
        )
        .unwrap();
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
        config.model_dir = PathBuf::from(self.dir.path());
        config.restart_window = Duration::from_secs(60);
        config
    }

    /// How many times the runtime started.
    fn starts(&self) -> usize {
        std::fs::read_to_string(self.dir.path().join("starts"))
            .unwrap_or_default()
            .lines()
            .count()
    }

    async fn engine(&self) -> MlxEngine {
        let started = MlxEngine::start(self.config(), Arc::new(SystemClock));
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

#[tokio::test]
async fn a_runtime_that_exits_while_serving_is_restarted() {
    let fake = Fake::new();
    let engine = fake.engine().await;
    let mut health = engine.health();
    crash(&engine).await;
    timeout(
        PATIENCE,
        health.wait_for(|h| matches!(h, EngineHealth::Up { .. }) && fake.starts() == 2),
    )
    .await
    .expect("the runtime is back in time")
    .unwrap();
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
