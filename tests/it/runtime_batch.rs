// Goal: with the batched runtime, a burst of requests four times a model's batch completes:
// every stream has contiguous token indices from 0 and exactly one terminal, `done`, with the
// text the same request gets alone (greedy decoding); the runtime never holds more streams than
// the model's load answered it decodes together (the worker keeps the rest in its queue); and
// the engine's figures for the model count every stream the runtime completed.
// Method: the real runtime with the tiny model, asked for a batch of 4 (what `runtime.batchSize:
// 4` hands the engine), an in-process worker allowed 16 at once overall and for the tier (so
// only the engine's figure holds it back), a real nats-server. One request alone first (it loads
// the model; its text is the reference), then 16 at once, read on one `response.>`
// subscription and held to the stream's rules, then a quiet window in which nothing may follow,
// while a task asks the runtime (`runtime/state`) for the streams it holds, as fast as it
// answers, until the burst has ended.

use std::collections::BTreeMap;
use std::sync::Arc;

use mlx_worker::engine::Engine;
use mlx_worker::plan::recommendation::BatchSizes;
use mlx_worker::protocol::StreamMessage;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::engine::mlx_engine;
use testkit::runtime::TINY;
use testkit::*;

/// The batch size the engine asks for the model.
const BATCH: usize = 4;
/// Requests sent at once.
const BURST: usize = 16;
/// Tokens each request asks for at most.
const MAX_TOKENS: u64 = 12;

/// The worker's lines: far more at once than the model's batch.
const CONFIG: &str = "  maxConcurrent: 16
  requestQueue:
    maxDepth: 64
  tierLimits:
    \"<3B\":
      maxConcurrent: 16
      queueDepth: 64
";

fn request(id: &str) -> serde_json::Value {
    json!({"requestId": id, "modelId": TINY, "prompt": "Hello world",
           "maxTokens": MAX_TOKENS, "temperature": 0})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_past_the_batch_completes_and_the_runtime_holds_no_more_than_the_batch() {
    let server = NatsServer::start().await;
    let config = test_config(&server.url(), CONFIG);
    let engine = Arc::new(mlx_engine(BatchSizes::uniform(BATCH)).await);
    let catalog = engine.catalog().await.unwrap();
    assert_eq!(catalog.models[TINY].streams_max, Some(BATCH));
    let mut worker = RunningWorker::start("batching", &config, engine.clone(), vec![]).await;
    worker.ready().await;
    let client = Controller::connect(&server.url()).await;

    let alone = client.infer("batching", request("alone")).await;
    assert_done(&alone);
    let reference = stream_text(&alone);
    // Loaded by the request: the engine answers from what the load said.
    let reported = engine
        .load(TINY)
        .await
        .unwrap()
        .streams_max
        .expect("the batched runtime answers the model's batch size");
    assert_eq!(reported, BATCH, "the tiny model's cache can be batched");

    let stop = CancellationToken::new();
    let watcher = tokio::spawn({
        let engine = engine.clone();
        let stop = stop.clone();
        async move {
            let (mut peak, mut samples) = (0u64, 0u64);
            while !stop.is_cancelled() {
                peak = peak.max(engine.active_streams().await.unwrap());
                samples += 1;
            }
            (peak, samples)
        }
    });

    let mut responses = client.subscribe("response.>").await;
    client.sync().await;
    let target = mlx_worker::client::Target::Worker("batching".to_owned());
    for n in 0..BURST {
        let body = request(&format!("b-{n}"));
        client.publish(&target, body.to_string().into()).await;
    }
    client.flush().await;
    // Each stream is held to its rules as it arrives (indices 0, 1, 2, …, one terminal,
    // nothing after it); the texts are gathered for the comparison.
    let mut streams = Streams::default();
    let mut texts: BTreeMap<String, String> = BTreeMap::new();
    let mut ends: BTreeMap<String, StreamMessage> = BTreeMap::new();
    within("every request's end", async {
        while ends.len() < BURST {
            let (id, m) = streams.push(&responses.next().await.unwrap());
            match m {
                StreamMessage::Token { token, .. } => texts.entry(id).or_default().push_str(&token),
                end => assert!(ends.insert(id.clone(), end).is_none(), "{id} ended twice"),
            }
        }
    })
    .await;
    stop.cancel();
    let (peak, samples) = watcher.await.unwrap();
    // Nothing follows the terminals: no second terminal, no late token.
    if let Ok(Some(late)) = tokio::time::timeout(QUIET, responses.next()).await {
        panic!("{} after every stream had ended", late.subject);
    }
    eprintln!("the runtime held at most {peak} streams in {samples} samples; batch {reported}");

    for (id, end) in &ends {
        let StreamMessage::Done { total_tokens, .. } = end else {
            panic!("{id} ended {end:?}")
        };
        assert!((1..=MAX_TOKENS).contains(total_tokens), "{id}: {end:?}");
        assert_eq!(texts.get(id), Some(&reference), "{id}'s text");
    }
    assert!(
        peak <= reported as u64,
        "the runtime held {peak} streams of a model whose batch is {reported}"
    );
    assert!(
        peak >= 2,
        "{samples} samples never saw two streams at once: the burst ran one at a time"
    );
    let figures = &engine.model_figures()[TINY];
    assert_eq!(figures.batch_size, reported);
    assert_eq!(figures.streams_completed, BURST as u64 + 1);
    let published: u64 = ends
        .values()
        .map(|end| match end {
            StreamMessage::Done { total_tokens, .. } => *total_tokens,
            _ => 0,
        })
        .sum();
    // An empty token (text not complete yet) is generated but not published.
    assert!(figures.generated_tokens >= published, "{figures:?}");
    assert!(figures.prompt_tokens > 0, "{figures:?}");
    assert!(
        figures.prompt_seconds > 0.0 && figures.decode_seconds > 0.0,
        "{figures:?}"
    );
    worker.stop().await;
    engine.shutdown(std::time::Duration::from_secs(5)).await;
}
