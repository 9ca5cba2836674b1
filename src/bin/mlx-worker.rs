//! The `mlx-worker` binary: command line → configuration (exit 64 if invalid) → logs →
//! production seams → `Worker::run`, plus the operator's helper commands.
//!
//! Exit codes: 0 success; 1 a request failed (`infer`); 64 invalid configuration or usage;
//! 69 a service is unavailable (message server, MLX runtime, embedded nats-server);
//! 73 the worker id cannot be stored; 77 the message server rejected the credentials, or the
//! TLS handshake with it failed (certificate not trusted, client certificate refused);
//! 130 stopped by a second signal before the drain finished.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use mlx_worker::clock::{Clock, SystemClock};
use mlx_worker::config::{Flags, LogFormat, WorkerConfig};
use mlx_worker::engine::mlx::MlxEngine;
use mlx_worker::hardware;
use mlx_worker::identity::{self, Identity};
use mlx_worker::models;
use mlx_worker::protocol::{InferenceRequest, StreamMessage};
use mlx_worker::transport::Transport;
use mlx_worker::transport::embedded::EmbeddedServer;
use mlx_worker::transport::nats::{ConnectError, NatsTransport};
use mlx_worker::worker::{Deps, Worker};
use tracing::{error, info, warn};

const EX_USAGE: u8 = 64;
const EX_UNAVAILABLE: u8 = 69;
const EX_CANTCREAT: u8 = 73;
const EX_NOPERM: u8 = 77;
const EX_FORCED: u8 = 130;

#[derive(Parser, Debug)]
#[command(
    name = "mlx-worker",
    version,
    about = "Worker node of an MLX inference cluster over NATS"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the worker until SIGINT or SIGTERM, then drain.
    Run(Flags),
    /// Send one request and print its tokens as they arrive.
    Infer(InferArgs),
    /// Print the messages on a subject as they pass (default `worker.>`: registrations,
    /// heartbeats, deregistrations), one `<subject> <payload>` line each.
    Watch(WatchArgs),
    /// Print the detected hardware profile and concurrency recommendations as JSON.
    Probe(Flags),
    /// List the models in the model directory as JSON.
    Models(Flags),
    /// Configuration commands.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Validate the configuration and print it resolved (secrets redacted).
    Check(Flags),
}

#[derive(Args, Debug)]
struct WatchArgs {
    #[command(flatten)]
    settings: Flags,
    /// Subject to watch (wildcards allowed).
    #[arg(long, short = 's', default_value = "worker.>")]
    subject: String,
    /// Exit after this many messages.
    #[arg(long, short = 'n')]
    count: Option<u64>,
}

#[derive(Args, Debug)]
struct InferArgs {
    #[command(flatten)]
    settings: Flags,
    /// Model id to run.
    #[arg(long, short = 'm')]
    model: String,
    /// Prompt text.
    #[arg(long, short = 'p')]
    prompt: String,
    /// Worker to send to (default: the id kept in the state directory).
    #[arg(long, short = 'w')]
    worker: Option<String>,
    /// Tokens to generate at most.
    #[arg(long)]
    max_tokens: Option<u32>,
    /// Sampling temperature.
    #[arg(long)]
    temperature: Option<f64>,
    /// Print every message as a JSON line instead of the text.
    #[arg(long)]
    json: bool,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout_s: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mlx-worker: cannot start the async runtime: {e}");
            return ExitCode::from(EX_UNAVAILABLE);
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Run(settings) => run(settings).await,
            Command::Infer(args) => infer(args).await,
            Command::Watch(args) => watch(args).await,
            Command::Probe(settings) => probe(settings).await,
            Command::Models(settings) => list_models(settings).await,
            Command::Config {
                command: ConfigCommand::Check(settings),
            } => check(settings),
        }
    })
}

fn resolve_or_exit(settings: &Flags) -> Result<WorkerConfig, ExitCode> {
    settings.resolve().map_err(|e| {
        eprintln!("mlx-worker: invalid configuration: {e}");
        ExitCode::from(EX_USAGE)
    })
}

