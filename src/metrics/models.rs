//! Batching figures per model: what the worker has in hand of a model (requests running, that
//! is handed to the engine, and requests waiting in the worker's queue) beside what the engine
//! did with it ([`engine::ModelFigures`]: its batch size, and the prompt tokens, prefill time,
//! generated tokens and decode time of its completed streams), and the rates over an interval
//! that the heartbeat and `$SRV.STATS` show.
//!
//! `/metrics` exports the engine's figures as counters, from which Prometheus takes rates
//! itself; [`RateMeter`] turns two readings of the same counters into rates for the messages
//! that carry figures and not counters. Pure: callers pass in the readings and the time.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::engine;

/// One model's batching figures, read at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelLoad {
    /// Requests of the model the worker started: handed to a request task, which loads the
    /// model and generates.
    pub running: usize,
    /// Requests of the model waiting in the worker's queue.
    pub queued: usize,
    /// What the engine did with the model (all zero before the engine has reported on it).
    pub engine: engine::ModelFigures,
}

impl ModelLoad {
    /// The share of the model's batch that its running requests fill, 0 to 1: running requests
    /// over the batch size, at most 1 (past the batch size, streams wait inside the engine), and
    /// 0 while the model is not loaded (batch size 0).
    pub fn occupancy(&self) -> f64 {
        match self.engine.batch_size {
            0 => 0.0,
            batch => self.running.min(batch) as f64 / batch as f64,
        }
    }

    /// The share of the prompt tokens of the model's completed streams that its prefix cache
    /// held, 0 to 1 (0 before any completed).
    pub fn cache_hit_ratio(&self) -> f64 {
        match self.engine.prompt_tokens {
            0 => 0.0,
            prompt => (self.engine.cached_tokens.min(prompt) as f64) / prompt as f64,
        }
    }

    /// Whether the model is in play: loaded, or with requests in hand.
    pub fn is_active(&self) -> bool {
        self.engine.batch_size > 0 || self.running > 0 || self.queued > 0
    }
}

/// A model's rates over one interval, from the streams of it that completed in the interval.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ModelRates {
    /// Prompt tokens per second of the interval.
    pub prompt_tokens_per_second: f64,
    /// Generated tokens per second of the interval.
    pub generation_tokens_per_second: f64,
    /// Mean prefill time of the streams completed in the interval (zero when none did).
    pub prefill_avg: Duration,
    /// Share of the prompt tokens of the interval found in the prefix cache, 0 to 1.
    pub cached_share: f64,
}

impl ModelRates {
    /// Whether any stream of the model completed in the interval.
    pub fn is_zero(&self) -> bool {
        *self == ModelRates::default()
    }
}

/// Rates from successive readings of the engine's counters: each [`RateMeter::sample`] gives
/// the rates over the time since the previous one.
///
/// The engine counts a stream when it completes, so a rate is the work of the streams that
/// completed in the interval, spread over the interval: a long generation counts all its tokens
/// in the interval it ends in. A counter that went down (it never should) counts as no change.
#[derive(Debug, Default)]
pub struct RateMeter {
    /// The previous reading and when it was taken.
    last: Option<(Instant, BTreeMap<String, engine::ModelFigures>)>,
}

impl RateMeter {
    /// The rates of every model of `now_figures`, over the time since the previous sample;
    /// all zero at the first sample, which only sets the baseline, and for an interval of no
    /// length.
    pub fn sample(
        &mut self,
        now: Instant,
        now_figures: &BTreeMap<String, engine::ModelFigures>,
    ) -> BTreeMap<String, ModelRates> {
        let previous = self.last.replace((now, now_figures.clone()));
        let Some((then, before)) = previous else {
            return zero_rates(now_figures);
        };
        let seconds = now.saturating_duration_since(then).as_secs_f64();
        if seconds == 0.0 {
            return zero_rates(now_figures);
        }
        let empty = engine::ModelFigures::default();
        now_figures
            .iter()
            .map(|(model, after)| {
                let before = before.get(model).unwrap_or(&empty);
                let streams = after
                    .streams_completed
                    .saturating_sub(before.streams_completed);
                let tokens = |after: u64, before: u64| after.saturating_sub(before) as f64;
                let prefill = (after.prompt_seconds - before.prompt_seconds).max(0.0);
                let prompt = tokens(after.prompt_tokens, before.prompt_tokens);
                let cached = tokens(after.cached_tokens, before.cached_tokens);
                let rates = ModelRates {
                    prompt_tokens_per_second: tokens(after.prompt_tokens, before.prompt_tokens)
                        / seconds,
                    generation_tokens_per_second: tokens(
                        after.generated_tokens,
                        before.generated_tokens,
                    ) / seconds,
                    prefill_avg: match streams {
                        0 => Duration::ZERO,
                        n => Duration::try_from_secs_f64(prefill / n as f64)
                            .unwrap_or(Duration::ZERO),
                    },
                    cached_share: if prompt > 0.0 {
                        (cached / prompt).min(1.0)
                    } else {
                        0.0
                    },
                };
                (model.clone(), rates)
            })
            .collect()
    }
}

