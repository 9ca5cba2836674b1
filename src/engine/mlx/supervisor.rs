//! The MLX runtime's process supervisor: it spawns the Python child, waits for its readiness
//! line on stderr and a `runtime/info` answer, pings it, and when it exits or stops answering
//! fails every call and stream in flight with `Crashed`, reports `Restarting` and starts it
//! again with backoff, within a restart budget (after which it reports `Down`). Whatever ends a
//! child's run, its stdin is closed (the runtime exits by itself at the end of its input) and it
//! is killed if it lingers.
//!
//! The child runs in a process group of its own, so a signal sent to the worker's group (by
//! `timeout`, `kill -- -PGID`, a terminal's Ctrl-C, some supervisors) reaches the worker
//! alone, which drains and then stops the child itself. Once the engine is stopping, a child
//! that exits is not restarted: its run is over, not crashed.
//!
//! It owns the child process, the engine's health, the record of the models loaded in the live
//! child, the number of streams the child holds at once (from its `runtime/info`) and the
//! per-model figures, which outlive each child (`figures`). It makes
//! no call beyond readiness and liveness: lines and their routing are the
//! connection's (`conn`), the engine's calls the engine face's (`mlx`).

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};
use std::ffi::OsStr;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::sync::{oneshot, watch};
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::conn::{CallError, Conn, Features, lock};
use super::figures::FigureBook;
use super::stderr;
use crate::clock::Clock;
use crate::config::EngineConfig;
use crate::engine::rpc::{GetInfo, GetState, Info};
use crate::engine::{CacheState, EngineError, EngineHealth, LoadedModel};
use crate::limits::{INFLIGHT_REQUESTS_MAX, RUNTIME_STREAMS_LIVE_DEFAULT};

/// Period of the liveness ping (`runtime/info`, which the runtime's read loop answers without
/// waiting for generation).
const PING_INTERVAL: Duration = Duration::from_secs(2);
/// How long a liveness ping waits for its answer.
const PING_TIMEOUT: Duration = Duration::from_secs(3);
/// Pings in a row left unanswered before the runtime counts as hung: one can be a long pause
/// of the runtime's interpreter, two are not. A hung runtime is found within
/// `PING_INTERVAL + PING_MISSES * PING_TIMEOUT` (8 s), then killed and restarted.
const PING_MISSES: u32 = 2;
/// Read the prefix caches' figures every this many pings (10 s).
const CACHE_READ_EVERY: u32 = 5;
/// How long, once a child has exited during its start-up, its last stderr lines get to arrive.
const STDERR_DRAIN: Duration = Duration::from_millis(500);
/// First restart delay; doubles per consecutive restart up to [`RESTART_DELAY_MAX`].
const RESTART_DELAY_MIN: Duration = Duration::from_millis(250);
/// Longest restart delay.
const RESTART_DELAY_MAX: Duration = Duration::from_secs(30);
/// How long a child whose stdin is closed gets to exit before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(2);

/// The supervised runtime, shared by the engine face and the supervisor task.
pub(super) struct Runtime {
    /// The engine's configuration.
    pub(super) config: EngineConfig,
    clock: Arc<dyn Clock>,
    /// The live child's connection; `None` while starting, restarting or stopped.
    conn: Mutex<Option<Arc<Conn>>>,
    /// The engine's health; the face hands out its receivers.
    health: watch::Sender<EngineHealth>,
    /// Models loaded in the live child; cleared when it ends.
    loaded: Mutex<BTreeMap<String, LoadedModel>>,
    /// Fired when the engine starts stopping (the worker's stop began, or `shutdown`); from
    /// then on a child that exits is not restarted.
    stopping: CancellationToken,
    /// Streams the last ready child said it holds at once ([`streams_max`]).
    streams_max: AtomicUsize,
    /// What the engine has done with each model, across children; each child's connection
    /// records its streams' stats here.
    pub(super) figures: Arc<FigureBook>,
}

impl Runtime {
    /// A runtime not started yet (`Starting`).
    pub(super) fn new(config: EngineConfig, clock: Arc<dyn Clock>) -> Runtime {
        Runtime {
            config,
            clock,
            conn: Mutex::new(None),
            health: watch::Sender::new(EngineHealth::Starting),
            loaded: Mutex::new(BTreeMap::new()),
            stopping: CancellationToken::new(),
            streams_max: AtomicUsize::new(RUNTIME_STREAMS_LIVE_DEFAULT),
            figures: Arc::default(),
        }
    }

    /// Marks the engine as stopping: a child that exits from now on is not restarted.
    pub(super) fn begin_stop(&self) {
        self.stopping.cancel();
    }

