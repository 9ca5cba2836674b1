//! `mlx-worker run`: configuration → logs → worker id → embedded server (if configured) →
//! production seams (the engine asks each model's batch size of the host's plan) →
//! `Worker::run` until SIGINT or SIGTERM, then the drain. A run that ended because the client
//! gave up reconnecting to the message server exits 74, not 0.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mlx_worker::clock::{Clock, SystemClock};
use mlx_worker::config::{Flags, NatsConfig, WorkerConfig};
use mlx_worker::engine::mlx::MlxEngine;
use mlx_worker::engine::{Engine, EngineHealth};
use mlx_worker::hardware::{self, HardwareProbe, HostProfile, HostSample};
use mlx_worker::identity::{self, Identity};
use mlx_worker::instance::{self, InstanceError, StateLock};
use mlx_worker::plan::prefix_cache_bytes_default;
use mlx_worker::plan::recommendation::{BatchSizes, Recommendation};
use mlx_worker::transport::embedded::EmbeddedServer;
use mlx_worker::transport::nats::{self, ConnectError, NatsTransport};
use mlx_worker::worker::{Deps, Worker};
use tokio::net::TcpListener;
use tracing::{error, info, warn};

use crate::exit::{
    EX_CANTCREAT, EX_FORCED, EX_IOERR, EX_NOPERM, EX_SOFTWARE, EX_TEMPFAIL, EX_UNAVAILABLE,
    EX_USAGE, config_or_exit,
};
use crate::logs;

/// Signals within this time of the first one are the same stop request: `timeout` and some
/// supervisors send SIGTERM to the process and then to its whole group, so one request can
/// arrive twice at once.
const SIGNAL_REPEAT_WINDOW: Duration = Duration::from_secs(1);

