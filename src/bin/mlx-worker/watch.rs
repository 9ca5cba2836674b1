//! `mlx-worker watch`: prints the messages on a subject as they pass, connected under a name
//! of its own, and warns at start when its subject would take response streams.

use std::io::Write;
use std::process::ExitCode;

use clap::Args;
use mlx_worker::config::Flags;
use mlx_worker::identity;
use mlx_worker::protocol::subject::check_token;
use mlx_worker::transport::Transport;
use mlx_worker::transport::nats::NatsTransport;

use crate::exit::{EX_UNAVAILABLE, config_or_exit};

#[derive(Args, Debug)]
pub(crate) struct WatchArgs {
    #[command(flatten)]
    settings: Flags,
    /// Subject to watch (wildcards allowed).
    #[arg(long, short = 's', default_value = "worker.>")]
    subject: String,
    /// Exit after this many messages.
    #[arg(long, short = 'n')]
    count: Option<u64>,
}

pub(crate) async fn watch(args: WatchArgs) -> ExitCode {
    let config = match config_or_exit(&args.settings) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if covers_responses(&args.subject) {
        eprintln!(
            "mlx-worker watch: warning: subject {:?} covers response.<requestId> subjects; a \
             worker holds a stream's first token until someone listens there and counts this \
             watch as that listener, so a controller that subscribes after sending its request \
             may miss the leading tokens",
            args.subject
        );
    }
    let nats = config.nats.for_command("watch", &identity::hostname());
    let result: anyhow::Result<()> = async {
        let transport = NatsTransport::connect(&nats).await?;
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

/// Whether NATS would deliver some `response.{requestId}` message to a subscription on
/// `pattern`: `*` stands for one token, a final `>` for one or more, and a request id is one
/// token.
fn covers_responses(pattern: &str) -> bool {
    match pattern.split('.').collect::<Vec<_>>().as_slice() {
        [">"] => true,
        [first, second] => {
            matches!(*first, "response" | "*")
                && (matches!(*second, "*" | ">") || check_token(second).is_ok())
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests;
