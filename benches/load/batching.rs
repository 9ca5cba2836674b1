//! The batching part: the real runtime behind a worker, batched and serial, against
//! `mlx_lm.server` (the anchor, started and driven by `anchor`) on the same model with the
//! same batch size, all three driven as their clients drive them with the same prompts, at 1,
//! 4, 8 and 16 concurrent requests, in rounds that interleave the systems. On the tiny model,
//! and on a larger random model of its family that the tiny model's generator makes on demand.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mlx_worker::client::Client;
use mlx_worker::clock::SystemClock;
use mlx_worker::config::EngineConfig;
use mlx_worker::engine::Engine;
use mlx_worker::engine::mlx::MlxEngine;
use mlx_worker::limits::REQUEST_TIMEOUT_MAX;
use mlx_worker::plan::recommendation::BatchSizes;
use testkit::RunningWorker;

use crate::anchor::{AnchorServer, AnchorSettings, completion, version};
use crate::harness::{
    CountingEngine, Sampling, TINY_MODEL, gaps, sampled_request, stream_client, worker_arrivals,
    worker_config_with,
};
use crate::measurement::percentile;
use crate::models::{self, LARGER, LARGER_CHECK, TINY, describe};

/// The batch size of the batched worker, and the anchor's `--decode-concurrency`: the largest
/// row fits in one batch on both.
pub(crate) const BATCH_SIZE: usize = 16;
/// How the anchor runs: batches of [`BATCH_SIZE`], prompts prefilled in the runtime's default
/// step.
pub(crate) const ANCHOR: AnchorSettings = AnchorSettings {
    decode_concurrency: BATCH_SIZE,
    prefill_step_size: 512,
};
/// Concurrent requests of the rows.
const CONCURRENCY: [usize; 4] = [1, 4, 8, 16];
/// Tokens each request asks for.
const MAX_TOKENS: u32 = 256;
/// How every request samples, on every system.
pub(crate) const SAMPLING: Sampling = Sampling {
    temperature: 0.7,
    top_p: Some(1.0),
};
/// Longest a client waits for any one message: a serial system makes the last request of a
/// row wait for all the others.
const PATIENCE: Duration = Duration::from_secs(1800);

/// Worker settings: (dotted key, value) pairs.
pub(crate) type Settings = Vec<(&'static str, String)>;

/// The serial baseline's worker settings: every model loaded with `batch_size: 1`. The one
/// place to change how the serial baseline is asked for.
fn serial_settings() -> Settings {
    vec![
        ("runtime.batching", "false".to_owned()),
        ("runtime.prefixCache", "false".to_owned()),
    ]
}

/// The batched worker's settings: batches of [`BATCH_SIZE`].
fn batched_settings() -> Settings {
    vec![
        ("runtime.batchSize", BATCH_SIZE.to_string()),
        ("runtime.prefixCache", "false".to_owned()),
    ]
}

/// `settings` as the YAML sections of a configuration file.
fn settings_yaml(settings: &Settings) -> String {
    let mut sections: BTreeMap<&str, String> = BTreeMap::new();
    for (key, value) in settings {
        let (section, key) = key.split_once('.').expect("a setting's key has a section");
        sections
            .entry(section)
            .or_default()
            .push_str(&format!("  {key}: {value}\n"));
    }
    sections
        .into_iter()
        .map(|(section, keys)| format!("{section}:\n{keys}"))
        .collect()
}

/// The prompts, request `i` of a row taking prompt `i % PROMPTS.len()` on every system.
const PROMPTS: [&str; 8] = [
    "The night train to the coast was late again, and the passengers",
    "Write a short note to a neighbour about the fallen fence:",
    "Three facts about the moon that most people get wrong:",
    "The recipe called for butter, but all she had was",
    "In the old mill by the river, the miller kept a ledger of",
    "A list of things to pack for a week in the mountains:",
    "When the power went out, the whole street came outside and",
    "The museum's newest exhibit is a clock that",
];

/// The system under measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum System {
    /// `mlx_lm.server`.
    Anchor,
    /// The worker, batching.
    Batched,
    /// The worker with batching off.
    Serial,
}

impl System {
    /// Every system, in the order of a round's first row.
    pub(crate) const ALL: [System; 3] = [System::Anchor, System::Batched, System::Serial];

    /// Its name in the report.
    pub(crate) fn label(self) -> &'static str {
        match self {
            System::Anchor => "mlx_lm.server",
            System::Batched => "worker (batched)",
            System::Serial => "worker (serial)",
        }
    }
}

