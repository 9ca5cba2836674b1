//! `mlx-worker config check`: validates the configuration and prints it resolved (its
//! `Debug` form, which redacts secrets).

use std::io::Write;
use std::process::ExitCode;

use mlx_worker::config::Flags;

use crate::exit::config_or_exit;

pub(crate) fn check(flags: Flags) -> ExitCode {
    match config_or_exit(&flags) {
        Ok(config) => {
            let mut out = std::io::stdout().lock();
            match writeln!(out, "{config:#?}") {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::FAILURE,
            }
        }
        Err(code) => code,
    }
}
