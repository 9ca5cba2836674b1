//! The controller's side of the protocol, for tests: [`Controller`] sends requests and reads
//! their streams through the library's client, and the functions here say what a test
//! asserts about a stream.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use mlx_worker::client::{Client, ClientError, ResponseStream, StreamCheck, Target};
use mlx_worker::clock::SystemClock;
use mlx_worker::config;
use mlx_worker::protocol::{StreamMessage, WorkerHeartbeat, subject};
use mlx_worker::transport::nats::NatsTransport;
use mlx_worker::transport::{InboundMessage, Subscription, Transport};
use serde_json::Value;

use crate::{PATIENCE, QUIET, connected, test_config, within};

#[cfg(test)]
mod tests;

/// The controller's side: the library's client over its own connection, and a plain NATS
/// connection for request/reply, which `Transport` does not offer.
///
/// Everything the worker must see in order (requests, cancels, raw payloads) goes over the
/// transport; a request sent with a reply subject goes over the plain connection, after a
/// round trip on the transport, so the server has routed everything sent before it.
pub struct Controller {
    /// The connection the client's subscriptions and publishes use.
    pub transport: Arc<NatsTransport>,
    client: Client,
    /// A plain NATS connection, for request/reply only.
    pub nats: async_nats::Client,
}

impl Controller {
    /// Connects to `url` with no credentials.
    pub async fn connect(url: &str) -> Controller {
        // Named apart from the workers, whose connections tests count by name.
        let mut config = test_config(url, "").nats;
        config.name = "test-controller".to_owned();
        Controller::connect_with(&config, async_nats::ConnectOptions::new()).await
    }

    /// Connects the transport with `config` and the plain connection with `raw` (the same
    /// credentials, in async-nats' terms).
    pub async fn connect_with(
        config: &config::NatsConfig,
        raw: async_nats::ConnectOptions,
    ) -> Controller {
        let transport = Arc::new(connected(config, "the controller's connection").await);
        let nats = raw
            .connect(config.servers.clone())
            .await
            .expect("the controller's plain connection");
        Controller {
            client: Client::new(transport.clone(), Arc::new(SystemClock)),
            transport,
            nats,
        }
    }

    /// Sends `request` to the worker (subscribing to its response subject first) and reads
    /// the stream ([`collect_stream`]).
    pub async fn infer(&self, worker_id: &str, request: Value) -> Vec<StreamMessage> {
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
    pub async fn subscribe_response(&self, request_id: &str) -> ResponseStream {
        let stream = self
            .client
            .subscribe(request_id)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        self.sync().await;
        stream
    }

    /// Subscribes to `subject` and waits until the server has the subscription.
    pub async fn subscribe(&self, subject: &str) -> Subscription {
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
    pub async fn sync(&self) {
        let heard = self
            .transport
            .publish_if_listened("harness.sync".to_owned(), Bytes::new())
            .await;
        assert_eq!(heard, Ok(false), "sync round trip");
    }

    /// Writes everything published so far to the socket.
    pub async fn flush(&self) {
        self.transport.flush().await.expect("flush");
    }

    /// Publishes `payload` on `target`'s subject (not flushed).
    pub async fn publish(&self, target: &Target, payload: Bytes) {
        self.client
            .publish(target, payload)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Publishes a request to the worker.
    pub async fn send(&self, worker_id: &str, request: &Value) {
        self.send_raw(worker_id, Bytes::from(request.to_string()))
            .await;
    }

    /// Publishes raw bytes to the worker's inference subject.
    pub async fn send_raw(&self, worker_id: &str, payload: Bytes) {
        self.publish(&Target::Worker(worker_id.to_owned()), payload)
            .await;
        self.flush().await;
    }

    /// Sends raw bytes with a reply inbox and returns the first reply.
    pub async fn send_with_reply(&self, worker_id: &str, payload: Bytes) -> Value {
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
    pub async fn cancel(&self, worker_id: &str, request_id: &str) {
        let body = serde_json::json!({ "requestId": request_id }).to_string();
        self.transport
            .publish(subject::cancel(worker_id), body.into())
            .await
            .expect("publish");
        self.flush().await;
    }

    /// Waits for the next heartbeat of `worker_id` matching `pred`.
    pub async fn heartbeat_where(
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

/// Reads a response stream up to its terminal message within [`PATIENCE`], holding every
/// message to the stream's rules ([`StreamCheck`]: it names the request, token indices run
/// 0, 1, 2, …, `done` counts the tokens before it, one terminal ends it), then waits [`QUIET`]
/// and fails if any further message arrives on `response.{id}` in that window: a second
/// terminal or a token sent right after the end shows up, one sent later than that does not.
/// Returns the messages it read; fails the test, naming the broken rule, otherwise.
pub async fn collect_stream(stream: &mut ResponseStream) -> Vec<StreamMessage> {
    try_collect_stream(stream)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// [`collect_stream`], for a test of a stream that must fail.
pub async fn try_collect_stream(
    stream: &mut ResponseStream,
) -> Result<Vec<StreamMessage>, ClientError> {
    stream.collect(PATIENCE, QUIET).await
}

/// Many response streams read from one `response.>` subscription, each held to the stream's
/// rules ([`StreamCheck`]).
#[derive(Default)]
pub struct Streams {
    checks: BTreeMap<String, StreamCheck>,
}

impl Streams {
    /// Decodes and checks a message of `response.>`; returns its request id and the message.
    pub fn push(&mut self, msg: &InboundMessage) -> (String, StreamMessage) {
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
pub fn assert_complete(stream: &[StreamMessage], n: u64) {
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
pub fn error_code(stream: &[StreamMessage]) -> String {
    match stream.last() {
        Some(StreamMessage::Error { code, .. }) => code.clone(),
        other => panic!("expected an error, got {other:?}"),
    }
}

/// The text of a stream's tokens, concatenated.
pub fn stream_text(stream: &[StreamMessage]) -> String {
    stream
        .iter()
        .filter_map(|m| match m {
            StreamMessage::Token { token, .. } => Some(token.as_str()),
            _ => None,
        })
        .collect()
}

/// Asserts a stream ended with `done` (whatever its token count).
pub fn assert_done(stream: &[StreamMessage]) {
    assert!(
        matches!(stream.last(), Some(StreamMessage::Done { .. })),
        "expected done: {stream:?}"
    );
}