    /// Streams the runtime holds live at once, across its models (generating or queued), past
    /// which it refuses `generate`: what the last ready child said, else the default.
    pub(super) fn streams_max(&self) -> usize {
        self.streams_max.load(Ordering::Relaxed)
    }

    /// The live child's connection, or why there is none.
    pub(super) fn conn(&self) -> Result<Arc<Conn>, EngineError> {
        lock(&self.conn)
            .clone()
            .ok_or_else(|| EngineError::Unavailable {
                reason: match *self.health.borrow() {
                    _ if self.stopping.is_cancelled() => "the MLX runtime is stopping".to_owned(),
                    EngineHealth::Down => "the MLX runtime is down".to_owned(),
                    _ => "the MLX runtime is starting".to_owned(),
                },
            })
    }

    /// The engine's health, updated as it changes.
    pub(super) fn health(&self) -> watch::Receiver<EngineHealth> {
        self.health.subscribe()
    }

    /// The model `model_id`, when the live child has it loaded.
    pub(super) fn loaded(&self, model_id: &str) -> Option<LoadedModel> {
        lock(&self.loaded).get(model_id).cloned()
    }

    /// Records a model the live child loaded, decoding `batch_size` of its streams together.
    pub(super) fn add_loaded(&self, model: LoadedModel, batch_size: usize) {
        self.figures.loaded(&model.model_id, batch_size);
        lock(&self.loaded).insert(model.model_id.clone(), model);
        self.publish_up();
    }

    /// Records that the live child no longer has `model_id`.
    pub(super) fn remove_loaded(&self, model_id: &str) {
        lock(&self.loaded).remove(model_id);
        self.figures.unloaded(model_id);
        self.publish_up();
    }

    fn publish_up(&self) {
        let loaded = lock(&self.loaded).keys().cloned().collect();
        self.health.send_replace(EngineHealth::Up { loaded });
    }

    /// Makes a ready child's connection the live one.
    fn go_live(&self, conn: &Arc<Conn>) {
        *lock(&self.conn) = Some(conn.clone());
        self.publish_up();
    }

    /// Forgets the ended child: its models, and its calls and streams, which fail with `reason`.
    fn forget_child(&self, reason: &str) {
        lock(&self.loaded).clear();
        self.figures.all_unloaded();
        if let Some(conn) = lock(&self.conn).take() {
            conn.fail_all(reason);
        }
    }
}

/// Restarts allowed within a sliding window, and the delay before each, which doubles per
/// restart up to [`RESTART_DELAY_MAX`].
struct RestartBudget {
    window: Duration,
    max: usize,
    /// When the restarts still in the window happened.
    recent: VecDeque<Instant>,
    /// The delay before the next restart.
    delay: Duration,
}

impl RestartBudget {
    fn new(window: Duration, max: u32) -> RestartBudget {
        RestartBudget {
            window,
            max: max as usize,
            recent: VecDeque::new(),
            delay: RESTART_DELAY_MIN,
        }
    }

    /// Counts a restart at `now` and gives the delay before it; `None` when the window's
    /// budget is spent.
    fn admit(&mut self, now: Instant) -> Option<Duration> {
        let window = self.window;
        self.recent
            .retain(|at| now.saturating_duration_since(*at) < window);
        if self.recent.len() >= self.max {
            return None;
        }
        self.recent.push_back(now);
        let delay = self.delay;
        self.delay = (delay * 2).min(RESTART_DELAY_MAX);
        Some(delay)
    }
}

