//! The collector's window figures kept as requests enter and leave it, so that reading them
//! costs the same however full the window is: samples stay sorted for the percentiles, and each
//! model's sums are added to on entry and taken from on eviction.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{ModelFigures, Outcome, Percentiles, RequestRecord};

/// Durations kept in order, with their sum.
#[derive(Debug, Default)]
pub(super) struct SortedSamples {
    sorted: Vec<Duration>,
    total: Duration,
}

impl SortedSamples {
    pub(super) fn insert(&mut self, sample: Duration) {
        let at = self.sorted.partition_point(|&s| s <= sample);
        self.sorted.insert(at, sample);
        self.total += sample;
    }

    /// Takes out one sample equal to `sample`; one was inserted before, so it is there.
    pub(super) fn remove(&mut self, sample: Duration) {
        if let Ok(at) = self.sorted.binary_search(&sample) {
            self.sorted.remove(at);
            self.total = self.total.saturating_sub(sample);
        }
    }

    /// The same figures [`Percentiles::of`] gives for these samples.
    pub(super) fn percentiles(&self) -> Percentiles {
        Percentiles::of_sorted(&self.sorted, self.total)
    }
}

/// One model's sums over the window.
#[derive(Debug, Default)]
struct ModelSums {
    requests: usize,
    errors: usize,
    tokens: u64,
    successes: u32,
    latency_of_successes: Duration,
}

/// Every figure of the window that a snapshot reads.
#[derive(Debug, Default)]
pub(super) struct WindowFigures {
    latency: SortedSamples,
    time_to_first_token: SortedSamples,
    tokens: u64,
    models: BTreeMap<String, ModelSums>,
}

impl WindowFigures {
    pub(super) fn enter(&mut self, r: &RequestRecord) {
        if r.outcome == Outcome::Success {
            self.latency.insert(r.latency);
        }
        if let Some(ttft) = r.time_to_first_token {
            self.time_to_first_token.insert(ttft);
        }
        self.tokens += r.tokens;
        let m = self.models.entry(r.model.clone()).or_default();
        m.requests += 1;
        m.tokens += r.tokens;
        if r.outcome == Outcome::Success {
            m.successes += 1;
            m.latency_of_successes += r.latency;
        } else {
            m.errors += 1;
        }
    }

    pub(super) fn leave(&mut self, r: &RequestRecord) {
        if r.outcome == Outcome::Success {
            self.latency.remove(r.latency);
        }
        if let Some(ttft) = r.time_to_first_token {
            self.time_to_first_token.remove(ttft);
        }
        self.tokens = self.tokens.saturating_sub(r.tokens);
        let Some(m) = self.models.get_mut(&r.model) else {
            return;
        };
        m.requests = m.requests.saturating_sub(1);
        m.tokens = m.tokens.saturating_sub(r.tokens);
        if r.outcome == Outcome::Success {
            m.successes = m.successes.saturating_sub(1);
            m.latency_of_successes = m.latency_of_successes.saturating_sub(r.latency);
        } else {
            m.errors = m.errors.saturating_sub(1);
        }
        if m.requests == 0 {
            self.models.remove(&r.model);
        }
    }

    pub(super) fn latency(&self) -> Percentiles {
        self.latency.percentiles()
    }

    pub(super) fn time_to_first_token(&self) -> Percentiles {
        self.time_to_first_token.percentiles()
    }

    pub(super) fn tokens(&self) -> u64 {
        self.tokens
    }

    pub(super) fn models(&self) -> BTreeMap<String, ModelFigures> {
        self.models
            .iter()
            .map(|(model, m)| {
                let figures = ModelFigures {
                    requests: m.requests,
                    errors: m.errors,
                    avg_latency: m.latency_of_successes / m.successes.max(1),
                    tokens: m.tokens,
                };
                (model.clone(), figures)
            })
            .collect()
    }
}
