//! `mlx-worker models`: the models in the model directories, as JSON; what the scan passed
//! over and why (a link out of a cache repository, a duplicate id) goes to stderr as log lines.

use std::process::ExitCode;

use mlx_worker::config::{Flags, LoggingConfig};
use mlx_worker::engine::catalog;

use crate::exit::{EX_UNAVAILABLE, EX_USAGE, config_or_exit};
use crate::logs;
use crate::output::print_json;

pub(crate) async fn list(flags: Flags) -> ExitCode {
    let config = match config_or_exit(&flags) {
        Ok(c) => c,
        Err(code) => return code,
    };
    // The scan's warnings are for the operator at the terminal, whatever file `run` logs to.
    let logging = LoggingConfig {
        file: None,
        ..config.logging.clone()
    };
    if let Err(e) = logs::init(&logging) {
        eprintln!("mlx-worker: {e:#}");
        return ExitCode::from(EX_USAGE);
    }
    let dirs = &config.engine.model_dirs;
    match catalog::scan(dirs) {
        Ok(catalog) => {
            let list: Vec<serde_json::Value> = catalog
                .models
                .iter()
                .map(|(id, m)| {
                    serde_json::json!({
                        "modelId": id,
                        "path": m.path.display().to_string(),
                        "sizeBytes": m.size_bytes,
                        "parameterCount": m.parameter_count,
                    })
                })
                .collect();
            let dirs: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
            print_json(&serde_json::json!({
                "modelDirs": dirs,
                "models": list,
            }))
        }
        Err(e) => {
            eprintln!("mlx-worker: {e}");
            ExitCode::from(EX_UNAVAILABLE)
        }
    }
}
