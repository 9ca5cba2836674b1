//! `mlx-worker models`: the models in the model directory, as JSON.

use std::process::ExitCode;

use mlx_worker::config::Flags;
use mlx_worker::engine::catalog;

use crate::exit::{EX_UNAVAILABLE, config_or_exit};
use crate::output::print_json;

pub(crate) async fn list(flags: Flags) -> ExitCode {
    let config = match config_or_exit(&flags) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match catalog::scan(&config.engine.model_dir) {
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
            print_json(&serde_json::json!({
                "modelDir": config.engine.model_dir.display().to_string(),
                "models": list,
            }))
        }
        Err(e) => {
            eprintln!("mlx-worker: {e}");
            ExitCode::from(EX_UNAVAILABLE)
        }
    }
}
