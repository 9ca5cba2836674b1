// Goal: the client subscribes before it publishes, hands out each message with its arrival
// time, and refuses every stream that breaks the protocol's rules with an error naming the
// rule; the rules alone (`StreamCheck`) hold for every order of messages.
// Method: an in-memory bus behind the `Transport` trait that records the order of operations
// and lets the test publish on any subject; paused tokio time, so waits cost nothing and
// arrival times are exact.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

use super::*;
use crate::clock::SystemClock;
use crate::transport::{ConnectionState, InboundMessage};

/// What the bus was asked to do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Op {
    Subscribe(String),
    Publish(String),
}

/// An in-memory bus: exact subjects only, one subscriber per subject.
#[derive(Default)]
struct Bus {
    ops: Mutex<Vec<Op>>,
    published: Mutex<Vec<(String, Bytes)>>,
    subscribers: Mutex<BTreeMap<String, mpsc::Sender<InboundMessage>>>,
}

impl Bus {
    fn ops(&self) -> Vec<Op> {
        self.ops.lock().unwrap().clone()
    }

    /// Delivers `payload` to the subscriber of `subject`, if any.
    fn deliver(&self, subject: &str, payload: impl Into<Bytes>) {
        let tx = self.subscribers.lock().unwrap().get(subject).cloned();
        if let Some(tx) = tx {
            tx.try_send(InboundMessage {
                subject: subject.to_owned(),
                reply: None,
                payload: payload.into(),
            })
            .unwrap();
        }
    }

    /// Delivers each JSON value on `response.{id}`.
    fn stream(&self, id: &str, messages: &[Value]) {
        for m in messages {
            self.deliver(&format!("response.{id}"), m.to_string());
        }
    }
}

#[async_trait]
impl Transport for Bus {
    async fn publish(&self, subject: String, payload: Bytes) -> Result<(), TransportError> {
        self.ops.lock().unwrap().push(Op::Publish(subject.clone()));
        self.published.lock().unwrap().push((subject, payload));
        Ok(())
    }

    async fn publish_if_listened(
        &self,
        subject: String,
        payload: Bytes,
    ) -> Result<bool, TransportError> {
        let listened = self.subscribers.lock().unwrap().contains_key(&subject);
        self.publish(subject, payload).await?;
        Ok(listened)
    }

    async fn subscribe(
        &self,
        subject: String,
        _queue_group: Option<String>,
    ) -> Result<Subscription, TransportError> {
        self.ops
            .lock()
            .unwrap()
            .push(Op::Subscribe(subject.clone()));
        let (tx, rx) = mpsc::channel(STREAM_MESSAGES_MAX + 8);
        self.subscribers.lock().unwrap().insert(subject, tx);
        Ok(Subscription::new(futures::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|m| (m, rx)) },
        )))
    }

    async fn flush(&self) -> Result<(), TransportError> {
        Ok(())
    }

    fn connection(&self) -> watch::Receiver<ConnectionState> {
        watch::channel(ConnectionState {
            connected: true,
            reconnects: 0,
        })
        .1
    }
}

fn client() -> (Arc<Bus>, Client) {
    let bus = Arc::new(Bus::default());
    (bus.clone(), Client::new(bus, Arc::new(SystemClock)))
}

fn request(id: &str) -> InferenceRequest {
    InferenceRequest {
        request_id: id.to_owned(),
        model_id: "m".to_owned(),
        prompt: "hi".to_owned(),
        max_tokens: Some(2),
        temperature: None,
        top_p: None,
        session_id: None,
        stream: None,
        priority: None,
        timeout_ms: None,
    }
}

fn token(id: &str, index: u64) -> Value {
    json!({"type": "token", "requestId": id, "token": format!("t{index}"), "index": index})
}

fn done(id: &str, total: u64) -> Value {
    json!({"type": "done", "requestId": id, "totalTokens": total, "latencyMs": 7})
}

fn error(id: &str, code: &str) -> Value {
    json!({"type": "error", "requestId": id, "error": "no", "code": code})
}

