//! The load bench: a real nats-server, one worker over the production `NatsTransport`, and in
//! the same run the floor each figure is divided by:
//!
//! - **zero-latency engine** (the simulated engine, no delay): tokens/s and µs per token through
//!   the worker at 1, 8, 64 and 512 concurrent streams, against a plain async-nats client
//!   publishing the same token messages with no worker (the raw floor);
//! - **paced engine** (the simulated engine, 1 ms before each token): the same concurrencies,
//!   against the same engine driven directly with no worker and no NATS;
//! - **request overhead**: request sent → first token, against a raw request/reply round trip
//!   between two clients measured in the same round, with the late-subscriber check on and
//!   off; its overhead figures are percentiles of the per-round differences;
//! - **start to registered** and **memory per in-flight stream**;
//! - **end to end with the real MLX runtime** and the tiny model (when `ci/setup.sh` has made
//!   them): time per token through the worker against the runtime's own time per token, the
//!   same runtime driven directly;
//! - **batching**: the real runtime behind a worker, batched and serial, against
//!   `mlx_lm.server` on the same model and batch size, at 1 to 16 concurrent requests, on the
//!   tiny model and on a larger random model generated for it;
//! - **sessions**: four-turn conversations built as the controller builds its prompts, each turn
//!   on a worker with the prefix cache and on one without, on the tiny model and a mid-sized
//!   random model: prefill tokens avoided and the time to each turn's first token;
//! - **model subjects**: requests to `inference.{model}` through the JetStream work queue
//!   against the queue group, on a JetStream-enabled server of its own: send → done p50/p99 and
//!   requests per second.
//!
//! Run: `cargo bench --bench load` (needs nats-server on PATH; `ci/setup.sh` installs it).
//! Writes `docs/benchmarks/load.md`, `load.svg`, `batching.md`, `batching.svg`, `sessions.md`,
//! `sessions.svg`, `warmup.md` and `fleet.md`; with `-- --only batching`, `sessions`, `warmup`
//! or `fleet`, only that part and its files. With `-- --test` (as
//! `cargo bench -- --test` passes), or without `--bench` (as `cargo test --benches` runs it), it runs
//! every part at a tiny size and writes nothing.
//! Each throughput figure is the median of several rounds, floor and worker alternating.
//!
//! Layout: `harness` drives the traffic (connections, workers, engines, one run of each kind),
//! `measurement` makes the figures of each part against its floor, `batching` the batching
//! part's against `mlx_lm.server` (`anchor`) on its `models`, `sessions` the prefix cache's
//! cold against warm, `report` writes them.

#![allow(clippy::unwrap_used, clippy::disallowed_methods)] // A bench: failures are loud; it times.

mod anchor;
mod batching;
mod fleet;
mod harness;
mod measurement;
mod models;
mod report;
mod sessions;
mod warmup;

use std::time::Duration;

use mlx_worker::limits::MAX_TOKENS_MAX;
use testkit::NatsServer;

use crate::batching::{Batching, batching, check_batching_logic};
use crate::harness::{SIM_MODEL, raw_tokens, repo, sim_engine, start_worker, worker_tokens};
use crate::measurement::{
    Report, check_overhead_percentiles, end_to_end, median, memory_per_stream, paced_rows,
    request_overhead, zero_latency_rows,
};
use crate::sessions::{Sessions, check_sessions_logic, sessions};
use crate::warmup::{WarmUp, warm_up};

/// Longest the batching part may take: its slowest rows queue requests for minutes.
const BATCHING_WITHIN: Duration = Duration::from_secs(4 * 3600);
/// Longest the sessions part may take.
const SESSIONS_WITHIN: Duration = Duration::from_secs(3600);
/// Longest the warm-up part may take.
const WARM_UP_WITHIN: Duration = Duration::from_secs(600);

