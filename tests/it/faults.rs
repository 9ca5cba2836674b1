// Goal: the worker binary under faults from its surroundings. With a finite reconnect budget
// it warns at start, and once the budget is spent after losing its broker it exits with the
// documented status 74 (which a supervisor restarts), not 0. A SIGTERM sent as `timeout` sends
// it (to the process, then to its whole process group; `kill -- -PGID` and some supervisors
// signal the group too) drains the requests in flight: the runtime and the embedded
// nats-server do not die under them, the runtime is not restarted while the worker stops, and
// the signal arriving twice at once is one stop request; a signal a second later still forces
// the exit. A model that fails to load tells the client why without the absolute paths of the
// host, while the worker's log keeps them.
// Method: the real binary (JSON logs on a pipe, read line by line) with the real runtime and
// the tiny model, against a real nats-server (an external one the test kills, or the worker's
// embedded one); the worker runs in a process group of its own, which the test signals whole.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use futures::StreamExt;
use mlx_worker::clock::{Clock, SystemClock};
use mlx_worker::protocol::StreamMessage;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use testkit::runtime::TINY;
use testkit::*;

/// The exit status for a message server lost for good (README, docs/operations.md).
const EX_IOERR: i32 = 74;

/// A worker binary with its JSON log lines collected as they come.
struct LoggedWorker {
    child: Child,
    /// Every log line so far, parsed.
    log: watch::Receiver<Vec<Value>>,
    _state: tempfile::TempDir,
}

impl LoggedWorker {
    /// Starts `mlx-worker run <args> --port 0 --log-format json` from the repository root, in
    /// a process group of its own (its id is the worker's pid).
    fn spawn(args: &[&str]) -> LoggedWorker {
        let state = tempfile::tempdir().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_mlx-worker"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .arg("run")
            .args(args)
            .args(["--port", "0", "--log-format", "json"])
            .env("MLX_WORKER_STATE_DIR", state.path())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .expect("start the mlx-worker binary");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let (tx, log) = watch::channel(Vec::new());
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let value = serde_json::from_str(&line).unwrap_or(Value::String(line));
                tx.send_modify(|log| log.push(value));
            }
        });
        LoggedWorker {
            child,
            log,
            _state: state,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// Waits for the first log line whose message contains `message`.
    async fn logged(&mut self, message: &str) -> Value {
        let log = within(&format!("the log line {message:?}"), async {
            self.log
                .wait_for(|log| log.iter().any(|l| text(l).contains(message)))
                .await
                .unwrap()
                .clone()
        })
        .await;
        log.into_iter().find(|l| text(l).contains(message)).unwrap()
    }

    /// Every log line so far whose message passes `pred`.
    fn lines(&self, pred: impl Fn(&str) -> bool) -> Vec<Value> {
        self.log
            .borrow()
            .iter()
            .filter(|l| pred(&text(l)))
            .cloned()
            .collect()
    }

    /// Waits, up to `limit`, for the process to exit by itself; its exit code.
    async fn exit_within(&mut self, limit: Duration, what: &str) -> Option<i32> {
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(status) => status.unwrap().code(),
            Err(_) => panic!("the worker did not exit within {limit:?} ({what})"),
        }
    }
}

impl Drop for LoggedWorker {
    fn drop(&mut self) {
        // A failed test shows what the worker logged.
        if std::thread::panicking() {
            for line in self.log.borrow().iter() {
                eprintln!("worker: {line}");
            }
        }
    }
}

/// A log line's message (or the raw line, when it is not JSON).
fn text(line: &Value) -> String {
    match &line["fields"]["message"] {
        Value::String(s) => s.clone(),
        _ => line.as_str().unwrap_or_default().to_owned(),
    }
}

/// Stops the worker `pid` as `timeout` does (and as some supervisors do): SIGTERM to the
/// process, then to its whole process group (the worker leads its own, so its id is `pid`).
fn terminate_like_timeout(pid: u32) {
    let status = std::process::Command::new("bash")
        .args(["-c", &format!("kill -TERM {pid} && kill -TERM -- -{pid}")])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -TERM {pid}, then -{pid}, failed");
}

