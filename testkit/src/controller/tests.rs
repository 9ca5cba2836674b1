// Goal: a stream that a test collects is held to the protocol end to end: a message right
// after the terminal fails the collection, a clean stream passes.
// Method: a real nats-server, the controller subscribed to `response.r-*`, and a fake worker
// (a plain NATS client) publishing the stream, with or without a stray token after `done`.

use bytes::Bytes;
use mlx_worker::client::StreamViolation;
use serde_json::{Value, json};

use super::*;
use crate::NatsServer;

/// Publishes `messages` on `response.{id}` from a connection of its own.
async fn fake_worker(url: &str, id: &str, messages: &[Value]) {
    let nats = async_nats::connect(url).await.unwrap();
    for m in messages {
        nats.publish(format!("response.{id}"), Bytes::from(m.to_string()))
            .await
            .unwrap();
    }
    nats.flush().await.unwrap();
}

fn token(id: &str, index: u64) -> Value {
    json!({"type": "token", "requestId": id, "token": "x", "index": index})
}

fn done(id: &str, total: u64) -> Value {
    json!({"type": "done", "requestId": id, "totalTokens": total, "latencyMs": 1})
}

#[tokio::test]
async fn a_token_right_after_done_fails_the_collection() {
    let server = NatsServer::start().await;
    let controller = Controller::connect(&server.url()).await;

    let mut clean = controller.subscribe_response("r-clean").await;
    fake_worker(
        &server.url(),
        "r-clean",
        &[token("r-clean", 0), done("r-clean", 1)],
    )
    .await;
    assert_eq!(collect_stream(&mut clean).await.len(), 2);

    let mut stray = controller.subscribe_response("r-stray").await;
    fake_worker(
        &server.url(),
        "r-stray",
        &[token("r-stray", 0), done("r-stray", 1), token("r-stray", 1)],
    )
    .await;
    match try_collect_stream(&mut stray).await {
        Err(ClientError::Broken { violation, .. }) => {
            assert_eq!(
                violation,
                StreamViolation::AfterTerminal { terminal: false }
            )
        }
        other => panic!("a token after done was let through: {other:?}"),
    }
}
