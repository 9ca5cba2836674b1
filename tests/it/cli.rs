// Goal: `mlx-worker infer` streams tokens to the terminal as they arrive, and its `--json`
// mode prints the wire messages; exit codes follow the outcome.
// Method: a worker whose simulated engine spaces tokens 150 ms apart, on a real nats-server;
// the real binary as a child process, its stdout read chunk by chunk with arrival times.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use mlx_worker::clock::{Clock, SystemClock};
use mlx_worker_sim::{SimEngine, SimEngineConfig};
use tokio::io::AsyncReadExt;

use testkit::*;

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
