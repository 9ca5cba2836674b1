//! The Prometheus text exposition (format 0.0.4) of the worker's figures. Pure: it renders a
//! [`MetricsView`] gathered by the worker; names carry their unit (`_seconds`, `_total`).

use std::fmt::Write;

use super::telemetry::HistogramReading;
use super::{Outcome, Snapshot};

/// Everything `/metrics` shows, read at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MetricsView {
    /// The worker id (a label of `mlx_worker_info`).
    pub worker_id: String,
    /// The crate version.
    pub version: String,
    /// The lifecycle state's name.
    pub lifecycle: String,
    /// Whether the worker takes work.
    pub ready: bool,
    /// The collector's reading.
    pub snapshot: Snapshot,
    /// Requests running.
    pub running: usize,
    /// Requests waiting.
    pub queued: usize,
    /// Bound of the queue.
    pub queue_capacity: usize,
    /// Requests that may run at once.
    pub inflight_capacity: usize,
    /// Inbound messages dropped because their request id was unreadable.
    pub unreadable: u64,
    /// Duplicates of in-flight request ids.
    pub duplicates: u64,
    /// Unreadable cancel messages.
    pub bad_cancels: u64,
    /// Reconnects to the message server.
    pub reconnects: u64,
    /// Heartbeats published.
    pub heartbeats_sent: u64,
    /// Registrations published.
    pub registrations_sent: u64,
    /// Engine restarts.
    pub engine_restarts: u64,
    /// Receipt to terminal.
    pub request_duration: HistogramReading,
    /// Receipt to first token.
    pub time_to_first_token: HistogramReading,
    /// Between consecutive tokens.
    pub inter_token: HistogramReading,
}

/// Escapes a label value.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn outcome_label(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Success => "success",
        Outcome::Failed(_) => "error",
        Outcome::Undeliverable => "undeliverable",
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn single(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    header(out, name, kind, help);
    let _ = writeln!(out, "{name} {value}");
}

fn histogram(out: &mut String, name: &str, help: &str, h: &HistogramReading) {
    header(out, name, "histogram", help);
    for (bound, count) in &h.buckets {
        let le = if bound.is_infinite() {
            "+Inf".to_owned()
        } else {
            bound.to_string()
        };
        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {count}");
    }
    let _ = writeln!(out, "{name}_sum {}", h.sum);
    let _ = writeln!(out, "{name}_count {}", h.count);
}

