//! [`MlxEngine`]: the production [`Engine`], a supervised Python child running the MLX runtime,
//! spoken to with newline-delimited JSON-RPC over its stdin and stdout.
//!
//! Parts, each a task:
//!
//! - the **supervisor** starts the child, waits for its readiness line on stderr and a
//!   `runtime/info` answer, pings it, and when it exits or stops answering fails every call and
//!   stream in flight with `Crashed`, reports `Restarting`, and starts it again with backoff
//!   within a restart budget (after which it reports `Down`);
//! - per child: a **writer** (one line at a time to stdin), a **reader** (stdout lines with a
//!   hard cap, routed to waiting calls by id and to streams by `stream_id`) and a **stderr**
//!   forwarder (the child's log lines, prefixed, into ours);
//! - per generation: a **watcher** that sends `cancel` when the token receiver is dropped.
//!
//! This module and `engine::rpc` are the only ones that know the runtime's process and
//! protocol. The child also exits by itself when its stdin closes, so it cannot outlive the
//! worker even when the worker is killed.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::rpc::{self, Inbound, Line, RpcError, StreamEnd};
use super::{
    Catalog, Engine, EngineError, EngineHealth, FinishReason, GenerateRequest, LoadedModel,
    TokenEvent, TokenStream, catalog,
};
use crate::clock::Clock;
use crate::config::EngineConfig;
use crate::limits::TOKEN_CHANNEL_CAPACITY;

/// The line the runtime prints on stderr once it reads stdin.
const READY_LINE: &str = "MLX Runtime ready";
/// Period of the liveness ping.
const PING_INTERVAL: Duration = Duration::from_secs(10);
/// First restart delay; doubles per consecutive restart up to [`RESTART_DELAY_MAX`].
const RESTART_DELAY_MIN: Duration = Duration::from_millis(250);
/// Longest restart delay.
const RESTART_DELAY_MAX: Duration = Duration::from_secs(30);
/// Lines queued for the child's stdin.
const STDIN_QUEUE: usize = 256;
/// Longest stderr line forwarded to the log.
const STDERR_LINE_BYTES_MAX: usize = 64 * 1024;