/// One request as its client saw it.
pub(crate) struct Sample {
    /// When the request went out.
    pub(crate) sent: Instant,
    /// When each piece of text arrived.
    pub(crate) arrivals: Vec<Instant>,
    /// Tokens generated, when the system says (the anchor's `usage`).
    pub(crate) tokens: Option<u64>,
    /// Times the request was sent again, its connection reset before any answer.
    pub(crate) resets: u32,
}

/// One row run once on one system.
struct RowRun {
    /// First request sent to last stream ended.
    wall: Duration,
    /// Tokens generated for the row.
    tokens: u64,
    samples: Vec<Sample>,
}

/// A row's figures on one system, over every round.
pub(crate) struct Figures {
    pub(crate) system: System,
    pub(crate) streams: usize,
    /// Requests measured (streams × rounds).
    pub(crate) requests: usize,
    /// Times a request was sent again, its connection reset before any answer.
    pub(crate) resets: u32,
    /// Tokens generated in all.
    pub(crate) tokens: u64,
    /// Tokens generated per second of the row's wall time, median of the rounds.
    pub(crate) tokens_per_s: f64,
    /// Request sent → first text, over every request.
    pub(crate) ttft_p50: Option<Duration>,
    pub(crate) ttft_p99: Option<Duration>,
    /// Between consecutive pieces of text of a stream, over every stream.
    pub(crate) itl_p99: Option<Duration>,
}

/// A target of the batching work, judged on one table.
pub(crate) struct Target {
    pub(crate) what: &'static str,
    /// The figure it is judged on, or why there is none.
    pub(crate) figure: Result<String, String>,
    pub(crate) met: bool,
}

/// One model's rows.
pub(crate) struct Table {
    /// The model id.
    pub(crate) model: String,
    /// Its shape and size.
    pub(crate) about: String,
    pub(crate) rounds: usize,
    pub(crate) max_tokens: u32,
    pub(crate) rows: Vec<Figures>,
    pub(crate) targets: Vec<Target>,
}

/// Everything the batching part measured.
pub(crate) struct Batching {
    /// The anchor's version (mlx-lm's).
    pub(crate) anchor_version: String,
    /// What each worker system ran with.
    pub(crate) settings: Vec<String>,
    pub(crate) tiny: Result<Table, String>,
    pub(crate) larger: Result<Table, String>,
}

/// What a run measures: the rows, and on each model the tokens of a request and the rounds.
struct Plan {
    rows: Vec<usize>,
    tiny: Share,
    larger: Share,
}

/// What a run measures on one model.
#[derive(Clone, Copy)]
struct Share {
    max_tokens: u32,
    rounds: usize,
}

impl Plan {
    /// The full run, or (`quick`) one request of a few tokens per system and model.
    fn new(quick: bool) -> Plan {
        if quick {
            let share = Share {
                max_tokens: 8,
                rounds: 1,
            };
            Plan {
                rows: vec![1],
                tiny: share,
                larger: share,
            }
        } else {
            // The larger model's serial rows, a request after another at a few dozen tokens
            // a second, would take most of the run at full length: half the tokens there.
            Plan {
                rows: CONCURRENCY.to_vec(),
                tiny: Share {
                    max_tokens: MAX_TOKENS,
                    rounds: 3,
                },
                larger: Share {
                    max_tokens: MAX_TOKENS / 2,
                    rounds: 1,
                },
            }
        }
    }
}

/// A worker over the real runtime, its engine counting the tokens it generates.
pub(crate) struct WorkerSystem {
    pub(crate) id: String,
    worker: RunningWorker,
    engine: Arc<CountingEngine>,
    pub(crate) client: Client,
}

impl WorkerSystem {
    /// Starts a runtime and a worker with `settings` and `models` preloaded. A worker that
    /// rejects the settings (one that predates them) runs with its defaults; the returned note
    /// says which it was.
    async fn start(
        url: &str,
        system: System,
        settings: Settings,
        paths: &EngineConfig,
        models: &[String],
    ) -> Result<(WorkerSystem, String), String> {
        let id = format!(
            "batching-{}",
            if system == System::Serial {
                "serial"
            } else {
                "batched"
            }
        );
        WorkerSystem::start_as(url, id, system.label(), settings, paths, models).await
    }