/// Starts, watches and restarts the child until `stop` fires, the engine is stopping or the
/// budget runs out. `first` hears how the first start went.
pub(super) async fn supervise(
    runtime: Arc<Runtime>,
    stop: CancellationToken,
    first: oneshot::Sender<Result<(), String>>,
) {
    let mut first = Some(first);
    let mut budget = RestartBudget::new(runtime.config.restart_window, runtime.config.restarts_max);
    loop {
        let outcome = run_child(&runtime, &stop, &mut first).await;
        runtime.forget_child(&outcome);
        if stop.is_cancelled() || runtime.stopping.is_cancelled() {
            runtime.health.send_replace(EngineHealth::Down);
            info!(cause = %outcome, "runtime stopped");
            return;
        }
        if let Some(first) = first.take() {
            runtime.health.send_replace(EngineHealth::Down);
            let _ = first.send(Err(outcome));
            return;
        }
        let Some(delay) = budget.admit(runtime.clock.now()) else {
            error!(
                restarts = budget.recent.len(),
                window_s = runtime.config.restart_window.as_secs(),
                cause = %outcome,
                "runtime keeps failing; giving up"
            );
            runtime.health.send_replace(EngineHealth::Down);
            return;
        };
        runtime.health.send_replace(EngineHealth::Restarting);
        warn!(cause = %outcome, retry_ms = delay.as_millis() as u64, "runtime failed; restarting");
        tokio::select! {
            () = stop.cancelled() => {
                runtime.health.send_replace(EngineHealth::Down);
                return;
            }
            () = runtime.stopping.cancelled() => {
                runtime.health.send_replace(EngineHealth::Down);
                info!("runtime stopped before its restart");
                return;
            }
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Runs one child to its end; returns why it ended.
async fn run_child(
    runtime: &Runtime,
    stop: &CancellationToken,
    first: &mut Option<oneshot::Sender<Result<(), String>>>,
) -> String {
    let config = &runtime.config;
    let mut child = match spawn(config) {
        Ok(child) => child,
        Err(e) => return format!("cannot start {}: {e}", program(config).to_string_lossy()),
    };
    let (Some(stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return "the runtime's pipes are missing".to_owned();
    };
    let (ready_tx, ready_rx) = oneshot::channel();
    let tail = Arc::new(stderr::Tail::default());
    let mut stderr_task = tokio::spawn(stderr::forward(stderr, ready_tx, tail.clone()));
    let (conn, pipes) = Conn::start(stdin, stdout, runtime.figures.clone());
    let end = serve(runtime, stop, first, &mut child, &conn, ready_rx).await;
    // Whatever ended the child's run, make sure it is gone: a hung child is killed at once;
    // any other gets its stdin closed (it exits by itself on end of input), then is killed if
    // it lingers.
    drop(conn);
    pipes.close_stdin();
    if matches!(end, End::Hung(_)) || timeout(EXIT_GRACE, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
    pipes.stop_reading();
    let outcome = match end {
        End::DuringStartup(reason) => {
            // Its last words are in the pipe still, or on their way to the log.
            let _ = timeout(STDERR_DRAIN, &mut stderr_task).await;
            match tail.text() {
                words if words.is_empty() => format!("{reason}; it wrote nothing on stderr"),
                words => format!("{reason}; its last stderr lines: {words}"),
            }
        }
        End::Hung(reason) | End::Other(reason) => reason,
    };
    stderr_task.abort();
    outcome
}

/// How a child's run ended.
enum End {
    /// It exited before it was ready.
    DuringStartup(String),
    /// It stopped answering the liveness ping.
    Hung(String),
    /// Anything else: it exited while serving, failed its readiness, or the engine stopped.
    Other(String),
}

/// Brings a started child up, then watches it until it exits, stops answering or `stop`
/// fires; returns why its run ended.
async fn serve(
    runtime: &Runtime,
    stop: &CancellationToken,
    first: &mut Option<oneshot::Sender<Result<(), String>>>,
    child: &mut Child,
    conn: &Arc<Conn>,
    ready_line: oneshot::Receiver<()>,
) -> End {
    let config = &runtime.config;
    let pid = child.id().unwrap_or(0);
    let readiness = ready(
        conn,
        runtime.clock.as_ref(),
        ready_line,
        config.startup_timeout,
    );
    let info = tokio::select! {
        outcome = readiness => match outcome {
            Ok(info) => info,
            Err(reason) => return End::Other(reason),
        },
        // A child that dies while starting is seen at once, not at the start-up timeout.
        status = child.wait() => {
            return End::DuringStartup(match status {
                Ok(s) => format!("the runtime exited during its start-up ({s})"),
                Err(e) => format!("cannot wait for the starting runtime: {e}"),
            });
        }
        () = stop.cancelled() => return End::Other("stopped while starting".to_owned()),
    };
    runtime
        .streams_max
        .store(streams_max(&info), Ordering::Relaxed);
    info!(pid, "runtime ready");
    runtime.go_live(conn);
    if let Some(first) = first.take() {
        let _ = first.send(Ok(()));
    }
    let mut ping = tokio::time::interval(PING_INTERVAL);
    ping.tick().await;
    let (mut pings, mut missed) = (0u32, 0u32);
    loop {
        tokio::select! {
            status = child.wait() => {
                return End::Other(match status {
                    Ok(s) => format!("the runtime exited ({s})"),
                    Err(e) => format!("cannot wait for the runtime: {e}"),
                });
            }
            () = stop.cancelled() => return End::Other("stopped".to_owned()),
            _ = ping.tick() => {
                pings = pings.wrapping_add(1);
                match conn.call(&GetInfo {}, PING_TIMEOUT).await {
                    Err(CallError::TimedOut(_)) => {
                        missed += 1;
                        warn!(missed, timeout_ms = crate::clock::millis(PING_TIMEOUT), "the runtime did not answer its liveness ping");
                        if missed >= PING_MISSES {
                            return End::Hung(format!(
                                "the runtime stopped answering: {missed} liveness pings in a row got no answer within {} ms",
                                crate::clock::millis(PING_TIMEOUT)
                            ));
                        }
                        continue;
                    }
                    _ => missed = 0,
                }
                if conn.features().prefix_cache && pings % CACHE_READ_EVERY == 0 {
                    read_caches(runtime, conn).await;
                }
            }
        }
    }
}

/// Takes what each model's prefix cache holds from the runtime's `runtime/state` into the
/// figures; a failed call leaves them as they were (the ping judges liveness).
async fn read_caches(runtime: &Runtime, conn: &Conn) {
    let Ok(state) = conn.call(&GetState {}, runtime.config.call_timeout).await else {
        return;
    };
    for model in state.loaded_models {
        let (Some(id), Some(cache)) = (model.model_id, model.prefix_cache) else {
            continue;
        };
        let state = CacheState {
            bytes: cache.bytes.unwrap_or(0),
            entries: cache.entries.unwrap_or(0),
            evictions: cache.evictions.unwrap_or(0),
        };
        runtime.figures.cache_state(&id, state);
    }
}

/// The program the runtime runs as: `runtime.command`'s first word, else the interpreter.
fn program(config: &EngineConfig) -> &OsStr {
    match config.command.as_deref() {
        Some([program, ..]) => OsStr::new(program),
        _ => config.python.as_os_str(),
    }
}

fn spawn(config: &EngineConfig) -> std::io::Result<Child> {
    let mut command = Command::new(program(config));
    match config.command.as_deref() {
        Some([_, args @ ..]) => {
            command.args(args);
        }
        _ => {
            command
                .arg("-m")
                .arg("mlx_runtime")
                .env("PYTHONPATH", &config.runtime_dir);
        }
    }
    command
        .env("PYTHONUNBUFFERED", "1")
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_OFFLINE", "1")
        .envs(&config.env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: signals for the worker's group are the worker's to act on.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
}

/// Waits for the readiness line, then for a `runtime/info` answer, within `limit` in all;
/// returns the answer.
async fn ready(
    conn: &Conn,
    clock: &dyn Clock,
    ready_line: oneshot::Receiver<()>,
    limit: Duration,
) -> Result<Info, String> {
    let deadline = clock.now() + limit;
    let line = async {
        if ready_line.await.is_err() {
            // Its stderr ended without the line: it is exiting, which the caller sees.
            std::future::pending::<()>().await;
        }
    };
    if tokio::time::timeout_at(deadline, line).await.is_err() {
        return Err(format!(
            "no readiness line within {} ms",
            crate::clock::millis(limit)
        ));
    }
    let remaining = deadline.saturating_duration_since(clock.now());
    let info = conn
        .call(&GetInfo {}, remaining.max(Duration::from_millis(1)))
        .await
        .map_err(|e| format!("runtime/info failed: {e:?}"))?;
    if info.mlx_supported == Some(false) {
        return Err("the runtime reports that MLX is not supported on this host".to_owned());
    }
    conn.set_features(Features {
        cancel: info.can_cancel(),
        step_chunks: info.can_step_chunks(),
        prefix_cache: info.can_prefix_cache(),
        warm_up: info.can_warm_up(),
    });
    info!(
        version = info.version.as_deref().unwrap_or("?"),
        mlx = info.mlx_version.as_deref().unwrap_or("?"),
        can_cancel = info.can_cancel(),
        step_chunks = info.can_step_chunks(),
        streams_max = streams_max(&info),
        stated = info.streams_live_max().is_some(),
        "runtime info"
    );
    Ok(info)
}

/// The streams a runtime whose `runtime/info` answer is `info` holds live at once: its own
/// figure, within 1 and [`INFLIGHT_REQUESTS_MAX`], or [`RUNTIME_STREAMS_LIVE_DEFAULT`] when it
/// states none (as the existing runtime does not).
fn streams_max(info: &Info) -> usize {
    info.streams_live_max()
        .map_or(RUNTIME_STREAMS_LIVE_DEFAULT, |n| {
            usize::try_from(n)
                .unwrap_or(usize::MAX)
                .clamp(1, INFLIGHT_REQUESTS_MAX)
        })
}