/// SIGINT and SIGTERM, listened to from the start of the run, so none is missed between two
/// waits.
struct Signals {
    #[cfg(unix)]
    interrupt: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Signals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Signals {
                interrupt: signal(SignalKind::interrupt()).ok(),
                terminate: signal(SignalKind::terminate()).ok(),
            }
        }
        #[cfg(not(unix))]
        {
            Signals {}
        }
    }

    /// Resolves at the next SIGINT or SIGTERM.
    async fn next(&mut self) {
        #[cfg(unix)]
        {
            async fn recv(signal: &mut Option<tokio::signal::unix::Signal>) {
                match signal {
                    Some(signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending().await,
                }
            }
            if self.interrupt.is_none() && self.terminate.is_none() {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
            tokio::select! {
                () = recv(&mut self.interrupt) => {}
                () = recv(&mut self.terminate) => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

pub(crate) async fn run(flags: Flags) -> ExitCode {
    let config = match config_or_exit(&flags) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Err(e) = logs::init(&config.logging) {
        eprintln!("mlx-worker: {e:#}");
        return ExitCode::from(EX_USAGE);
    }
    let _lock = match StateLock::acquire(&config.node.state_dir) {
        Ok(lock) => lock,
        Err(e) => return refuse(&e),
    };
    warn_if_reconnects_are_limited(&config.nats);
    let worker_id =
        match identity::worker_id(config.node.worker_id.as_deref(), &config.node.state_dir) {
            Ok(id) => id,
            Err(e) => {
                error!(cause = %e, "cannot settle the worker id");
                return ExitCode::from(EX_CANTCREAT);
            }
        };
    let embedded = match &config.nats.embedded {
        Some(embedded) => match EmbeddedServer::start(embedded, &config.node.state_dir).await {
            Ok(server) => Some(server),
            Err(e) => {
                error!("{e}");
                return ExitCode::from(EX_UNAVAILABLE);
            }
        },
        None => None,
    };
    let code = serve(config, worker_id).await;
    if let Some(server) = embedded {
        server.stop().await;
    }
    code
}

/// Another instance (exit 75: it clears when that one stops), or an unusable state directory.
fn refuse(e: &InstanceError) -> ExitCode {
    error!("{e}");
    ExitCode::from(if e.is_conflict() {
        EX_TEMPFAIL
    } else {
        EX_CANTCREAT
    })
}

/// With a finite `nats.maxReconnectAttempts` the worker ends once they are spent: say so at
/// start, so whoever runs it knows to restart it (or to reconnect forever).
fn warn_if_reconnects_are_limited(config: &NatsConfig) {
    let (Some(attempts), Some(wait)) = (
        config.max_reconnect_attempts,
        nats::reconnect_wait_max(config),
    ) else {
        return;
    };
    let wait_s = wait.as_secs_f64();
    warn!(
        attempts,
        wait_ms = mlx_worker::clock::millis(wait),
        exit_code = EX_IOERR,
        "reconnects are limited (nats.maxReconnectAttempts: {attempts}): once the link to the \
         message server is lost, the worker tries {attempts} times, waiting up to {wait_s:.1} s \
         in all between attempts, then exits with status {EX_IOERR} (-1 reconnects forever)"
    );
}

/// The production seams and the HTTP listener.
struct Seams {
    deps: Deps,
    listener: TcpListener,
    /// `deps.transport` itself, for what only the NATS transport tells: whether it gave up.
    nats: Arc<NatsTransport>,
    /// `deps.engine` itself, told when the stop begins.
    engine: Arc<MlxEngine>,
}

/// The production seams and the HTTP listener, or the exit code of the first that fails.
async fn seams(config: &WorkerConfig, worker_id: &str) -> Result<Seams, ExitCode> {
    let transport = match NatsTransport::connect(&config.nats).await {
        Ok(t) => Arc::new(t),
        // Both need a person (new credentials or certificates), not a restart.
        Err(e @ (ConnectError::Rejected { .. } | ConnectError::TlsHandshake { .. })) => {
            error!("{e}");
            return Err(ExitCode::from(EX_NOPERM));
        }
        Err(e) => {
            error!("{e}");
            return Err(ExitCode::from(EX_UNAVAILABLE));
        }
    };
    // Before the engine starts and before any subscription: another live instance with this
    // id would otherwise run every request a second time.
    if let Err(e) = instance::check_bus(&transport, worker_id).await {
        return Err(refuse(&e));
    }
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let hardware = Probed::detect().await;
    let recommendation = Recommendation::for_profile(&hardware.profile)
        .with_overrides(&config.node.plan_settings().tier_limits);
    let batch_sizes = BatchSizes::configured(
        config.engine.batching,
        config.engine.batch_size,
        &recommendation,
    );
    let mut engine_config = config.engine.clone();
    engine_config.prefix_cache_bytes = Some(
        engine_config
            .prefix_cache_bytes
            .unwrap_or_else(|| prefix_cache_bytes_default(hardware.profile.memory_bytes)),
    );
    let engine = match MlxEngine::start(engine_config, batch_sizes, clock.clone()).await {
        Ok(engine) => Arc::new(engine),
        Err(e) => {
            error!("{e}");
            return Err(ExitCode::from(EX_UNAVAILABLE));
        }
    };
    let address = (config.node.http_bind_address, config.node.port);
    let listener = match TcpListener::bind(address).await {
        Ok(l) => l,
        Err(e) => {
            error!(port = config.node.port, cause = %e, "cannot open the HTTP port");
            return Err(ExitCode::from(EX_UNAVAILABLE));
        }
    };
    let deps = Deps {
        transport: transport.clone(),
        engine: engine.clone(),
        clock,
        hardware: Arc::new(hardware),
    };
    Ok(Seams {
        deps,
        listener,
        nats: transport,
        engine,
    })
}

/// The host's probe with its profile taken once, at start: the engine's batch sizes and the
/// worker's plan come from the same profile, and the slow profile tools run once.
struct Probed {
    profile: HostProfile,
    probe: Arc<dyn HardwareProbe>,
}

impl Probed {
    async fn detect() -> Probed {
        let probe = hardware::detect();
        Probed {
            profile: probe.profile().await,
            probe,
        }
    }
}

#[async_trait::async_trait]
impl HardwareProbe for Probed {
    async fn profile(&self) -> HostProfile {
        self.profile.clone()
    }

    async fn sample(&self) -> HostSample {
        self.probe.sample().await
    }
}

async fn serve(config: WorkerConfig, worker_id: String) -> ExitCode {
    let Seams {
        deps,
        listener,
        nats,
        engine,
    } = match seams(&config, &worker_id).await {
        Ok(seams) => seams,
        Err(code) => return code,
    };
    let port = listener.local_addr().map_or(config.node.port, |a| a.port());
    let identity = Identity {
        worker_id,
        hostname: identity::hostname(),
        ip: identity::primary_ip(),
        port,
    };
    info!(worker_id = %identity.worker_id, servers = %config.nats.servers.join(","), "starting");
    let worker = Worker::new(
        identity,
        config.node.clone(),
        config.engine.preload.clone(),
        deps,
    );
    let stop_http = tokio_util::sync::CancellationToken::new();
    let http = tokio::spawn(mlx_worker::http::serve(
        listener,
        worker.observer(),
        stop_http.clone(),
    ));
    let (forced_tx, mut forced_rx) = tokio::sync::oneshot::channel::<()>();
    let mut signals = Signals::new();
    let mut health = engine.health();
    let engine_gave_up = Arc::new(AtomicBool::new(false));
    let gave_up = engine_gave_up.clone();
    let shutdown = async move {
        tokio::select! {
            () = signals.next() => info!(
                "stop requested: draining (another signal, a second or more later, forces the exit)"
            ),
            // Down before any stop began: the runtime's restart budget is spent. A worker that
            // serves nothing leaves, so that its own supervisor can start it afresh.
            Ok(_) = health.wait_for(|h| *h == EngineHealth::Down) => {
                gave_up.store(true, Ordering::Relaxed);
                error!(
                    exit_code = EX_SOFTWARE,
                    "the MLX runtime keeps failing and its restart budget is spent: deregistering, \
                     draining and exiting"
                );
            }
        }
        // The runtime serves the drain; if it exits now, it is not started again.
        engine.begin_stop();
        tokio::spawn(async move {
            let repeats_end = tokio::time::sleep(SIGNAL_REPEAT_WINDOW);
            tokio::pin!(repeats_end);
            loop {
                tokio::select! {
                    () = &mut repeats_end => break,
                    () = signals.next() => {
                        info!(
                            window_ms = mlx_worker::clock::millis(SIGNAL_REPEAT_WINDOW),
                            "signal repeated at once: the same stop request"
                        );
                    }
                }
            }
            signals.next().await;
            let _ = forced_tx.send(());
        });
    };
    let code = tokio::select! {
        result = worker.run(shutdown) => match result {
            // The subscriptions ended because the link is gone for good: not a clean stop.
            _ if nats.gave_up_reconnecting() => {
                error!(
                    exit_code = EX_IOERR,
                    "the message server is gone and the reconnect attempts are spent; exiting"
                );
                ExitCode::from(EX_IOERR)
            }
            Ok(_) if engine_gave_up.load(Ordering::Relaxed) => ExitCode::from(EX_SOFTWARE),
            Ok(report) => {
                info!(
                    requests = report.dispatch.metrics.total,
                    failed = report.dispatch.metrics.total - report.dispatch.metrics.successes,
                    "bye"
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                error!("{e}");
                ExitCode::from(EX_UNAVAILABLE)
            }
        },
        // Only a second signal: the sender also goes away when the run ends without any.
        Ok(()) = &mut forced_rx => {
            warn!("second signal: exiting without finishing the drain");
            ExitCode::from(EX_FORCED)
        }
    };
    stop_http.cancel();
    let _ = http.await;
    code
}
