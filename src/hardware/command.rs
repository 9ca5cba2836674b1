//! Running the host's inspection tools (`sysctl`, `system_profiler`, `ioreg`, `nvidia-smi` …):
//! one command, bounded in time and in output, its standard output as text.
//!
//! This module knows nothing of what the text means (the parsers do) and never retries: a
//! probe that gets an error logs it and uses its documented fallback.

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::Command;

use super::ProbeError;

/// Time a tool may take while the static profile is read (once, at start).
pub(crate) const PROFILE_COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// Time a tool may take during a heartbeat sample; shorter, so a stuck tool cannot delay the
/// heartbeat by much.
pub(crate) const SAMPLE_COMMAND_TIMEOUT: Duration = Duration::from_secs(1);

/// Bytes of standard output read from one tool at most; the largest real output
/// (`system_profiler SPDisplaysDataType -json` with several displays) is a few KiB.
pub(crate) const COMMAND_OUTPUT_BYTES_MAX: usize = 1 << 20;

/// Runs `program args…` and returns its standard output, or why it could not.
///
/// The child is killed when `timeout` passes (it is spawned with `kill_on_drop`), its standard
/// error is discarded, and a non-zero exit is an error even when it printed something.
pub(crate) async fn run(
    program: &'static str,
    args: &[&str],
    timeout: Duration,
) -> Result<String, ProbeError> {
    match tokio::time::timeout(timeout, run_to_end(program, args)).await {
        Ok(result) => result,
        Err(_elapsed) => Err(ProbeError::TimedOut { program, timeout }),
    }
}

/// Spawns the child, reads at most [`COMMAND_OUTPUT_BYTES_MAX`] bytes and waits for its exit.
async fn run_to_end(program: &'static str, args: &[&str]) -> Result<String, ProbeError> {
    let io_error = |cause: std::io::Error| match cause.kind() {
        std::io::ErrorKind::NotFound => ProbeError::Absent { program },
        _ => ProbeError::Io { program, cause },
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(io_error)?;
    let mut output = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        let limit = u64::try_from(COMMAND_OUTPUT_BYTES_MAX + 1).unwrap_or(u64::MAX);
        stdout
            .take(limit)
            .read_to_end(&mut output)
            .await
            .map_err(io_error)?;
    }
    if output.len() > COMMAND_OUTPUT_BYTES_MAX {
        return Err(ProbeError::OutputTooLarge {
            program,
            limit: COMMAND_OUTPUT_BYTES_MAX,
        });
    }
    let status = child.wait().await.map_err(io_error)?;
    if !status.success() {
        return Err(ProbeError::Failed { program, status });
    }
    String::from_utf8(output).map_err(|_| ProbeError::NotUtf8 { program })
}

/// A command line a probe runs again and again (on every heartbeat), which remembers that its
/// program is not installed so that a missing tool costs one failed spawn, not one per sample.
#[derive(Debug)]
pub(crate) struct Tool {
    program: &'static str,
    args: &'static [&'static str],
    /// Set when a spawn found no such program; from then on [`Tool::run`] fails at once.
    absent: AtomicBool,
}

impl Tool {
    /// A tool that has not been tried yet.
    pub(crate) const fn new(program: &'static str, args: &'static [&'static str]) -> Tool {
        Tool {
            program,
            args,
            absent: AtomicBool::new(false),
        }
    }

    /// Runs the command, or fails with [`ProbeError::Absent`] without spawning when an earlier
    /// run found the program missing.
    pub(crate) async fn run(&self, timeout: Duration) -> Result<String, ProbeError> {
        let program = self.program;
        if self.absent.load(Ordering::Relaxed) {
            return Err(ProbeError::Absent { program });
        }
        let result = run(program, self.args, timeout).await;
        if let Err(ProbeError::Absent { .. }) = result {
            self.absent.store(true, Ordering::Relaxed);
        }
        result
    }
}

#[cfg(test)]
mod tests;
