//! The JSON-RPC multiplexer over one running child's pipes: it numbers the calls and hands each
//! response to the call waiting for it, routes stream notifications to their generations by
//! `stream_id` (a `stream.step` line entry by entry, to each stream its own in line order),
//! waiting on a stream far behind, which is the back-pressure, records each completed stream's
//! stats in its model's figures, fails everything in flight when the child is gone, and sends
//! `cancel` when a generation's consumer goes away.
//!
//! It owns the lines on the child's stdin and stdout and the routing tables, not the child:
//! starting it, readiness, liveness and restarts are the supervisor's (`supervisor`), and which
//! calls the engine makes is the engine face's (`mlx`). Framing and the classification of a
//! line are `engine::rpc`'s.

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tracing::{debug, warn};

use super::figures::FigureBook;
use crate::engine::rpc::{self, Call, Cancel, ChunkToken, Inbound, Line, RpcError, StreamEnd};
use crate::engine::{EngineError, Finish, FinishReason, PromptUsage, TokenEvent, TokenSender};

/// Lines queued for the child's stdin.
const STDIN_QUEUE: usize = 256;

/// Locks `m`, also when poisoned: every critical section of the engine is a plain read or
/// write that cannot panic half-way, so a poisoned lock still holds valid data.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why a JSON-RPC call failed.
#[derive(Debug)]
pub(super) enum CallError {
    /// The runtime answered with an error.
    Rpc(RpcError),
    /// No runtime, or it died during the call.
    Gone(String),
    /// The call did not answer in time.
    TimedOut(u64),
    /// The request could not be encoded.
    Encode(String),
}

impl CallError {
    /// The engine error a failed `method` call is, when the caller has no better one.
    pub(super) fn into_engine(self, method: &str) -> EngineError {
        match self {
            CallError::Rpc(e) => EngineError::Generation {
                reason: format!("{} (code {})", e.message, e.code),
            },
            CallError::Gone(reason) => EngineError::Crashed { reason },
            CallError::TimedOut(millis) => EngineError::TimedOut {
                call: method.to_owned(),
                millis,
            },
            CallError::Encode(reason) => EngineError::Rejected { reason },
        }
    }
}

/// One running child's connection: its calls in flight and its live streams.
pub(super) struct Conn {
    /// Lines for the child's stdin; the writer task owns the pipe.
    stdin: mpsc::Sender<Vec<u8>>,
    /// Calls waiting for their response, by id.
    pending: Mutex<HashMap<u64, oneshot::Sender<Result<Value, RpcError>>>>,
    /// Live streams, by stream id; the reader sends their events.
    streams: Mutex<HashMap<String, Route>>,
    /// Where completed streams' stats go, by model; outlives the connection.
    figures: Arc<FigureBook>,
    /// The next call id, also the number of the next stream id.
    next_id: AtomicU64,
    /// What the runtime can do, from its `runtime/info`.
    features: Mutex<Features>,
}

/// Where a live stream's notifications go.
struct Route {
    /// Its generation's events.
    tx: TokenSender,
    /// Its model, whose figures its stats add to.
    model_id: String,
    /// Its prompt's figures, from its `stream.stats` (which comes before its end).
    usage: Option<PromptUsage>,
}

/// What the runtime on the other end of a connection can do, from its `runtime/info`
/// capabilities; nothing until it has said.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Features {
    /// It has a `cancel` method (ours does; the existing one does not).
    pub(super) cancel: bool,
    /// Its `generate` takes `step_chunks` (ours does; the existing one does not).
    pub(super) step_chunks: bool,
    /// It keeps a prefix cache per model (ours does; the existing one does not).
    pub(super) prefix_cache: bool,
    /// Its `load_model` warms the model up and takes `warm_up` (ours does; the existing one
    /// does not).
    pub(super) warm_up: bool,
}

/// The tasks that move one child's lines; whoever runs the child ends them with it.
pub(super) struct Pipes {
    /// Writes queued lines to the child's stdin, which it owns: aborting it closes stdin.
    writer: JoinHandle<()>,
    /// Reads the child's stdout and routes each line.
    reader: JoinHandle<()>,
}

impl Pipes {
    /// Closes the child's stdin (the runtime exits by itself at the end of its input).
    pub(super) fn close_stdin(&self) {
        self.writer.abort();
    }

    /// Stops reading the child's stdout.
    pub(super) fn stop_reading(&self) {
        self.reader.abort();
    }
}

