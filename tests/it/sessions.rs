// Goal: a conversation's next turn is prefilled only past the previous turn's prompt: from the
// second turn on, the `done` message says most of the prompt came from the prefix cache, and the
// text is the text a worker without the cache gives (greedy decoding). The worker without the
// cache says none of its prompt did, and the cached worker's figures count what its done messages
// said.
// Method: two in-process workers over two real runtimes with the tiny model, one with the prefix
// cache (the default) and one with `runtime.prefixCache: false`, a real nats-server; four turns
// built as the controller builds them (every user message so far joined by a newline), each sent
// with one `sessionId` to the cached worker and to the other.

use std::sync::Arc;

use mlx_worker::clock::SystemClock;
use mlx_worker::engine::Engine;
use mlx_worker::engine::mlx::MlxEngine;
use mlx_worker::plan::recommendation::BatchSizes;
use mlx_worker::protocol::StreamMessage;
use serde_json::json;

use crate::engine::engine_config;
use testkit::runtime::TINY;
use testkit::*;

const TURNS: [&str; 4] = [
    "Tell me about the river and the old mill by the bridge.",
    "What did the miller do in the winter?",
    "And how did the town change after the railway came?",
    "Sum it up in one line.",
];

async fn engine(prefix_cache: bool) -> Arc<MlxEngine> {
    let mut config = engine_config();
    config.prefix_cache = prefix_cache;
    let engine = MlxEngine::start(config, BatchSizes::default(), Arc::new(SystemClock))
        .await
        .expect("the MLX runtime starts");
    Arc::new(engine)
}

fn turn(id: &str, prompt: &str) -> serde_json::Value {
    json!({"requestId": id, "modelId": TINY, "prompt": prompt, "maxTokens": 12,
           "temperature": 0, "sessionId": "7d3f5a9e-2c41-4b8e-9f00-5e6a7b8c9d0e"})
}

/// The stream's text and its done message's prompt figures.
fn text_and_figures(stream: &[StreamMessage]) -> (String, Option<u64>, Option<u64>) {
    assert_done(stream);
    let text = stream
        .iter()
        .filter_map(|m| match m {
            StreamMessage::Token { token, .. } => Some(token.as_str()),
            _ => None,
        })
        .collect();
    match stream.last() {
        Some(StreamMessage::Done {
            prompt_tokens,
            cached_tokens,
            ..
        }) => (text, *prompt_tokens, *cached_tokens),
        other => panic!("ended {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_turn_after_the_first_is_prefilled_past_the_last_and_says_so() {
    let server = NatsServer::start().await;
    let config = test_config(&server.url(), "");
    let (warm_engine, cold_engine) = (engine(true).await, engine(false).await);
    let mut warm = RunningWorker::start("warm", &config, warm_engine.clone(), vec![]).await;
    let mut cold = RunningWorker::start("cold", &config, cold_engine.clone(), vec![]).await;
    warm.ready().await;
    cold.ready().await;
    let client = Controller::connect(&server.url()).await;

    let mut cached_said = 0;
    let mut previous_prompt_tokens = 0;
    for k in 1..=TURNS.len() {
        let prompt = TURNS[..k].join("\n");
        let (text, prompt_tokens, cached) = text_and_figures(
            &client
                .infer("warm", turn(&format!("warm-{k}"), &prompt))
                .await,
        );
        let (cold_text, cold_prompt_tokens, cold_cached) = text_and_figures(
            &client
                .infer("cold", turn(&format!("cold-{k}"), &prompt))
                .await,
        );
        assert_eq!(text, cold_text, "turn {k}: the cache changed the text");
        assert_eq!(prompt_tokens, cold_prompt_tokens, "turn {k}");
        assert_eq!(cold_cached, Some(0), "turn {k}: the worker without a cache");
        let (Some(prompt_tokens), Some(cached)) = (prompt_tokens, cached) else {
            panic!("turn {k}: the done message has no prompt figures");
        };
        if k == 1 {
            assert_eq!(cached, 0, "nothing is cached before the first turn");
        } else {
            // The whole previous prompt but its last token, and never the whole of this one.
            assert!(
                cached + 2 >= previous_prompt_tokens && cached < prompt_tokens,
                "turn {k}: {cached} of {prompt_tokens} cached, the last turn had {previous_prompt_tokens}"
            );
        }
        cached_said += cached;
        previous_prompt_tokens = prompt_tokens;
    }
    let figures = &warm_engine.model_figures()[TINY];
    assert_eq!(figures.cached_tokens, cached_said);
    assert_eq!(cold_engine.model_figures()[TINY].cached_tokens, 0);
    warm.stop().await;
    cold.stop().await;
    warm_engine
        .shutdown(std::time::Duration::from_secs(5))
        .await;
    cold_engine
        .shutdown(std::time::Duration::from_secs(5))
        .await;
}