/// Renders the view.
pub fn render(v: &MetricsView) -> String {
    let mut out = String::with_capacity(8 * 1024);
    header(
        &mut out,
        "mlx_worker_info",
        "gauge",
        "Worker identity (always 1).",
    );
    let _ = writeln!(
        out,
        "mlx_worker_info{{worker_id=\"{}\",version=\"{}\",lifecycle=\"{}\"}} 1",
        label(&v.worker_id),
        label(&v.version),
        label(&v.lifecycle)
    );
    single(
        &mut out,
        "mlx_worker_ready",
        "gauge",
        "1 when the worker takes work.",
        u8::from(v.ready),
    );

    header(
        &mut out,
        "mlx_worker_requests_total",
        "counter",
        "Requests finished, by model and outcome.",
    );
    let mut by_label: std::collections::BTreeMap<(&str, &str), u64> = Default::default();
    for ((model, outcome), n) in &v.snapshot.by_model_outcome {
        *by_label
            .entry((model, outcome_label(*outcome)))
            .or_default() += n;
    }
    for ((model, outcome), n) in by_label {
        let _ = writeln!(
            out,
            "mlx_worker_requests_total{{model=\"{}\",outcome=\"{outcome}\"}} {n}",
            label(model)
        );
    }
    header(
        &mut out,
        "mlx_worker_errors_total",
        "counter",
        "Requests that ended with an error, by code.",
    );
    for (code, n) in &v.snapshot.errors_by_code {
        let _ = writeln!(out, "mlx_worker_errors_total{{code=\"{code}\"}} {n}");
    }
    single(
        &mut out,
        "mlx_worker_undeliverable_total",
        "counter",
        "Requests whose terminal message could not be delivered.",
        v.snapshot.undeliverable,
    );
    single(
        &mut out,
        "mlx_worker_tokens_generated_total",
        "counter",
        "Tokens sent to clients.",
        v.snapshot.tokens_total,
    );
    single(
        &mut out,
        "mlx_worker_requests_in_flight",
        "gauge",
        "Requests running now.",
        v.running,
    );
    single(
        &mut out,
        "mlx_worker_queue_depth",
        "gauge",
        "Requests waiting for a slot.",
        v.queued,
    );
    single(
        &mut out,
        "mlx_worker_queue_capacity",
        "gauge",
        "Requests that may wait.",
        v.queue_capacity,
    );
    single(
        &mut out,
        "mlx_worker_inflight_capacity",
        "gauge",
        "Requests that may run at once.",
        v.inflight_capacity,
    );
    header(
        &mut out,
        "mlx_worker_intake_rejected_total",
        "counter",
        "Inbound messages that never became requests, by reason.",
    );
    for (reason, n) in [
        ("unreadable", v.unreadable),
        ("duplicate", v.duplicates),
        ("bad_cancel", v.bad_cancels),
    ] {
        let _ = writeln!(
            out,
            "mlx_worker_intake_rejected_total{{reason=\"{reason}\"}} {n}"
        );
    }
    single(
        &mut out,
        "mlx_worker_reconnects_total",
        "counter",
        "Reconnects to the message server.",
        v.reconnects,
    );
    single(
        &mut out,
        "mlx_worker_heartbeats_sent_total",
        "counter",
        "Heartbeats published.",
        v.heartbeats_sent,
    );
    single(
        &mut out,
        "mlx_worker_registrations_sent_total",
        "counter",
        "Registrations published.",
        v.registrations_sent,
    );
    single(
        &mut out,
        "mlx_worker_engine_restarts_total",
        "counter",
        "Times the engine restarted after a failure.",
        v.engine_restarts,
    );
    histogram(
        &mut out,
        "mlx_worker_request_duration_seconds",
        "Receipt of a request to its terminal message.",
        &v.request_duration,
    );
    histogram(
        &mut out,
        "mlx_worker_time_to_first_token_seconds",
        "Receipt of a request to its first token.",
        &v.time_to_first_token,
    );
    histogram(
        &mut out,
        "mlx_worker_inter_token_seconds",
        "Time between two tokens of one stream.",
        &v.inter_token,
    );
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::super::telemetry::{Histogram, LATENCY_BUCKETS};
    use super::*;
    use crate::protocol::ErrorCode;

    #[test]
    fn the_exposition_is_pinned() {
        let h = Histogram::new(&LATENCY_BUCKETS);
        h.observe(Duration::from_millis(7));
        h.observe(Duration::from_millis(300));
        h.observe(Duration::from_secs(60));
        let view = MetricsView {
            worker_id: "w-1".to_owned(),
            version: "0.1.0".to_owned(),
            lifecycle: "ready".to_owned(),
            ready: true,
            snapshot: Snapshot {
                errors_by_code: BTreeMap::from([(ErrorCode::QueueFull, 2)]),
                tokens_total: 40,
                by_model_outcome: BTreeMap::from([
                    (("org/m\"x".to_owned(), Outcome::Success), 3),
                    (
                        ("org/m\"x".to_owned(), Outcome::Failed(ErrorCode::QueueFull)),
                        2,
                    ),
                ]),
                ..Snapshot::default()
            },
            running: 1,
            queue_capacity: 100,
            inflight_capacity: 8,
            request_duration: h.read(),
            ..MetricsView::default()
        };
        insta::assert_snapshot!(render(&view));
    }
}
