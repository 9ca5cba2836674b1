//! The warm-up part: a worker preloads the tiny model on a host whose MLX kernel cache is
//! empty (its runtime gets a temporary directory of its own, where MLX on the CPU keeps
//! compiled kernels), then serves one request after another; the first request's time to
//! first token against the steady state's, with the load's warm-up (the worker's default) and
//! without it (`runtime.warmUp: false`), and how long each worker took from its start to the
//! end of its preload.

use std::time::{Duration, Instant};

use mlx_worker::config::EngineConfig;

use crate::batching::{Settings, Target, WorkerSystem};
use crate::harness::{Sampling, sampled_request, worker_answer};
use crate::measurement::percentile;
use crate::models::{self, TINY};

/// Requests after the first, for the steady state.
const STEADY: usize = 15;
/// Tokens each request asks for.
const MAX_TOKENS: u32 = 8;
/// Longest a client waits for any one message.
const PATIENCE: Duration = Duration::from_secs(120);
/// The target: the first request after preload within this many times the steady state.
const FIRST_WITHIN: f64 = 3.0;

/// The part's figures.
pub(crate) struct WarmUp {
    /// How each worker ran.
    pub(crate) settings: Vec<String>,
    pub(crate) rows: Vec<Result<WarmRow, String>>,
    pub(crate) targets: Vec<Target>,
}

/// One worker's figures.
pub(crate) struct WarmRow {
    pub(crate) label: &'static str,
    /// From the worker's start (its runtime's included) to the end of its preload.
    pub(crate) preloaded_after: Duration,
    /// The first request's time to first token.
    pub(crate) first: Duration,
    /// The steady state's, p50.
    pub(crate) steady: Duration,
}

impl WarmRow {
    pub(crate) fn ratio(&self) -> f64 {
        self.first.as_secs_f64() / self.steady.as_secs_f64().max(1e-9)
    }
}

/// The warm-up part; `quick`: a few requests.
pub(crate) async fn warm_up(url: &str, quick: bool) -> WarmUp {
    let not_measured = |why: String| WarmUp {
        settings: Vec::new(),
        rows: vec![Err(why)],
        targets: Vec::new(),
    };
    let paths = match models::runtime_paths() {
        Ok(paths) => paths,
        Err(missing) => return not_measured(format!("not measured: {missing}")),
    };
    if let Err(why) = TINY.make().await {
        return not_measured(format!("not measured: {why}"));
    }
    let steady = if quick { 3 } else { STEADY };
    let mut settings = Vec::new();
    let mut rows = Vec::new();
    for (label, warm) in [("with warm-up", true), ("without warm-up", false)] {
        match worker(url, label, warm, &paths, steady).await {
            Ok((row, note)) => {
                settings.push(note);
                rows.push(Ok(row));
            }
            Err(why) => rows.push(Err(format!("{label}: not measured: {why}"))),
        }
    }
    let targets = targets(&rows);
    WarmUp {
        settings,
        rows,
        targets,
    }
}

/// One worker on an empty kernel cache: started, preloaded, then `steady + 1` requests.
async fn worker(
    url: &str,
    label: &'static str,
    warm: bool,
    paths: &EngineConfig,
    steady: usize,
) -> Result<(WarmRow, String), String> {
    let kernels = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut settings: Settings = vec![(
        "runtime.env",
        format!("{{TMPDIR: '{}'}}", kernels.path().display()),
    )];
    if !warm {
        settings.push(("runtime.warmUp", "false".to_owned()));
    }
    let id = format!("warm-up-{}", if warm { "on" } else { "off" });
    let started = Instant::now();
    let (system, note) =
        WorkerSystem::start_as(url, id, label, settings, paths, &[TINY.id()]).await?;
    system.preload_ended().await;
    let preloaded_after = started.elapsed();
    let mut ttfts = Vec::new();
    for n in 0..=steady {
        // The worker's default sampling, as a client that sends none gets.
        let mut request = sampled_request(
            &format!("{}-{n}", system.id),
            &TINY.id(),
            "Hello there, how are you today?",
            MAX_TOKENS,
            Sampling::GREEDY,
        );
        request.temperature = None;
        request.top_p = None;
        let answer = worker_answer(&system.client, &system.id, &request, PATIENCE).await;
        let answer = match answer {
            Ok(answer) => answer,
            Err(why) => {
                system.stop().await;
                return Err(why);
            }
        };
        let first = answer.arrivals.first().copied().ok_or("no token")?;
        ttfts.push(first.saturating_duration_since(answer.sent));
    }
    system.stop().await;
    let first = ttfts.remove(0);
    // The note names the kernel cache's own directory: say what it is instead.
    let note = note.replace(
        &format!("'{}'", kernels.path().display()),
        "<an empty directory>",
    );
    Ok((
        WarmRow {
            label,
            preloaded_after,
            first,
            steady: percentile(&mut ttfts, 50),
        },
        note,
    ))
}

fn targets(rows: &[Result<WarmRow, String>]) -> Vec<Target> {
    let with = rows.iter().flatten().find(|r| r.label == "with warm-up");
    vec![match with {
        Some(row) => Target {
            what: "first request after preload: TTFT ≤ 3× the steady state's",
            figure: Ok(format!(
                "{:.2}× ({:.1} ms against {:.1} ms)",
                row.ratio(),
                row.first.as_secs_f64() * 1e3,
                row.steady.as_secs_f64() * 1e3
            )),
            met: row.ratio() <= FIRST_WITHIN,
        },
        None => Target {
            what: "first request after preload: TTFT ≤ 3× the steady state's",
            figure: Err("not measured".to_owned()),
            met: false,
        },
    }]
}
