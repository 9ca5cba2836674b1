//! The reports: `docs/benchmarks/load.md`'s text and `load.svg`'s chart, from a [`Report`],
//! `batching.md` and `batching.svg`, from a [`Batching`], and `sessions.md` and `sessions.svg`,
//! from a [`Sessions`]. Formatting only; every figure is computed in `measurement`, `batching`
//! and `sessions`.

use std::fmt::Write as _;
use std::time::Duration;

use testkit::nats::nats_server_version;

use crate::anchor::server_args;
use crate::batching::{ANCHOR, Batching, Figures, SAMPLING, System, Table, Target};
use crate::harness::PACE;
use crate::measurement::{Report, Row, overhead_percentiles, percentile};
use crate::sessions::{SessionTable, Sessions};
use crate::warmup::WarmUp;

/// A report's first line: what ran (`command`, with `--test` when `quick`), where.
pub(crate) fn header(command: &str, quick: bool) -> String {
    let test = match (quick, command.contains(" -- ")) {
        (false, _) => "",
        (true, true) => " --test",
        (true, false) => " -- --test",
    };
    format!(
        "One run of `{command}{test}`{} on {} ({} CPUs), nats-server {} on loopback.",
        if quick { " (tiny sizes)" } else { "" },
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

/// How a chart line is drawn.
#[derive(Clone, Copy)]
pub(crate) enum Line {
    /// Solid blue, its values written beside its points.
    Solid,
    /// Dashed grey.
    Dashed,
    /// Dotted red.
    Dotted,
}

impl Line {
    /// Its name in the legend.
    fn name(self) -> &'static str {
        match self {
            Line::Solid => "solid",
            Line::Dashed => "dashed",
            Line::Dotted => "dotted",
        }
    }

    /// Its SVG stroke attributes.
    fn stroke(self) -> &'static str {
        match self {
            Line::Solid => "stroke=\"#1f77b4\" stroke-width=\"2\"",
            Line::Dashed => "stroke=\"#999\" stroke-width=\"2\" stroke-dasharray=\"6 4\"",
            Line::Dotted => "stroke=\"#d62728\" stroke-width=\"2\" stroke-dasharray=\"2 3\"",
        }
    }
}

/// One line of a chart panel: a value per point of the x axis.
pub(crate) struct Series {
    pub(crate) line: Line,
    pub(crate) label: String,
    pub(crate) values: Vec<f64>,
}

/// One panel of a chart.
pub(crate) struct Panel {
    pub(crate) title: String,
    pub(crate) series: Vec<Series>,
    /// Decimals of the values written beside the solid line's points.
    pub(crate) decimals: usize,
}

/// Panels stacked, each with its lines against the same x axis (`x_labels`, evenly spaced);
/// each panel's y axis runs from 0 to its largest value.
pub(crate) fn chart(x_labels: &[String], panels: &[Panel]) -> String {
    let (w, panel_h, pad) = (640.0, 260.0, 50.0);
    let h = panels.len() as f64 * panel_h;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>\n"
    );
    let x = |i: usize| pad + i as f64 * (w - 2.0 * pad) / (x_labels.len().max(2) - 1) as f64;
    for (p, panel) in panels.iter().enumerate() {
        let top = p as f64 * panel_h;
        let max = panel
            .series
            .iter()
            .flat_map(|l| l.values.iter().copied())
            .fold(1e-9, f64::max);
        let y = |v: f64| top + panel_h - pad - v / max * (panel_h - 2.0 * pad);
        let base = top + panel_h - pad;
        s += &format!(
            "<line x1=\"{pad}\" y1=\"{base}\" x2=\"{}\" y2=\"{base}\" stroke=\"black\"/>\n",
            w - pad
        );
        s += &format!(
            "<line x1=\"{pad}\" y1=\"{}\" x2=\"{pad}\" y2=\"{base}\" stroke=\"black\"/>\n",
            top + pad
        );
        for series in &panel.series {
            let points: Vec<String> = series
                .values
                .iter()
                .enumerate()
                .map(|(i, v)| format!("{:.1},{:.1}", x(i), y(*v)))
                .collect();
            s += &format!(
                "<polyline fill=\"none\" {} points=\"{}\"/>\n",
                series.line.stroke(),
                points.join(" ")
            );
        }
        for (i, label) in x_labels.iter().enumerate() {
            s += &format!(
                "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{label}</text>\n",
                x(i),
                base + 18.0
            );
            let labelled = panel
                .series
                .iter()
                .filter(|l| matches!(l.line, Line::Solid));
            for v in labelled.filter_map(|l| l.values.get(i)) {
                s += &format!(
                    "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#1f77b4\">{v:.*}</text>\n",
                    x(i),
                    y(*v) - 6.0,
                    panel.decimals
                );
            }
        }
        let legend: Vec<String> = panel
            .series
            .iter()
            .map(|l| format!("{}: {}", l.line.name(), l.label))
            .collect();
        s += &format!(
            "<text x=\"{pad}\" y=\"{}\">{} (max {max:.2})</text>\n<text x=\"{pad}\" y=\"{}\">{}</text>\n",
            top + pad - 26.0,
            panel.title,
            top + pad - 12.0,
            legend.join(", ")
        );
    }
    s += "</svg>\n";
    s
}

