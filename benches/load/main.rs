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
//!   same runtime driven directly.
//!
//! Run: `cargo bench --bench load` (needs nats-server on PATH; `ci/setup.sh` installs it).
//! Writes `docs/benchmarks/load.md` and `docs/benchmarks/load.svg`. With `-- --test` (as
//! `cargo bench -- --test` passes), or without `--bench` (as `cargo test --benches` runs it), it runs
//! every part at a tiny size and writes nothing.
//! Each throughput figure is the median of several rounds, floor and worker alternating.
//!
//! Layout: `harness` drives the traffic (connections, workers, engines, one run of each kind),
//! `measurement` makes the figures of each part against its floor, `report` writes them.

#![allow(clippy::unwrap_used, clippy::disallowed_methods)] // A bench: failures are loud; it times.

mod harness;
mod measurement;
mod report;

use std::time::Duration;

use mlx_worker::limits::MAX_TOKENS_MAX;
use testkit::NatsServer;

use crate::harness::{SIM_MODEL, raw_tokens, repo, sim_engine, start_worker, worker_tokens};
use crate::measurement::{
    Report, check_overhead_percentiles, end_to_end, median, memory_per_stream, paced_rows,
    request_overhead, zero_latency_rows,
};

fn main() {
    check_overhead_percentiles();
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
    let rounds = if quick { 1 } else { 5 };
    // `--profile <streams>`: only the zero-latency row at that concurrency, and `--profile e2e`
    // only the real runtime's part, for a profiler attached from outside (see
    // docs/benchmarks/load.md); prints the figures, writes nothing.
    if args
        .windows(2)
        .any(|w| w[0] == "--profile" && w[1] == "e2e")
    {
        match rt.block_on(end_to_end(&url, false)) {
            Ok(e) => eprintln!(
                "runtime alone {:.0} µs/token, through the worker {:.0} µs/token ({} gaps)",
                e.direct_us, e.through_us, e.gaps
            ),
            Err(why) => eprintln!("{why}"),
        }
        return;
    }
    if let Some(streams) = args
        .iter()
        .position(|a| a == "--profile")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse::<usize>().ok())
    {
        // `--floor`: the raw floor's rounds too, alternating with the worker's, for the ratio
        // (left out under a profiler, whose samples should be the worker's).
        let floor = args.iter().any(|a| a == "--floor");
        let row = rt.block_on(async {
            let worker =
                start_worker(&url, "bench", 2000, sim_engine(Duration::ZERO), vec![]).await;
            let tokens = (65_536 / streams).clamp(16, MAX_TOKENS_MAX as usize) as u32;
            let n = streams * tokens as usize;
            let (mut times, mut raw) = (Vec::new(), Vec::new());
            for r in 0..20 {
                let tag = format!("prof{r}");
                times.push(worker_tokens(&url, "bench", SIM_MODEL, streams, tokens, &tag).await);
                if floor {
                    raw.push(raw_tokens(&url, n).await);
                }
            }
            worker.stop().await;
            (n, median(times), (!raw.is_empty()).then(|| median(raw)))
        });
        let per_token = |d: Duration| d.as_secs_f64() * 1e6 / row.0 as f64;
        eprintln!(
            "{streams} streams: {} tokens in {:?} (median of 20), {:.2} µs/token",
            row.0,
            row.1,
            per_token(row.1)
        );
        if let Some(raw) = row.2 {
            eprintln!(
                "raw floor: {:.2} µs/token (median of 20); worker/raw {:.2}",
                per_token(raw),
                row.1.as_secs_f64() / raw.as_secs_f64()
            );
        }
        return;
    }
    // A hung bench is a failed bench.
    let report = rt
        .block_on(tokio::time::timeout(Duration::from_secs(900), async {
            // First, while the process's heap is fresh, so that its growth is the streams'.
            eprintln!("load bench: memory per stream");
            let (held, per_stream_kib) = memory_per_stream(&url, quick).await;
            eprintln!("load bench: zero-latency engine");
            let (zero, start_to_registered) = zero_latency_rows(&url, quick, rounds).await;
            eprintln!("load bench: paced engine");
            let paced = paced_rows(&url, quick, rounds).await;

            eprintln!("load bench: request overhead");
            // Request overhead: receipt→first token vs a raw round trip between two clients.
            let overhead = request_overhead(&url, if quick { 20 } else { 1000 }).await;

            eprintln!("load bench: end to end with the MLX runtime");
            let e2e = end_to_end(&url, quick).await;
            Report {
                zero,
                paced,
                overhead,
                start_to_registered,
                held,
                per_stream_kib,
                e2e,
            }
        }))
        .expect("the load bench finished within 15 minutes");
    let md = report::markdown(report::header(quick), &report);
    eprintln!("{md}");
    if !quick {
        let dir = repo("docs/benchmarks");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("load.md"), &md).unwrap();
        std::fs::write(dir.join("load.svg"), report::svg(&report.zero)).unwrap();
    } else if let Err(why) = &report.e2e {
        eprintln!("end to end: {why}");
    }
}
