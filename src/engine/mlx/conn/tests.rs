// Goal: the multiplexer hands each answer to the call that asked, routes stream notifications
// of both chunk forms and of step lines to their generation in order, waits on a full stream
// whichever form its tokens came in, adds a stream's stats to its model's figures, ends a
// stream with its last event, fails everything in flight when the child is gone, and sends
// `cancel` only to a runtime that has it.
// Method: a connection over in-memory pipes, with the test playing the runtime: it reads the
// request lines the connection writes and writes the lines a runtime would.

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream, Lines};

use super::*;
use crate::engine::rpc::{GetInfo, GetState, LoadModel, State};
use crate::engine::{TokenStream, token_channel};
use crate::limits::TOKENS_HELD_MAX;

const PIPE_BYTES: usize = 64 * 1024;
const LIMIT: Duration = Duration::from_secs(30);

/// The runtime's side of a connection's pipes.
struct FakeRuntime {
    /// What the connection wrote to the runtime's stdin.
    stdin: Lines<BufReader<DuplexStream>>,
    /// The runtime's stdout, which the connection reads.
    stdout: DuplexStream,
}

impl FakeRuntime {
    /// The next request line, parsed.
    async fn request(&mut self) -> Value {
        let line = self.stdin.next_line().await.unwrap().unwrap();
        serde_json::from_str(&line).unwrap()
    }

    async fn send(&mut self, line: Value) {
        let mut bytes = serde_json::to_vec(&line).unwrap();
        bytes.push(b'\n');
        self.stdout.write_all(&bytes).await.unwrap();
    }
}

fn connect() -> (Arc<Conn>, Pipes, FakeRuntime) {
    let (stdin, runtime_stdin) = tokio::io::duplex(PIPE_BYTES);
    let (runtime_stdout, stdout) = tokio::io::duplex(PIPE_BYTES);
    let (conn, pipes) = Conn::start(stdin, stdout, Arc::default());
    let runtime = FakeRuntime {
        stdin: BufReader::new(runtime_stdin).lines(),
        stdout: runtime_stdout,
    };
    (conn, pipes, runtime)
}

/// Makes a call in its own task, so that the test can answer it.
fn spawn_call<C>(
    conn: &Arc<Conn>,
    call: C,
    limit: Duration,
) -> tokio::task::JoinHandle<Result<C::Output, CallError>>
where
    C: Call + Send + Sync + 'static,
    C::Output: Send + 'static,
{
    let conn = conn.clone();
    tokio::spawn(async move { conn.call(&call, limit).await })
}

fn notification(method: &str, params: Value) -> Value {
    json!({"jsonrpc": "2.0", "method": method, "params": params})
}

#[tokio::test]
async fn each_answer_reaches_the_call_with_its_id() {
    let (conn, _pipes, mut runtime) = connect();
    let a = spawn_call(&conn, GetInfo {}, LIMIT);
    let first = runtime.request().await;
    let b = spawn_call(&conn, GetState {}, LIMIT);
    let second = runtime.request().await;
    assert_eq!(
        (first["method"].as_str(), second["method"].as_str()),
        (Some("runtime/info"), Some("runtime/state"))
    );
    assert_ne!(first["id"], second["id"]);
    // Answered in the other order, each call still gets its own answer.
    runtime
        .send(json!({"jsonrpc": "2.0", "id": second["id"], "result": {"active_streams": 2}}))
        .await;
    runtime
        .send(json!({"jsonrpc": "2.0", "id": first["id"], "error": {"code": -32602, "message": "no"}}))
        .await;
    assert_eq!(
        b.await.unwrap().unwrap(),
        State {
            active_streams: Some(2),
            ..State::default()
        }
    );
    let Err(CallError::Rpc(error)) = a.await.unwrap() else {
        panic!("the error answer is the call's error")
    };
    assert_eq!((error.code, error.message.as_str()), (-32602, "no"));
}

