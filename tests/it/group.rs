// Goal: model-addressed requests (`inference.{model}`, one queue group) spread over every
// worker that serves the model, and a worker that stops mid-run loses none of them.
// Method: three workers (simulated engine, a few ms per token) on one real nats-server; a
// client sends 300 requests to the model subject, stops one worker after the first third, and
// reads every response stream to its end.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use mlx_worker::client::Target;
use mlx_worker::protocol::StreamMessage;
use mlx_worker_sim::{SimEngine, SimEngineConfig};
use serde_json::json;

use testkit::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_share_a_model_and_a_stopping_one_loses_nothing() {
    let server = NatsServer::start().await;
    let client = Controller::connect(&server.url()).await;
    let config = test_config(
        &server.url(),
        "  drainTimeoutMs: 20000\n  requestQueue:\n    maxDepth: 300\n",
    );
    let engine = || {
        Arc::new(SimEngine::new(SimEngineConfig {
            token_latency: Duration::from_millis(2),
            ..SimEngineConfig::default()
        }))
    };
    let mut workers = Vec::new();
    for i in 0..3 {
        workers.push(RunningWorker::start(&format!("g-{i}"), &config, engine(), vec![]).await);
    }
    let mut responses = client.subscribe("response.>").await;
    let model = Target::Model("sim/tiny".to_owned());

    let mut stopping = None;
    for n in 0..300 {
        let body = json!({"requestId": format!("m-{n}"), "modelId": "sim/tiny", "prompt": "x", "maxTokens": 3});
        client.publish(&model, body.to_string().into()).await;
        if n == 100 {
            client.flush().await;
            stopping = Some(tokio::spawn(workers.remove(1).stop()));
        }
    }
    client.flush().await;

    let mut ends: BTreeMap<String, StreamMessage> = BTreeMap::new();
    let mut streams = Streams::default();
    within("every request's terminal message", async {
        while ends.len() < 300 {
            let (id, m) = streams.push(&responses.next().await.unwrap());
            if m.is_terminal() {
                assert!(
                    ends.insert(id.clone(), m).is_none(),
                    "two terminals for {id}"
                );
            }
        }
    })
    .await;
    let failed: Vec<_> = ends
        .iter()
        .filter(|(_, m)| {
            !matches!(
                m,
                StreamMessage::Done {
                    total_tokens: 3,
                    ..
                }
            )
        })
        .collect();
    assert!(failed.is_empty(), "{failed:?}");

    let stopped = stopping.unwrap().await.unwrap();
    let mut shares = vec![stopped.dispatch.metrics.total];
    for w in workers {
        shares.push(w.stop().await.dispatch.metrics.total);
    }
    assert_eq!(shares.iter().sum::<u64>(), 300, "{shares:?}");
    assert!(
        shares.iter().all(|&n| n > 0),
        "every worker took a share: {shares:?}"
    );
}
