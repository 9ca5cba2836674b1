// Goal: the real MLX runtime, driven by MlxEngine and by the worker binary, does real work:
// loads the tiny model, streams exactly the tokens the model generates (their concatenation is
// the tokenizer's own decoding), runs concurrent requests, frees a cancelled slot, survives a
// SIGKILL of the runtime, and serves requests end to end over NATS.
// Method: the project venv (.venv) with CPU MLX and the tiny model under models/, both made by
// ci/setup.sh; a greedy reference generation through mlx_lm directly; a real nats-server. Any
// of them missing fails the test with the command that installs it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use mlx_worker::clock::SystemClock;
use mlx_worker::config::EngineConfig;
use mlx_worker::engine::mlx::MlxEngine;
use mlx_worker::engine::{Engine, EngineHealth, FinishReason, GenerateRequest, TokenEvent};
use mlx_worker::plan::recommendation::BatchSizes;
use mlx_worker::protocol::{StreamMessage, WorkerHeartbeat, WorkerRegistration, WorkerStatus};
use serde_json::json;

use testkit::runtime::TINY;
use testkit::*;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The engine configuration for the project venv and model directory; fails clearly when
/// setup has not run.
pub(crate) fn engine_config() -> EngineConfig {
    testkit::runtime::engine_config(&repo("")).unwrap_or_else(|missing| panic!("{missing}"))
}

/// The real runtime, each model loaded with its tier's figure of `batch_sizes`; fails clearly
/// when setup has not run.
pub(crate) async fn mlx_engine(batch_sizes: BatchSizes) -> MlxEngine {
    MlxEngine::start(engine_config(), batch_sizes, Arc::new(SystemClock))
        .await
        .expect("the MLX runtime starts")
}

/// The real runtime with `config`, each model at its tier's default batch size, shared.
pub(crate) async fn started(config: EngineConfig) -> Arc<MlxEngine> {
    let engine = MlxEngine::start(config, BatchSizes::default(), Arc::new(SystemClock));
    Arc::new(engine.await.expect("the MLX runtime starts"))
}

fn generate(stream_id: &str, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        stream_id: stream_id.to_owned(),
        model_id: TINY.to_owned(),
        prompt: "Hello world".to_owned(),
        max_tokens,
        temperature: 0.0,
        top_p: 1.0,
        session_id: None,
    }
}

/// Reads a generation to its end: the token texts and how it ended.
async fn drain(mut rx: mlx_worker::engine::TokenStream) -> (Vec<String>, TokenEvent) {
    let mut tokens = Vec::new();
    within("the generation's end", async {
        while let Some(event) = rx.recv().await {
            match event {
                TokenEvent::Tokens(t) => tokens.extend(t),
                end => return (tokens, end),
            }
        }
        panic!("the stream closed without an end event");
    })
    .await
}