#[tokio::test(start_paused = true)]
async fn a_call_without_an_answer_times_out_and_is_forgotten() {
    let (conn, _pipes, mut runtime) = connect();
    let call = spawn_call(&conn, GetInfo {}, Duration::from_millis(1500));
    let request = runtime.request().await;
    assert!(matches!(
        call.await.unwrap(),
        Err(CallError::TimedOut(1500))
    ));
    assert!(lock(&conn.pending).is_empty());
    // A late answer finds nobody waiting and is dropped; the connection keeps working.
    runtime
        .send(json!({"jsonrpc": "2.0", "id": request["id"], "result": {}}))
        .await;
    let next = spawn_call(&conn, GetState {}, LIMIT);
    let request = runtime.request().await;
    runtime
        .send(json!({"jsonrpc": "2.0", "id": request["id"], "result": {"active_streams": 0}}))
        .await;
    assert_eq!(
        next.await.unwrap().unwrap(),
        State {
            active_streams: Some(0),
            ..State::default()
        }
    );
}

#[tokio::test]
async fn chunks_of_both_forms_reach_their_stream_in_order_until_its_end() {
    let (conn, _pipes, mut runtime) = connect();
    let stream_id = conn.new_stream_id();
    let (tx, mut rx) = token_channel(16);
    conn.open_stream(&stream_id, "org/m", tx);
    let (other_tx, mut other_rx) = token_channel(16);
    conn.open_stream("s-other", "org/m", other_tx);
    runtime
        .send(notification(
            "stream.chunk",
            json!({"stream_id": stream_id, "tokens": [
                {"stream_id": stream_id, "token": "a", "token_id": 1, "is_final": false},
                {"stream_id": stream_id, "token": "b", "token_id": 2, "is_final": false},
            ], "batch_size": 2, "is_batch": true}),
        ))
        .await;
    runtime
        .send(notification(
            "stream.chunk",
            json!({"stream_id": "s-unknown", "token": "lost", "token_id": 3}),
        ))
        .await;
    runtime
        .send(notification(
            "stream.chunk",
            json!({"stream_id": stream_id, "token": "c", "token_id": 4, "is_final": false}),
        ))
        .await;
    runtime
        .send(notification(
            "stream.stats",
            json!({"stream_id": stream_id, "tokens_generated": 3}),
        ))
        .await;
    runtime
        .send(notification(
            "stream.event",
            json!({"stream_id": stream_id, "event": "completed", "is_final": true, "finish_reason": "stop"}),
        ))
        .await;
    let mut events = Vec::new();
    while let Some(event) = rx.recv().await {
        events.push(event);
    }
    // A line's tokens of a stream are handed over together, in one event.
    assert_eq!(
        events,
        [
            TokenEvent::Tokens(vec!["a".into(), "b".into()]),
            TokenEvent::Tokens(vec!["c".into()]),
            TokenEvent::Finished(FinishReason::Stop.into()),
        ]
    );
    // The end unregistered the stream (its channel closed above); the other one saw nothing.
    assert!(!conn.close_stream(&stream_id));
    assert!(other_rx.try_recv().is_err());
    assert!(conn.close_stream("s-other"));
}

/// Reads `rx` to its end, each token as an event of its own (how tokens were grouped into
/// events is the token stream's business, not the connection's).
async fn events(mut rx: TokenStream) -> Vec<TokenEvent> {
    let mut events = Vec::new();
    while let Some(event) = rx.recv().await {
        match event {
            TokenEvent::Tokens(texts) => {
                events.extend(texts.into_iter().map(|t| TokenEvent::Tokens(vec![t])));
            }
            other => events.push(other),
        }
    }
    events
}

fn tokens(texts: &[&str]) -> Vec<TokenEvent> {
    texts
        .iter()
        .map(|t| TokenEvent::Tokens(vec![(*t).into()]))
        .collect()
}