/// Why a JSON-RPC call failed.
#[derive(Debug)]
enum CallError {
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
    fn into_engine(self, method: &str) -> EngineError {
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

/// One running child's channels.
struct Conn {
    /// Lines for the child's stdin; the writer task owns the pipe.
    stdin: mpsc::Sender<Vec<u8>>,
    /// Calls waiting for their response, by id.
    pending: Mutex<HashMap<u64, oneshot::Sender<Result<Value, RpcError>>>>,
    /// Live streams, by stream id; the reader sends their events.
    streams: Mutex<HashMap<String, mpsc::Sender<TokenEvent>>>,
    next_id: AtomicU64,
    /// Whether the runtime has a `cancel` method (ours does; the existing one does not).
    can_cancel: Mutex<bool>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The critical sections below cannot panic; a poisoned lock still holds valid data.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Conn {
    /// Fails every call and stream in flight: the child is gone.
    fn fail_all(&self, reason: &str) {
        lock(&self.pending).clear();
        let streams: Vec<_> = lock(&self.streams).drain().collect();
        for (_, tx) in streams {
            let _ = tx.try_send(TokenEvent::Failed(EngineError::Crashed {
                reason: reason.to_owned(),
            }));
        }
    }

    async fn call(&self, method: &str, params: Value, limit: Duration) -> Result<Value, CallError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let line = rpc::encode_request(id, method, &params)
            .map_err(|e| CallError::Encode(e.to_string()))?;
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        if self.stdin.send(line).await.is_err() {
            lock(&self.pending).remove(&id);
            return Err(CallError::Gone("the runtime's stdin is closed".to_owned()));
        }
        match timeout(limit, rx).await {
            Ok(Ok(outcome)) => outcome.map_err(CallError::Rpc),
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

/// State shared by the handle and the supervisor.
struct Shared {
    config: EngineConfig,
    clock: Arc<dyn Clock>,
    /// The live child's channels; `None` while starting, restarting or stopped.
    conn: Mutex<Option<Arc<Conn>>>,
    health: watch::Sender<EngineHealth>,
    /// Models loaded in the live child.
    loaded: Mutex<BTreeMap<String, LoadedModel>>,
    /// The scanned catalog, once scanned.
    catalog: Mutex<Option<Catalog>>,
    /// Restarts since start.
    restarts: AtomicU64,
    /// The live child's process id, 0 when none.
    pid: AtomicU32,
}

impl Shared {
    fn conn(&self) -> Result<Arc<Conn>, EngineError> {
        lock(&self.conn)
            .clone()
            .ok_or_else(|| EngineError::Unavailable {
                reason: match *self.health.borrow() {
                    EngineHealth::Down => "the MLX runtime is down".to_owned(),
                    _ => "the MLX runtime is starting".to_owned(),
                },
            })
    }

    fn publish_up(&self) {
        let loaded = lock(&self.loaded).keys().cloned().collect();
        self.health.send_replace(EngineHealth::Up { loaded });
    }
}

/// The MLX runtime as an [`Engine`].
pub struct MlxEngine {
    shared: Arc<Shared>,
    /// Stops the supervisor; fired by `shutdown`.
    stop: CancellationToken,
    /// The supervisor task, awaited by `shutdown`.
    supervisor: Mutex<Option<JoinHandle<()>>>,
}

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The interpreter is missing.
    #[error("python interpreter {path} not found; run ci/setup.sh or set runtime.pythonPath")]
    NoPython {
        /// The configured path.
        path: PathBuf,
    },
    /// The runtime package is missing.
    #[error("MLX runtime package not found in {path}; set runtime.runtimeDir")]
    NoRuntime {
        /// The configured directory.
        path: PathBuf,
    },
    /// The first start failed.
    #[error("the MLX runtime did not start: {reason}")]
    Failed {
        /// What went wrong.
        reason: String,
    },
}

impl MlxEngine {
    /// Starts the runtime and waits until it is ready (or the first start failed).
    pub async fn start(
        config: EngineConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<MlxEngine, StartError> {
        if !config.python.exists() {
            return Err(StartError::NoPython {
                path: config.python.clone(),
            });
        }
        if !config.runtime_dir.join("mlx_runtime").is_dir() {
            return Err(StartError::NoRuntime {
                path: config.runtime_dir.clone(),
            });
        }
        let shared = Arc::new(Shared {
            config,
            clock,
            conn: Mutex::new(None),
            health: watch::Sender::new(EngineHealth::Starting),
            loaded: Mutex::new(BTreeMap::new()),
            catalog: Mutex::new(None),
            restarts: AtomicU64::new(0),
            pid: AtomicU32::new(0),
        });
        let stop = CancellationToken::new();
        let (first_tx, first_rx) = oneshot::channel();
        let supervisor = tokio::spawn(
            supervise(shared.clone(), stop.clone(), first_tx).instrument(info_span!("engine")),
        );
        match first_rx.await {
            Ok(Ok(())) => Ok(MlxEngine {
                shared,
                stop,
                supervisor: Mutex::new(Some(supervisor)),
            }),
            Ok(Err(reason)) => {
                stop.cancel();
                let _ = supervisor.await;
                Err(StartError::Failed { reason })
            }
            Err(_) => Err(StartError::Failed {
                reason: "the supervisor ended".to_owned(),
            }),
        }
    }

    /// Times the runtime was restarted after a crash.
    pub fn restarts(&self) -> u64 {
        self.shared.restarts.load(Ordering::Relaxed)
    }

    /// The live runtime's process id, when one runs.
    pub fn runtime_pid(&self) -> Option<u32> {
        Some(self.shared.pid.load(Ordering::Relaxed)).filter(|&pid| pid != 0)
    }

    /// Generations the runtime itself counts as live (its `runtime/state`).
    pub async fn active_streams(&self) -> Result<u64, EngineError> {
        let conn = self.shared.conn()?;
        let state = conn
            .call("runtime/state", json!({}), self.shared.config.call_timeout)
            .await
            .map_err(|e| e.into_engine("runtime/state"))?;
        Ok(state
            .get("active_streams")
            .and_then(Value::as_u64)
            .unwrap_or(0))
    }

    fn catalog_entry(&self, model_id: &str) -> Result<PathBuf, EngineError> {
        let not_found = || EngineError::ModelNotFound {
            model: model_id.to_owned(),
        };
        let catalog = lock(&self.shared.catalog).clone();
        let catalog = match catalog {
            Some(c) => c,
            None => catalog::scan(&self.shared.config.model_dir).map_err(|e| {
                EngineError::Unavailable {
                    reason: e.to_string(),
                }
            })?,
        };
        let entry = catalog.models.get(model_id).ok_or_else(not_found)?;
        // The catalog only holds scanned directories; still, never load outside the root.
        let root = self
            .shared
            .config
            .model_dir
            .canonicalize()
            .map_err(|_| not_found())?;
        let path = entry.path.canonicalize().map_err(|_| not_found())?;
        if !path.starts_with(&root) {
            return Err(not_found());
        }
        Ok(path)
    }
}

#[async_trait]
impl Engine for MlxEngine {
    async fn catalog(&self) -> Result<Catalog, EngineError> {
        let root = self.shared.config.model_dir.clone();
        let catalog = tokio::task::spawn_blocking(move || catalog::scan(&root))
            .await
            .map_err(|e| EngineError::Unavailable {
                reason: format!("model scan failed: {e}"),
            })?
            .map_err(|e| EngineError::Unavailable {
                reason: e.to_string(),
            })?;
        *lock(&self.shared.catalog) = Some(catalog.clone());
        Ok(catalog)
    }

    async fn load(&self, model_id: &str) -> Result<LoadedModel, EngineError> {
        if let Some(model) = lock(&self.shared.loaded).get(model_id) {
            return Ok(model.clone());
        }
        let path = self.catalog_entry(model_id)?;
        let conn = self.shared.conn()?;
        let params = json!({"model_id": model_id, "local_path": path.display().to_string()});
        let result = conn
            .call("load_model", params, self.shared.config.load_timeout)
            .await
            .map_err(|e| match e {
                CallError::Rpc(rpc) => EngineError::LoadFailed {
                    model: model_id.to_owned(),
                    reason: rpc.message,
                },
                other => other.into_engine("load_model"),
            })?;
        let model = LoadedModel {
            model_id: model_id.to_owned(),
            context_length: result
                .get("context_length")
                .and_then(Value::as_u64)
                .unwrap_or(0),
            parameter_count: result
                .get("parameter_count")
                .and_then(Value::as_u64)
                .filter(|&n| n > 0),
        };
        lock(&self.shared.loaded).insert(model_id.to_owned(), model.clone());
        self.shared.publish_up();
        info!(model = model_id, "model loaded");
        Ok(model)
    }

    async fn unload(&self, model_id: &str) -> Result<(), EngineError> {
        let conn = self.shared.conn()?;
        conn.call(
            "unload_model",
            json!({"model_id": model_id}),
            self.shared.config.call_timeout,
        )
        .await
        .map_err(|e| e.into_engine("unload_model"))?;
        lock(&self.shared.loaded).remove(model_id);
        self.shared.publish_up();
        Ok(())
    }

    async fn generate(&self, request: GenerateRequest) -> Result<TokenStream, EngineError> {
        let conn = self.shared.conn()?;
        let (tx, rx) = mpsc::channel(TOKEN_CHANNEL_CAPACITY);
        // The runtime's stream ids have a narrower charset than request ids: use our own.
        let stream_id = format!("s-{}", conn.next_id.fetch_add(1, Ordering::Relaxed));
        // Registered before the call: notifications may follow the answer at once.
        lock(&conn.streams).insert(stream_id.clone(), tx.clone());
        let params = json!({
            "model_id": request.model_id,
            "prompt": request.prompt,
            "stream_id": stream_id,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "streaming": true,
        });
        if let Err(err) = conn
            .call("generate", params, self.shared.config.call_timeout)
            .await
        {
            lock(&conn.streams).remove(&stream_id);
            return Err(match err {
                CallError::Rpc(rpc) if rpc.code == rpc::code::INVALID_PARAMS => {
                    EngineError::Rejected {
                        reason: rpc.message,
                    }
                }
                CallError::Rpc(rpc) if rpc.code == rpc::code::MODEL_NOT_LOADED => {
                    // Lost in a restart the engine has not seen yet: load again next time.
                    lock(&self.shared.loaded).remove(&request.model_id);
                    self.shared.publish_up();
                    EngineError::Generation {
                        reason: rpc.message,
                    }
                }
                other => other.into_engine("generate"),
            });
        }
        debug!(request_id = %request.stream_id, stream_id, "generation started");
        tokio::spawn(watch_cancel(
            conn,
            tx,
            stream_id,
            self.shared.config.call_timeout,
        ));
        Ok(rx)
    }

    fn health(&self) -> watch::Receiver<EngineHealth> {
        self.shared.health.subscribe()
    }

    async fn shutdown(&self, grace: Duration) {
        let Some(supervisor) = lock(&self.supervisor).take() else {
            return;
        };
        if let Ok(conn) = self.shared.conn() {
            match conn.call("shutdown", json!({}), grace).await {
                Ok(_) => debug!("runtime acknowledged shutdown"),
                Err(err) => warn!(cause = ?err, "runtime did not acknowledge shutdown"),
            }
        }
        self.stop.cancel();
        if timeout(grace + Duration::from_secs(1), supervisor)
            .await
            .is_err()
        {
            error!("engine supervisor did not stop in time");
        }
    }
}

/// Sends `cancel` for a stream whose receiver was dropped before its end.
async fn watch_cancel(
    conn: Arc<Conn>,
    tx: mpsc::Sender<TokenEvent>,
    stream_id: String,
    limit: Duration,
) {
    tx.closed().await;
    let live = lock(&conn.streams).remove(&stream_id).is_some();
    if !live || !*lock(&conn.can_cancel) {
        return;
    }
    debug!(stream_id, "generation cancelled by its consumer");
    if let Err(err) = conn
        .call("cancel", json!({"stream_id": stream_id}), limit)
        .await
    {
        debug!(cause = ?err, "cancel not acknowledged");
    }
}

/// Starts, watches and restarts the child until `stop` fires or the budget runs out.
async fn supervise(
    shared: Arc<Shared>,
    stop: CancellationToken,
    first: oneshot::Sender<Result<(), String>>,
) {
    let mut first = Some(first);
    let mut restarts: VecDeque<Instant> = VecDeque::new();
    let mut delay = RESTART_DELAY_MIN;
    loop {
        let outcome = run_child(&shared, &stop, &mut first).await;
        lock(&shared.loaded).clear();
        if let Some(conn) = lock(&shared.conn).take() {
            conn.fail_all(&outcome);
        }
        if stop.is_cancelled() {
            shared.health.send_replace(EngineHealth::Down);
            info!("runtime stopped");
            return;
        }
        if let Some(first) = first.take() {
            shared.health.send_replace(EngineHealth::Down);
            let _ = first.send(Err(outcome));
            return;
        }
        let now = shared.clock.now();
        restarts.retain(|at| now.saturating_duration_since(*at) < shared.config.restart_window);
        if restarts.len() >= shared.config.restarts_max as usize {
            error!(
                restarts = restarts.len(),
                window_s = shared.config.restart_window.as_secs(),
                cause = %outcome,
                "runtime keeps failing; giving up"
            );
            shared.health.send_replace(EngineHealth::Down);
            return;
        }
        restarts.push_back(now);
        shared.restarts.fetch_add(1, Ordering::Relaxed);
        shared.health.send_replace(EngineHealth::Restarting);
        warn!(cause = %outcome, retry_ms = delay.as_millis() as u64, "runtime failed; restarting");
        tokio::select! {
            () = stop.cancelled() => {
                shared.health.send_replace(EngineHealth::Down);
                return;
            }
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(RESTART_DELAY_MAX);
    }
}

/// Runs one child to its end; returns why it ended.
async fn run_child(
    shared: &Arc<Shared>,
    stop: &CancellationToken,
    first: &mut Option<oneshot::Sender<Result<(), String>>>,
) -> String {
    let config = &shared.config;
    let mut child = match spawn(config) {
        Ok(child) => child,
        Err(e) => return format!("cannot start {}: {e}", config.python.display()),
    };
    let (Some(stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return "the runtime's pipes are missing".to_owned();
    };
    let pid = child.id().unwrap_or(0);
    let (ready_tx, ready_rx) = oneshot::channel();
    let stderr_task = tokio::spawn(forward_stderr(stderr, ready_tx));
    let (stdin_tx, stdin_rx) = mpsc::channel(STDIN_QUEUE);
    let writer = tokio::spawn(write_stdin(stdin, stdin_rx));
    let conn = Arc::new(Conn {
        stdin: stdin_tx,
        pending: Mutex::new(HashMap::new()),
        streams: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(1),
        can_cancel: Mutex::new(false),
    });
    let reader = tokio::spawn(read_stdout(stdout, conn.clone()));
    let outcome = async {
        if let Err(reason) = ready(
            &conn,
            shared.clock.as_ref(),
            ready_rx,
            config.startup_timeout,
        )
        .await
        {
            return reason;
        }
        info!(pid, "runtime ready");
        shared.pid.store(pid, Ordering::Relaxed);
        *lock(&shared.conn) = Some(conn.clone());
        shared.publish_up();
        if let Some(first) = first.take() {
            let _ = first.send(Ok(()));
        }
        let mut ping = tokio::time::interval(PING_INTERVAL);
        ping.tick().await;
        loop {
            tokio::select! {
                status = child.wait() => {
                    return match status {
                        Ok(s) => format!("the runtime exited ({s})"),
                        Err(e) => format!("cannot wait for the runtime: {e}"),
                    };
                }
                () = stop.cancelled() => return "stopped".to_owned(),
                _ = ping.tick() => {
                    if let Err(err @ CallError::TimedOut(_)) =
                        conn.call("runtime/info", json!({}), config.call_timeout).await
                    {
                        return format!("the runtime stopped answering ({err:?})");
                    }
                }
            }
        }
    }
    .await;
    shared.pid.store(0, Ordering::Relaxed);
    // Whatever ended the child's run, make sure it is gone: its stdin closes (it exits by
    // itself on end of input), then it is killed if it lingers.
    drop(conn);
    writer.abort();
    if timeout(Duration::from_secs(2), child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
    reader.abort();
    stderr_task.abort();
    outcome
}

fn spawn(config: &EngineConfig) -> std::io::Result<Child> {
    Command::new(&config.python)
        .arg("-m")
        .arg("mlx_runtime")
        .env("PYTHONPATH", &config.runtime_dir)
        .env("PYTHONUNBUFFERED", "1")
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_OFFLINE", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
}

/// Waits for the readiness line, then for a `runtime/info` answer, within `limit` in all.
async fn ready(
    conn: &Conn,
    clock: &dyn Clock,
    ready_line: oneshot::Receiver<()>,
    limit: Duration,
) -> Result<(), String> {
    let deadline = clock.now() + limit;
    if tokio::time::timeout_at(deadline, ready_line).await.is_err() {
        return Err(format!(
            "no readiness line within {} ms",
            crate::clock::millis(limit)
        ));
    }
    let remaining = deadline.saturating_duration_since(clock.now());
    let info = conn
        .call(
            "runtime/info",
            json!({}),
            remaining.max(Duration::from_millis(1)),
        )
        .await
        .map_err(|e| format!("runtime/info failed: {e:?}"))?;
    let capabilities: Vec<&str> = info
        .get("capabilities")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if info.get("mlx_supported").and_then(Value::as_bool) == Some(false) {
        return Err("the runtime reports that MLX is not supported on this host".to_owned());
    }
    *lock(&conn.can_cancel) = capabilities.contains(&"cancel");
    info!(
        version = info
            .get("version")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("?"),
        mlx = info
            .get("mlx_version")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("?"),
        can_cancel = capabilities.contains(&"cancel"),
        "runtime info"
    );
    Ok(())
}

async fn write_stdin(mut stdin: ChildStdin, mut lines: mpsc::Receiver<Vec<u8>>) {
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

async fn forward_stderr(stderr: tokio::process::ChildStderr, ready: oneshot::Sender<()>) {
    let mut ready = Some(ready);
    let mut reader = BufReader::new(stderr);
    let mut buf = Vec::new();
    loop {
        match rpc::read_line(&mut reader, &mut buf, STDERR_LINE_BYTES_MAX).await {
            Ok(Line::Complete(bytes)) => {
                let text = String::from_utf8_lossy(&bytes);
                let text = text.trim_end();
                if text == READY_LINE
                    && let Some(tx) = ready.take()
                {
                    let _ = tx.send(());
                }
                info!(target: "mlx_worker::runtime", "runtime: {text}");
            }
            Ok(Line::TooLong { len }) => warn!(len, "runtime: (stderr line too long, skipped)"),
            Ok(Line::Eof) | Err(_) => return,
        }
    }
}

async fn read_stdout(stdout: ChildStdout, conn: Arc<Conn>) {
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
            Ok(Inbound::Response {
                id: Some(id),
                outcome,
            }) => {
                if let Some(waiter) = lock(&conn.pending).remove(&id) {
                    let _ = waiter.send(outcome);
                }
            }
            Ok(Inbound::Response { id: None, outcome }) => {
                warn!(?outcome, "runtime answered a request it could not read");
            }
            Ok(Inbound::Chunk { stream_id, tokens }) => {
                let tx = lock(&conn.streams).get(&stream_id).cloned();
                let Some(tx) = tx else { continue };
                for token in tokens {
                    // Waiting here is the back-pressure: a full stream slows the reader.
                    if tx.send(TokenEvent::Token(token.text)).await.is_err() {
                        break;
                    }
                }
            }
            Ok(Inbound::End { stream_id, end }) => {
                let tx = lock(&conn.streams).remove(&stream_id);
                let Some(tx) = tx else { continue };
                let event = match end {
                    StreamEnd::Completed { finish_reason } => {
                        TokenEvent::Finished(if finish_reason == "stop" {
                            FinishReason::Stop
                        } else {
                            FinishReason::Length
                        })
                    }
                    StreamEnd::Failed { error } => {
                        TokenEvent::Failed(EngineError::Generation { reason: error })
                    }
                    StreamEnd::Cancelled => TokenEvent::Failed(EngineError::Generation {
                        reason: "cancelled by the runtime".to_owned(),
                    }),
                };
                let _ = tx.send(event).await;
            }
            Ok(Inbound::Stats { .. } | Inbound::Other { .. }) => {}
            Err(e) => warn!(cause = %e, "runtime line not understood"),
        }
    }
}

impl Drop for MlxEngine {
    fn drop(&mut self) {
        // Without a shutdown, stop the supervisor; the child is killed on drop.
        self.stop.cancel();
    }
}
