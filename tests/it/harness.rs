//! Test harness: a real `nats-server` on a free loopback port, a worker over the production
//! `NatsTransport`, and a client that speaks the controller's side of the protocol.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use futures::StreamExt;
use mlx_worker::client::{ResponseStream, StreamCheck, Target};
use mlx_worker::clock::SystemClock;
use mlx_worker::config::{self, NodeConfig, WorkerConfig};
use mlx_worker::engine::Engine;
use mlx_worker::identity::Identity;
use mlx_worker::lifecycle::Lifecycle;
use mlx_worker::protocol::{StreamMessage, WorkerHeartbeat, WorkerRegistration, subject};
use mlx_worker::transport::nats::NatsTransport;
use mlx_worker::transport::{InboundMessage, Subscription, Transport};
use mlx_worker::worker::{Deps, RunReport, Worker, WorkerError};
use mlx_worker_sim::SimProbe;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// How long any single expected event may take before the test fails.
pub(crate) const PATIENCE: Duration = Duration::from_secs(20);

/// Waits for `fut`, failing the test with `what` if it takes longer than [`PATIENCE`].
pub(crate) async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(PATIENCE, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {PATIENCE:?} waiting for {what}"),
    }
}

#[allow(clippy::disallowed_methods)] // Tests may look at PATH.
fn nats_server_binary() -> PathBuf {
    for dir in std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/bin")])
    {
        let candidate = dir.join("nats-server");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("nats-server not found on PATH or in /usr/sbin: run ci/setup.sh (it installs it)");
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local address").port()
}

/// Sends the worker's logs to the test's captured output (shown when a test fails).
pub(crate) fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("mlx_worker=debug")),
        )
        .with_test_writer()
        .try_init();
}

/// A `nats-server` process on 127.0.0.1.
pub(crate) struct NatsServer {
    child: Option<Child>,
    /// Its client port.
    pub(crate) port: u16,
    args: Vec<String>,
}

impl NatsServer {
    /// Starts a server on a free port and waits until it accepts clients.
    pub(crate) async fn start() -> NatsServer {
        NatsServer::start_with(&[]).await
    }

    /// Starts a server with extra command-line arguments (authentication, …).
    pub(crate) async fn start_with(args: &[&str]) -> NatsServer {
        init_logs();
        let mut server = NatsServer {
            child: None,
            port: free_port(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
        };
        server.spawn().await.expect("nats-server starts");
        server
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let mut child = Command::new(nats_server_binary())
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("spawn nats-server")?;
        let stderr = child.stderr.take().context("nats-server stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let ready = tokio::time::timeout(PATIENCE, async {
            while let Some(line) = lines.next_line().await? {
                if line.contains("Server is ready") {
                    return Ok::<bool, std::io::Error>(true);
                }
            }
            Ok(false)
        })
        .await;
        match ready {
            Ok(Ok(true)) => {}
            other => bail!("nats-server did not become ready: {other:?}"),
        }
        // Keep draining its log so the pipe never fills.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.child = Some(child);
        Ok(())
    }

    /// The client URL.
    pub(crate) fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL) and waits for it to be gone.
    pub(crate) async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("kill nats-server");
        }
    }

    /// Starts it again on the same port.
    pub(crate) async fn restart(&mut self) {
        self.kill().await;
        // The port may linger for a moment after the kill; retry until it binds.
        for _ in 0..50 {
            if self.spawn().await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("nats-server did not restart on port {}", self.port);
    }
}

/// A configuration for tests: external NATS at `url`, short intervals, the rest default.
pub(crate) fn test_config(url: &str, extra_yaml: &str) -> WorkerConfig {
    let yaml = format!(
        "nats:\n  serverUrl: {url}\n  reconnectTimeWait: 200\n  pingIntervalMs: 500\n\
         discovery:\n  heartbeatIntervalMs: 200\n\
         worker:\n  port: 0\n  lateSubscriberWaitMs: 2000\n{extra_yaml}"
    );
    config::from_yaml(&yaml, std::path::Path::new("test.yaml")).expect("test config is valid")
}

/// A worker running in the background.
pub(crate) struct RunningWorker {
    /// Its lifecycle.
    pub(crate) lifecycle: watch::Receiver<Lifecycle>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<RunReport, WorkerError>>>,
}

