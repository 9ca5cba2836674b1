// Goal: `mlx-worker infer` streams tokens to the terminal as they arrive, and its `--json`
// mode prints the wire messages; exit codes follow the outcome. `infer` and `watch` connect
// under names of their own, so a server's connection list tells them from the workers, and
// `watch` warns when its subject would make workers take it for a client listening on
// `response.{requestId}`.
// Method: a worker whose simulated engine spaces tokens 150 ms apart, on a real nats-server;
// the real binary as a child process, its stdout read chunk by chunk with arrival times; the
// server's monitoring endpoint (`/connz`) for the connection names; the first line `watch`
// writes on stderr.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use mlx_worker::clock::{Clock, SystemClock};
use mlx_worker_sim::{SimEngine, SimEngineConfig};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

use testkit::*;

use crate::http::get_from;

async fn infer(url: &str, extra: &[&str]) -> (Vec<(Duration, String)>, i32) {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_mlx-worker"))
        .args([
            "infer",
            "--nats-url",
            url,
            "--worker",
            "w-cli",
            "--model",
            "sim/tiny",
        ])
        .args(["--prompt", "x", "--max-tokens", "5"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let clock = SystemClock;
    let start = clock.now();
    let mut chunks = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = within("infer output", stdout.read(&mut buf)).await.unwrap();
        if n == 0 {
            break;
        }
        chunks.push((
            clock.now().saturating_duration_since(start),
            String::from_utf8_lossy(&buf[..n]).into_owned(),
        ));
    }
    let status = within("infer to exit", child.wait()).await.unwrap();
    (chunks, status.code().unwrap_or(-1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infer_prints_tokens_as_they_arrive() {
    let server = NatsServer::start().await;
    let config = test_config(&server.url(), "");
    let engine = Arc::new(SimEngine::new(SimEngineConfig {
        token_latency: Duration::from_millis(150),
        ..SimEngineConfig::default()
    }));
    let worker = RunningWorker::start("w-cli", &config, engine, vec![]).await;

    let (chunks, code) = infer(&server.url(), &[]).await;
    assert_eq!(code, 0);
    let text: String = chunks.iter().map(|(_, c)| c.as_str()).collect();
    assert_eq!(text, "tok0 tok1 tok2 tok3 tok4\n");
    // Streamed: the first token was on the terminal long before the last one.
    let first = chunks.first().unwrap().0;
    let last = chunks.last().unwrap().0;
    assert!(chunks.len() >= 3, "{chunks:?}");
    assert!(last - first >= Duration::from_millis(400), "{chunks:?}");

    let (chunks, code) = infer(&server.url(), &["--json"]).await;
    assert_eq!(code, 0);
    let lines: Vec<serde_json::Value> = chunks
        .iter()
        .map(|(_, c)| c.as_str())
        .collect::<String>()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6);
    assert_eq!(lines[5]["type"], "done");

    let (_, code) = tokio::process::Command::new(env!("CARGO_BIN_EXE_mlx-worker"))
        .args([
            "infer",
            "--nats-url",
            &server.url(),
            "--worker",
            "w-cli",
            "--model",
            "nope",
        ])
        .args(["--prompt", "x"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .map(|s| ((), s.code().unwrap_or(-1)))
        .unwrap();
    assert_eq!(code, 1, "a request that ends with an error exits 1");

    // `watch` prints the worker's announcements as they pass.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_mlx-worker"))
        .args([
            "watch",
            "--nats-url",
            &server.url(),
            "--subject",
            "worker.heartbeat",
        ])
        .args(["--count", "2"])
        .output();
    let out = within("two heartbeats", out).await.unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "", "no warning");
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2);
    assert!(
        lines
            .iter()
            .all(|l| l.starts_with("worker.heartbeat {\"workerId\":\"w-cli\"")),
        "{text}"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infer_without_a_worker_id_sends_to_the_model_subject() {
    let server = NatsServer::start().await;
    let config = test_config(&server.url(), "");
    let engine = Arc::new(SimEngine::new(SimEngineConfig::default()));
    let worker = RunningWorker::start("w-model", &config, engine, vec![]).await;
    // No `--worker`, and a state directory that holds no worker id.
    let state = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_mlx-worker"))
        .args(["infer", "--nats-url", &server.url(), "--model", "sim/tiny"])
        .args(["--prompt", "x", "--max-tokens", "3", "--json"])
        .env("MLX_WORKER_STATE_DIR", state.path())
        .kill_on_drop(true)
        .output();
    let out = within("infer to exit", out).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let types: Vec<&str> = lines.iter().filter_map(|l| l["type"].as_str()).collect();
    assert_eq!(types, ["token", "token", "token", "done"], "{lines:?}");
    // It says where the request went, and that any worker of the model may take it.
    let said = stderr.lines().next().unwrap_or_default();
    assert!(
        said.contains(&mlx_worker::protocol::subject::model_inference("sim/tiny"))
            && said.contains("any worker"),
        "{stderr}"
    );
    worker.stop().await;
}

/// `mlx-worker <args>` as a child process, killed when dropped.
fn command(args: &[&str], stderr: Stdio) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_mlx-worker"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// The names of the connections the server at monitoring port `monitor` lists.
async fn connection_names(monitor: u16) -> Vec<String> {
    let (status, body) = get_from(("127.0.0.1", monitor), "/connz").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let connz: serde_json::Value = serde_json::from_str(&body).unwrap();
    connz["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap_or("").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infer_and_watch_connect_under_names_of_their_own() {
    let monitor = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let server = NatsServer::start_with(NatsOptions::new().monitor_port(monitor)).await;
    let config = test_config(&server.url(), "");
    let worker = RunningWorker::start(
        "w-names",
        &config,
        Arc::new(SimEngine::new(SimEngineConfig::default())),
        vec![],
    )
    .await;
    let url = server.url();
    let _watch = command(&["watch", "--nats-url", &url], Stdio::null());
    // A request nobody answers keeps `infer` connected while the server is asked.
    let _infer = command(
        &[
            "infer",
            "--nats-url",
            &url,
            "--worker",
            "nobody",
            "--model",
            "sim/tiny",
            "--prompt",
            "x",
        ],
        Stdio::null(),
    );
    let host = mlx_worker::identity::hostname();
    let (watch, infer) = (
        format!("mlx-worker-watch@{host}"),
        format!("mlx-worker-infer@{host}"),
    );
    // The server has no event for a new connection: ask it until both are listed.
    let mut names = Vec::new();
    let listed = tokio::time::timeout(PATIENCE, async {
        loop {
            names = connection_names(monitor).await;
            if names.contains(&watch) && names.contains(&infer) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        listed.is_ok(),
        "no {watch} and {infer} within {PATIENCE:?} in {names:?}"
    );
    // The worker keeps the configured name; no one else takes it.
    let workers = names.iter().filter(|n| *n == "mlx-worker").count();
    assert_eq!(workers, 1, "{names:?}");
    worker.stop().await;
}

#[tokio::test]
async fn watch_warns_when_its_subject_covers_the_response_subjects() {
    let server = NatsServer::start().await;
    let url = server.url();
    for subject in ["response.>", ">", "*.*", "response.*"] {
        let mut watch = command(
            &["watch", "--nats-url", &url, "--subject", subject],
            Stdio::piped(),
        );
        let mut stderr = BufReader::new(watch.stderr.take().unwrap()).lines();
        let line = within("the warning", stderr.next_line())
            .await
            .unwrap()
            .unwrap_or_default();
        assert!(
            line.starts_with("mlx-worker watch: warning: ") && line.contains(subject),
            "{subject}: {line}"
        );
        // It says why: the leading tokens a late subscriber may then miss.
        assert!(
            line.contains("response.<requestId>") && line.contains("miss the leading tokens"),
            "{line}"
        );
        watch.kill().await.unwrap();
    }
}