fn init_logs(config: &WorkerConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&config.logging.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.logging.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn print_json(value: &serde_json::Value) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match serde_json::to_writer_pretty(&mut out, value).map(|()| writeln!(out)) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mlx-worker: cannot write the output: {e}");
            ExitCode::FAILURE
        }
    }
}

fn check(settings: Flags) -> ExitCode {
    match resolve_or_exit(&settings) {
        Ok(config) => {
            let mut out = std::io::stdout().lock();
            match writeln!(out, "{config:#?}") {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::FAILURE,
            }
        }
        Err(code) => code,
    }
}

async fn probe(settings: Flags) -> ExitCode {
    let config = match resolve_or_exit(&settings) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let probe = hardware::detect();
    let profile = probe.profile().await;
    let sample = probe.sample().await;
    let recommendation = hardware::recommendation::Recommendation::for_profile(&profile)
        .with_overrides(&config.node.tier_limits);
    let report = hardware::report::probe_report(&profile, &sample, &recommendation);
    print_json(&report)
}

async fn list_models(settings: Flags) -> ExitCode {
    let config = match resolve_or_exit(&settings) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match models::scan(&config.engine.model_dir) {
        Ok(catalog) => {
            let list: Vec<serde_json::Value> = catalog
                .models
                .iter()
                .map(|(id, m)| {
                    serde_json::json!({
                        "modelId": id,
                        "path": m.path.display().to_string(),
                        "sizeBytes": m.size_bytes,
                        "parameterCount": m.parameter_count,
                    })
                })
                .collect();
            print_json(&serde_json::json!({
                "modelDir": config.engine.model_dir.display().to_string(),
                "models": list,
            }))
        }
        Err(e) => {
            eprintln!("mlx-worker: {e}");
            ExitCode::from(EX_UNAVAILABLE)
        }
    }
}

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

