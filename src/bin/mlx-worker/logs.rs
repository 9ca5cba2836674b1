//! The process's log output, set up once by `run` from the `logging` section: stderr, or the
//! file `logging.file` names (appended to). Text lines carry colour codes only on a terminal.

use std::fs::OpenOptions;
use std::io::IsTerminal;
use std::sync::Arc;

use anyhow::Context;
use mlx_worker::config::{LogFormat, LoggingConfig};
use tracing_subscriber::fmt::writer::BoxMakeWriter;

/// Installs the global subscriber: `RUST_LOG` if set, else the configured level. Fails only
/// when the log file cannot be opened.
pub(crate) fn init(config: &LoggingConfig) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, ansi) = match &config.file {
        Some(path) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| {
                    format!("cannot open the log file {} (logging.file)", path.display())
                })?;
            (BoxMakeWriter::new(Arc::new(file)), false)
        }
        None => (
            BoxMakeWriter::new(std::io::stderr),
            std::io::stderr().is_terminal(),
        ),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    match config.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    Ok(())
}