const PATIENCE: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(100);

#[tokio::test(start_paused = true)]
async fn send_subscribes_to_the_response_subject_before_it_publishes_the_request() {
    let (bus, client) = client();
    let _stream = client
        .send(&Target::Worker("w1".into()), &request("r1"))
        .await
        .unwrap();
    assert_eq!(
        bus.ops(),
        [
            Op::Subscribe("response.r1".into()),
            Op::Publish("worker.w1.inference".into())
        ]
    );
    let published = bus.published.lock().unwrap()[0].1.clone();
    let sent: InferenceRequest = serde_json::from_slice(&published).unwrap();
    assert_eq!(sent, request("r1"));

    let _stream = client
        .send(&Target::Model("org/model-1.5".into()), &request("r2"))
        .await
        .unwrap();
    assert_eq!(
        bus.ops()[3],
        Op::Publish("inference.org_2Fmodel-1_2E5".into())
    );
}

#[tokio::test(start_paused = true)]
async fn a_stream_is_read_to_its_terminal_with_each_arrival_time() {
    let (bus, client) = client();
    let mut stream = client
        .send(&Target::Worker("w1".into()), &request("r1"))
        .await
        .unwrap();
    let sent = stream.sent_at();
    bus.stream("r1", &[token("r1", 0)]);
    let first = stream.next(PATIENCE).await.unwrap();
    assert_eq!(first.at, sent, "time stood still until the first token");
    assert!(matches!(
        first.message,
        StreamMessage::Token { index: 0, .. }
    ));
    assert_eq!(first.payload, Bytes::from(token("r1", 0).to_string()));

    let bus2 = bus.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(150)).await;
        bus2.stream("r1", &[token("r1", 1), done("r1", 2)]);
    });
    let second = stream.next(PATIENCE).await.unwrap();
    assert_eq!(second.at - first.at, Duration::from_millis(150));
    assert_eq!(stream.outcome(), None);
    let rest = stream.collect(PATIENCE, QUIET).await.unwrap();
    assert_eq!(rest.len(), 1, "only what this call read: {rest:?}");
    assert_eq!(
        stream.outcome(),
        Some(&Outcome::Done {
            total_tokens: 2,
            latency_ms: 7
        })
    );
    assert_eq!(stream.tokens(), 2);
}

#[tokio::test(start_paused = true)]
async fn an_error_ends_the_stream_with_its_code() {
    let (bus, client) = client();
    let mut stream = client.subscribe("r1").await.unwrap();
    bus.stream("r1", &[token("r1", 0), error("r1", "TIMEOUT")]);
    let all = stream.collect(PATIENCE, QUIET).await.unwrap();
    assert_eq!(all.len(), 2);
    let outcome = stream.outcome().unwrap();
    assert!(!outcome.is_done());
    assert_eq!(
        outcome,
        &Outcome::Failed {
            code: "TIMEOUT".into(),
            error: "no".into()
        }
    );
    // An error whose request could not be read names none, and is still this stream's end.
    let mut anonymous = client.subscribe("r2").await.unwrap();
    bus.stream(
        "r2",
        &[json!({"type": "error", "error": "bad", "code": "INVALID_REQUEST"})],
    );
    assert_eq!(anonymous.collect(PATIENCE, QUIET).await.unwrap().len(), 1);
}

/// Collects a stream of `messages` for `r1` and returns the error it ends with.
async fn broken(messages: &[Value]) -> ClientError {
    let (bus, client) = client();
    let mut stream = client.subscribe("r1").await.unwrap();
    bus.stream("r1", messages);
    stream.collect(PATIENCE, QUIET).await.unwrap_err()
}

