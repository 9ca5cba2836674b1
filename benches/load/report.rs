//! The report: `docs/benchmarks/load.md`'s text and `load.svg`'s chart, from a
//! [`Report`]. Formatting only; every figure is computed in `measurement`.

use std::fmt::Write as _;
use std::time::Duration;

use testkit::nats::nats_server_version;

use crate::harness::PACE;
use crate::measurement::{Report, Row, overhead_percentiles, percentile};

/// The report's first line: what ran, where.
pub(crate) fn header(quick: bool) -> String {
    format!(
        "One run of `cargo bench --bench load`{} on {} ({} CPUs), nats-server {} on loopback.",
        if quick { " -- --test (tiny sizes)" } else { "" },
        host(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        nats_server_version()
    )
}

/// The report's Markdown.
pub(crate) fn markdown(header: String, r: &Report) -> String {
    let mut md = String::new();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let p = |v: &[Duration], q| us(percentile(&mut v.to_vec(), q));
    writeln!(md, "# Load bench\n\n{header} Every figure is a ratio to a floor measured in the same run; throughput figures are medians of rounds in which floor and worker alternate.\n").unwrap();
    writeln!(
        md,
        "## Zero-latency engine, against the raw async-nats floor\n"
    )
    .unwrap();
    writeln!(md, "The floor: one async-nats client publishes the same number of token messages to another, no worker.\n").unwrap();
    writeln!(md, "| streams | tokens | raw floor tokens/s | worker tokens/s | raw µs/token | worker µs/token | ratio (worker/raw time) |").unwrap();
    writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|").unwrap();
    for row in &r.zero {
        writeln!(
            md,
            "| {} | {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} |",
            row.streams,
            row.tokens,
            row.floor_rate(),
            row.worker_rate(),
            row.floor_us(),
            row.worker_us(),
            row.ratio()
        )
        .unwrap();
    }
    writeln!(
        md,
        "\n## Paced engine ({} ms before each token), against the engine alone\n",
        PACE.as_millis()
    )
    .unwrap();
    writeln!(
        md,
        "The floor: the same simulated engine driven directly, no worker and no NATS.\n"
    )
    .unwrap();
    writeln!(md, "| streams | tokens | engine alone tokens/s | through the worker tokens/s | ratio (worker/engine time) |").unwrap();
    writeln!(md, "|---:|---:|---:|---:|---:|").unwrap();
    for row in &r.paced {
        writeln!(
            md,
            "| {} | {} | {:.0} | {:.0} | {:.3} |",
            row.streams,
            row.tokens,
            row.floor_rate(),
            row.worker_rate(),
            row.ratio()
        )
        .unwrap();
    }
    let o = &r.overhead;
    let (raw50, raw99) = (p(&o.raw_rtt, 50), p(&o.raw_rtt, 99));
    let (w50, w99) = (p(&o.first, 50), p(&o.first, 99));
    let (n50, n99) = (p(&o.first_nolate, 50), p(&o.first_nolate, 99));
    writeln!(
        md,
        "\n## Request overhead ({} rounds of requests one at a time, zero-latency engine)\n",
        o.first.len()
    )
    .unwrap();
    writeln!(md, "Each round: a raw round trip, a request with the late-subscriber check on, one with it off. The overhead rows are percentiles of each round's difference, not differences of percentiles.\n").unwrap();
    writeln!(md, "| figure | p50 | p99 |").unwrap();
    writeln!(md, "|---|---:|---:|").unwrap();
    writeln!(
        md,
        "| raw request/reply round trip between two clients (µs) | {raw50:.0} | {raw99:.0} |"
    )
    .unwrap();
    writeln!(
        md,
        "| request sent → first token, late-subscriber check on (µs) | {w50:.0} | {w99:.0} |"
    )
    .unwrap();
    writeln!(
        md,
        "| request sent → first token, check off (µs) | {n50:.0} | {n99:.0} |"
    )
    .unwrap();
    for (figure, (d50, d99)) in [
        (
            "request overhead beyond the round's raw round trip, check on (µs)",
            overhead_percentiles(&o.first, &o.raw_rtt),
        ),
        (
            "request overhead beyond the round's raw round trip, check off (µs)",
            overhead_percentiles(&o.first_nolate, &o.raw_rtt),
        ),
        (
            "late-subscriber check's cost on the first token, check on minus off in a round (µs)",
            overhead_percentiles(&o.first, &o.first_nolate),
        ),
    ] {
        writeln!(md, "| {figure} | {d50:.0} | {d99:.0} |").unwrap();
    }
    writeln!(md, "| inside the worker: message received → first token published, check on (µs) | {:.0} | {:.0} |", us(o.inside.p50), us(o.inside.p99)).unwrap();
    writeln!(md, "| inside the worker: message received → first token published, check off (µs) | {:.0} | {:.0} |", us(o.inside_nolate.p50), us(o.inside_nolate.p99)).unwrap();
    writeln!(md, "\n## Start, memory, end to end\n").unwrap();
    writeln!(
        md,
        "- start to registered (connect, subscribe, register): {:.1} ms",
        r.start_to_registered.as_secs_f64() * 1e3
    )
    .unwrap();
    writeln!(
        md,
        "- memory per in-flight stream ({} streams held open, RSS of the bench process): {:.1} KiB",
        r.held, r.per_stream_kib
    )
    .unwrap();
    match &r.e2e {
        Ok(e) => {
            let added = e.through_us - e.direct_us;
            let zero1 = r
                .zero
                .first()
                .map_or(0.0, |row| row.worker_us() - row.floor_us());
            writeln!(md, "- real MLX runtime, tiny model, {} rounds of {} tokens, one stream, median of {} gaps between consecutive tokens, rounds alternating on one runtime process: the runtime alone {:.0} µs; through the worker and NATS, as the client receives them, {:.0} µs; difference {:+.1} µs ({:+.2}% of the runtime's time per token)", e.rounds, e.tokens, e.gaps, e.direct_us, e.through_us, added, added / e.direct_us * 100.0).unwrap();
            writeln!(md, "- the worker's own cost per token at one stream (zero-latency row, worker minus raw floor): {zero1:.2} µs, {:.3}% of the runtime's time per token", zero1 / e.direct_us * 100.0).unwrap();
        }
        Err(why) => writeln!(md, "- real MLX runtime: {why}").unwrap(),
    }
    writeln!(
        md,
        "\n![tokens/s and µs per token against concurrency](load.svg)\n\nWhat bounds the figures that miss their targets, measured with a profiler: [profile.md](profile.md)."
    )
    .unwrap();
    md
}

/// The operating system and CPU model.
fn host() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{} / {cpu}", std::env::consts::OS)
}

