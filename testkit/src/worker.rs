//! Workers for tests: one in this process over the production transport
//! ([`RunningWorker`]), or the worker binary as a child process ([`WorkerProcess`],
//! [`run_until_exit`]), each with the configuration tests run it with ([`test_config`]).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use mlx_worker::clock::{Clock, SystemClock};
use mlx_worker::config::{self, NodeConfig, WorkerConfig};
use mlx_worker::engine::Engine;
use mlx_worker::hardware::HardwareProbe;
use mlx_worker::identity::Identity;
use mlx_worker::lifecycle::Lifecycle;
use mlx_worker::protocol::{WorkerRegistration, subject};
use mlx_worker::transport::Transport;
use mlx_worker::transport::nats::NatsTransport;
use mlx_worker::worker::{Deps, Observer, RunReport, Worker, WorkerError};
use mlx_worker_sim::SimProbe;
use tokio::process::{Child, Command};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::runtime::TINY;
use crate::{Controller, PATIENCE, init_logs, within};

/// A configuration for tests: external NATS at `url`, short intervals, the rest default;
/// `extra_yaml` adds lines under `worker:` (two-space indented).
pub fn test_config(url: &str, extra_yaml: &str) -> WorkerConfig {
    let yaml = format!(
        "nats:\n  serverUrl: {url}\n  reconnectTimeWait: 200\n  pingIntervalMs: 500\n\
         discovery:\n  heartbeatIntervalMs: 200\n\
         worker:\n  port: 0\n  lateSubscriberWaitMs: 2000\n{extra_yaml}"
    );
    config::from_yaml(&yaml, Path::new("test.yaml")).expect("test config is valid")
}

/// Connects with `config` (which must succeed) and waits until the link is up.
pub async fn connected(config: &config::NatsConfig, what: &str) -> NatsTransport {
    let transport = NatsTransport::connect(config)
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    wait_connected(&transport, what).await;
    transport
}

/// Waits until `transport`'s link is up.
pub async fn wait_connected(transport: &NatsTransport, what: &str) {
    let mut connection = transport.connection();
    within(what, connection.wait_for(|c| c.connected))
        .await
        .expect("the connection state is kept while the transport lives");
}

/// The arguments of `mlx-worker run` that serve the tiny model (from the repository root's
/// `models/`, loaded at start) and heartbeat every 200 ms.
pub const SERVING_TINY: [&str; 6] = [
    "--model-dir",
    "models",
    "--preload",
    TINY,
    "--heartbeat-interval-ms",
    "200",
];

/// A worker running in this process, as a task.
pub struct RunningWorker {
    /// Its lifecycle.
    pub lifecycle: watch::Receiver<Lifecycle>,
    /// What its HTTP port would serve.
    pub observer: Observer,
    /// Asks the worker to stop (drain); taken by [`RunningWorker::stop`].
    stop: Option<oneshot::Sender<()>>,
    /// The task running `Worker::run`; joined by [`RunningWorker::stop`].
    task: Option<JoinHandle<Result<RunReport, WorkerError>>>,
    registered_after: Duration,
}

impl RunningWorker {
    /// Starts a worker with this id, configuration and engine over a real NATS connection,
    /// and waits until its registration is seen.
    pub async fn start(
        id: &str,
        config: &WorkerConfig,
        engine: Arc<dyn Engine>,
        preload: Vec<String>,
    ) -> RunningWorker {
        // The worker subscribes before it registers, on one connection: once its
        // registration is seen, the server has its subscriptions too.
        let observer = Controller::connect(&config.nats.servers[0]).await;
        let mut registrations = observer.subscribe(subject::REGISTER).await;
        let clock = SystemClock;
        let start = clock.now();
        let transport = NatsTransport::connect(&config.nats)
            .await
            .unwrap_or_else(|e| panic!("the worker connects: {e}"));
        let mut worker = RunningWorker::start_with(
            id,
            config.node.clone(),
            engine,
            preload,
            Arc::new(transport),
            Arc::new(SimProbe::new()),
        );
        within("the worker's registration", async {
            while let Some(msg) = registrations.next().await {
                let reg: WorkerRegistration =
                    serde_json::from_slice(&msg.payload).expect("registration decodes");
                if reg.worker_id == id {
                    return;
                }
            }
        })
        .await;
        worker.registered_after = clock.now().saturating_duration_since(start);
        worker
    }

    /// Starts a worker over a given transport and probe.
    pub fn start_with(
        id: &str,
        node: NodeConfig,
        engine: Arc<dyn Engine>,
        preload: Vec<String>,
        transport: Arc<dyn Transport>,
        hardware: Arc<dyn HardwareProbe>,
    ) -> RunningWorker {
        let worker = build(id, node, engine, preload, transport, hardware);
        RunningWorker::spawn(Arc::new(worker))
    }

