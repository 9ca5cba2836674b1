//! The MLX engine's record of what it has done with each model ([`ModelFigures`]): the batch
//! size each load answered, and the prompt, decode and stream counts of every completed stream,
//! from its `stream.stats`.
//!
//! One record lives as long as the engine, across runtime restarts: the counters only grow,
//! and a model the live runtime does not hold has a batch size of 0. The connection records the
//! streams (it reads their stats), the engine face the loads; readers take a copy.

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::conn::lock;
use crate::engine::rpc::StreamStats;
use crate::engine::{CacheState, ModelFigures};

/// Every model's figures, behind one lock held only to add or copy.
#[derive(Debug, Default)]
pub(super) struct FigureBook {
    /// Model id → figures; only models the engine loaded or streamed, so bounded by the
    /// catalog.
    models: Mutex<BTreeMap<String, ModelFigures>>,
}

impl FigureBook {
    /// `model` is loaded, decoding `batch_size` streams together.
    pub(super) fn loaded(&self, model: &str, batch_size: usize) {
        self.entry(model, |f| f.batch_size = batch_size);
    }

    /// `model` is no longer loaded.
    pub(super) fn unloaded(&self, model: &str) {
        if let Some(figures) = lock(&self.models).get_mut(model) {
            figures.batch_size = 0;
        }
    }

    /// No model is loaded any more (the runtime ended).
    pub(super) fn all_unloaded(&self) {
        for figures in lock(&self.models).values_mut() {
            figures.batch_size = 0;
        }
    }

    /// A stream of `model` completed with `stats`. A runtime that states no prefill time (the
    /// existing one) counts its time to the first token as the prefill, which is what it is
    /// there; a figure that is negative counts as none.
    pub(super) fn completed(&self, model: &str, stats: &StreamStats) {
        let seconds = |s: Option<f64>| s.filter(|s| *s >= 0.0);
        let prompt = seconds(stats.prompt_time).or(seconds(stats.time_to_first_token));
        let total = seconds(stats.total_time);
        self.entry(model, |f| {
            f.streams_completed += 1;
            f.prompt_tokens += stats.prompt_tokens.unwrap_or(0);
            f.cached_tokens += stats.cached_tokens.unwrap_or(0);
            f.generated_tokens += stats.tokens_generated.unwrap_or(0);
            f.prompt_seconds += prompt.unwrap_or(0.0);
            f.decode_seconds += total.map_or(0.0, |t| (t - prompt.unwrap_or(0.0)).max(0.0));
        });
    }

    /// What `model`'s prefix cache holds now, and has evicted since the model was loaded,
    /// as the runtime last said (its `runtime/state`).
    pub(super) fn cache_state(&self, model: &str, cache: CacheState) {
        self.entry(model, |f| f.cache = cache);
    }

    /// A copy of every model's figures.
    pub(super) fn snapshot(&self) -> BTreeMap<String, ModelFigures> {
        lock(&self.models).clone()
    }

    fn entry(&self, model: &str, change: impl FnOnce(&mut ModelFigures)) {
        let mut models = lock(&self.models);
        match models.get_mut(model) {
            Some(figures) => change(figures),
            None => {
                let mut figures = ModelFigures::default();
                change(&mut figures);
                models.insert(model.to_owned(), figures);
            }
        }
    }
}
