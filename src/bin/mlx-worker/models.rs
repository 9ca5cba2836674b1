//! `mlx-worker models`: the models in the model directories, as JSON; what the scan passed
//! over and why (a link out of a cache repository, a duplicate id) goes to stderr as log lines.
//! With an action and `--worker`, the same for a running worker, through its model control
//! subject: list, load, unload, pin, unpin, rescan; the reply is printed as JSON.

use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::{Args, ValueEnum};
use mlx_worker::config::{Flags, LoggingConfig};
use mlx_worker::engine::catalog;
use mlx_worker::protocol::control::{ControlReply, ControlRequest};
use mlx_worker::protocol::subject;
use mlx_worker::transport::Transport;

use crate::exit::{EX_UNAVAILABLE, EX_USAGE, config_or_exit};
use crate::logs;
use crate::output::print_json;

#[derive(Args, Debug)]
pub(crate) struct ModelsArgs {
    #[command(flatten)]
    settings: Flags,
    /// What to do on the running worker `--worker` names; without an action, the model
    /// directories are scanned here.
    #[arg(value_enum)]
    action: Option<Action>,
    /// The model the action is about (load, unload, pin, unpin).
    model: Option<String>,
    /// The worker to act on.
    #[arg(long, short = 'w')]
    worker: Option<String>,
    /// Give up after this many seconds (a load may take long).
    #[arg(long, default_value_t = 600)]
    timeout_s: u64,
}

/// What to do on a running worker.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Action {
    /// Its models and their states.
    List,
    /// Load a model (a withdrawn one too), making room within the memory budget.
    Load,
    /// Unload a model no request uses.
    Unload,
    /// Keep a model loaded: neither unloaded when idle nor evicted.
    Pin,
    /// Let a pinned model go again.
    Unpin,
    /// Scan the model directories now.
    Rescan,
}

pub(crate) async fn models(args: ModelsArgs) -> ExitCode {
    let Some(action) = args.action else {
        return list(args.settings).await;
    };
    let config = match config_or_exit(&args.settings) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Some(worker) = args.worker.as_deref() else {
        eprintln!("mlx-worker models: an action needs --worker <id>");
        return ExitCode::from(EX_USAGE);
    };
    if let Err(e) = subject::check_token(worker) {
        eprintln!("mlx-worker models: --worker {worker:?}: {e}");
        return ExitCode::from(EX_USAGE);
    }
    let model = || match args.model.clone() {
        Some(model) => Ok(model),
        None => Err(format!("{action:?} needs a model id").to_lowercase()),
    };
    let request = match action {
        Action::List => Ok(ControlRequest::List {}),
        Action::Rescan => Ok(ControlRequest::Rescan {}),
        Action::Load => model().map(|model_id| ControlRequest::Load { model_id }),
        Action::Unload => model().map(|model_id| ControlRequest::Unload { model_id }),
        Action::Pin | Action::Unpin => model().map(|model_id| ControlRequest::Pin {
            model_id,
            pinned: matches!(action, Action::Pin),
        }),
    };
    let request = match request {
        Ok(request) => request,
        Err(why) => {
            eprintln!("mlx-worker models: {why}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let transport = match crate::infer::connect(&config).await {
        Ok(t) => t,
        Err(e) => {
            eprintln!("mlx-worker models: {e:#}");
            return ExitCode::from(EX_UNAVAILABLE);
        }
    };
    let payload = match serde_json::to_vec(&request) {
        Ok(p) => Bytes::from(p),
        Err(e) => {
            eprintln!("mlx-worker models: {e}");
            return ExitCode::FAILURE;
        }
    };
    let patience = Duration::from_secs(args.timeout_s);
    let answer = Transport::request(&transport, subject::models(worker), payload, patience).await;
    let reply: ControlReply = match answer.map(|b| serde_json::from_slice(&b)) {
        Ok(Ok(reply)) => reply,
        Ok(Err(e)) => {
            eprintln!("mlx-worker models: worker {worker} sent no control reply: {e}");
            return ExitCode::from(EX_UNAVAILABLE);
        }
        Err(e) => {
            eprintln!("mlx-worker models: worker {worker} did not answer: {e}");
            return ExitCode::from(EX_UNAVAILABLE);
        }
    };
    let printed = match serde_json::to_value(&reply) {
        Ok(value) => print_json(&value),
        Err(_) => ExitCode::FAILURE,
    };
    if reply.ok { printed } else { ExitCode::FAILURE }
}

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
