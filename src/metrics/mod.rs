//! The metrics collector: lifetime counters plus a rolling window of the most recent finished
//! requests, from which the heartbeat and the Prometheus export read latency percentiles, time
//! to first token, throughput and per-model figures; [`models`] holds the batching figures of
//! each model, and the rates taken from them.
//!
//! Pure bookkeeping: callers pass in the time (`Instant`s from the `Clock`); nothing here reads
//! a clock, does I/O or knows the wire format.

pub mod models;
pub mod prometheus;
pub mod telemetry;
#[cfg(test)]
mod tests;
mod window;

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use crate::limits::{METRICS_WINDOW_REQUESTS, MODEL_LABELS_MAX};
use crate::protocol::ErrorCode;

use window::WindowFigures;

/// How a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    /// With a `done` message.
    Success,
    /// With an `error` message carrying this code.
    Failed(ErrorCode),
    /// Its terminal message could not be delivered (the link was lost).
    Undeliverable,
}

impl Outcome {
    /// Whether this outcome tells of a fault of the worker or its engine (as opposed to the
    /// client's input, a cancel, load shedding, shutdown, or one model that cannot be loaded,
    /// which is withdrawn instead); only these make a worker degraded.
    pub fn is_fault(self) -> bool {
        match self {
            Outcome::Success => false,
            Outcome::Undeliverable => true,
            Outcome::Failed(code) => matches!(
                code,
                ErrorCode::EngineError
                    | ErrorCode::EngineCrashed
                    | ErrorCode::Timeout
                    | ErrorCode::InternalError
            ),
        }
    }
}

/// One finished request.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestRecord {
    /// The model it asked for.
    pub model: String,
    /// How it ended.
    pub outcome: Outcome,
    /// Receipt to terminal message.
    pub latency: Duration,
    /// Receipt to first token, when one was sent.
    pub time_to_first_token: Option<Duration>,
    /// Tokens sent.
    pub tokens: u64,
    /// When it finished.
    pub finished_at: Instant,
}

/// Latency figures over a set of samples.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Percentiles {
    /// Samples counted.
    pub count: usize,
    /// Smallest.
    pub min: Duration,
    /// Largest.
    pub max: Duration,
    /// Mean.
    pub avg: Duration,
    /// Median (nearest rank).
    pub p50: Duration,
    /// 95th percentile (nearest rank).
    pub p95: Duration,
    /// 99th percentile (nearest rank).
    pub p99: Duration,
}

impl Percentiles {
    /// Figures over `samples` (any order); all zero when empty.
    pub fn of(mut samples: Vec<Duration>) -> Percentiles {
        samples.sort_unstable();
        let total = samples.iter().sum();
        Percentiles::of_sorted(&samples, total)
    }

    /// Figures over samples already in order, whose sum is `total`.
    fn of_sorted(sorted: &[Duration], total: Duration) -> Percentiles {
        let count = sorted.len();
        let (Some(&min), Some(&max)) = (sorted.first(), sorted.last()) else {
            return Percentiles::default();
        };
        let rank = |p: usize| sorted[(count * p).div_ceil(100).clamp(1, count) - 1];
        Percentiles {
            count,
            min,
            max,
            avg: total / u32::try_from(count).unwrap_or(u32::MAX),
            p50: rank(50),
            p95: rank(95),
            p99: rank(99),
        }
    }
}

/// Figures for one model over the window.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelFigures {
    /// Requests finished.
    pub requests: usize,
    /// Of which failed.
    pub errors: usize,
    /// Mean latency of the successful ones.
    pub avg_latency: Duration,
    /// Tokens sent.
    pub tokens: u64,
}

/// A reading of the collector.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// Requests finished since start.
    pub total: u64,
    /// Of which succeeded.
    pub successes: u64,
    /// Failures since start, by code.
    pub errors_by_code: BTreeMap<ErrorCode, u64>,
    /// Requests whose terminal message could not be delivered, since start.
    pub undeliverable: u64,
    /// Tokens sent since start.
    pub tokens_total: u64,
    /// Latency of the window's successful requests.
    pub latency: Percentiles,
    /// Time to first token over the window.
    pub time_to_first_token: Percentiles,
    /// Tokens per second over the window's span.
    pub tokens_per_second: f64,
    /// Requests per second over the window's span.
    pub requests_per_second: f64,
    /// Per-model figures over the window.
    pub models: BTreeMap<String, ModelFigures>,
    /// Requests finished since start, by model and outcome (models past
    /// [`MODEL_LABELS_MAX`] distinct ones count under `other`).
    pub by_model_outcome: BTreeMap<(String, Outcome), u64>,
}