    /// As [`WorkerSystem::start`], the worker's id `id`, named `label` in the note.
    pub(crate) async fn start_as(
        url: &str,
        id: String,
        label: &str,
        settings: Settings,
        paths: &EngineConfig,
        models: &[String],
    ) -> Result<(WorkerSystem, String), String> {
        let shown: Vec<String> = settings.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        let shown = shown.join(", ");
        let (mut config, note) = match worker_config_with(url, 2000, &settings_yaml(&settings)) {
            Ok(config) if shown.is_empty() => (config, format!("{label}: the worker's defaults")),
            Ok(config) => (config, format!("{label}: `{shown}`")),
            Err(why) => {
                // The reason's first clause; the rest lists every key the section has.
                let why = why.split(", expected").next().unwrap_or(&why);
                let note = format!(
                    "{label}: `{shown}` is not a setting of this worker ({why}); measured with the worker's defaults"
                );
                (worker_config_with(url, 2000, "")?, note)
            }
        };
        // The slowest rows queue requests for minutes: a request has the longest time there is.
        config.node.request_timeout = REQUEST_TIMEOUT_MAX;
        let mut engine_config = config.engine.clone();
        engine_config.python = paths.python.clone();
        engine_config.runtime_dir = paths.runtime_dir.clone();
        engine_config.model_dirs = paths.model_dirs.clone();
        // As the worker's run does, without the hardware table: the runtime's default then.
        let batch_sizes = BatchSizes::configured_or(
            engine_config.batching,
            engine_config.batch_size,
            BatchSizes::default,
        );
        let runtime = MlxEngine::start(engine_config, batch_sizes, Arc::new(SystemClock))
            .await
            .map_err(|e| e.to_string())?;
        let engine = Arc::new(CountingEngine::new(Arc::new(runtime)));
        let worker = RunningWorker::start(&id, &config, engine.clone(), models.to_vec()).await;
        let client = stream_client(url).await;
        Ok((
            WorkerSystem {
                id,
                worker,
                engine,
                client,
            },
            note,
        ))
    }

    /// Waits until the worker's preload has ended.
    pub(crate) async fn preload_ended(&self) {
        self.worker.observer.preload_ended().await;
    }

    /// Stops the worker, then its runtime.
    pub(crate) async fn stop(self) {
        self.worker.stop().await;
        self.engine.shutdown(Duration::from_secs(5)).await;
    }
}

/// The worker systems of a run.
struct Workers {
    batched: WorkerSystem,
    serial: WorkerSystem,
}

/// The batching part: both models, every row, every system.
pub(crate) async fn batching(url: &str, quick: bool) -> Batching {
    let plan = Plan::new(quick);
    let anchor_version = version().await;
    let not_measured = |why: String| Batching {
        anchor_version: anchor_version.clone(),
        settings: Vec::new(),
        tiny: Err(why.clone()),
        larger: Err(why),
    };
    let paths = match models::runtime_paths() {
        Ok(paths) => paths,
        Err(missing) => return not_measured(format!("not measured: {missing}")),
    };
    if let Err(why) = TINY.make().await {
        return not_measured(format!("not measured: {why}"));
    }
    let shape = if quick { &LARGER_CHECK } else { &LARGER };
    let larger = shape.make().await.map(|()| shape.id());
    let mut models = vec![TINY.id()];
    models.extend(larger.iter().cloned());
    let batched = WorkerSystem::start(url, System::Batched, batched_settings(), &paths, &models);
    let (batched, b) = match batched.await {
        Ok(started) => started,
        Err(why) => return not_measured(format!("not measured: {why}")),
    };
    let serial = WorkerSystem::start(url, System::Serial, serial_settings(), &paths, &models);
    let (serial, s) = match serial.await {
        Ok(started) => started,
        Err(why) => {
            batched.stop().await;
            return not_measured(format!("not measured: {why}"));
        }
    };
    let (workers, settings) = (Workers { batched, serial }, vec![b, s]);
    let tiny = measure(&workers, &TINY.id(), TINY.dir(), &plan.rows, plan.tiny).await;
    let larger = match larger {
        Ok(id) => measure(&workers, &id, shape.dir(), &plan.rows, plan.larger).await,
        Err(why) => Err(format!("not measured: {why}")),
    };
    workers.batched.stop().await;
    workers.serial.stop().await;
    Batching {
        anchor_version,
        settings,
        tiny,
        larger,
    }
}