/// `load.svg`: two panels against the stream count, tokens/s (top) and µs per token
/// (bottom), each with the worker (solid) and the raw floor (dashed).
pub(crate) fn svg(rows: &[Row]) -> String {
    let x_labels: Vec<String> = rows
        .iter()
        .map(|r| format!("{} streams", r.streams))
        .collect();
    let panel = |title: &str, worker: &dyn Fn(&Row) -> f64, floor: &dyn Fn(&Row) -> f64| Panel {
        title: title.to_owned(),
        decimals: 3,
        series: vec![
            Series {
                line: Line::Solid,
                label: "through the worker".into(),
                values: rows.iter().map(worker).collect(),
            },
            Series {
                line: Line::Dashed,
                label: "raw async-nats floor".into(),
                values: rows.iter().map(floor).collect(),
            },
        ],
    };
    chart(
        &x_labels,
        &[
            panel("thousand tokens/s", &|r| r.worker_rate() / 1e3, &|r| {
                r.floor_rate() / 1e3
            }),
            panel("µs per token", &|r| r.worker_us(), &|r| r.floor_us()),
        ],
    )
}

/// `batching.md`'s text.
pub(crate) fn batching_markdown(header: String, b: &Batching) -> String {
    let mut md = String::new();
    writeln!(md, "# Batching bench\n\n{header}\n").unwrap();
    let anchor = server_args(ANCHOR, "<model directory>", "<port>").join(" ");
    writeln!(md, "The same model, prompts and requests on three systems, sampling at temperature {:.1} (top-p {:.1}), a row's requests sent at once; rounds interleave the systems, their order turning each round.\n", SAMPLING.temperature, SAMPLING.top_p.unwrap_or(1.0)).unwrap();
    writeln!(md, "- mlx_lm.server {}, from the project's venv: `python {anchor}`, driven over HTTP (OpenAI-compatible streaming completions);", b.anchor_version).unwrap();
    for settings in &b.settings {
        writeln!(md, "- {settings}, driven over NATS as a client drives it;").unwrap();
    }
    writeln!(md, "\ntokens/s: tokens generated (mlx_lm.server's `usage`; behind the worker, counted at its engine) per second from a row's first request sent to its last stream's end, median of the rounds. TTFT: request sent → first text the client receives, over every request of the row. Inter-token: between consecutive pieces of text a client receives, over every stream (a token whose text is not complete yet arrives with the next).\n").unwrap();
    table(&mut md, "Tiny model", &b.tiny);
    writeln!(md, "On this CPU the `mlx[cpu]` wheel's reference BLAS makes a larger model compute-bound: a step costs about its batch's tokens times a token's multiply-adds, so batching gains only 1.2–1.7× there.\n").unwrap();
    table(&mut md, "Larger random model", &b.larger);
    writeln!(
        md,
        "![tokens/s and TTFT against concurrent requests](batching.svg)"
    )
    .unwrap();
    md
}

