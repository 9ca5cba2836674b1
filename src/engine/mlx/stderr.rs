//! The runtime's stderr: its readiness line, and its log lines forwarded into the worker's
//! log (target `mlx_worker::runtime`, prefixed `runtime:`) at the level the runtime gave them.
//!
//! The runtime logs with Python's `logging` in the format `mlx_runtime/__main__.py` sets:
//! `<date> <time> <LEVEL> <logger>: <message>`. A record logged with its exception continues
//! over the lines of the traceback, which keep the record's level; any other line (what a
//! library prints) is logged at info.
//!
//! It owns the reading of the pipe only: the child is the supervisor's (`supervisor`).

#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::io::BufReader;
use tokio::process::ChildStderr;
use tokio::sync::oneshot;
use tracing::{Level, debug, error, info, warn};

use crate::engine::rpc::{self, Line};

/// The line the runtime prints on stderr once it reads stdin.
const READY_LINE: &str = "MLX Runtime ready";
/// Longest stderr line forwarded to the log.
const STDERR_LINE_BYTES_MAX: usize = 64 * 1024;

/// Lines the tail keeps.
const TAIL_LINES: usize = 12;
/// Longest line the tail keeps, in bytes (longer ones are cut).
const TAIL_LINE_BYTES_MAX: usize = 400;

/// The child's last stderr lines, for the message when it dies before it is ready.
#[derive(Debug, Default)]
pub(super) struct Tail {
    lines: Mutex<VecDeque<String>>,
}

impl Tail {
    fn push(&self, line: &str) {
        let mut cut = line.len().min(TAIL_LINE_BYTES_MAX);
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        let Ok(mut lines) = self.lines.lock() else {
            return;
        };
        if lines.len() == TAIL_LINES {
            lines.pop_front();
        }
        lines.push_back(line[..cut].to_owned());
    }

    /// The lines kept, oldest first, joined with ` | `; empty when there were none.
    pub(super) fn text(&self) -> String {
        self.lines
            .lock()
            .map(|lines| {
                lines
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join(" | ")
            })
            .unwrap_or_default()
    }
}

/// Forwards the child's stderr lines into the log, keeps the last ones in `tail` and reports
/// its readiness line; returns at the end of the pipe.
pub(super) async fn forward(stderr: ChildStderr, ready: oneshot::Sender<()>, tail: Arc<Tail>) {
    let mut ready = Some(ready);
    let mut reader = BufReader::new(stderr);
    let mut buf = Vec::new();
    let mut levels = LineLevels::default();
    loop {
        match rpc::read_line(&mut reader, &mut buf, STDERR_LINE_BYTES_MAX).await {
            Ok(Line::Complete(bytes)) => {
                let text = String::from_utf8_lossy(&bytes);
                let text = text.trim_end();
                if text == READY_LINE
                    && let Some(tx) = ready.take()
                {
                    let _ = tx.send(());
                }
                log(levels.level(text), text);
                if !text.is_empty() {
                    tail.push(text);
                }
            }
            Ok(Line::TooLong { len }) => warn!(len, "runtime: (stderr line too long, skipped)"),
            Ok(Line::Eof) | Err(_) => return,
        }
    }
}

/// Logs one runtime line at `level`.
fn log(level: Level, text: &str) {
    const TARGET: &str = "mlx_worker::runtime";
    match level {
        Level::ERROR => error!(target: TARGET, "runtime: {text}"),
        Level::WARN => warn!(target: TARGET, "runtime: {text}"),
        Level::DEBUG | Level::TRACE => debug!(target: TARGET, "runtime: {text}"),
        Level::INFO => info!(target: TARGET, "runtime: {text}"),
    }
}

/// The first line of a Python traceback.
const TRACEBACK_START: &str = "Traceback (most recent call last):";
/// The lines that join the tracebacks of chained exceptions.
const TRACEBACK_CHAINS: [&str; 2] = [
    "During handling of the above exception, another exception occurred:",
    "The above exception was the direct cause of the following exception:",
];

/// The levels of the runtime's stderr lines, read in order: a traceback's lines take the
/// level of the record they follow.
#[derive(Debug, Default)]
struct LineLevels {
    state: Place,
}

/// Where the last line was.
#[derive(Clone, Copy, Debug, Default)]
enum Place {
    /// In no record.
    #[default]
    Outside,
    /// A record's first line, of this level.
    Record(Level),
    /// Inside the traceback of a record of this level (after its first line).
    Traceback(Level),
    /// Just past a traceback's exception line, where a chained traceback may follow.
    AfterTraceback(Level),
}

impl LineLevels {
    /// The level of the next line.
    fn level(&mut self, line: &str) -> Level {
        if let Some(level) = record_level(line) {
            self.state = Place::Record(level);
            return level;
        }
        let (next, level) = match self.state {
            Place::Record(level) | Place::AfterTraceback(level) if line == TRACEBACK_START => {
                (Place::Traceback(level), level)
            }
            // Frames are indented; the first line that is not names the exception.
            Place::Traceback(level) if line.starts_with([' ', '\t']) => {
                (Place::Traceback(level), level)
            }
            Place::Traceback(level) => (Place::AfterTraceback(level), level),
            Place::AfterTraceback(level) if line.is_empty() || TRACEBACK_CHAINS.contains(&line) => {
                (Place::AfterTraceback(level), level)
            }
            _ => (Place::Outside, Level::INFO),
        };
        self.state = next;
        level
    }
}

/// The level of a line that starts a log record (`<date> <time> <LEVEL> <rest>`, the date
/// as `YYYY-MM-DD` and the time as `HH:MM:SS…`); `None` for any other line.
fn record_level(line: &str) -> Option<Level> {
    let mut words = line.splitn(4, ' ');
    let (date, time, level, _rest) = (words.next()?, words.next()?, words.next()?, words.next()?);
    let digits_at = |s: &str, at: &[usize]| at.iter().all(|&i| s.as_bytes()[i].is_ascii_digit());
    let date_ok = date.len() == 10
        && date.as_bytes()[4] == b'-'
        && date.as_bytes()[7] == b'-'
        && digits_at(date, &[0, 1, 2, 3, 5, 6, 8, 9]);
    let time_ok = time.len() >= 8
        && time.as_bytes()[2] == b':'
        && time.as_bytes()[5] == b':'
        && digits_at(time, &[0, 1, 3, 4, 6, 7]);
    if !(date_ok && time_ok) {
        return None;
    }
    match level {
        "CRITICAL" | "ERROR" => Some(Level::ERROR),
        "WARNING" => Some(Level::WARN),
        "INFO" => Some(Level::INFO),
        "DEBUG" => Some(Level::DEBUG),
        _ => None,
    }
}