/// One model's table: the anchor started on it, a warm-up request on every system, then the
/// rounds, each running every row on every system, the systems' order turning round by round.
async fn measure(
    workers: &Workers,
    model: &str,
    dir: PathBuf,
    rows: &[usize],
    share: Share,
) -> Result<Table, String> {
    let Share { max_tokens, rounds } = share;
    let anchor = AnchorServer::start(&dir, ANCHOR)
        .await
        .map_err(|why| format!("not measured: {why}"))?;
    let port = anchor.port();
    let run = |system: System, streams: usize, tag: String| {
        let worker = match system {
            System::Anchor => None,
            System::Batched => Some(&workers.batched),
            System::Serial => Some(&workers.serial),
        };
        run_row(port, worker, model, streams, tag, max_tokens)
    };
    for system in System::ALL {
        eprintln!("load bench: batching, {model}, warming {}", system.label());
        run(system, 1, format!("warm-{}", system as u8)).await;
    }
    let mut runs: BTreeMap<(usize, System), Vec<RowRun>> = BTreeMap::new();
    for round in 0..rounds {
        for &streams in rows {
            eprintln!("load bench: batching, {model}, round {round}, {streams} concurrent");
            for k in 0..System::ALL.len() {
                let system = System::ALL[(k + round) % System::ALL.len()];
                let tag = format!("b{round}-{streams}-{}", system as u8);
                let row = run(system, streams, tag).await;
                runs.entry((streams, system)).or_default().push(row);
            }
        }
    }
    drop(anchor);
    let rows: Vec<Figures> = runs
        .into_iter()
        .map(|((streams, system), runs)| figures(system, streams, runs))
        .collect();
    Ok(Table {
        model: model.to_owned(),
        about: describe(&dir),
        rounds,
        max_tokens,
        targets: targets(&rows),
        rows,
    })
}

/// `streams` requests at once on the anchor (`worker` none) or a worker system.
async fn run_row(
    port: u16,
    worker: Option<&WorkerSystem>,
    model: &str,
    streams: usize,
    tag: String,
    max_tokens: u32,
) -> RowRun {
    let before = worker.map_or(0, |w| w.engine.tokens());
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(streams);
    for i in 0..streams {
        let prompt = PROMPTS[i % PROMPTS.len()];
        tasks.push(match worker {
            None => tokio::spawn(completion(port, prompt, max_tokens, SAMPLING, PATIENCE)),
            Some(w) => {
                let request =
                    sampled_request(&format!("{tag}-{i}"), model, prompt, max_tokens, SAMPLING);
                let (client, id) = (w.client.clone(), w.id.clone());
                tokio::spawn(async move {
                    let (sent, arrivals) = worker_arrivals(&client, &id, &request, PATIENCE).await;
                    Sample {
                        sent,
                        arrivals,
                        tokens: None,
                        resets: 0,
                    }
                })
            }
        });
    }
    let mut samples = Vec::with_capacity(streams);
    for task in tasks {
        samples.push(task.await.unwrap());
    }
    let wall = start.elapsed();
    let tokens = match worker {
        Some(w) => w.engine.tokens() - before,
        None => samples.iter().filter_map(|s| s.tokens).sum(),
    };
    RowRun {
        wall,
        tokens,
        samples,
    }
}

/// A row's figures from its rounds.
fn figures(system: System, streams: usize, runs: Vec<RowRun>) -> Figures {
    let mut rates: Vec<f64> = runs
        .iter()
        .map(|r| r.tokens as f64 / r.wall.as_secs_f64())
        .collect();
    let samples: Vec<&Sample> = runs.iter().flat_map(|r| &r.samples).collect();
    let mut ttft: Vec<Duration> = samples
        .iter()
        .filter_map(|s| s.arrivals.first().map(|&first| first - s.sent))
        .collect();
    let mut itl: Vec<Duration> = samples.iter().flat_map(|s| gaps(&s.arrivals)).collect();
    Figures {
        system,
        streams,
        requests: samples.len(),
        resets: samples.iter().map(|s| s.resets).sum(),
        tokens: runs.iter().map(|r| r.tokens).sum(),
        tokens_per_s: percentile(&mut rates, 50),
        ttft_p50: some_percentile(&mut ttft, 50),
        ttft_p99: some_percentile(&mut ttft, 99),
        itl_p99: some_percentile(&mut itl, 99),
    }
}

/// The `p`-th percentile of `samples`, `None` when there are none (a stream of a few tokens
/// may show no text, or a single piece of it).
fn some_percentile(samples: &mut [Duration], p: usize) -> Option<Duration> {
    (!samples.is_empty()).then(|| percentile(samples, p))
}

/// The single stream's TTFT p50 target.
const SINGLE_TTFT_MAX: Duration = Duration::from_millis(50);