#[tokio::test]
async fn step_entries_reach_their_streams_in_line_order_beside_chunks() {
    let (conn, _pipes, mut runtime) = connect();
    let (a_tx, a_rx) = token_channel(16);
    conn.open_stream("s-a", "org/m", a_tx);
    let (b_tx, b_rx) = token_channel(16);
    conn.open_stream("s-b", "org/m", b_tx);
    let entry = |stream_id: &str, token: &str| json!({"stream_id": stream_id, "token": token, "token_id": 1});
    runtime
        .send(notification(
            "stream.step",
            json!({"chunks": [entry("s-a", "a1"), entry("s-b", "b1"), entry("s-lost", "x"),
                              entry("s-a", ""), entry("s-b", "b2"), entry("s-a", "a2")]}),
        ))
        .await;
    // A malformed step routes none of its entries, and the next line is read.
    runtime
        .send(notification(
            "stream.step",
            json!({"chunks": [entry("s-a", "never"), {"stream_id": "s-b"}]}),
        ))
        .await;
    runtime
        .send(notification(
            "stream.chunk",
            json!({"stream_id": "s-b", "token": "b3", "token_id": 2}),
        ))
        .await;
    runtime
        .send(notification(
            "stream.step",
            json!({"chunks": [entry("s-a", "a3")]}),
        ))
        .await;
    for stream_id in ["s-a", "s-b"] {
        runtime
            .send(notification(
                "stream.event",
                json!({"stream_id": stream_id, "event": "completed", "finish_reason": "length"}),
            ))
            .await;
    }
    let finished = TokenEvent::Finished(FinishReason::Length.into());
    let (a, b) = tokio::join!(events(a_rx), events(b_rx));
    assert_eq!(
        a,
        [tokens(&["a1", "", "a2", "a3"]), vec![finished.clone()]].concat()
    );
    assert_eq!(b, [tokens(&["b1", "b2", "b3"]), vec![finished]].concat());
}

#[tokio::test(start_paused = true)]
async fn a_stream_far_behind_holds_up_the_rest_of_its_step_as_it_holds_up_chunks() {
    let (conn, _pipes, mut runtime) = connect();
    let (a_tx, mut a_rx) = token_channel(1);
    conn.open_stream("s-a", "org/m", a_tx);
    let (b_tx, mut b_rx) = token_channel(16);
    conn.open_stream("s-b", "org/m", b_tx);
    let entry = |stream_id: &str, token: &str| json!({"stream_id": stream_id, "token": token, "token_id": 1});
    // "a0" fills s-a's channel; the next line's tokens are held back, as many as it holds.
    let step = |entries: Vec<Value>| notification("stream.step", json!({ "chunks": entries }));
    runtime.send(step(vec![entry("s-a", "a0")])).await;
    let held: Vec<Value> = (0..TOKENS_HELD_MAX).map(|_| entry("s-a", "h")).collect();
    runtime.send(step(held)).await;
    runtime
        .send(step(vec![entry("s-a", "a-last"), entry("s-b", "b1")]))
        .await;
    // s-a is far behind: "a-last" waits for it, and so does the reader: "b1" stays behind.
    assert!(
        timeout(Duration::from_secs(1), b_rx.recv()).await.is_err(),
        "b1 passed a stream far behind"
    );
    assert_eq!(
        a_rx.recv().await,
        Some(TokenEvent::Tokens(vec!["a0".into()]))
    );
    assert_eq!(
        a_rx.recv().await,
        Some(TokenEvent::Tokens(vec!["h".into(); TOKENS_HELD_MAX]))
    );
    assert_eq!(
        b_rx.recv().await,
        Some(TokenEvent::Tokens(vec!["b1".into()]))
    );
    assert_eq!(
        a_rx.recv().await,
        Some(TokenEvent::Tokens(vec!["a-last".into()]))
    );
}

#[tokio::test]
async fn a_streams_stats_count_for_its_model() {
    let (conn, _pipes, mut runtime) = connect();
    let (a_tx, a_rx) = token_channel(16);
    conn.open_stream("s-a", "org/a", a_tx);
    let (b_tx, b_rx) = token_channel(16);
    conn.open_stream("s-b", "org/b", b_tx);
    let stats = |stream_id: &str, tokens: u64| {
        notification(
            "stream.stats",
            json!({"stream_id": stream_id, "prompt_tokens": 3, "prompt_time": 0.5,
                   "queue_time": 0.0, "tokens_generated": tokens, "time_to_first_token": 0.5,
                   "total_time": 1.5}),
        )
    };
    for line in [stats("s-a", 4), stats("s-b", 6), stats("s-unknown", 100)] {
        runtime.send(line).await;
    }
    for stream_id in ["s-a", "s-b"] {
        runtime
            .send(notification(
                "stream.event",
                json!({"stream_id": stream_id, "event": "completed", "finish_reason": "stop"}),
            ))
            .await;
    }
    let _ = tokio::join!(events(a_rx), events(b_rx));
    let figures = conn.figures.snapshot();
    let counted = |model: &str| {
        let f = &figures[model];
        (
            f.streams_completed,
            f.prompt_tokens,
            f.generated_tokens,
            f.decode_seconds,
        )
    };
    assert_eq!(figures.len(), 2, "{figures:?}");
    assert_eq!(counted("org/a"), (1, 3, 4, 1.0));
    assert_eq!(counted("org/b"), (1, 3, 6, 1.0));
}