fn main() {
    check_overhead_percentiles();
    check_batching_logic();
    check_sessions_logic();
    // `cargo bench` passes `--bench`; without it (`cargo test --benches`) or with `--test`
    // (`cargo bench -- --test`) the bench only checks that every part still runs.
    let args: Vec<String> = std::env::args().collect();
    let quick = !args.iter().any(|a| a == "--bench") || args.iter().any(|a| a == "--test");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    // The worker's logs would cost what they measure: no subscriber takes them.
    let _ = tracing::subscriber::set_global_default(tracing::subscriber::NoSubscriber::default());
    let server = rt.block_on(NatsServer::start());
    let url = server.url();
    let _guard = rt.enter();
    let option = |name: &str| {
        args.windows(2)
            .find(|w| w[0] == name)
            .map(|w| w[1].as_str())
    };
    // `--profile <streams>`: only the zero-latency row at that concurrency, and `--profile e2e`
    // only the real runtime's part, for a profiler attached from outside (see
    // docs/benchmarks/load.md); prints the figures, writes nothing.
    if let Some(what) = option("--profile") {
        // `--floor`: the raw floor's rounds too, alternating with the worker's, for the ratio
        // (left out under a profiler, whose samples should be the worker's).
        let floor = args.iter().any(|a| a == "--floor");
        rt.block_on(profile(&url, what, floor));
        return;
    }
    if option("--only") == Some("batching") {
        let b = rt.block_on(batching_within(&url, quick));
        write_batching(&b, quick, "cargo bench --bench load -- --only batching");
        return;
    }
    if option("--only") == Some("sessions") {
        let s = rt.block_on(sessions_within(&url, quick));
        write_sessions(&s, quick, "cargo bench --bench load -- --only sessions");
        return;
    }
    if option("--only") == Some("fleet") {
        let f = rt.block_on(fleet_within(quick));
        write_fleet(&f, quick, "cargo bench --bench load -- --only fleet");
        return;
    }
    if option("--only") == Some("warmup") {
        let w = rt.block_on(warm_up_within(&url, quick));
        write_warm_up(&w, quick, "cargo bench --bench load -- --only warmup");
        return;
    }
    let report = rt
        .block_on(tokio::time::timeout(
            Duration::from_secs(900),
            measure(&url, quick),
        ))
        .expect("the load bench finished within 15 minutes");
    let b = rt.block_on(batching_within(&url, quick));
    let command = "cargo bench --bench load";
    let md = report::markdown(report::header(command, quick), &report);
    eprintln!("{md}");
    write(quick, "load", &md, &report::svg(&report.zero));
    if let (true, Err(why)) = (quick, &report.e2e) {
        eprintln!("end to end: {why}");
    }
    write_batching(&b, quick, command);
    let s = rt.block_on(sessions_within(&url, quick));
    write_sessions(&s, quick, command);
    let w = rt.block_on(warm_up_within(&url, quick));
    write_warm_up(&w, quick, command);
    let f = rt.block_on(fleet_within(quick));
    write_fleet(&f, quick, command);
}

/// The model-subjects part, bounded.
async fn fleet_within(quick: bool) -> fleet::Fleet {
    eprintln!("load bench: model subjects (JetStream against the queue group)");
    tokio::time::timeout(Duration::from_secs(900), fleet::fleet(quick))
        .await
        .expect("the model-subjects part finished in time")
}

/// Prints the model-subjects report and, unless `quick`, writes it.
fn write_fleet(f: &fleet::Fleet, quick: bool, command: &str) {
    let md = fleet::markdown(report::header(command, quick), f);
    eprintln!("{md}");
    write_md(quick, "fleet", &md);
}

/// Writes `docs/benchmarks/{name}.md` and `.svg`, unless `quick`: then the report, made all
/// the same, is only printed.
fn write(quick: bool, name: &str, md: &str, svg: &str) {
    assert!(svg.starts_with("<svg ") && svg.ends_with("</svg>\n"));
    write_md(quick, name, md);
    if !quick {
        std::fs::write(repo("docs/benchmarks").join(format!("{name}.svg")), svg).unwrap();
    }
}

/// Writes `docs/benchmarks/{name}.md`, unless `quick`.
fn write_md(quick: bool, name: &str, md: &str) {
    if quick {
        return;
    }
    let dir = repo("docs/benchmarks");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{name}.md")), md).unwrap();
}

