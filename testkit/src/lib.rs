//! What mlx-worker's integration tests and benches share, so each is written once.
//!
//! A dev-only crate: the worker's package uses it as a dev-dependency, nothing ships it.
//!
//! - [`nats`]: a real `nats-server` on a free loopback port, plain or with TLS, authentication
//!   or a configuration file ([`NatsOptions`]); killed with its handle.
//! - [`worker`]: a worker in this process over the production transport ([`RunningWorker`]),
//!   the worker binary as a child process ([`WorkerProcess`], [`run_until_exit`]), and the
//!   configuration tests run it with ([`test_config`]).
//! - [`controller`]: the controller's side ([`Controller`]): the library's client for requests
//!   and their streams, plus what tests assert about a stream.
//! - [`runtime`]: the real MLX runtime's configuration, for tests and benches that need it.
//! - [`schema`]: the existing controller's schema of a heartbeat, as a check.
//!
//! Nothing here skips: a missing nats-server or runtime fails with a message saying how to
//! install it. Helpers panic with a message when something they need does not happen: they
//! serve tests, where a panic is the failure.

pub mod controller;
pub mod nats;
pub mod runtime;
pub mod schema;
pub mod worker;

use std::time::Duration;

pub use controller::{
    Controller, Streams, assert_complete, assert_done, collect_stream, error_code, stream_text,
    try_collect_stream,
};
pub use nats::{LAME_DUCK_GRACE, NatsCluster, NatsOptions, NatsServer, ServerTls};
pub use worker::{
    Exited, RunningWorker, SERVING_TINY, WorkerBinary, WorkerProcess, connected, run_until_exit,
    send_signal, test_config, wait_connected,
};

/// How long any single expected event may take before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// How long [`collect_stream`] listens after a stream's terminal message for anything that
/// follows it.
pub const QUIET: Duration = Duration::from_millis(100);

/// Waits for `fut`, failing the test with `what` if it takes longer than [`PATIENCE`].
pub async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(PATIENCE, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {PATIENCE:?} waiting for {what}"),
    }
}

/// How long a fleet of worker processes (each with its MLX runtime) may take to start and load
/// its model, on a loaded two-core machine.
pub const FLEET_START_PATIENCE: Duration = Duration::from_secs(180);

/// Waits for `fut`, failing the test with `what` if it takes longer than `limit`.
pub async fn within_for<T>(
    what: &str,
    limit: Duration,
    fut: impl std::future::Future<Output = T>,
) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// Sends the worker's logs to the test's captured output (shown when a test fails); the
/// filter is `RUST_LOG`, else `mlx_worker=debug`. Later calls do nothing.
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("mlx_worker=debug")),
        )
        .with_test_writer()
        .try_init();
}

/// The worker binary under test, run from the repository root of the calling package: for
/// integration tests and benches of the worker's package, where Cargo sets both variables.
#[macro_export]
macro_rules! worker_binary {
    () => {
        $crate::WorkerBinary::new(env!("CARGO_BIN_EXE_mlx-worker"), env!("CARGO_MANIFEST_DIR"))
    };
}