/// Collects finished requests.
#[derive(Debug)]
pub struct Collector {
    window: VecDeque<RequestRecord>,
    capacity: usize,
    total: u64,
    successes: u64,
    errors_by_code: BTreeMap<ErrorCode, u64>,
    undeliverable: u64,
    tokens_total: u64,
    by_model_outcome: BTreeMap<(String, Outcome), u64>,
    figures: WindowFigures,
}

impl Default for Collector {
    fn default() -> Self {
        Collector::with_capacity(METRICS_WINDOW_REQUESTS)
    }
}

impl Collector {
    /// A collector whose window keeps the last `capacity` requests.
    pub fn with_capacity(capacity: usize) -> Collector {
        assert!(capacity > 0, "a metrics window holds at least one request");
        Collector {
            window: VecDeque::with_capacity(capacity),
            capacity,
            total: 0,
            successes: 0,
            errors_by_code: BTreeMap::new(),
            undeliverable: 0,
            tokens_total: 0,
            by_model_outcome: BTreeMap::new(),
            figures: WindowFigures::default(),
        }
    }

    /// Records a finished request, evicting the oldest when the window is full.
    pub fn record(&mut self, record: RequestRecord) {
        self.total += 1;
        self.tokens_total += record.tokens;
        match record.outcome {
            Outcome::Success => self.successes += 1,
            Outcome::Failed(code) => *self.errors_by_code.entry(code).or_default() += 1,
            Outcome::Undeliverable => self.undeliverable += 1,
        }
        let known = self
            .by_model_outcome
            .keys()
            .any(|(m, _)| *m == record.model);
        let distinct = self
            .by_model_outcome
            .keys()
            .map(|(m, _)| m)
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        let label = if known || distinct < MODEL_LABELS_MAX {
            record.model.clone()
        } else {
            "other".to_owned()
        };
        *self
            .by_model_outcome
            .entry((label, record.outcome))
            .or_default() += 1;
        if self.window.len() == self.capacity
            && let Some(oldest) = self.window.pop_front()
        {
            self.figures.leave(&oldest);
        }
        self.figures.enter(&record);
        self.window.push_back(record);
    }

    /// Share of the requests finished within `period` before `now` that failed by a fault
    /// (see [`Outcome::is_fault`]), when at least `min_samples` finished in that period; else 0.
    /// Being time-bound, the ratio clears by itself once the faults age out.
    pub fn fault_ratio(&self, now: Instant, period: Duration, min_samples: usize) -> f64 {
        let recent = self
            .window
            .iter()
            .rev()
            .take_while(|r| now.saturating_duration_since(r.finished_at) <= period);
        let (mut count, mut faults) = (0usize, 0usize);
        for r in recent {
            count += 1;
            faults += usize::from(r.outcome.is_fault());
        }
        if count < min_samples.max(1) {
            return 0.0;
        }
        faults as f64 / count as f64
    }

    /// Reads every figure; the window's are kept as requests come and go, so a reading costs
    /// the same however full the window is (it is taken on every change of the figures).
    pub fn snapshot(&self) -> Snapshot {
        let span = match (self.window.front(), self.window.back()) {
            (Some(first), Some(last)) => {
                // The first request's start bounds the window's span from below.
                let start = first
                    .finished_at
                    .checked_sub(first.latency)
                    .unwrap_or(first.finished_at);
                last.finished_at.saturating_duration_since(start)
            }
            _ => Duration::ZERO,
        };
        let window_tokens = self.figures.tokens();
        let per_second = |n: f64| {
            if span.is_zero() {
                0.0
            } else {
                n / span.as_secs_f64()
            }
        };
        Snapshot {
            total: self.total,
            successes: self.successes,
            errors_by_code: self.errors_by_code.clone(),
            undeliverable: self.undeliverable,
            tokens_total: self.tokens_total,
            latency: self.figures.latency(),
            time_to_first_token: self.figures.time_to_first_token(),
            tokens_per_second: per_second(window_tokens as f64),
            requests_per_second: per_second(self.window.len() as f64),
            models: self.figures.models(),
            by_model_outcome: self.by_model_outcome.clone(),
        }
    }
}
