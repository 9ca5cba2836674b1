//! `mlx-worker run`: configuration → logs → worker id → embedded server (if configured) →
//! production seams → `Worker::run` until SIGINT or SIGTERM, then the drain.

use std::process::ExitCode;
use std::sync::Arc;

use mlx_worker::clock::{Clock, SystemClock};
use mlx_worker::config::{Flags, WorkerConfig};
use mlx_worker::engine::mlx::MlxEngine;
use mlx_worker::hardware;
use mlx_worker::identity::{self, Identity};
use mlx_worker::instance::{self, InstanceError, StateLock};
use mlx_worker::transport::embedded::EmbeddedServer;
use mlx_worker::transport::nats::{ConnectError, NatsTransport};
use mlx_worker::worker::{Deps, Worker};
use tokio::net::TcpListener;
use tracing::{error, info, warn};

use crate::exit::{
    EX_CANTCREAT, EX_FORCED, EX_NOPERM, EX_TEMPFAIL, EX_UNAVAILABLE, EX_USAGE, config_or_exit,
};
use crate::logs;

/// Resolves when the process gets SIGINT or SIGTERM.
async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
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

/// The production seams and the HTTP listener, or the exit code of the first that fails.
async fn seams(config: &WorkerConfig, worker_id: &str) -> Result<(Deps, TcpListener), ExitCode> {
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
    let engine = match MlxEngine::start(config.engine.clone(), clock.clone()).await {
        Ok(engine) => Arc::new(engine),
        Err(e) => {
            error!("{e}");
            return Err(ExitCode::from(EX_UNAVAILABLE));
        }
    };
    let listener = match TcpListener::bind(("0.0.0.0", config.node.port)).await {
        Ok(l) => l,
        Err(e) => {
            error!(port = config.node.port, cause = %e, "cannot open the HTTP port");
            return Err(ExitCode::from(EX_UNAVAILABLE));
        }
    };
    let deps = Deps {
        transport,
        engine,
        clock,
        hardware: hardware::detect(),
    };
    Ok((deps, listener))
}

async fn serve(config: WorkerConfig, worker_id: String) -> ExitCode {
    let (deps, listener) = match seams(&config, &worker_id).await {
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
    let shutdown = async move {
        signal().await;
        info!("stop requested: draining (a second signal forces the exit)");
        tokio::spawn(async move {
            signal().await;
            let _ = forced_tx.send(());
        });
    };
    let code = tokio::select! {
        result = worker.run(shutdown) => match result {
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
        _ = &mut forced_rx => {
            warn!("second signal: exiting without finishing the drain");
            ExitCode::from(EX_FORCED)
        }
    };
    stop_http.cancel();
    let _ = http.await;
    code
}