    /// Runs `worker` as a task.
    pub fn spawn(worker: Arc<Worker>) -> RunningWorker {
        init_logs();
        let lifecycle = worker.lifecycle();
        let observer = worker.observer();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            worker
                .run(async {
                    let _ = stopped.await;
                })
                .await
        });
        RunningWorker {
            lifecycle,
            observer,
            stop: Some(stop),
            task: Some(task),
            registered_after: Duration::ZERO,
        }
    }

    /// For a worker started with [`RunningWorker::start`]: the time from its transport's
    /// connect to the arrival of its registration (zero for the others).
    pub fn registered_after(&self) -> Duration {
        self.registered_after
    }

    /// Waits until the worker is ready.
    pub async fn ready(&mut self) {
        within(
            "the worker to be ready",
            self.lifecycle.wait_for(|s| *s == Lifecycle::Ready),
        )
        .await
        .expect("lifecycle channel open");
    }

    /// Stops the worker (drain) and returns its report; fails the test unless it ends within
    /// [`PATIENCE`] and its run succeeds.
    pub async fn stop(self) -> RunReport {
        self.stop_within(PATIENCE).await
    }

    /// Stops the worker (drain) and returns its report; fails the test unless it ends within
    /// `limit` and its run succeeds.
    pub async fn stop_within(mut self, limit: Duration) -> RunReport {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = self.task.take().expect("a running worker has its task");
        match tokio::time::timeout(limit, task).await {
            Err(_) => panic!("the worker did not stop within {limit:?}"),
            Ok(joined) => joined
                .expect("worker task joins")
                .unwrap_or_else(|e| panic!("the worker's run failed: {e}")),
        }
    }
}

/// A worker with this id over `transport`, as tests build it (host `test-host`).
pub fn build(
    id: &str,
    node: NodeConfig,
    engine: Arc<dyn Engine>,
    preload: Vec<String>,
    transport: Arc<dyn Transport>,
    hardware: Arc<dyn HardwareProbe>,
) -> Worker {
    let deps = Deps {
        transport,
        engine,
        clock: Arc::new(SystemClock),
        hardware,
    };
    let identity = Identity {
        worker_id: id.to_owned(),
        hostname: "test-host".to_owned(),
        ip: "127.0.0.1".to_owned(),
        port: 8080,
    };
    Worker::new(identity, node, preload, deps)
}

/// The worker binary and the repository root it runs from (so `models/` is the tiny model's
/// directory); [`crate::worker_binary!`] names the ones of the calling package.
#[derive(Clone, Debug)]
pub struct WorkerBinary {
    /// The executable.
    pub path: PathBuf,
    /// The repository root.
    pub repo_root: PathBuf,
}

impl WorkerBinary {
    /// The binary at `path`, run from `repo_root`.
    pub fn new(path: impl Into<PathBuf>, repo_root: impl Into<PathBuf>) -> WorkerBinary {
        WorkerBinary {
            path: path.into(),
            repo_root: repo_root.into(),
        }
    }
}

/// Sends `signal` (`TERM`, `KILL`, …) to process `pid`.
pub fn send_signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// What a worker process that stopped by itself printed, and how it exited.
#[derive(Debug)]
pub struct Exited {
    /// The exit code (`None` when a signal ended it).
    pub code: Option<i32>,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

fn state_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("a temporary state directory")
}

/// Runs `mlx-worker run <args> --port 0` with a fresh state directory and `envs`, and waits
/// (bounded) until it exits by itself: for a start-up that must fail. A worker that would
/// go on retrying never exits, and the wait fails the test.
pub async fn run_until_exit(
    binary: &WorkerBinary,
    what: &str,
    args: &[&str],
    envs: &[(&str, &str)],
) -> Exited {
    let state = state_dir();
    let output = Command::new(&binary.path)
        .arg("run")
        .args(args)
        .args(["--port", "0"])
        .env("MLX_WORKER_STATE_DIR", state.path())
        .envs(envs.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let output = within(&format!("the worker to exit ({what})"), output)
        .await
        .expect("run the worker binary");
    Exited {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A running `mlx-worker run` process, started from the repository root with its own state
/// directory; killed if dropped.
pub struct WorkerProcess {
    /// The process.
    pub child: Child,
    /// Its state directory, removed when dropped.
    _state: tempfile::TempDir,
}

impl WorkerProcess {
    /// Starts `mlx-worker run <args> --port 0`.
    pub fn spawn(binary: &WorkerBinary, args: &[&str]) -> WorkerProcess {
        WorkerProcess::spawn_with_env(binary, args, &[])
    }

    /// Starts `mlx-worker run <args> --port 0` with `envs` added to its environment (and so
    /// to the MLX runtime's, which it inherits).
    pub fn spawn_with_env(
        binary: &WorkerBinary,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> WorkerProcess {
        let state = state_dir();
        let child = Command::new(&binary.path)
            .current_dir(&binary.repo_root)
            .arg("run")
            .args(args)
            .args(["--port", "0"])
            .env("MLX_WORKER_STATE_DIR", state.path())
            .envs(envs.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start the mlx-worker binary");
        WorkerProcess {
            child,
            _state: state,
        }
    }

    /// Starts a worker `id` on the message server at `url`, serving the tiny model (preloaded),
    /// heartbeating every 200 ms.
    pub fn serving_tiny(binary: &WorkerBinary, url: &str, id: &str) -> WorkerProcess {
        let args = [&["--nats-url", url, "--worker-id", id][..], &SERVING_TINY].concat();
        WorkerProcess::spawn(binary, &args)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child
            .id()
            .expect("the process has not been waited for")
    }

    /// Sends SIGTERM and returns the exit code once the process has exited (-1 for a signal).
    pub async fn terminate(mut self) -> i32 {
        send_signal(self.pid(), "TERM");
        within("the worker to exit", self.child.wait())
            .await
            .expect("wait for the worker")
            .code()
            .unwrap_or(-1)
    }
}
