//! Cost of the hardware probe on the heartbeat path: one `LinuxProbe::sample()` (run on every
//! heartbeat, `discovery.heartbeatIntervalMs`, default 5 s) and the parsers of the tools'
//! output, which run once per heartbeat (nvidia-smi, ioreg) or once at start
//! (system_profiler).
//!
//! sysinfo skips a CPU re-read less than 200 ms after the previous one, so a probe sampled
//! back to back measures less than a heartbeat does. The heartbeat bench therefore rotates
//! over [`PROBES`] primed probes, each sampled again only after all the others, which is
//! long after 200 ms: every iteration pays the CPU re-read, as a real heartbeat does. The
//! back-to-back figure is kept for comparison.

use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use mlx_worker::hardware::{HardwareProbe, LinuxProbe, linux, mac};

fn fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/probes")
        .join(name);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|err| panic!("fixture {} is unreadable: {err}", path.display()))
}

/// Probes in rotation: at ~20 µs a sample, each is sampled again after ~0.6 s.
const PROBES: usize = 32_768;

fn heartbeat_probe_sample(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|err| panic!("the bench needs a tokio runtime: {err}"));
    // The first sample of a probe primes sysinfo and finds out whether nvidia-smi exists.
    let probes: Vec<LinuxProbe> = (0..PROBES)
        .map(|_| {
            let probe = LinuxProbe::new();
            runtime.block_on(probe.sample());
            probe
        })
        .collect();
    let mut next = 0;
    c.bench_function("heartbeat probe sample (LinuxProbe::sample)", |b| {
        b.iter(|| {
            next = (next + 1) % PROBES;
            runtime.block_on(probes[next].sample())
        })
    });
    let probe = &probes[0];
    c.bench_function(
        "heartbeat probe sample back to back (cpu re-read skipped by sysinfo)",
        |b| b.iter(|| runtime.block_on(probe.sample())),
    );
}

fn probe_parsers(c: &mut Criterion) {
    let displays = fixture("mac/m1-pro/system_profiler_displays.json");
    c.bench_function(
        "parse system_profiler SPDisplaysDataType json (profile, once)",
        |b| b.iter(|| mac::parse_displays_json(black_box(&displays))),
    );
    let gpus = fixture("linux/ryzen-2x4090/nvidia_smi.csv");
    c.bench_function("parse nvidia-smi csv, 2 gpus (heartbeat sample)", |b| {
        b.iter(|| linux::parse_nvidia_smi(black_box(&gpus)))
    });
    let ioreg = fixture("mac/m2-max/ioreg_accelerator.txt");
    c.bench_function("parse ioreg IOAccelerator (heartbeat sample)", |b| {
        b.iter(|| mac::parse_ioreg_gpu_utilization(black_box(&ioreg)))
    });
}

criterion_group!(benches, heartbeat_probe_sample, probe_parsers);
criterion_main!(benches);
