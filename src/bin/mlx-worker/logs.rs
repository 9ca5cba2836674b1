//! The process's log output, set up once by `run` from the `logging` section.

use mlx_worker::config::{LogFormat, WorkerConfig};

/// Installs the global subscriber: `RUST_LOG` if set, else the configured level.
pub(crate) fn init(config: &WorkerConfig) {
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