fn violation(e: ClientError) -> StreamViolation {
    match e {
        ClientError::Broken {
            request_id,
            violation,
        } => {
            assert_eq!(request_id, "r1");
            violation
        }
        other => panic!("expected a broken stream, got {other}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_stream_that_breaks_a_rule_is_refused_naming_the_rule() {
    assert_eq!(
        violation(broken(&[token("r1", 1)]).await),
        StreamViolation::TokenIndex {
            expected: 0,
            found: 1
        }
    );
    assert_eq!(
        violation(broken(&[token("r1", 0), token("r1", 2)]).await),
        StreamViolation::TokenIndex {
            expected: 1,
            found: 2
        }
    );
    assert_eq!(
        violation(broken(&[token("r1", 0), token("r1", 0)]).await),
        StreamViolation::TokenIndex {
            expected: 1,
            found: 0
        }
    );
    assert_eq!(
        violation(broken(&[token("r1", 0), done("r1", 3)]).await),
        StreamViolation::TokenCount {
            total_tokens: 3,
            received: 1
        }
    );
    assert_eq!(
        violation(broken(&[token("other", 0)]).await),
        StreamViolation::WrongRequest {
            found: "other".into()
        }
    );
    let e = broken(&[json!({"type": "token", "requestId": "r1"})]).await;
    assert!(matches!(e, ClientError::Undecodable { .. }), "{e}");
    assert!(
        e.to_string().starts_with(
            "response.r1 carried a message that is not a stream message: missing field"
        )
    );
}

#[tokio::test(start_paused = true)]
async fn a_message_after_the_terminal_is_refused_when_read() {
    let (bus, client) = client();
    let mut stream = client.subscribe("r1").await.unwrap();
    bus.stream("r1", &[done("r1", 0), token("r1", 0)]);
    stream.next(PATIENCE).await.unwrap();
    let e = stream.next(PATIENCE).await.unwrap_err();
    assert_eq!(
        violation(e.clone()),
        StreamViolation::AfterTerminal { terminal: false }
    );
    assert_eq!(
        e.to_string(),
        "response.r1 broke the stream's rules: a token after the terminal message"
    );
}

#[tokio::test(start_paused = true)]
async fn a_silent_stream_times_out_saying_how_much_came() {
    let (bus, client) = client();
    let mut stream = client.subscribe("r1").await.unwrap();
    bus.stream("r1", &[token("r1", 0)]);
    let e = stream
        .collect(Duration::from_millis(2500), QUIET)
        .await
        .unwrap_err();
    assert_eq!(
        e,
        ClientError::TimedOut {
            request_id: "r1".into(),
            millis: 2500,
            received: 1
        }
    );
    assert_eq!(
        e.to_string(),
        "no message on response.r1 within 2500 ms (1 received)"
    );
}

#[tokio::test(start_paused = true)]
async fn a_stream_that_never_ends_stops_at_the_bound() {
    let (bus, client) = client();
    let mut stream = client.subscribe("r1").await.unwrap();
    let tokens: Vec<Value> = (0..=STREAM_MESSAGES_MAX as u64)
        .map(|i| token("r1", i))
        .collect();
    bus.stream("r1", &tokens);
    assert_eq!(
        stream.collect(PATIENCE, QUIET).await.unwrap_err(),
        ClientError::TooLong {
            request_id: "r1".into(),
            limit: STREAM_MESSAGES_MAX
        }
    );
    // The longest legal stream fits: every token a request may ask for, then `done`.
    let mut full = client.subscribe("r2").await.unwrap();
    let mut longest: Vec<Value> = (0..STREAM_MESSAGES_MAX as u64 - 1)
        .map(|i| token("r2", i))
        .collect();
    longest.push(done("r2", STREAM_MESSAGES_MAX as u64 - 1));
    bus.stream("r2", &longest);
    assert_eq!(
        full.collect(PATIENCE, QUIET).await.unwrap().len(),
        STREAM_MESSAGES_MAX
    );
}

#[tokio::test(start_paused = true)]
async fn ids_that_cannot_be_subject_tokens_are_refused_before_anything_is_sent() {
    let (bus, client) = client();
    let e = client.subscribe("a.b").await.unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::BadId {
                what: "request id",
                ..
            }
        ),
        "{e}"
    );
    let e = client
        .send(&Target::Worker("w.*".into()), &request("r1"))
        .await
        .err()
        .unwrap();
    assert_eq!(
        e.to_string(),
        "worker id \"w.*\" cannot be a subject token: it contains '.', which cannot appear in a NATS subject token"
    );
    assert!(bus.ops().is_empty(), "{:?}", bus.ops());
}