fn zero_rates(figures: &BTreeMap<String, engine::ModelFigures>) -> BTreeMap<String, ModelRates> {
    figures
        .keys()
        .map(|model| (model.clone(), ModelRates::default()))
        .collect()
}

#[cfg(test)]
mod tests {
    // Goal: occupancy is the filled share of the batch; rates are the change of the counters
    // over the interval between two samples, with the prefill averaged over the streams that
    // completed in it.
    // Method: readings built by hand, sampled at chosen times.

    use super::*;
    use crate::clock::{Clock, SystemClock};

    fn load(running: usize, batch_size: usize) -> ModelLoad {
        ModelLoad {
            running,
            engine: engine::ModelFigures {
                batch_size,
                ..engine::ModelFigures::default()
            },
            ..ModelLoad::default()
        }
    }

    #[test]
    fn occupancy_is_the_filled_share_of_the_batch() {
        assert_eq!(load(0, 8).occupancy(), 0.0);
        assert_eq!(load(2, 8).occupancy(), 0.25);
        assert_eq!(load(8, 8).occupancy(), 1.0);
        assert_eq!(
            load(12, 8).occupancy(),
            1.0,
            "the surplus waits in the engine"
        );
        assert_eq!(load(3, 0).occupancy(), 0.0, "not loaded");
        assert!(load(0, 8).is_active(), "loaded");
        assert!(!load(0, 0).is_active());
        let waiting = ModelLoad {
            queued: 1,
            ..ModelLoad::default()
        };
        assert!(waiting.is_active());
    }

    fn figures(
        prompt_tokens: u64,
        prompt_seconds: f64,
        generated_tokens: u64,
        streams_completed: u64,
    ) -> engine::ModelFigures {
        engine::ModelFigures {
            batch_size: 4,
            prompt_tokens,
            prompt_seconds,
            generated_tokens,
            decode_seconds: 0.0,
            streams_completed,
            ..engine::ModelFigures::default()
        }
    }

    #[test]
    fn rates_are_the_change_of_the_counters_over_the_interval() {
        let t0 = SystemClock.now();
        let mut meter = RateMeter::default();
        let first = BTreeMap::from([("m".to_owned(), figures(100, 1.0, 50, 2))]);
        assert_eq!(
            meter.sample(t0, &first),
            BTreeMap::from([("m".to_owned(), ModelRates::default())]),
            "the first sample only sets the baseline"
        );
        // Two seconds later, three more streams completed; a model appeared.
        let second = BTreeMap::from([
            ("m".to_owned(), figures(400, 2.5, 250, 5)),
            ("n".to_owned(), figures(10, 0.5, 8, 1)),
        ]);
        let rates = meter.sample(t0 + Duration::from_secs(2), &second);
        assert_eq!(
            rates["m"],
            ModelRates {
                prompt_tokens_per_second: 150.0,
                generation_tokens_per_second: 100.0,
                prefill_avg: Duration::from_millis(500),
                cached_share: 0.0,
            }
        );
        assert_eq!(rates["n"].prompt_tokens_per_second, 5.0);
        assert_eq!(rates["n"].prefill_avg, Duration::from_millis(500));
        // Nothing completed since: zero rates, whatever the counters' size.
        let rates = meter.sample(t0 + Duration::from_secs(3), &second);
        assert!(rates.values().all(ModelRates::is_zero), "{rates:?}");
        // An interval of no length gives no rate; nor do counters that went down.
        let rates = meter.sample(t0 + Duration::from_secs(3), &first);
        assert!(rates.values().all(ModelRates::is_zero), "{rates:?}");
        let rates = meter.sample(t0 + Duration::from_secs(4), &first);
        assert!(rates.values().all(ModelRates::is_zero), "{rates:?}");
        let down = BTreeMap::from([("m".to_owned(), figures(0, 0.0, 0, 0))]);
        let rates = meter.sample(t0 + Duration::from_secs(5), &down);
        assert!(rates.values().all(ModelRates::is_zero), "{rates:?}");
    }
}