async fn run(settings: Flags) -> ExitCode {
    let config = match resolve_or_exit(&settings) {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_logs(&config);
    let worker_id =
        match identity::worker_id(config.node.worker_id.as_deref(), &config.node.state_dir) {
            Ok(id) => id,
            Err(e) => {
                error!(cause = %e, "cannot settle the worker id");
                return ExitCode::from(EX_CANTCREAT);
            }
        };
    let embedded = match &config.nats.embedded {
        Some(embedded) => match EmbeddedServer::start(embedded).await {
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

async fn serve(config: WorkerConfig, worker_id: String) -> ExitCode {
    let transport = match NatsTransport::connect(&config.nats).await {
        Ok(t) => Arc::new(t),
        // Both need a person (new credentials or certificates), not a restart.
        Err(e @ (ConnectError::Rejected { .. } | ConnectError::TlsHandshake { .. })) => {
            error!("{e}");
            return ExitCode::from(EX_NOPERM);
        }
        Err(e) => {
            error!("{e}");
            return ExitCode::from(EX_UNAVAILABLE);
        }
    };
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let engine = match MlxEngine::start(config.engine.clone(), clock.clone()).await {
        Ok(engine) => Arc::new(engine),
        Err(e) => {
            error!("{e}");
            return ExitCode::from(EX_UNAVAILABLE);
        }
    };
    let listener = match tokio::net::TcpListener::bind(("0.0.0.0", config.node.port)).await {
        Ok(l) => l,
        Err(e) => {
            error!(port = config.node.port, cause = %e, "cannot open the HTTP port");
            return ExitCode::from(EX_UNAVAILABLE);
        }
    };
    let port = listener.local_addr().map_or(config.node.port, |a| a.port());
    let identity = Identity {
        worker_id,
        hostname: identity::hostname(),
        ip: identity::primary_ip(),
        port,
    };
    info!(worker_id = %identity.worker_id, servers = %config.nats.servers.join(","), "starting");
    let deps = Deps {
        transport,
        engine,
        clock,
        hardware: hardware::detect(),
    };
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

async fn watch(args: WatchArgs) -> ExitCode {
    let config = match resolve_or_exit(&args.settings) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let result: anyhow::Result<()> = async {
        let transport = NatsTransport::connect(&config.nats).await?;
        let mut sub = transport.subscribe(args.subject.clone(), None).await?;
        let mut seen = 0u64;
        let mut out = std::io::stdout().lock();
        while args.count.is_none_or(|n| seen < n) {
            let Some(msg) = sub.next().await else { break };
            writeln!(
                out,
                "{} {}",
                msg.subject,
                String::from_utf8_lossy(&msg.payload)
            )?;
            out.flush()?;
            seen += 1;
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mlx-worker watch: {e:#}");
            ExitCode::from(EX_UNAVAILABLE)
        }
    }
}

async fn infer(args: InferArgs) -> ExitCode {
    let config = match resolve_or_exit(&args.settings) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match infer_inner(&config, &args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mlx-worker infer: {e:#}");
            ExitCode::from(EX_UNAVAILABLE)
        }
    }
}

async fn infer_inner(config: &WorkerConfig, args: &InferArgs) -> anyhow::Result<ExitCode> {
    let worker = match &args.worker {
        Some(w) => w.clone(),
        None => std::fs::read_to_string(config.node.state_dir.join(identity::WORKER_ID_FILE))
            .map(|s| s.trim().to_owned())
            .with_context(|| {
                format!(
                    "no --worker given and no worker id in {}",
                    config.node.state_dir.display()
                )
            })?,
    };
    let transport = NatsTransport::connect(&config.nats).await?;
    let mut connection = transport.connection();
    tokio::time::timeout(
        Duration::from_secs(10),
        connection.wait_for(|c| c.connected),
    )
    .await
    .with_context(|| format!("cannot reach {}", config.nats.servers.join(",")))??;
    let request_id = uuid::Uuid::new_v4().to_string();
    let request = InferenceRequest {
        request_id: request_id.clone(),
        model_id: args.model.clone(),
        prompt: args.prompt.clone(),
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_p: None,
        session_id: None,
        stream: Some(true),
        priority: None,
        timeout_ms: None,
    };
    // Subscribe first, so no token can be missed.
    let mut responses = transport
        .subscribe(format!("response.{request_id}"), None)
        .await
        .context("cannot subscribe to the response subject")?;
    let clock = SystemClock;
    let sent = clock.now();
    transport
        .publish(
            format!("worker.{worker}.inference"),
            mlx_worker::protocol::encode(&request)?.into(),
        )
        .await
        .context("cannot send the request")?;
    let mut first_token = None;
    let mut out = std::io::stdout().lock();
    let deadline = Duration::from_secs(args.timeout_s);
    loop {
        let msg = tokio::time::timeout(deadline, responses.next())
            .await
            .with_context(|| format!("no answer from worker {worker} within {deadline:?}"))?
            .context("the response subscription ended")?;
        if args.json {
            out.write_all(&msg.payload)?;
            out.write_all(b"\n")?;
            out.flush()?;
        }
        let message: StreamMessage = serde_json::from_slice(&msg.payload)
            .context("the worker sent an unreadable message")?;
        match message {
            StreamMessage::Token { token, .. } => {
                first_token.get_or_insert_with(|| clock.now().saturating_duration_since(sent));
                if !args.json {
                    out.write_all(token.as_bytes())?;
                    out.flush()?;
                }
            }
            StreamMessage::Done {
                total_tokens,
                latency_ms,
                ..
            } => {
                let total = clock.now().saturating_duration_since(sent);
                if !args.json {
                    writeln!(out)?;
                }
                eprintln!(
                    "{total_tokens} tokens; first token after {} ms; {} ms in all (worker: {latency_ms} ms)",
                    first_token.map_or(0, |d| d.as_millis()),
                    total.as_millis()
                );
                return Ok(ExitCode::SUCCESS);
            }
            StreamMessage::Error { error, code, .. } => {
                if !args.json {
                    writeln!(out)?;
                }
                eprintln!("error {code}: {error}");
                return Ok(ExitCode::FAILURE);
            }
        }
    }
}
