//! `mlx-worker watch`: prints the messages on a subject as they pass.

use std::io::Write;
use std::process::ExitCode;

use clap::Args;
use mlx_worker::config::Flags;
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
