//! Lock-free counters and histograms that many tasks update (tokens, heartbeats, reconnects),
//! read by the Prometheus export. The per-request window stays in the dispatcher's `Collector`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency buckets, seconds.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Upper bounds of the inter-token buckets, seconds.
pub const INTER_TOKEN_BUCKETS: [f64; 10] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// A histogram with fixed buckets, updated with atomics.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// One count per bound, plus the overflow (`+Inf`) bucket.
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
}

/// A histogram's reading: cumulative bucket counts, as Prometheus wants them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HistogramReading {
    /// (upper bound in seconds, observations at or below it); the last bound is `+Inf`.
    pub buckets: Vec<(f64, u64)>,
    /// Sum of the observations, seconds.
    pub sum: f64,
    /// Observations.
    pub count: u64,
}

impl Histogram {
    /// An empty histogram with these bucket bounds (ascending).
    pub fn new(bounds: &'static [f64]) -> Histogram {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]));
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, value: Duration) {
        let secs = value.as_secs_f64();
        let slot = self
            .bounds
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(self.bounds.len());
        self.counts[slot].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(value.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// Reads the histogram.
    pub fn read(&self) -> HistogramReading {
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(self.counts.len());
        for (i, count) in self.counts.iter().enumerate() {
            cumulative += count.load(Ordering::Relaxed);
            let bound = self.bounds.get(i).copied().unwrap_or(f64::INFINITY);
            buckets.push((bound, cumulative));
        }
        HistogramReading {
            buckets,
            sum: self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
            count: cumulative,
        }
    }
}

/// The worker's shared counters.
#[derive(Debug)]
pub struct Telemetry {
    /// Receipt to terminal message, per finished request.
    pub request_duration: Histogram,
    /// Receipt to first token.
    pub time_to_first_token: Histogram,
    /// Between two consecutive tokens of one stream.
    pub inter_token: Histogram,
    /// Heartbeats published.
    pub heartbeats_sent: AtomicU64,
    /// Registrations published: the first after each (re)connection and the periodic ones.
    pub registrations_sent: AtomicU64,
    /// Registrations and heartbeats for this worker's id that another process published.
    pub id_conflicts: AtomicU64,
    /// Times the engine went from up to restarting.
    pub engine_restarts: AtomicU64,
    /// Models unloaded, by (model, reason).
    pub model_unloads: std::sync::Mutex<std::collections::BTreeMap<(String, &'static str), u64>>,
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry {
            request_duration: Histogram::new(&LATENCY_BUCKETS),
            time_to_first_token: Histogram::new(&LATENCY_BUCKETS),
            inter_token: Histogram::new(&INTER_TOKEN_BUCKETS),
            heartbeats_sent: AtomicU64::new(0),
            registrations_sent: AtomicU64::new(0),
            id_conflicts: AtomicU64::new(0),
            engine_restarts: AtomicU64::new(0),
            model_unloads: std::sync::Mutex::default(),
        }
    }
}

impl Telemetry {
    /// Counts an unload of `model` for `reason` (at most [`crate::limits::MODEL_LABELS_MAX`]
    /// models are told apart; the rest count under `other`).
    pub fn unloaded(&self, model: &str, reason: &'static str) {
        let mut unloads = self
            .model_unloads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let known = unloads.keys().any(|(m, _)| m == model);
        let distinct = unloads
            .keys()
            .map(|(m, _)| m.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        let model = if known || distinct < crate::limits::MODEL_LABELS_MAX {
            model
        } else {
            "other"
        };
        *unloads.entry((model.to_owned(), reason)).or_default() += 1;
    }

    /// The unload counts, by (model, reason).
    pub fn unloads(&self) -> Vec<(String, &'static str, u64)> {
        self.model_unloads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|((m, r), n)| (m.clone(), *r, *n))
            .collect()
    }
}

/// Adds one to a counter.
pub fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Reads a counter.
pub fn read(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}
