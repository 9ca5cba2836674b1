//! `mlx-worker infer`: sends one request and prints its tokens as they arrive, connected under a
//! name of its own.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use mlx_worker::client::{Arrival, Client, ClientError, ResponseStream, Target};
use mlx_worker::clock::SystemClock;
use mlx_worker::config::{Flags, ModelSubjects, WorkerConfig};
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
    /// Worker to send to (default: the model's subject, where any worker serving the model
    /// may take it, through the queue group or the work queue as `modelSubjects.mode` says).
    #[arg(long, short = 'w')]
    worker: Option<String>,
    /// Tokens to generate at most.
    #[arg(long)]
    max_tokens: Option<u32>,
    /// Sampling temperature.
    #[arg(long)]
    temperature: Option<f64>,
    /// The conversation this prompt continues: the worker keeps its prompt's cache pinned for
    /// the next turn.
    #[arg(long)]
    session: Option<String>,
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
    let target = target(args);
    if let Target::Model(model) = &target {
        let through = match config.node.model_subjects {
            ModelSubjects::QueueGroup => "its queue group",
            ModelSubjects::JetStream(_) => "the work queue",
        };
        eprintln!(
            "mlx-worker infer: sending to {}, where any worker serving {model} may take it \
             (through {through}; --worker sends to one worker)",
            target.subject()?
        );
    }
    let client = Client::new(Arc::new(connect(config).await?), Arc::new(SystemClock))
        .with_model_subjects(&config.node.model_subjects);
    let request = InferenceRequest {
        request_id: uuid::Uuid::new_v4().to_string(),
        model_id: args.model.clone(),
        prompt: args.prompt.clone(),
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_p: None,
        session_id: args.session.clone(),
        stream: Some(true),
        priority: None,
        timeout_ms: None,
    };
    // The client subscribes to the response subject first, so no token can be missed.
    let mut stream = client.send(&target, &request).await?;
    let from = match &target {
        Target::Worker(id) => format!("worker {id}"),
        Target::Model(_) => target.subject()?,
    };
    print_stream(&mut stream, args, &from).await
}

/// Where the request goes: `--worker`, else the model's subject.
fn target(args: &InferArgs) -> Target {
    match &args.worker {
        Some(worker) => Target::Worker(worker.clone()),
        None => Target::Model(args.model.clone()),
    }
}

/// A transport connected under `infer`'s own name, its link up.
pub(crate) async fn connect(config: &WorkerConfig) -> anyhow::Result<NatsTransport> {
    let nats = config.nats.for_command("infer", &identity::hostname());
    let transport = NatsTransport::connect(&nats).await?;
    let mut connection = transport.connection();
    tokio::time::timeout(
        Duration::from_secs(10),
        connection.wait_for(|c| c.connected),
    )
    .await
    .with_context(|| format!("cannot reach {}", config.nats.servers.join(",")))??;
    Ok(transport)
}

/// Prints `stream` to its terminal message (the text, or with `--json` every message as a
/// line), then the timings on stderr; `from` names the sender in a timeout.
async fn print_stream(
    stream: &mut ResponseStream,
    args: &InferArgs,
    from: &str,
) -> anyhow::Result<ExitCode> {
    let mut first_token = None;
    let mut out = std::io::stdout().lock();
    let patience = Duration::from_secs(args.timeout_s);
    loop {
        let Arrival {
            message,
            payload,
            at,
        } = match stream.next(patience).await {
            Err(ClientError::TimedOut { .. }) => {
                anyhow::bail!("no answer from {from} within {patience:?}")
            }
            other => other?,
        };
        if args.json {
            out.write_all(&payload)?;
            out.write_all(b"\n")?;
            out.flush()?;
        }
        let (said, code) = match message {
            StreamMessage::Token { token, .. } => {
                first_token.get_or_insert_with(|| at.saturating_duration_since(stream.sent_at()));
                if !args.json {
                    out.write_all(token.as_bytes())?;
                    out.flush()?;
                }
                continue;
            }
            StreamMessage::Done {
                total_tokens,
                latency_ms,
                prompt_tokens,
                cached_tokens,
                ..
            } => (
                format!(
                    "{total_tokens} tokens; first token after {} ms; {} ms in all (worker: {latency_ms} ms){}",
                    first_token.map_or(0, |d| d.as_millis()),
                    at.saturating_duration_since(stream.sent_at()).as_millis(),
                    prompt_summary(prompt_tokens, cached_tokens),
                ),
                ExitCode::SUCCESS,
            ),
            StreamMessage::Error { error, code, .. } => {
                (format!("error {code}: {error}"), ExitCode::FAILURE)
            }
        };
        if !args.json {
            writeln!(out)?;
        }
        // Nothing may follow the terminal: check what has already come.
        stream.confirm_quiet(Duration::ZERO).await?;
        eprintln!("{said}");
        return Ok(code);
    }
}

/// The prompt's part of the summary, when the worker stated it: its tokens, and of those the
/// ones its prefix cache held.
fn prompt_summary(prompt_tokens: Option<u64>, cached_tokens: Option<u64>) -> String {
    match prompt_tokens {
        Some(prompt) => format!(
            "; prompt {prompt} tokens, {} of them cached",
            cached_tokens.unwrap_or(0)
        ),
        None => String::new(),
    }
}
