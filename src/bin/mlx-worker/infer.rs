//! `mlx-worker infer`: sends one request and prints its tokens as they arrive.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use mlx_worker::clock::{Clock, SystemClock};
use mlx_worker::config::{Flags, WorkerConfig};
use mlx_worker::identity;
use mlx_worker::protocol::{InferenceRequest, StreamMessage};
use mlx_worker::transport::Transport;
use mlx_worker::transport::nats::NatsTransport;

use crate::exit::{EX_UNAVAILABLE, config_or_exit};

#[derive(Args, Debug)]
pub(crate) struct InferArgs {
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

pub(crate) async fn infer(args: InferArgs) -> ExitCode {
    let config = match config_or_exit(&args.settings) {
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