/// Every part but batching. A hung bench is a failed bench: the caller bounds it.
async fn measure(url: &str, quick: bool) -> Report {
    let rounds = if quick { 1 } else { 5 };
    // First, while the process's heap is fresh, so that its growth is the streams'.
    eprintln!("load bench: memory per stream");
    let (held, per_stream_kib) = memory_per_stream(url, quick).await;
    eprintln!("load bench: zero-latency engine");
    let (zero, start_to_registered) = zero_latency_rows(url, quick, rounds).await;
    eprintln!("load bench: paced engine");
    let paced = paced_rows(url, quick, rounds).await;

    eprintln!("load bench: request overhead");
    // Request overhead: receipt→first token vs a raw round trip between two clients.
    let overhead = request_overhead(url, if quick { 20 } else { 1000 }).await;

    eprintln!("load bench: end to end with the MLX runtime");
    let e2e = end_to_end(url, quick).await;
    Report {
        zero,
        paced,
        overhead,
        start_to_registered,
        held,
        per_stream_kib,
        e2e,
    }
}

/// The batching part, bounded by [`BATCHING_WITHIN`].
async fn batching_within(url: &str, quick: bool) -> Batching {
    eprintln!("load bench: batching");
    tokio::time::timeout(BATCHING_WITHIN, batching(url, quick))
        .await
        .expect("the batching part finished in time")
}

/// The sessions part, bounded by [`SESSIONS_WITHIN`].
async fn sessions_within(url: &str, quick: bool) -> Sessions {
    eprintln!("load bench: sessions");
    tokio::time::timeout(SESSIONS_WITHIN, sessions(url, quick))
        .await
        .expect("the sessions part finished in time")
}

/// The warm-up part, bounded.
async fn warm_up_within(url: &str, quick: bool) -> WarmUp {
    eprintln!("load bench: warm-up");
    tokio::time::timeout(WARM_UP_WITHIN, warm_up(url, quick))
        .await
        .expect("the warm-up part finished in time")
}

/// Prints the warm-up report and, unless `quick`, writes it.
fn write_warm_up(w: &WarmUp, quick: bool, command: &str) {
    let md = report::warm_up_markdown(report::header(command, quick), w);
    eprintln!("{md}");
    write_md(quick, "warmup", &md);
}

/// Prints the sessions report and, unless `quick`, writes it with its chart.
fn write_sessions(s: &Sessions, quick: bool, command: &str) {
    let md = report::sessions_markdown(report::header(command, quick), s);
    eprintln!("{md}");
    write(quick, "sessions", &md, &report::sessions_svg(s));
}

/// Prints the batching report and, unless `quick`, writes it with its chart.
fn write_batching(b: &Batching, quick: bool, command: &str) {
    let md = report::batching_markdown(report::header(command, quick), b);
    eprintln!("{md}");
    write(quick, "batching", &md, &report::batching_svg(b));
}

/// `--profile e2e` or `--profile <streams>`: one part, its figures printed; with `floor`, the
/// raw floor's rounds too, alternating with the worker's.
async fn profile(url: &str, what: &str, floor: bool) {
    if what == "e2e" {
        match end_to_end(url, false).await {
            Ok(e) => eprintln!(
                "runtime alone {:.0} µs/token, through the worker {:.0} µs/token ({} gaps)",
                e.direct_us, e.through_us, e.gaps
            ),
            Err(why) => eprintln!("{why}"),
        }
        return;
    }
    let Ok(streams) = what.parse::<usize>() else {
        eprintln!("--profile takes e2e or a stream count, not {what:?}");
        return;
    };
    let worker = start_worker(url, "bench", 2000, sim_engine(Duration::ZERO), vec![]).await;
    let tokens = (65_536 / streams).clamp(16, MAX_TOKENS_MAX as usize) as u32;
    let total = streams * tokens as usize;
    let (mut times, mut raw) = (Vec::new(), Vec::new());
    for r in 0..20 {
        let tag = format!("prof{r}");
        times.push(worker_tokens(url, "bench", SIM_MODEL, streams, tokens, &tag).await);
        if floor {
            raw.push(raw_tokens(url, total).await);
        }
    }
    worker.stop().await;
    let time = median(times);
    let per_token = |d: Duration| d.as_secs_f64() * 1e6 / total as f64;
    eprintln!(
        "{streams} streams: {total} tokens in {time:?} (median of 20), {:.2} µs/token",
        per_token(time)
    );
    if !raw.is_empty() {
        let raw = median(raw);
        eprintln!(
            "raw floor: {:.2} µs/token (median of 20); worker/raw {:.2}",
            per_token(raw),
            time.as_secs_f64() / raw.as_secs_f64()
        );
    }
}
