//! What the commands print on stdout.

use std::io::Write;
use std::process::ExitCode;

/// Prints `value` as pretty JSON; a failed write is exit 1.
pub(crate) fn print_json(value: &serde_json::Value) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match serde_json::to_writer_pretty(&mut out, value).map(|()| writeln!(out)) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mlx-worker: cannot write the output: {e}");
            ExitCode::FAILURE
        }
    }
}
