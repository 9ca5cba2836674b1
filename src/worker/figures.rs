//! The worker's figures: what the dispatcher knows of its load and history, published on a
//! `watch` channel after each change and read without waiting by the heartbeat (`presence`),
//! the `$SRV.STATS` answer (`service`) and `/metrics` (the `Observer`).
//!
//! The dispatcher is the only writer. A reader borrows the last published [`Figures`], so no
//! reader can hold up the dispatcher or be held up by it; outside a run the channel holds the
//! defaults. A reader puts each model's requests beside the engine's figures of the model
//! ([`Figures::model_loads`]), read from the engine when it reads the figures.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use crate::engine;
use crate::limits::{FAULT_WINDOW, METRICS_WINDOW_REQUESTS, MODEL_LABELS_MAX};
use crate::metrics::Snapshot;
use crate::metrics::models::{ModelLoad, ModelRates};
use crate::protocol::ModelMetrics;
use crate::scheduler::ModelCount;

/// Counts of inbound messages that never became requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IntakeCounters {
    /// Messages whose request id could not be read.
    pub unreadable: u64,
    /// Requests whose id was already in flight.
    pub duplicates: u64,
    /// Cancel messages that could not be read.
    pub bad_cancels: u64,
    /// Refusals published without waiting for a listener, because too many were pending.
    pub refusals_unprotected: u64,
    /// Work-queue messages handed back because no slot was free when they arrived.
    pub handed_back: u64,
}

/// Everything the dispatcher tells about itself.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Figures {
    /// The metrics collector's reading.
    pub(crate) snapshot: Snapshot,
    /// Requests running.
    pub(crate) running: usize,
    /// Requests waiting.
    pub(crate) queued: usize,
    /// Bound of the queue.
    pub(crate) queue_capacity: usize,
    /// Requests that may run at once.
    pub(crate) inflight_capacity: usize,
    /// Inbound messages that never became requests.
    pub(crate) intake: IntakeCounters,
    /// Share of the requests finished within [`FAULT_WINDOW`] that failed by a fault.
    pub(crate) fault_ratio: f64,
    /// Requests running and waiting, by model, for the models with any.
    pub(crate) models: BTreeMap<String, ModelCount>,
}

impl Figures {
    /// The batching figures of each model: the requests of these figures beside the engine's
    /// `engine` figures, for every model either names, the first [`MODEL_LABELS_MAX`] by id.
    pub(crate) fn model_loads(
        &self,
        engine: &BTreeMap<String, engine::ModelFigures>,
    ) -> BTreeMap<String, ModelLoad> {
        let mut loads: BTreeMap<String, ModelLoad> = BTreeMap::new();
        for (model, count) in &self.models {
            let load = loads.entry(model.clone()).or_default();
            load.running = count.running;
            load.queued = count.queued;
        }
        for (model, figures) in engine {
            loads.entry(model.clone()).or_default().engine = figures.clone();
        }
        loads.into_iter().take(MODEL_LABELS_MAX).collect()
    }
}

/// The batching figures the heartbeat and `$SRV.STATS` carry: each model in play (loaded, or
/// with requests in hand) or with streams completed over the rates' interval, with its
/// `rates` (zero for a model they do not name).
pub(crate) fn model_metrics(
    loads: &BTreeMap<String, ModelLoad>,
    rates: &BTreeMap<String, ModelRates>,
) -> Vec<ModelMetrics> {
    loads
        .iter()
        .filter_map(|(model, load)| {
            let rates = rates.get(model).copied().unwrap_or_default();
            if !load.is_active() && rates.is_zero() {
                return None;
            }
            Some(ModelMetrics {
                model_id: model.clone(),
                batch_size: count(load.engine.batch_size),
                running: count(load.running),
                queued: count(load.queued),
                batch_occupancy: round2(load.occupancy()),
                prompt_tokens_per_second: round2(rates.prompt_tokens_per_second),
                generation_tokens_per_second: round2(rates.generation_tokens_per_second),
                avg_prefill_ms: round2(rates.prefill_avg.as_secs_f64() * 1000.0),
                cached_prompt_share: round2(rates.cached_share),
                prefix_cache_bytes: load.engine.cache.bytes,
                prefix_cache_evictions: load.engine.cache.evictions,
            })
        })
        .collect()
}

/// `x` rounded to two decimals, as the heartbeat's figures are.
pub(crate) fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// A count as the wire's 32 bits, saturated.
pub(crate) fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Slack after a request leaves the fault window before the ratio is taken again: a ratio taken
/// at the window's very end still counts the request, and timers fire on whole milliseconds.
const AGING_SLACK: Duration = Duration::from_millis(1);

/// When the fault ratio changes by itself: each finished request stops counting once it is
/// [`FAULT_WINDOW`] old, with nothing happening at that moment. Holds those moments, earliest
/// first, at most one per request of the metrics window (an older request has left the window).
#[derive(Debug, Default)]
pub(crate) struct FaultAging {
    /// Moments at which a request has just left the fault window, sorted.
    pending: VecDeque<Instant>,
}