/// One model's section: its table and its targets, or why it was not measured.
fn table(md: &mut String, title: &str, t: &Result<Table, String>) {
    let t = match t {
        Ok(t) => t,
        Err(why) => {
            writeln!(md, "## {title}\n\n{why}\n").unwrap();
            return;
        }
    };
    writeln!(md, "## {title}: {}\n", t.model).unwrap();
    writeln!(
        md,
        "{}; rounds: {}; tokens a request at most: {}.\n",
        t.about, t.rounds, t.max_tokens
    )
    .unwrap();
    writeln!(md, "| concurrent | system | requests | tokens | tokens/s | TTFT p50 (ms) | TTFT p99 (ms) | inter-token p99 (ms) |").unwrap();
    writeln!(md, "|---:|---|---:|---:|---:|---:|---:|---:|").unwrap();
    let ms = |d: Option<Duration>| {
        d.map_or("–".to_owned(), |d| {
            format!("{:.1}", d.as_secs_f64() * 1e3)
        })
    };
    for f in &t.rows {
        writeln!(
            md,
            "| {} | {} | {} | {} | {:.0} | {} | {} | {} |",
            f.streams,
            f.system.label(),
            f.requests,
            f.tokens,
            f.tokens_per_s,
            ms(f.ttft_p50),
            ms(f.ttft_p99),
            ms(f.itl_p99)
        )
        .unwrap();
    }
    let resets: u32 = t.rows.iter().map(|f| f.resets).sum();
    if resets > 0 {
        writeln!(md, "\nmlx_lm.server reset {resets} connections of its bursts before answering (its listen backlog holds 5); those requests were sent again at once, their TTFT counted from the first attempt.").unwrap();
    }
    writeln!(md, "\nTargets (the batched worker):\n").unwrap();
    for target in &t.targets {
        writeln!(md, "- {}", target_line(target)).unwrap();
    }
    writeln!(md).unwrap();
}

/// A target, its figure and whether it was met.
pub(crate) fn target_line(t: &Target) -> String {
    match &t.figure {
        Ok(figure) => format!(
            "{}: {figure}, {}",
            t.what,
            if t.met { "met" } else { "missed" }
        ),
        Err(why) => format!("{}: not measured ({why}), missed", t.what),
    }
}

/// `batching.svg`: tokens/s and TTFT p50 against concurrent requests, one pair of panels a
/// measured model, each with the three systems.
pub(crate) fn batching_svg(b: &Batching) -> String {
    let tables: Vec<&Table> = [&b.tiny, &b.larger].into_iter().flatten().collect();
    let Some(first) = tables.first() else {
        return chart(&[], &[]);
    };
    let mut streams: Vec<usize> = first.rows.iter().map(|f| f.streams).collect();
    streams.dedup();
    let x_labels: Vec<String> = streams.iter().map(|s| format!("{s} concurrent")).collect();
    let mut panels = Vec::new();
    for t in tables {
        let series = |pick: &dyn Fn(&Figures) -> f64| {
            [
                (System::Batched, Line::Solid),
                (System::Anchor, Line::Dashed),
                (System::Serial, Line::Dotted),
            ]
            .map(|(system, line)| Series {
                line,
                label: system.label().to_owned(),
                values: t
                    .rows
                    .iter()
                    .filter(|f| f.system == system)
                    .map(pick)
                    .collect(),
            })
            .into()
        };
        panels.push(Panel {
            title: format!("tokens/s, {}", t.model),
            series: series(&|f| f.tokens_per_s),
            decimals: 1,
        });
        panels.push(Panel {
            title: format!("TTFT p50 (ms), {}", t.model),
            series: series(&|f| f.ttft_p50.map_or(0.0, |d| d.as_secs_f64() * 1e3)),
            decimals: 0,
        });
    }
    chart(&x_labels, &panels)
}

