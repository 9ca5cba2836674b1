//! The `mlx-worker` binary: command line → configuration (exit 64 if invalid) → logs →
//! production seams → `Worker::run`, plus the operator's helper commands. This file parses the
//! command line and dispatches; each command has its own module, and what a test would want
//! lives in the library.
//!
//! Exit codes: 0 success; 1 a request failed (`infer`); 64 invalid configuration or usage;
//! 69 a service is unavailable (message server, MLX runtime, embedded nats-server);
//! 73 the state directory or the worker id cannot be written; 74 the link to the message
//! server was lost and the reconnect attempts ran out; 75 another instance holds the state
//! directory or answers for the worker id; 77 the message server rejected the credentials, or
//! the TLS handshake with it failed (certificate not trusted, client certificate refused);
//! 130 stopped by a second signal before the drain finished.

mod check;
mod exit;
mod infer;
mod logs;
mod models;
mod output;
mod probe;
mod run;
mod watch;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mlx_worker::config::Flags;

use crate::exit::EX_UNAVAILABLE;
use crate::infer::InferArgs;
use crate::watch::WatchArgs;

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
    /// heartbeats, deregistrations), one `<subject> <payload>` line each; warns when the
    /// subject covers `response.<requestId>`, where workers would take it for a client.
    Watch(WatchArgs),
    /// Print the detected hardware profile and concurrency recommendations as JSON.
    Probe(Flags),
    /// List the models in the model directories as JSON; with an action and `--worker`, list,
    /// load, unload, pin or unpin a running worker's models, or have it rescan.
    Models(models::ModelsArgs),
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
            Command::Run(flags) => run::run(flags).await,
            Command::Infer(args) => infer::infer(args).await,
            Command::Watch(args) => watch::watch(args).await,
            Command::Probe(flags) => probe::probe(flags).await,
            Command::Models(args) => models::models(args).await,
            Command::Config {
                command: ConfigCommand::Check(flags),
            } => check::check(flags),
        }
    })
}
