//! Exit codes (the BSD `sysexits` values where one fits) and the exit for an invalid
//! configuration, which every command shares.

use std::process::ExitCode;

use mlx_worker::config::{Flags, WorkerConfig};

/// Invalid configuration or usage.
pub(crate) const EX_USAGE: u8 = 64;
/// A service is unavailable: the message server, the MLX runtime, the embedded nats-server.
pub(crate) const EX_UNAVAILABLE: u8 = 69;
/// The MLX runtime kept failing after the worker served: its restarts within
/// `runtime.restartWindowMs` reached `runtime.maxRestarts`. The worker deregistered and
/// drained first; a supervisor that restarts on failure should restart it (a fresh process
/// has a fresh budget), which a worker left running and serving nothing would never get.
pub(crate) const EX_SOFTWARE: u8 = 70;
/// The state directory or the worker id cannot be written.
pub(crate) const EX_CANTCREAT: u8 = 73;
/// The link to the message server was lost and the reconnect attempts
/// (`nats.maxReconnectAttempts`) ran out. `sysexits`' I/O error: the worker's one link failed
/// for good after it served, which a supervisor that restarts on failure should restart
/// (unlike 64 and 77), and which 69 (unavailable at start) does not tell apart.
pub(crate) const EX_IOERR: u8 = 74;
/// Another instance holds the state directory or answers for the worker id; it clears when
/// that one stops, so a supervisor may retry.
pub(crate) const EX_TEMPFAIL: u8 = 75;
/// The message server rejected the credentials, or the TLS handshake with it failed.
pub(crate) const EX_NOPERM: u8 = 77;
/// A second signal stopped the worker before the drain finished.
pub(crate) const EX_FORCED: u8 = 130;

/// The configuration resolved from `flags` (file, environment, flags), or, printed on stderr,
/// why it is invalid and exit 64.
pub(crate) fn config_or_exit(flags: &Flags) -> Result<WorkerConfig, ExitCode> {
    flags.resolve().map_err(|e| {
        eprintln!("mlx-worker: invalid configuration: {e}");
        ExitCode::from(EX_USAGE)
    })
}