/// `sessions.md`: per model, each turn's prompt and cached tokens and its first token cold and
/// warm, then the targets.
pub(crate) fn sessions_markdown(header: String, s: &Sessions) -> String {
    let mut md = String::new();
    writeln!(md, "# Prefix cache bench\n\n{header}\n").unwrap();
    md.push_str(
        "Four-turn conversations, each turn's prompt built as the \
         controller builds it (every user message so far joined with a newline), greedy, each \
         turn sent to a worker with the prefix cache (with the conversation's `sessionId`) and \
         to one without it (cold), which goes first alternating; a warm-up request on each \
         first. Prompt tokens and cached tokens: the warm worker's `done` (`promptTokens`, \
         `cachedTokens`), mean over the conversations. TTFT: request sent → first token, p50 \
         over the conversations.\n\n",
    );
    for note in &s.settings {
        writeln!(md, "- {note}").unwrap();
    }
    for table in &s.tables {
        match table {
            Err(why) => writeln!(md, "\n{why}").unwrap(),
            Ok(t) => {
                writeln!(
                    md,
                    "\n## {}\n\n{}; conversations: {}.\n",
                    t.model, t.about, t.conversations
                )
                .unwrap();
                md.push_str(
                    "| turn | prompt tokens | cached tokens | prefill avoided | TTFT cold (ms) | TTFT warm (ms) | cold / warm |\n|---:|---:|---:|---:|---:|---:|---:|\n",
                );
                for r in &t.rows {
                    writeln!(
                        md,
                        "| {} | {:.0} | {:.0} | {:.0}% | {:.1} | {:.1} | {:.2}× |",
                        r.turn,
                        r.prompt_tokens,
                        r.cached_tokens,
                        100.0 * r.cached_tokens / r.prompt_tokens.max(1.0),
                        r.ttft_cold.as_secs_f64() * 1e3,
                        r.ttft_warm.as_secs_f64() * 1e3,
                        r.speedup()
                    )
                    .unwrap();
                }
                writeln!(md, "\nTargets:\n").unwrap();
                for target in &t.targets {
                    writeln!(md, "- {}", target_line(target)).unwrap();
                }
            }
        }
    }
    md.push_str("\n![TTFT per turn, cold and warm](sessions.svg)\n");
    md
}

/// `sessions.svg`: TTFT p50 per turn, warm (solid) and cold (dashed), a panel per model.
pub(crate) fn sessions_svg(s: &Sessions) -> String {
    let tables: Vec<&SessionTable> = s.tables.iter().flatten().collect();
    let Some(first) = tables.first() else {
        return chart(&[], &[]);
    };
    let x_labels: Vec<String> = first
        .rows
        .iter()
        .map(|r| format!("turn {}", r.turn))
        .collect();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let panels: Vec<Panel> = tables
        .iter()
        .map(|t| Panel {
            title: format!("TTFT p50 (ms), {}", t.model),
            series: vec![
                Series {
                    line: Line::Solid,
                    label: "prefix cache".to_owned(),
                    values: t.rows.iter().map(|r| ms(r.ttft_warm)).collect(),
                },
                Series {
                    line: Line::Dashed,
                    label: "cold".to_owned(),
                    values: t.rows.iter().map(|r| ms(r.ttft_cold)).collect(),
                },
            ],
            decimals: 1,
        })
        .collect();
    chart(&x_labels, &panels)
}

/// `warmup.md`: the first request after preload against the steady state, with and without
/// the load's warm-up.
pub(crate) fn warm_up_markdown(header: String, w: &WarmUp) -> String {
    let mut md = String::new();
    writeln!(md, "# Warm-up bench\n\n{header}\n").unwrap();
    md.push_str(
        "A worker preloads the tiny model with its runtime on an empty MLX kernel cache (a \
         temporary directory of its own, where MLX on the CPU keeps the kernels it compiles), \
         as on a fresh host; once its preload has ended, it serves one request after another \
         (8 tokens, the worker's default sampling). TTFT: request sent → first token; the \
         steady state is the p50 of the requests after the first. Preloaded after: from the \
         worker's start, its runtime's included, to the end of its preload.\n\n",
    );
    for note in &w.settings {
        writeln!(md, "- {note}").unwrap();
    }
    md.push_str(
        "\n| worker | preloaded after (ms) | first request TTFT (ms) | steady TTFT p50 (ms) | first / steady |\n|---|---:|---:|---:|---:|\n",
    );
    for row in &w.rows {
        match row {
            Err(why) => writeln!(md, "| {why} | | | | |").unwrap(),
            Ok(r) => writeln!(
                md,
                "| {} | {:.0} | {:.1} | {:.1} | {:.2}× |",
                r.label,
                r.preloaded_after.as_secs_f64() * 1e3,
                r.first.as_secs_f64() * 1e3,
                r.steady.as_secs_f64() * 1e3,
                r.ratio()
            )
            .unwrap(),
        }
    }
    writeln!(md, "\nTargets:\n").unwrap();
    for target in &w.targets {
        writeln!(md, "- {}", target_line(target)).unwrap();
    }
    md
}
