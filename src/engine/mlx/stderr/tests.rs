// Goal: each line of the runtime's stderr is logged at the level the runtime gave it: its
// log records by their level word, the traceback of a record with it, and anything else
// (lines libraries print) at info.
// Method: lines in the runtime's format (`<date> <time> <LEVEL> <logger>: <message>`, as
// `mlx_runtime/__main__.py` configures `logging`) fed in order to one reader of levels.

use tracing::Level;

use super::*;

/// Feeds `lines` in order and checks the level each one gets.
fn check(lines: &[(&str, Level)]) {
    let mut levels = LineLevels::default();
    for (line, expected) in lines {
        assert_eq!(levels.level(line), *expected, "{line:?}");
    }
}

#[test]
fn records_keep_their_level() {
    check(&[
        (
            "2026-01-02 03:04:05,678 ERROR mlx_runtime.models: loading x failed",
            Level::ERROR,
        ),
        (
            "2026-01-02 03:04:05,679 CRITICAL mlx_runtime: out of memory",
            Level::ERROR,
        ),
        (
            "2026-01-02 03:04:05,680 WARNING mlx_runtime.server: slow client",
            Level::WARN,
        ),
        (
            "2026-01-02 03:04:05,681 INFO mlx_runtime: exiting",
            Level::INFO,
        ),
        (
            "2026-01-02 03:04:05,682 DEBUG mlx_runtime.streams: s-1 queued",
            Level::DEBUG,
        ),
    ]);
}

#[test]
fn lines_outside_records_are_info() {
    check(&[
        ("MLX Runtime ready", Level::INFO),
        ("", Level::INFO),
        ("ERROR something printed", Level::INFO),
        (
            "2026-01-02 03:04:05,678 NOTICE mlx_runtime: unknown level word",
            Level::INFO,
        ),
        ("2026-01-02 ERROR mlx_runtime: no time", Level::INFO),
        ("Fetching 3 files: 100%", Level::INFO),
    ]);
}

#[test]
fn a_traceback_keeps_the_level_of_its_record() {
    check(&[
        (
            "2026-01-02 03:04:05,678 ERROR mlx_runtime.models: loading x failed",
            Level::ERROR,
        ),
        ("Traceback (most recent call last):", Level::ERROR),
        (
            "  File \"/venv/mlx_lm/utils.py\", line 1, in load",
            Level::ERROR,
        ),
        ("    raise FileNotFoundError(path)", Level::ERROR),
        ("FileNotFoundError: No safetensors found", Level::ERROR),
        // A chained exception continues the same record.
        ("", Level::ERROR),
        (
            "During handling of the above exception, another exception occurred:",
            Level::ERROR,
        ),
        ("", Level::ERROR),
        ("Traceback (most recent call last):", Level::ERROR),
        ("  File \"x.py\", line 2, in f", Level::ERROR),
        ("ValueError: bad", Level::ERROR),
        // The record is over.
        ("printed by a library", Level::INFO),
        ("  indented, but in no traceback", Level::INFO),
    ]);
}

#[test]
fn a_traceback_ends_at_the_next_record() {
    check(&[
        (
            "2026-01-02 03:04:05,678 WARNING mlx_runtime: retrying",
            Level::WARN,
        ),
        ("Traceback (most recent call last):", Level::WARN),
        ("  File \"x.py\", line 2, in f", Level::WARN),
        (
            "2026-01-02 03:04:05,679 INFO mlx_runtime: exiting",
            Level::INFO,
        ),
        ("  File \"y.py\", line 3, in g", Level::INFO),
    ]);
}

#[test]
fn a_traceback_without_a_record_is_info() {
    check(&[
        ("Traceback (most recent call last):", Level::INFO),
        ("  File \"x.py\", line 2, in f", Level::INFO),
        ("KeyError: 'x'", Level::INFO),
    ]);
}

#[test]
fn the_tail_keeps_the_last_lines_each_cut_to_its_bound() {
    let tail = Tail::default();
    assert_eq!(tail.text(), "");
    for n in 0..20 {
        tail.push(&format!("line {n}"));
    }
    let text = tail.text();
    assert!(text.starts_with("line 8 | line 9"), "{text}");
    assert!(text.ends_with("line 19"), "{text}");
    tail.push(&"é".repeat(300));
    let last = tail
        .text()
        .rsplit(" | ")
        .next()
        .unwrap_or_default()
        .to_owned();
    assert!(last.len() <= TAIL_LINE_BYTES_MAX && last.chars().all(|c| c == 'é'));
}