/// The batching work's targets, each as a ratio in the same run.
fn targets(rows: &[Figures]) -> Vec<Target> {
    let row = |system: System, streams: usize| {
        rows.iter()
            .find(|f| f.system == system && f.streams == streams)
            .ok_or_else(|| format!("no row of {streams} concurrent"))
    };
    // The batched worker's tokens/s at least `bound` times `of`'s.
    let rates = [
        (
            "8 concurrent: tokens/s ≥ 1.0× mlx_lm.server",
            8,
            System::Anchor,
            1.0,
        ),
        (
            "16 concurrent: tokens/s ≥ 1.0× mlx_lm.server",
            16,
            System::Anchor,
            1.0,
        ),
        (
            "8 concurrent: tokens/s ≥ 3× the serial worker",
            8,
            System::Serial,
            3.0,
        ),
        (
            "16 concurrent: tokens/s ≥ 3× the serial worker",
            16,
            System::Serial,
            3.0,
        ),
        (
            "single stream: tokens/s ≥ 0.95× the serial worker",
            1,
            System::Serial,
            0.95,
        ),
    ];
    let mut targets: Vec<Target> = rates
        .into_iter()
        .map(|(what, streams, of, bound)| {
            let ratio = row(System::Batched, streams)
                .and_then(|b| row(of, streams).map(|o| b.tokens_per_s / o.tokens_per_s));
            Target {
                what,
                met: ratio.as_ref().is_ok_and(|r| *r >= bound),
                figure: ratio.map(|r| format!("{r:.2}×")),
            }
        })
        .collect();
    let ttft = |system, streams| {
        row(system, streams).and_then(|f| f.ttft_p50.ok_or_else(|| "no text arrived".to_owned()))
    };
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let at_8 = ttft(System::Batched, 8).and_then(|b| ttft(System::Anchor, 8).map(|a| (b, a)));
    targets.push(Target {
        what: "8 concurrent: TTFT p50 ≤ mlx_lm.server's",
        met: at_8.as_ref().is_ok_and(|(b, a)| b <= a),
        figure: at_8.map(|(b, a)| format!("{:.1} ms against {:.1} ms", ms(b), ms(a))),
    });
    let single = ttft(System::Batched, 1);
    targets.push(Target {
        what: "single stream: TTFT p50 ≤ 50 ms",
        met: single.as_ref().is_ok_and(|t| *t <= SINGLE_TTFT_MAX),
        figure: single.map(|t| format!("{:.1} ms", ms(t))),
    });
    targets
}

/// Checks what the batching part judges with, on made-up figures whose answers are known:
/// each target at its bound is met and just past it missed, one without its row is missed
/// and says so; and the worker settings become YAML that a worker takes when it knows the
/// keys and rejects when it does not (which the part falls back on).
pub(crate) fn check_batching_logic() {
    let row = |system, streams, tokens_per_s, ttft_ms| Figures {
        system,
        streams,
        requests: 1,
        resets: 0,
        tokens: 1,
        tokens_per_s,
        ttft_p50: Some(Duration::from_millis(ttft_ms)),
        ttft_p99: None,
        itl_p99: None,
    };
    use System::{Anchor, Batched, Serial};
    let rows = [
        row(Anchor, 8, 100.0, 20),
        row(Batched, 8, 100.0, 20),
        row(Serial, 8, 34.0, 1),
        row(Batched, 1, 95.0, 50),
        row(Serial, 1, 100.0, 1),
    ];
    let judged: Vec<(bool, bool)> = targets(&rows)
        .iter()
        .map(|t| (t.met, t.figure.is_ok()))
        .collect();
    // 1.0× met, no row of 16, 2.94× missed, no row of 16, 0.95× met, equal TTFT met, 50 ms met.
    let expected = [(true, true), (false, false), (false, true), (false, false)];
    assert_eq!(judged[..4], expected);
    assert_eq!(judged[4..], [(true, true), (true, true), (true, true)]);
    let slower = [row(Batched, 1, 94.0, 51), row(Serial, 1, 100.0, 1)];
    assert!(targets(&slower)[4..].iter().all(|t| !t.met));
    let yaml = settings_yaml(&vec![
        ("runtime.startupTimeoutMs", "60000".to_owned()),
        ("runtime.callTimeoutMs", "30000".to_owned()),
    ]);
    assert_eq!(
        yaml,
        "runtime:\n  startupTimeoutMs: 60000\n  callTimeoutMs: 30000\n"
    );
    assert_eq!(
        TINY.id(),
        TINY_MODEL,
        "the tiny model's id, wherever it is made"
    );
    let url = "nats://127.0.0.1:4222";
    assert!(worker_config_with(url, 0, &yaml).is_ok(), "{yaml}");
    let unknown = settings_yaml(&vec![("runtime.noSuchSetting", "1".to_owned())]);
    assert!(worker_config_with(url, 0, &unknown).is_err(), "{unknown}");
}