/// Two panels against the stream count: tokens/s (top) and µs per token (bottom), each with
/// the worker (solid) and the raw floor (dashed).
pub(crate) fn svg(rows: &[Row]) -> String {
    let (w, panel_h, pad) = (640.0, 260.0, 50.0);
    let h = 2.0 * panel_h;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>\n"
    );
    let x = |i: usize| pad + i as f64 * (w - 2.0 * pad) / (rows.len().max(2) - 1) as f64;
    let mut panel = |top: f64,
                     title: &str,
                     worker: &dyn Fn(&Row) -> f64,
                     floor: &dyn Fn(&Row) -> f64| {
        let max = rows
            .iter()
            .flat_map(|r| [worker(r), floor(r)])
            .fold(1e-9, f64::max);
        let y = |v: f64| top + panel_h - pad - v / max * (panel_h - 2.0 * pad);
        let line = |pick: &dyn Fn(&Row) -> f64| {
            rows.iter()
                .enumerate()
                .map(|(i, r)| format!("{:.1},{:.1}", x(i), y(pick(r))))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let base = top + panel_h - pad;
        s += &format!(
            "<line x1=\"{pad}\" y1=\"{base}\" x2=\"{}\" y2=\"{base}\" stroke=\"black\"/>\n",
            w - pad
        );
        s += &format!(
            "<line x1=\"{pad}\" y1=\"{}\" x2=\"{pad}\" y2=\"{base}\" stroke=\"black\"/>\n",
            top + pad
        );
        s += &format!(
            "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\" points=\"{}\"/>\n",
            line(worker)
        );
        s += &format!(
            "<polyline fill=\"none\" stroke=\"#999\" stroke-width=\"2\" stroke-dasharray=\"6 4\" points=\"{}\"/>\n",
            line(floor)
        );
        for (i, r) in rows.iter().enumerate() {
            s += &format!(
                "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{} streams</text>\n",
                x(i),
                base + 18.0,
                r.streams
            );
            s += &format!(
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#1f77b4\">{:.3}</text>\n",
                x(i),
                y(worker(r)) - 6.0,
                worker(r)
            );
        }
        s += &format!(
            "<text x=\"{pad}\" y=\"{}\">{title} (max {max:.2}); solid: through the worker, dashed: raw async-nats floor</text>\n",
            top + pad - 20.0
        );
    };
    panel(0.0, "thousand tokens/s", &|r| r.worker_rate() / 1e3, &|r| {
        r.floor_rate() / 1e3
    });
    panel(panel_h, "µs per token", &|r| r.worker_us(), &|r| {
        r.floor_us()
    });
    s += "</svg>\n";
    s
}