fn reference_text(prompt: &str, max_tokens: u32) -> String {
    let out = std::process::Command::new(repo(".venv/bin/python"))
        .arg(repo("fixtures/tiny_model/reference_text.py"))
        .arg(repo("models").join(TINY))
        .arg(prompt)
        .arg(max_tokens.to_string())
        .output()
        .expect("run the reference generation");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["text"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_runtime_loads_streams_the_model_text_and_unloads() {
    init_logs();
    let engine = mlx_engine(BatchSizes::default()).await;
    let catalog = engine.catalog().await.unwrap();
    assert!(catalog.models.contains_key(TINY), "{catalog:?}");
    let loaded = engine.load(TINY).await.unwrap();
    assert!(loaded.parameter_count.is_some_and(|n| n > 100_000));
    assert_eq!(
        *engine.health().borrow(),
        EngineHealth::Up {
            loaded: vec![TINY.to_owned()]
        }
    );

    let (tokens, end) = drain(engine.generate(generate("g-1", 12)).await.unwrap()).await;
    assert_eq!(tokens.len(), 12, "one text per generated token");
    let TokenEvent::Finished(finish) = end else {
        panic!("ended {end:?}")
    };
    assert_eq!(finish.reason, FinishReason::Length);
    // The runtime states the prompt's figures; nothing was cached before the first prompt.
    let usage = finish
        .usage
        .expect("the runtime states the prompt's tokens");
    assert!(
        usage.prompt_tokens > 1 && usage.cached_tokens == 0,
        "{usage:?}"
    );
    assert_eq!(tokens.concat(), reference_text("Hello world", 12));

    // Two at once both complete (the runtime decodes them together).
    let a = engine.generate(generate("g-a", 8)).await.unwrap();
    let b = engine.generate(generate("g-b", 8)).await.unwrap();
    let ((ta, ea), (tb, eb)) = tokio::join!(drain(a), drain(b));
    assert_eq!((ta.len(), tb.len()), (8, 8));
    assert!(matches!(ea, TokenEvent::Finished(_)) && matches!(eb, TokenEvent::Finished(_)));

    engine.unload(TINY).await.unwrap();
    assert_eq!(
        *engine.health().borrow(),
        EngineHealth::Up { loaded: vec![] }
    );
    engine.shutdown(Duration::from_secs(5)).await;
    assert_eq!(*engine.health().borrow(), EngineHealth::Down);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_generation_is_cancelled_in_the_runtime() {
    init_logs();
    let engine = mlx_engine(BatchSizes::default()).await;
    engine.load(TINY).await.unwrap();
    let mut rx = engine.generate(generate("long", 4000)).await.unwrap();
    for _ in 0..3 {
        assert!(matches!(
            within("a token", rx.recv()).await,
            Some(TokenEvent::Tokens(_))
        ));
    }
    drop(rx);
    // The runtime reports the stream gone once the cancel landed, long before 4000 tokens.
    within("the runtime to drop the cancelled stream", async {
        while engine.active_streams().await.unwrap() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let (tokens, end) = drain(engine.generate(generate("next", 4)).await.unwrap()).await;
    assert_eq!(tokens.len(), 4);
    assert!(matches!(end, TokenEvent::Finished(_)));
    engine.shutdown(Duration::from_secs(5)).await;
}

/// The worker binary, with nats-server and the real runtime: what the README's first command
/// runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_real_tokens_over_nats_and_recovers_from_a_runtime_kill() {
    let server = NatsServer::start().await;
    let client = Controller::connect(&server.url()).await;
    let mut registrations = client.subscribe("worker.register").await;
    let binary = WorkerProcess::serving_tiny(&worker_binary!(), &server.url(), "e2e");

    let msg = within("the registration", registrations.next())
        .await
        .unwrap();
    let reg: WorkerRegistration = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(reg.skills.available_models, vec![TINY.to_owned()]);
    let hb = client
        .heartbeat_where("e2e", |hb| {
            hb.metrics.models_loaded.contains(&TINY.to_owned())
        })
        .await;
    assert_eq!(hb.status, WorkerStatus::Online);

    let body = json!({"requestId": "e2e-1", "modelId": TINY, "prompt": "Hello world", "maxTokens": 12, "temperature": 0});
    let stream = client.infer("e2e", body).await;
    let Some(StreamMessage::Done { total_tokens, .. }) = stream.last() else {
        panic!("{stream:?}")
    };
    assert!(*total_tokens > 0 && *total_tokens <= 12);
    let text: String = stream
        .iter()
        .filter_map(|m| match m {
            StreamMessage::Token { token, .. } => Some(token.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(text, reference_text("Hello world", 12));

    // Kill the runtime mid-generation: that request ends ENGINE_CRASHED, the worker goes
    // degraded, the runtime restarts, the worker is online again and serves.
    let mut long = client.subscribe_response("e2e-long").await;
    let mut degraded = client.subscribe("worker.heartbeat").await;
    client
        .send(
            "e2e",
            &json!({"requestId": "e2e-long", "modelId": TINY, "prompt": "Hi", "maxTokens": 4000}),
        )
        .await;
    long.next(PATIENCE).await.unwrap();
    let runtime_pid = runtime_child_pid(binary.pid());
    send_signal(runtime_pid, "KILL");
    let rest = collect_stream(&mut long).await;
    assert_eq!(error_code(&rest), "ENGINE_CRASHED");
    within("a degraded heartbeat", async {
        while let Some(msg) = degraded.next().await {
            let hb: WorkerHeartbeat = serde_json::from_slice(&msg.payload).unwrap();
            if hb.status == WorkerStatus::Degraded {
                return;
            }
        }
    })
    .await;
    client
        .heartbeat_where("e2e", |hb| hb.status == WorkerStatus::Online)
        .await;
    let after = client
        .infer(
            "e2e",
            json!({"requestId": "e2e-2", "modelId": TINY, "prompt": "Hello", "maxTokens": 4}),
        )
        .await;
    assert_done(&after);

    let mut goodbye = client.subscribe("worker.deregister").await;
    let restarted_runtime = runtime_child_pid(binary.pid());
    assert_ne!(restarted_runtime, runtime_pid);
    assert_eq!(binary.terminate().await, 0);
    within("the deregistration", goodbye.next()).await.unwrap();
    // No orphan: the runtime went with the worker.
    assert!(
        !Path::new(&format!("/proc/{restarted_runtime}")).exists(),
        "the MLX runtime {restarted_runtime} outlived the worker"
    );
}

/// The pid of the Python runtime started by the worker process `parent`.
pub(crate) fn runtime_child_pid(parent: u32) -> u32 {
    // Each thread lists the children it started; tokio starts them from any worker thread.
    child_pids(parent)
        .into_iter()
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmd| cmd.contains("mlx_runtime"))
        })
        .expect("the worker runs the MLX runtime as a child")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_mode_starts_its_own_nats_server_and_stops_it() {
    let port = testkit::nats::free_port();
    let mut worker = WorkerProcess::spawn(
        &worker_binary!(),
        &[
            "--nats-mode",
            "embedded",
            "--nats-embedded-port",
            &port.to_string(),
            "--worker-id",
            "embedded",
            "--model-dir",
            "models",
        ],
    );
    // The worker's own nats-server accepts a client, and the worker registers on it.
    let url = format!("nats://127.0.0.1:{port}");
    let client = within("the embedded server", async {
        loop {
            if let Ok(c) = async_nats::connect(&url).await {
                return c;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await;
    let mut heartbeats = client.subscribe("worker.heartbeat").await.unwrap();
    let msg = within("a heartbeat", heartbeats.next()).await.unwrap();
    let hb: WorkerHeartbeat = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(hb.worker_id, "embedded");
    let server_pid = child_pids(worker.pid())
        .into_iter()
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.contains("nats-server"))
        })
        .expect("the worker runs nats-server as its child");
    drop(client);
    let pid = worker.pid();
    send_signal(pid, "TERM");
    let status = within("the worker to exit", worker.child.wait())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(
        !Path::new(&format!("/proc/{server_pid}")).exists(),
        "the embedded nats-server outlived the worker"
    );
}

/// The children of process `parent`, over all its threads.
pub(crate) fn child_pids(parent: u32) -> Vec<u32> {
    std::fs::read_dir(format!("/proc/{parent}/task"))
        .unwrap()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// `runtime.command` and `runtime.env`: the runtime is started as the command says, with the
/// variables given, and serves; the interpreter and runtime directory settings are not used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_started_through_its_command_and_environment_serves() {
    init_logs();
    let mut config = engine_config();
    let python = config.python.display().to_string();
    let runtime_dir = config.runtime_dir.display().to_string();
    config.python = PathBuf::from("/nonexistent/python");
    config.runtime_dir = PathBuf::from("/nonexistent");
    config.command = Some(vec![python, "-m".to_owned(), "mlx_runtime".to_owned()]);
    config.env = [
        ("PYTHONPATH".to_owned(), runtime_dir),
        // Seen in the runtime's own limits: it holds 2 streams at once, so no model is loaded
        // with a larger batch.
        ("MLX_RUNTIME_STREAMS_LIVE_MAX".to_owned(), "2".to_owned()),
    ]
    .into();
    let engine = MlxEngine::start(config, BatchSizes::default(), Arc::new(SystemClock))
        .await
        .expect("the runtime starts through its command");
    let catalog = engine.catalog().await.unwrap();
    assert_eq!(catalog.models[TINY].streams_max, Some(2), "{catalog:?}");
    let loaded = engine.load(TINY).await.unwrap();
    assert_eq!(loaded.streams_max, Some(2));
    let (tokens, end) = drain(engine.generate(generate("cmd-1", 6)).await.unwrap()).await;
    assert_eq!(tokens.concat(), reference_text("Hello world", 6));
    assert!(matches!(end, TokenEvent::Finished(_)), "{end:?}");
    engine.shutdown(Duration::from_secs(5)).await;
}