impl RunningWorker {
    /// Starts a worker with this id, configuration and engine over a real NATS connection.
    pub(crate) async fn start(
        id: &str,
        config: &WorkerConfig,
        engine: Arc<dyn Engine>,
        preload: Vec<String>,
    ) -> RunningWorker {
        // The worker subscribes before it registers, on one connection: once its
        // registration is seen, the server has its subscriptions too.
        let observer = Controller::connect(&config.nats.servers[0]).await;
        let mut registrations = observer.subscribe(subject::REGISTER).await;
        let transport = NatsTransport::connect(&config.nats)
            .await
            .expect("worker connects");
        let worker = RunningWorker::start_with(
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
        worker
    }

    /// Starts a worker over a given transport.
    pub(crate) fn start_with(
        id: &str,
        node: NodeConfig,
        engine: Arc<dyn Engine>,
        preload: Vec<String>,
        transport: Arc<dyn mlx_worker::transport::Transport>,
        hardware: Arc<dyn mlx_worker::hardware::HardwareProbe>,
    ) -> RunningWorker {
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
        let worker = Worker::new(identity, node, preload, deps);
        let lifecycle = worker.lifecycle();
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
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Waits until the worker is ready.
    pub(crate) async fn ready(&mut self) {
        within(
            "the worker to be ready",
            self.lifecycle.wait_for(|s| *s == Lifecycle::Ready),
        )
        .await
        .expect("lifecycle channel open");
    }

    /// Stops the worker (drain) and returns its report.
    pub(crate) async fn stop(mut self) -> RunReport {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = self.task.take().expect("worker task");
        within("the worker to stop", task)
            .await
            .expect("worker task joins")
            .expect("worker run succeeds")
    }
}

/// The controller's side: the library's client over its own connection, and a plain NATS
/// connection for request/reply, which `Transport` does not offer.
///
/// Everything the worker must see in order (requests, cancels, raw payloads) goes over the
/// transport; a request sent with a reply subject goes over the plain connection, after a
/// round trip on the transport, so the server has routed everything sent before it.
pub(crate) struct Controller {
    /// The connection the client's subscriptions and publishes use.
    pub(crate) transport: Arc<NatsTransport>,
    client: mlx_worker::client::Client,
    /// A plain NATS connection, for request/reply only.
    pub(crate) nats: async_nats::Client,
}

impl Controller {
    /// Connects to `url` with no credentials.
    pub(crate) async fn connect(url: &str) -> Controller {
        Controller::connect_with(
            &test_config(url, "").nats,
            async_nats::ConnectOptions::new(),
        )
        .await
    }

    /// Connects the transport with `config` and the plain connection with `raw` (the same
    /// credentials, in async-nats' terms).
    pub(crate) async fn connect_with(
        config: &config::NatsConfig,
        raw: async_nats::ConnectOptions,
    ) -> Controller {
        let transport = Arc::new(connected(config, "the controller's connection").await);
        let nats = raw
            .connect(config.servers.clone())
            .await
            .expect("the controller's plain connection");
        Controller {
            client: mlx_worker::client::Client::new(transport.clone(), Arc::new(SystemClock)),
            transport,
            nats,
        }
    }

    /// Sends `request` to the worker (subscribing to its response subject first) and reads
    /// the stream ([`collect_stream`]).
    pub(crate) async fn infer(&self, worker_id: &str, request: Value) -> Vec<StreamMessage> {
        let id = request["requestId"].as_str().expect("requestId").to_owned();
        let mut stream = self
            .client
            .send_payload(
                &Target::Worker(worker_id.to_owned()),
                &id,
                Bytes::from(request.to_string()),
            )
            .await
            .unwrap_or_else(|e| panic!("send {id}: {e}"));
        self.flush().await;
        collect_stream(&mut stream).await
    }

    /// Subscribes to `response.{id}` and waits until the server has the subscription.
    pub(crate) async fn subscribe_response(&self, request_id: &str) -> ResponseStream {
        let stream = self
            .client
            .subscribe(request_id)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        self.sync().await;
        stream
    }

    /// Subscribes to `subject` and waits until the server has the subscription.
    pub(crate) async fn subscribe(&self, subject: &str) -> Subscription {
        let sub = self
            .transport
            .subscribe(subject.to_owned(), None)
            .await
            .unwrap_or_else(|e| panic!("subscribe to {subject}: {e}"));
        self.sync().await;
        sub
    }

    /// Waits until the server has processed everything this controller's transport sent: a
    /// listener check on a subject nobody listens on is answered after one round trip, and
    /// the server handles a connection's messages in order. (`flush` only writes the socket.)
    pub(crate) async fn sync(&self) {
        let heard = self
            .transport
            .publish_if_listened("harness.sync".to_owned(), Bytes::new())
            .await;
        assert_eq!(heard, Ok(false), "sync round trip");
    }

    /// Writes everything published so far to the socket.
    pub(crate) async fn flush(&self) {
        self.transport.flush().await.expect("flush");
    }

    /// Publishes `payload` on `target`'s subject (not flushed).
    pub(crate) async fn publish(&self, target: &Target, payload: Bytes) {
        self.client
            .publish(target, payload)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Publishes a request to the worker.
    pub(crate) async fn send(&self, worker_id: &str, request: &Value) {
        self.send_raw(worker_id, Bytes::from(request.to_string()))
            .await;
    }

    /// Publishes raw bytes to the worker's inference subject.
    pub(crate) async fn send_raw(&self, worker_id: &str, payload: Bytes) {
        self.publish(&Target::Worker(worker_id.to_owned()), payload)
            .await;
        self.flush().await;
    }

    /// Sends raw bytes with a reply inbox and returns the first reply.
    pub(crate) async fn send_with_reply(&self, worker_id: &str, payload: Bytes) -> Value {
        // What the transport sent before must reach the worker first.
        self.sync().await;
        let inbox = self.nats.new_inbox();
        let mut sub = self.nats.subscribe(inbox.clone()).await.expect("subscribe");
        match self.nats.request("harness.sync", Bytes::new()).await {
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {}
            other => panic!("sync round trip: {other:?}"),
        }
        self.nats
            .publish_with_reply(subject::inference(worker_id), inbox, payload)
            .await
            .expect("publish");
        let msg = within("a reply", sub.next()).await.expect("reply");
        serde_json::from_slice(&msg.payload).expect("reply is JSON")
    }

    /// Publishes a cancel for `request_id`.
    pub(crate) async fn cancel(&self, worker_id: &str, request_id: &str) {
        let body = serde_json::json!({ "requestId": request_id }).to_string();
        self.transport
            .publish(subject::cancel(worker_id), body.into())
            .await
            .expect("publish");
        self.flush().await;
    }

    /// Waits for the next heartbeat of `worker_id` matching `pred`.
    pub(crate) async fn heartbeat_where(
        &self,
        worker_id: &str,
        pred: impl Fn(&WorkerHeartbeat) -> bool,
    ) -> WorkerHeartbeat {
        let mut sub = self.subscribe(subject::HEARTBEAT).await;
        within("a matching heartbeat", async {
            while let Some(msg) = sub.next().await {
                let hb: WorkerHeartbeat =
                    serde_json::from_slice(&msg.payload).expect("heartbeat decodes");
                if hb.worker_id == worker_id && pred(&hb) {
                    return hb;
                }
            }
            panic!("heartbeat subscription ended");
        })
        .await
    }
}

/// Reads a response stream up to its terminal message, then checks that nothing follows it
/// for a short while (a second terminal would show up).
pub(crate) async fn collect_stream(stream: &mut ResponseStream) -> Vec<StreamMessage> {
    stream
        .collect(PATIENCE)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Many response streams read from one `response.>` subscription, each held to the stream's
/// rules ([`StreamCheck`]).
#[derive(Default)]
pub(crate) struct Streams {
    checks: BTreeMap<String, StreamCheck>,
}

impl Streams {
    /// Decodes and checks a message of `response.>`; returns its request id and the message.
    pub(crate) fn push(&mut self, msg: &InboundMessage) -> (String, StreamMessage) {
        let id = msg
            .subject
            .strip_prefix("response.")
            .unwrap_or_else(|| panic!("not a response subject: {}", msg.subject))
            .to_owned();
        let m: StreamMessage = serde_json::from_slice(&msg.payload)
            .unwrap_or_else(|e| panic!("response.{id}: not a stream message: {e}"));
        let check = self
            .checks
            .entry(id.clone())
            .or_insert_with(|| StreamCheck::new(id.clone()));
        if let Err(broken) = check.push(&m) {
            panic!("response.{id}: {broken}");
        }
        (id, m)
    }
}

/// Asserts a stream is `n` tokens with indices 0..n, then one `done` with `totalTokens: n`.
pub(crate) fn assert_complete(stream: &[StreamMessage], n: u64) {
    assert_eq!(stream.len() as u64, n + 1, "{stream:?}");
    for (i, m) in stream[..stream.len() - 1].iter().enumerate() {
        match m {
            StreamMessage::Token { index, .. } => assert_eq!(*index, i as u64),
            other => panic!("expected a token at {i}, got {other:?}"),
        }
    }
    match stream.last() {
        Some(StreamMessage::Done { total_tokens, .. }) => assert_eq!(*total_tokens, n),
        other => panic!("expected done, got {other:?}"),
    }
}

/// The code of a stream that ended with an error.
pub(crate) fn error_code(stream: &[StreamMessage]) -> String {
    match stream.last() {
        Some(StreamMessage::Error { code, .. }) => code.clone(),
        other => panic!("expected an error, got {other:?}"),
    }
}

/// Sends `signal` (`TERM`, `KILL`, …) to process `pid`.
pub(crate) fn send_signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// What a worker process that stopped by itself printed, and how it exited.
pub(crate) struct Exited {
    /// The exit code (`None` when a signal ended it).
    pub(crate) code: Option<i32>,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

/// Runs `mlx-worker run <args> --port 0` with a fresh state directory and `envs`, and waits
/// (bounded) until it exits by itself: for a start-up that must fail. A worker that would
/// go on retrying never exits, and `within` fails the test.
pub(crate) async fn run_until_exit(what: &str, args: &[&str], envs: &[(&str, &str)]) -> Exited {
    let state = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_mlx-worker"))
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
        .unwrap();
    Exited {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A running `mlx-worker run` process, started from the repository root (so `models/` is the
/// tiny model's directory) with its own state directory; killed if dropped.
pub(crate) struct WorkerProcess {
    pub(crate) child: Child,
    _state: tempfile::TempDir,
}

impl WorkerProcess {
    /// Starts `mlx-worker run <args> --port 0`.
    pub(crate) fn spawn(args: &[&str]) -> WorkerProcess {
        let state = tempfile::tempdir().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_mlx-worker"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .arg("run")
            .args(args)
            .args(["--port", "0"])
            .env("MLX_WORKER_STATE_DIR", state.path())
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
    pub(crate) fn serving_tiny(url: &str, id: &str) -> WorkerProcess {
        WorkerProcess::spawn(&[
            "--nats-url",
            url,
            "--worker-id",
            id,
            "--model-dir",
            "models",
            "--preload",
            crate::engine::TINY,
            "--heartbeat-interval-ms",
            "200",
        ])
    }

    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// Sends SIGTERM and returns the exit code once the process has exited.
    pub(crate) async fn terminate(mut self) -> i32 {
        send_signal(self.pid(), "TERM");
        within("the worker to exit", self.child.wait())
            .await
            .unwrap()
            .code()
            .unwrap_or(-1)
    }
}

/// Connects with `config` (which must succeed) and waits until the link is up.
pub(crate) async fn connected(config: &config::NatsConfig, what: &str) -> NatsTransport {
    let transport = NatsTransport::connect(config).await.unwrap();
    wait_connected(&transport, what).await;
    transport
}

/// Waits until `transport`'s link is up.
pub(crate) async fn wait_connected(transport: &NatsTransport, what: &str) {
    let mut connection = mlx_worker::transport::Transport::connection(transport);
    within(what, connection.wait_for(|c| c.connected))
        .await
        .unwrap();
}

/// Asserts a stream ended with `done` (whatever its token count).
pub(crate) fn assert_done(stream: &[StreamMessage]) {
    assert!(
        matches!(stream.last(), Some(StreamMessage::Done { .. })),
        "expected done: {stream:?}"
    );
}