impl Conn {
    /// Starts the writer on a child's `stdin` and the reader on its `stdout`; completed streams'
    /// stats go to `figures`.
    pub(super) fn start<W, R>(stdin: W, stdout: R, figures: Arc<FigureBook>) -> (Arc<Conn>, Pipes)
    where
        W: AsyncWrite + Unpin + Send + 'static,
        R: AsyncRead + Unpin + Send + 'static,
    {
        let (lines_tx, lines_rx) = mpsc::channel(STDIN_QUEUE);
        let writer = tokio::spawn(write_stdin(stdin, lines_rx));
        let conn = Arc::new(Conn {
            stdin: lines_tx,
            pending: Mutex::new(HashMap::new()),
            streams: Mutex::new(HashMap::new()),
            figures,
            next_id: AtomicU64::new(1),
            features: Mutex::new(Features::default()),
        });
        let reader = tokio::spawn(read_stdout(stdout, conn.clone()));
        (conn, Pipes { writer, reader })
    }

    /// Records what the runtime said it can do.
    pub(super) fn set_features(&self, features: Features) {
        *lock(&self.features) = features;
    }

    /// What the runtime said it can do.
    pub(super) fn features(&self) -> Features {
        *lock(&self.features)
    }

    /// A stream id unique on this connection. The runtime's stream ids have a narrower charset
    /// than request ids, so the worker uses its own.
    pub(super) fn new_stream_id(&self) -> String {
        format!("s-{}", self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// Routes the events of stream `stream_id`, of model `model_id`, to `tx` from now on.
    /// Register a stream before the call that starts it: notifications may follow its answer
    /// at once.
    pub(super) fn open_stream(&self, stream_id: &str, model_id: &str, tx: TokenSender) {
        let route = Route {
            tx,
            model_id: model_id.to_owned(),
            usage: None,
        };
        lock(&self.streams).insert(stream_id.to_owned(), route);
    }

    /// Stops routing stream `stream_id`; whether it was still live.
    pub(super) fn close_stream(&self, stream_id: &str) -> bool {
        lock(&self.streams).remove(stream_id).is_some()
    }

    /// Fails every call and stream in flight: the child is gone.
    pub(super) fn fail_all(&self, reason: &str) {
        lock(&self.pending).clear();
        let streams: Vec<_> = lock(&self.streams).drain().collect();
        for (_, Route { tx, .. }) in streams {
            tx.end(TokenEvent::Failed(EngineError::Crashed {
                reason: reason.to_owned(),
            }));
        }
    }

    /// Makes `call` and waits up to `limit` for its answer.
    pub(super) async fn call<C: Call>(
        &self,
        call: &C,
        limit: Duration,
    ) -> Result<C::Output, CallError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let line = rpc::encode_call(id, call).map_err(|e| CallError::Encode(e.to_string()))?;
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        if self.stdin.send(line).await.is_err() {
            lock(&self.pending).remove(&id);
            return Err(CallError::Gone("the runtime's stdin is closed".to_owned()));
        }
        match timeout(limit, rx).await {
            Ok(Ok(outcome)) => outcome.map(rpc::decode_result).map_err(CallError::Rpc),
            Ok(Err(_)) => Err(CallError::Gone(
                "the runtime exited during the call".to_owned(),
            )),
            Err(_) => {
                lock(&self.pending).remove(&id);
                Err(CallError::TimedOut(crate::clock::millis(limit)))
            }
        }
    }
}

/// Sends `cancel` for a stream whose receiver was dropped before its end.
pub(super) async fn watch_cancel(
    conn: Arc<Conn>,
    tx: TokenSender,
    stream_id: String,
    limit: Duration,
) {
    tx.closed().await;
    let live = conn.close_stream(&stream_id);
    if !live || !conn.features().cancel {
        return;
    }
    debug!(stream_id, "generation cancelled by its consumer");
    if let Err(err) = conn
        .call(
            &Cancel {
                stream_id: &stream_id,
            },
            limit,
        )
        .await
    {
        debug!(cause = ?err, "cancel not acknowledged");
    }
}

async fn write_stdin<W: AsyncWrite + Unpin>(mut stdin: W, mut lines: mpsc::Receiver<Vec<u8>>) {
    while let Some(line) = lines.recv().await {
        if let Err(e) = stdin.write_all(&line).await {
            warn!(cause = %e, "cannot write to the runtime");
            return;
        }
        if let Err(e) = stdin.flush().await {
            warn!(cause = %e, "cannot flush the runtime's stdin");
            return;
        }
    }
}

async fn read_stdout<R: AsyncRead + Unpin>(stdout: R, conn: Arc<Conn>) {
    let mut reader = BufReader::new(stdout);
    let mut buf = Vec::new();
    loop {
        let line = match rpc::read_line(&mut reader, &mut buf, rpc::LINE_CAP).await {
            Ok(Line::Complete(line)) => line,
            Ok(Line::TooLong { len }) => {
                warn!(
                    len,
                    limit = rpc::LINE_CAP,
                    "runtime line over the limit skipped"
                );
                continue;
            }
            Ok(Line::Eof) => return,
            Err(e) => {
                warn!(cause = %e, "cannot read the runtime's stdout");
                return;
            }
        };
        match rpc::decode_line(&line) {
            Ok(inbound) => route(&conn, inbound).await,
            Err(e) => warn!(cause = %e, "runtime line not understood"),
        }
    }
}

/// Hands one inbound message to the call or the stream it belongs to.
async fn route(conn: &Conn, inbound: Inbound) {
    match inbound {
        Inbound::Response {
            id: Some(id),
            outcome,
        } => {
            if let Some(waiter) = lock(&conn.pending).remove(&id) {
                let _ = waiter.send(outcome);
            }
        }
        Inbound::Response { id: None, outcome } => {
            warn!(?outcome, "runtime answered a request it could not read");
        }
        Inbound::Chunk { stream_id, tokens } => deliver(conn, &stream_id, tokens).await,
        Inbound::Step { chunks } => {
            for (stream_id, tokens) in by_stream(chunks) {
                deliver(conn, &stream_id, tokens).await;
            }
        }
        Inbound::Stats { stream_id, stats } => {
            let model = lock(&conn.streams).get_mut(&stream_id).map(|route| {
                route.usage = stats.prompt_tokens.map(|prompt_tokens| PromptUsage {
                    prompt_tokens,
                    cached_tokens: stats.cached_tokens.unwrap_or(0).min(prompt_tokens),
                });
                route.model_id.clone()
            });
            if let Some(model) = model {
                conn.figures.completed(&model, &stats);
            }
        }
        Inbound::End { stream_id, end } => {
            let route = lock(&conn.streams).remove(&stream_id);
            let Some(Route { tx, usage, .. }) = route else {
                return;
            };
            tx.end(end_event(end, usage));
        }
        Inbound::Other { .. } => {}
    }
}

/// Hands the tokens of one line to stream `stream_id`, if it is live.
async fn deliver(conn: &Conn, stream_id: &str, tokens: Vec<ChunkToken>) {
    let tx = lock(&conn.streams)
        .get(stream_id)
        .map(|route| route.tx.clone());
    if let Some(tx) = tx {
        send_tokens(&tx, tokens).await;
    }
}

/// Sends one line's tokens of a stream, in order. Waiting here is the back-pressure: a stream
/// far behind slows the reader.
async fn send_tokens(tx: &TokenSender, tokens: Vec<ChunkToken>) {
    let _ = tx
        .send_all(tokens.into_iter().map(|token| token.text).collect())
        .await;
}

/// The entries of a `stream.step` line by stream, in the order the streams first appear, each
/// stream's tokens in line order.
fn by_stream(chunks: Vec<rpc::StepChunk>) -> Vec<(String, Vec<ChunkToken>)> {
    let mut groups: Vec<(String, Vec<ChunkToken>)> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for chunk in chunks {
        match index.get(&chunk.stream_id) {
            Some(&at) => groups[at].1.push(chunk.token),
            None => {
                index.insert(chunk.stream_id.clone(), groups.len());
                groups.push((chunk.stream_id, vec![chunk.token]));
            }
        }
    }
    groups
}

/// The last event of a stream that ended with `end`, its prompt's figures `usage`.
fn end_event(end: StreamEnd, usage: Option<PromptUsage>) -> TokenEvent {
    match end {
        StreamEnd::Completed { finish_reason } => TokenEvent::Finished(Finish {
            reason: if finish_reason == "stop" {
                FinishReason::Stop
            } else {
                FinishReason::Length
            },
            usage,
        }),
        StreamEnd::Failed { error } => {
            TokenEvent::Failed(EngineError::Generation { reason: error })
        }
        StreamEnd::Cancelled => TokenEvent::Failed(EngineError::Generation {
            reason: "cancelled by the runtime".to_owned(),
        }),
    }
}