#[test]
fn each_stream_end_is_its_last_event() {
    let completed = |reason: &str| StreamEnd::Completed {
        finish_reason: reason.to_owned(),
    };
    let cases = [
        (
            completed("stop"),
            TokenEvent::Finished(FinishReason::Stop.into()),
        ),
        (
            completed("length"),
            TokenEvent::Finished(FinishReason::Length.into()),
        ),
        (
            completed("completed"),
            TokenEvent::Finished(FinishReason::Length.into()),
        ),
        (
            StreamEnd::Failed {
                error: "boom".into(),
            },
            TokenEvent::Failed(EngineError::Generation {
                reason: "boom".into(),
            }),
        ),
        (
            StreamEnd::Cancelled,
            TokenEvent::Failed(EngineError::Generation {
                reason: "cancelled by the runtime".into(),
            }),
        ),
    ];
    for (end, expected) in cases {
        assert_eq!(end_event(end.clone(), None), expected, "{end:?}");
    }
}

#[tokio::test]
async fn a_gone_child_fails_calls_and_streams_in_flight() {
    let (conn, _pipes, mut runtime) = connect();
    let (tx, mut rx) = token_channel(16);
    conn.open_stream("s-1", "org/m", tx);
    let call = spawn_call(
        &conn,
        LoadModel {
            batch_size: Some(4),
            local_path: "/models/org/m",
            model_id: "org/m",
            prefill_step_size: None,
            prefix_cache_bytes: None,
            session_ttl_seconds: None,
            warm_up: None,
        },
        LIMIT,
    );
    runtime.request().await;
    conn.fail_all("the runtime exited (signal: 9)");
    let Err(CallError::Gone(reason)) = call.await.unwrap() else {
        panic!("a call in flight fails as gone")
    };
    assert_eq!(reason, "the runtime exited during the call");
    assert_eq!(
        rx.recv().await,
        Some(TokenEvent::Failed(EngineError::Crashed {
            reason: "the runtime exited (signal: 9)".into()
        }))
    );
    assert!(!conn.close_stream("s-1"));
}

#[tokio::test]
async fn a_dropped_receiver_is_cancelled_in_a_runtime_that_can_cancel() {
    let (conn, _pipes, mut runtime) = connect();
    conn.set_features(Features {
        cancel: true,
        step_chunks: false,
        prefix_cache: false,
        warm_up: false,
    });
    let (tx, rx) = token_channel(16);
    conn.open_stream("s-1", "org/m", tx.clone());
    let watcher = tokio::spawn(watch_cancel(conn.clone(), tx, "s-1".into(), LIMIT));
    drop(rx);
    let cancel = runtime.request().await;
    assert_eq!(cancel["method"], "cancel");
    assert_eq!(cancel["params"], json!({"stream_id": "s-1"}));
    runtime
        .send(json!({"jsonrpc": "2.0", "id": cancel["id"], "result": {"cancelled": true}}))
        .await;
    watcher.await.unwrap();
    assert!(!conn.close_stream("s-1"));
}

#[tokio::test]
async fn a_runtime_without_cancel_is_sent_none() {
    let (conn, _pipes, mut runtime) = connect();
    let (tx, rx) = token_channel(16);
    conn.open_stream("s-1", "org/m", tx.clone());
    drop(rx);
    watch_cancel(conn.clone(), tx, "s-1".into(), LIMIT).await;
    assert!(!conn.close_stream("s-1"));
    // The next line on the pipe is the next call: no cancel went before it.
    let next = spawn_call(&conn, GetInfo {}, LIMIT);
    assert_eq!(runtime.request().await["method"], "runtime/info");
    next.abort();
}
