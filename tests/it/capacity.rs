// Goal: a worker allowed more requests at once than the MLX runtime runs never hands the runtime
// a stream past the runtime's limit: the surplus of a burst waits in the worker's own queue, and
// every request ends `done` after contiguous token indices, none with the runtime's refusal
// (`ENGINE_ERROR`).
// Method: the real binary configured with maxConcurrent 200 (and 200 for the tiny model's tier,
// so nothing but the engine's figure holds it back), the real runtime with the tiny model, a
// real nats-server. The runtime runs at its default limit with twice as many requests, and at a
// limit of 8 set through its MLX_RUNTIME_STREAMS_LIVE_MAX with three times as many. One
// subscription reads every response stream to its end, each held to the stream's rules.

use std::collections::BTreeMap;

use mlx_worker::client::Target;
use mlx_worker::protocol::StreamMessage;
use serde_json::json;

use testkit::runtime::TINY;
use testkit::*;

/// Tokens each request asks for at most.
const MAX_TOKENS: u64 = 8;

/// The worker's configuration: far more at once than the runtime runs.
const CONFIG: &str = "worker:
  maxConcurrent: 200
  requestQueue:
    maxDepth: 200
  tierLimits:
    \"<3B\":
      maxConcurrent: 200
      queueDepth: 200
";

/// Sends `requests` requests at once to a worker whose runtime runs with `runtime_env`, and
/// checks that every one completes.
async fn a_burst_completes(worker_id: &str, requests: usize, runtime_env: &[(&str, &str)]) {
    let _ = crate::engine::engine_config(); // fails clearly when setup has not run
    let server = NatsServer::start().await;
    let client = Controller::connect(&server.url()).await;
    let mut responses = client.subscribe("response.>").await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("worker.yaml");
    std::fs::write(&config, CONFIG).unwrap();
    let url = server.url();
    let args = [
        &[
            "--config",
            config.to_str().unwrap(),
            "--nats-url",
            &url,
            "--worker-id",
            worker_id,
        ][..],
        &SERVING_TINY,
    ]
    .concat();
    let worker = WorkerProcess::spawn_with_env(&worker_binary!(), &args, runtime_env);
    client
        .heartbeat_where(worker_id, |hb| {
            hb.metrics.models_loaded.contains(&TINY.to_owned())
        })
        .await;

    let target = Target::Worker(worker_id.to_owned());
    for n in 0..requests {
        let body = json!({
            "requestId": format!("{worker_id}-{n}"),
            "modelId": TINY,
            "prompt": "Hello world",
            "maxTokens": MAX_TOKENS,
            "temperature": 0,
        });
        client.publish(&target, body.to_string().into()).await;
    }
    client.flush().await;

    // Each stream is held to its rules as it arrives: token indices 0, 1, 2, …, then one
    // terminal, `done` counting the tokens before it.
    let mut streams = Streams::default();
    let mut ends: BTreeMap<String, String> = BTreeMap::new();
    within("every request's end", async {
        while ends.len() < requests {
            let (id, m) = streams.push(&responses.next().await.unwrap());
            let end = match m {
                StreamMessage::Done { total_tokens, .. } => {
                    assert!((1..=MAX_TOKENS).contains(&total_tokens), "{id}: {m:?}");
                    "done".to_owned()
                }
                StreamMessage::Error { code, .. } => code,
                StreamMessage::Token { .. } => continue,
            };
            assert!(ends.insert(id, end).is_none());
        }
    })
    .await;
    let mut outcomes: BTreeMap<&str, usize> = BTreeMap::new();
    for end in ends.values() {
        *outcomes.entry(end.as_str()).or_default() += 1;
    }
    eprintln!("{requests} requests at once ended {outcomes:?}");
    assert_eq!(
        outcomes,
        BTreeMap::from([("done", requests)]),
        "every request completes; none is refused by the runtime"
    );
    assert_eq!(worker.terminate().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_past_the_runtimes_default_limit_waits_in_the_worker() {
    // The runtime's default is 64 live streams (RUNTIME_STREAMS_LIVE_DEFAULT).
    a_burst_completes("cap-default", 130, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_past_a_lowered_runtime_limit_waits_in_the_worker() {
    a_burst_completes("cap-eight", 24, &[("MLX_RUNTIME_STREAMS_LIVE_MAX", "8")]).await;
}