/// Starts a worker `worker_id` on the message server at `url` (with `args` besides), connects
/// a client there and waits for the worker's registration.
async fn registered(url: &str, worker_id: &str, args: &[&str]) -> (LoggedWorker, Controller) {
    let client = Controller::connect(url).await;
    let mut registrations = client.nats.subscribe("worker.register").await.unwrap();
    client.sync().await;
    let mut all = vec!["--nats-url", url, "--worker-id", worker_id];
    all.extend_from_slice(args);
    let worker = LoggedWorker::spawn(&all);
    within("the worker's registration", async {
        while let Some(msg) = registrations.next().await {
            let reg: Value = serde_json::from_slice(&msg.payload).unwrap();
            if reg["workerId"] == worker_id {
                return;
            }
        }
    })
    .await;
    (worker, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_reconnect_budget_exits_74_and_is_announced_at_start() {
    let mut server = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cluster.yaml");
    std::fs::write(
        &config,
        "nats:\n  maxReconnectAttempts: 3\n  reconnectTimeWait: 200\n",
    )
    .unwrap();
    let models = dir.path().join("models");
    let (mut worker, client) = registered(
        &server.url(),
        "reconnects",
        &[
            "--config",
            config.to_str().unwrap(),
            "--model-dir",
            models.to_str().unwrap(),
        ],
    )
    .await;
    drop(client);

    server.kill().await;
    // The attempts wait at most 100 + 200 + 200 ms (the backoff caps) and a refused
    // connection fails at once; then the stop, with nothing in flight, takes the runtime's
    // shutdown (at most its 5 s grace).
    let expected = Duration::from_millis(500) + Duration::from_secs(10);
    let clock = SystemClock;
    let killed_at = clock.now();
    let code = worker.exit_within(expected, "reconnects spent").await;
    let took = clock.now().saturating_duration_since(killed_at);
    assert_eq!(code, Some(EX_IOERR), "exited after {took:?}");

    let warnings = worker.lines(|m| m.contains("exits with status 74"));
    let warning = warnings
        .iter()
        .find(|l| l["level"] == "WARN")
        .unwrap_or_else(|| {
            panic!(
                "no start-up warning about the reconnect budget: {:#?}",
                worker.lines(|_| true)
            )
        });
    assert_eq!(warning["fields"]["attempts"], 3, "{warning}");
    assert!(text(warning).contains("3 times"), "{warning}");
    // Logged at start: before the worker announced itself.
    let log = worker.log.borrow().clone();
    let position = |message: &str| log.iter().position(|l| text(l) == message);
    assert!(
        position(&text(warning)) < position("registered"),
        "the warning came after the registration: {log:#?}"
    );
}

/// Tokens each request of the process-group test generates at most (the tiny model's greedy
/// output has no end-of-sequence token that early).
const TOKENS: u64 = 2000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_to_the_process_group_drains_in_flight_requests() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cluster.yaml");
    // A drain long enough for the requests below, even on a slow host.
    std::fs::write(&config, "worker:\n  drainTimeoutMs: 120000\n").unwrap();
    let mut worker = LoggedWorker::spawn(&[
        "--config",
        config.to_str().unwrap(),
        "--nats-mode",
        "embedded",
        "--nats-embedded-port",
        &port.to_string(),
        "--worker-id",
        "group",
        "--model-dir",
        "models",
        "--preload",
        TINY,
        "--max-concurrent",
        "4",
        "--heartbeat-interval-ms",
        "200",
    ]);
    let url = format!("nats://127.0.0.1:{port}");
    worker.logged("embedded nats-server started").await;
    let client = Controller::connect(&url).await;
    client
        .heartbeat_where("group", |hb| {
            hb.metrics.models_loaded.contains(&TINY.to_owned())
        })
        .await;

    // Four long requests (greedy, so each runs to `maxTokens`): the runtime generates one at
    // a time, so one runs and three wait in the runtime.
    let ids: Vec<String> = (0..4).map(|i| format!("group-{i}")).collect();
    let mut streams = Vec::new();
    for id in &ids {
        streams.push(client.subscribe_response(id).await);
    }
    for id in &ids {
        let body = json!({"requestId": id, "modelId": TINY, "prompt": "Hello world", "maxTokens": TOKENS, "temperature": 0});
        client.send("group", &body).await;
    }
    let first = streams[0].next(PATIENCE).await.unwrap().message;
    assert!(
        matches!(first, StreamMessage::Token { index: 0, .. }),
        "{first:?}"
    );
    client
        .heartbeat_where("group", |hb| hb.metrics.active_requests == 4)
        .await;

    terminate_like_timeout(worker.pid());
    let mut lengths = Vec::new();
    for (i, stream) in streams.iter_mut().enumerate() {
        let mut whole = if i == 0 {
            vec![first.clone()]
        } else {
            Vec::new()
        };
        whole.extend(collect_stream(stream).await);
        // Every token, then `done`: the generation ran to its end.
        let tokens = whole.len() as u64 - 1;
        assert_complete(&whole, tokens);
        lengths.push(tokens);
    }
    // The same greedy generation four times: none was cut short.
    assert!(lengths.iter().all(|&n| n == lengths[0]), "{lengths:?}");
    let code = worker.exit_within(PATIENCE, "drained").await;
    assert_eq!(code, Some(0));

    let ready = worker.lines(|m| m == "runtime ready");
    assert_eq!(ready.len(), 1, "the runtime was restarted: {ready:#?}");
    let restarts = worker.lines(|m| m.contains("restarting"));
    assert!(restarts.is_empty(), "{restarts:#?}");
    let runtime_pid = ready[0]["fields"]["pid"].as_u64().unwrap();
    assert!(
        !Path::new(&format!("/proc/{runtime_pid}")).exists(),
        "the MLX runtime {runtime_pid} outlived the worker"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_a_second_after_the_first_forces_the_exit() {
    let server = NatsServer::start().await;
    let (mut worker, client) = registered(&server.url(), "forced", &SERVING_TINY).await;
    client
        .heartbeat_where("forced", |hb| {
            hb.metrics.models_loaded.contains(&TINY.to_owned())
        })
        .await;
    // Two long requests, so the drain outlasts the wait below by seconds.
    let mut first = client.subscribe_response("forced-0").await;
    for id in ["forced-0", "forced-1"] {
        let body = json!({"requestId": id, "modelId": TINY, "prompt": "Hello world", "maxTokens": TOKENS, "temperature": 0});
        client.send("forced", &body).await;
    }
    first.next(PATIENCE).await.unwrap();

    terminate_like_timeout(worker.pid());
    worker.logged("stop requested").await;
    // What is waited for is the time itself: a repeat within the first second is the same
    // stop request.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    send_signal(worker.pid(), "TERM");
    assert_eq!(worker.exit_within(PATIENCE, "forced").await, Some(130));
}

/// A model directory `<root>/org/broken` the catalog lists (a config and weights) but the
/// runtime cannot load: its weights are not in a format MLX reads.
fn broken_model(root: &Path) -> PathBuf {
    let dir = root.join("org").join("broken");
    std::fs::create_dir_all(&dir).unwrap();
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(TINY);
    for file in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tiny.join(file), dir.join(file)).unwrap();
    }
    std::fs::write(dir.join("pytorch_model.bin"), b"not a checkpoint").unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_failure_reaches_the_client_without_host_paths() {
    let server = NatsServer::start().await;
    let root = tempfile::tempdir().unwrap();
    let model = broken_model(root.path());
    let canonical = model.canonicalize().unwrap();
    let (mut worker, client) = registered(
        &server.url(),
        "broken",
        &["--model-dir", root.path().to_str().unwrap()],
    )
    .await;

    let stream = client
        .infer(
            "broken",
            json!({"requestId": "broken-1", "modelId": "org/broken", "prompt": "Hi", "maxTokens": 4}),
        )
        .await;
    let Some(StreamMessage::Error { error, code, .. }) = stream.last() else {
        panic!("expected an error: {stream:?}")
    };
    assert_eq!(code, "MODEL_LOAD_FAILED");
    assert!(error.contains("org/broken"), "{error}");
    let root_text = root.path().to_str().unwrap();
    let canonical_root = root.path().canonicalize().unwrap();
    for path in [root_text, canonical_root.to_str().unwrap()] {
        assert!(
            !error.contains(path),
            "the client sees the path {path}: {error}"
        );
    }
    assert!(
        !error.split_whitespace().any(|w| w.starts_with('/')),
        "an absolute path reaches the client: {error}"
    );

    // The worker's own log keeps the full reason, with the path.
    let logged = worker.logged("model failed to load").await;
    let reason = logged["fields"]["reason"].as_str().unwrap_or_default();
    let path = logged["fields"]["path"].as_str().unwrap_or_default();
    assert_eq!(path, canonical.to_str().unwrap(), "{logged}");
    assert!(reason.contains(canonical.to_str().unwrap()), "{logged}");
    terminate_like_timeout(worker.pid());
    assert_eq!(worker.exit_within(PATIENCE, "stopped").await, Some(0));
}