impl FaultAging {
    /// A request finished at `finished_at`.
    pub(crate) fn note(&mut self, finished_at: Instant) {
        if self.pending.len() == METRICS_WINDOW_REQUESTS {
            self.pending.pop_front();
        }
        let at = finished_at + FAULT_WINDOW + AGING_SLACK;
        // Requests finish in nearly the order they are reported, so this is nearly always the end.
        let pos = self.pending.partition_point(|t| *t <= at);
        self.pending.insert(pos, at);
    }

    /// The next moment the fault ratio may change without any event.
    pub(crate) fn next(&self) -> Option<Instant> {
        self.pending.front().copied()
    }

    /// Forgets the moments up to `now`; true when there was one (the ratio is due again).
    pub(crate) fn pass(&mut self, now: Instant) -> bool {
        let before = self.pending.len();
        while self.pending.front().is_some_and(|at| *at <= now) {
            self.pending.pop_front();
        }
        self.pending.len() != before
    }
}

#[cfg(test)]
mod tests {
    // Goal: the moments the fault ratio changes by itself are each request's exit from the
    // window, in time order, bounded in number; each model's requests meet the engine's figures
    // of it, within the label bound, and the heartbeat names the models that matter.
    // Method: note finish times out of order and past the bound, then pass time; figures built
    // by hand.

    use super::*;
    use crate::clock::{Clock, SystemClock};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn model_loads_join_the_requests_and_the_engines_figures_within_the_label_bound() {
        let figures = Figures {
            models: BTreeMap::from([
                (
                    "a".to_owned(),
                    ModelCount {
                        running: 2,
                        queued: 3,
                    },
                ),
                (
                    "b".to_owned(),
                    ModelCount {
                        running: 0,
                        queued: 1,
                    },
                ),
            ]),
            ..Figures::default()
        };
        let loaded = |batch_size| engine::ModelFigures {
            batch_size,
            ..engine::ModelFigures::default()
        };
        let engine = BTreeMap::from([("a".to_owned(), loaded(4)), ("c".to_owned(), loaded(0))]);
        let loads = figures.model_loads(&engine);
        assert_eq!(loads.keys().collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!((loads["a"].running, loads["a"].queued), (2, 3));
        assert_eq!(loads["a"].engine.batch_size, 4);
        assert_eq!((loads["b"].queued, loads["b"].engine.batch_size), (1, 0));

        // The heartbeat names the models in play, and those with completions in the interval.
        let rates = BTreeMap::from([(
            "c".to_owned(),
            ModelRates {
                generation_tokens_per_second: 12.345,
                ..ModelRates::default()
            },
        )]);
        let wire = model_metrics(&loads, &rates);
        let named: Vec<&str> = wire.iter().map(|m| m.model_id.as_str()).collect();
        assert_eq!(named, ["a", "b", "c"]);
        assert_eq!((wire[0].batch_size, wire[0].batch_occupancy), (4, 0.5));
        assert_eq!(wire[2].generation_tokens_per_second, 12.35);
        assert_eq!(
            model_metrics(&loads, &BTreeMap::new()).len(),
            2,
            "an unloaded, idle model without completions is left out"
        );

        let many: BTreeMap<String, engine::ModelFigures> = (0..=MODEL_LABELS_MAX)
            .map(|i| (format!("m{i:03}"), loaded(1)))
            .collect();
        let loads = Figures::default().model_loads(&many);
        assert_eq!(loads.len(), MODEL_LABELS_MAX);
        assert!(!loads.contains_key(&format!("m{MODEL_LABELS_MAX:03}")));
    }

    #[test]
    fn aging_yields_each_exit_from_the_window_in_time_order() {
        let t0 = SystemClock.now();
        let mut aging = FaultAging::default();
        assert_eq!(aging.next(), None);
        aging.note(t0 + ms(20));
        aging.note(t0 + ms(10));
        aging.note(t0 + ms(30));
        let first = t0 + ms(10) + FAULT_WINDOW + AGING_SLACK;
        assert_eq!(aging.next(), Some(first));
        assert!(
            !aging.pass(first - ms(1)),
            "nothing has left the window yet"
        );
        assert!(aging.pass(first + ms(10)), "two requests left it");
        assert_eq!(aging.next(), Some(t0 + ms(30) + FAULT_WINDOW + AGING_SLACK));
        assert!(aging.pass(t0 + ms(30) + FAULT_WINDOW + AGING_SLACK));
        assert_eq!(aging.next(), None);
    }

    #[test]
    fn aging_keeps_one_moment_per_request_of_the_metrics_window() {
        let t0 = SystemClock.now();
        let mut aging = FaultAging::default();
        for i in 0..=METRICS_WINDOW_REQUESTS as u64 {
            aging.note(t0 + ms(i));
        }
        assert_eq!(aging.pending.len(), METRICS_WINDOW_REQUESTS);
        assert_eq!(aging.next(), Some(t0 + ms(1) + FAULT_WINDOW + AGING_SLACK));
    }
}