/// Feeds `messages` to a fresh check for `r1`; returns each push's result.
fn check(messages: &[Value]) -> Vec<Result<(), StreamViolation>> {
    let mut check = StreamCheck::new("r1");
    messages
        .iter()
        .map(|m| check.push(&serde_json::from_value(m.clone()).unwrap()))
        .collect()
}

#[test]
fn the_check_reports_each_break_once_and_goes_on() {
    use StreamViolation::*;
    let ok = Ok(());
    assert_eq!(
        check(&[token("r1", 0), token("r1", 1), done("r1", 2)]),
        [ok.clone(), ok.clone(), ok.clone()]
    );
    // A gap is reported at the token that makes it; counting goes on from there.
    assert_eq!(
        check(&[
            token("r1", 0),
            token("r1", 5),
            token("r1", 6),
            done("r1", 3)
        ]),
        [
            ok.clone(),
            Err(TokenIndex {
                expected: 1,
                found: 5
            }),
            ok.clone(),
            ok.clone()
        ]
    );
    // A second terminal and a token after it, each reported for what it is.
    assert_eq!(
        check(&[error("r1", "X"), done("r1", 0), token("r1", 0)]),
        [
            ok.clone(),
            Err(AfterTerminal { terminal: true }),
            Err(AfterTerminal { terminal: false })
        ]
    );
    // The first broken rule of a message is the one reported.
    assert_eq!(
        check(&[token("r2", 3)]),
        [Err(WrongRequest { found: "r2".into() })]
    );
}

#[tokio::test(start_paused = true)]
async fn collecting_fails_on_a_message_right_after_the_terminal() {
    let (bus, client) = client();
    let mut stream = client.subscribe("r1").await.unwrap();
    bus.stream("r1", &[token("r1", 0), done("r1", 1), token("r1", 1)]);
    let e = stream.collect(PATIENCE, QUIET).await.unwrap_err();
    assert_eq!(
        violation(e),
        StreamViolation::AfterTerminal { terminal: false }
    );
    // A zero window still sees what has already arrived: here a second terminal.
    let mut stream = client.subscribe("r2").await.unwrap();
    bus.stream("r2", &[done("r2", 0), error("r2", "X")]);
    let e = stream.collect(PATIENCE, Duration::ZERO).await.unwrap_err();
    assert!(
        e.to_string()
            .ends_with("a second terminal after the terminal message"),
        "{e}"
    );
}

/// Collects `r1`, whose stray token comes `delay` after its `done`.
async fn stray_after(delay: Duration) -> Result<Vec<StreamMessage>, ClientError> {
    let (bus, client) = client();
    let mut stream = client.subscribe("r1").await.unwrap();
    bus.stream("r1", &[done("r1", 0)]);
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        bus.stream("r1", &[token("r1", 0)]);
    });
    stream.collect(PATIENCE, QUIET).await
}

#[tokio::test(start_paused = true)]
async fn the_quiet_window_catches_what_comes_within_it_and_nothing_later() {
    assert!(matches!(
        stray_after(QUIET - Duration::from_millis(1)).await,
        Err(ClientError::Broken {
            violation: StreamViolation::AfterTerminal { terminal: false },
            ..
        })
    ));
    assert_eq!(
        stray_after(QUIET + Duration::from_millis(1))
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn a_stream_that_has_not_ended_cannot_be_confirmed_quiet() {
    let (bus, client) = client();
    let mut stream = client.subscribe("r1").await.unwrap();
    assert_eq!(
        stream.confirm_quiet(QUIET).await,
        Err(ClientError::NotEnded {
            request_id: "r1".into()
        })
    );
    bus.stream("r1", &[done("r1", 0)]);
    stream.next(PATIENCE).await.unwrap();
    assert_eq!(stream.confirm_quiet(QUIET).await, Ok(()));
}
