//! The simulated engine's batching mode, after the MLX runtime's batch generator: one stepping
//! task per batched model; each step, after `step_latency`, yields one token of every running
//! generation, in the order they joined the batch.
//!
//! A batch runs at most `capacity` generations. Those beyond it are accepted (up to the model's
//! `streams_max` live generations, waiting ones included; past that `generate` is refused, as
//! for a model that is not batched) and wait inside the engine, in arrival order, for a place:
//! one is taken into the batch as soon as a running generation ends. Faults apply per
//! generation as without batching: `FailAfter` and `CrashAfter` at the step of that token, and
//! `HangAfter` keeps the generation in the batch, yielding nothing, until its consumer drops it.
//! A generation whose consumer is gone leaves at the next step, or, while it waits, at the next
//! step or the model's next `generate`.
//!
//! The stepper starts with the model's first generation and stops when the model has none; it
//! owns the running generations, so a stepper dropped with its host gives their places back.

use std::collections::VecDeque;
use std::time::Duration;

use mlx_worker::engine::{EngineError, FinishReason, TokenEvent, TokenSender};

use super::{Fault, LiveStream, SimEngine, token_text};

/// How a batched model runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batching {
    /// Generations one step runs at most; the others wait.
    pub capacity: usize,
    /// Time one step takes.
    pub step_latency: Duration,
}

/// A batched model's generations waiting for room, and its figures.
#[derive(Default)]
pub(super) struct Batch {
    /// Accepted, waiting for a place in the batch, in arrival order.
    waiting: VecDeque<BatchStream>,
    /// Whether a stepping task runs for the model.
    stepping: bool,
    /// The most generations one step ran.
    pub(super) running_peak: usize,
    /// The most generations that waited at once behind a full batch.
    pub(super) queued_peak: usize,
}

/// One generation of a batched model.
pub(super) struct BatchStream {
    tx: TokenSender,
    /// Index of its next token.
    next: u32,
    max_tokens: u32,
    fault: Option<Fault>,
    /// Its place among the model's live generations, given back when it is dropped.
    _place: LiveStream,
}

impl BatchStream {
    pub(super) fn new(
        tx: TokenSender,
        max_tokens: u32,
        fault: Option<Fault>,
        place: LiveStream,
    ) -> BatchStream {
        BatchStream {
            tx,
            next: 0,
            max_tokens,
            fault,
            _place: place,
        }
    }

    /// Runs this generation's part of one step; whether it stays in the batch.
    async fn step(&mut self, engine: &SimEngine) -> bool {
        if self.tx.is_closed() {
            engine.lock().cancelled += 1;
            return false;
        }
        let i = self.next;
        match &self.fault {
            Some(Fault::FailAfter(n)) if *n == i => {
                self.tx.end(TokenEvent::Failed(EngineError::Generation {
                    reason: "simulated failure".to_owned(),
                }));
                return false;
            }
            Some(Fault::CrashAfter { tokens, restart }) if *tokens == i => {
                engine.crash(*restart);
                return false;
            }
            Some(Fault::HangAfter(n)) if *n <= i => return true,
            _ => {}
        }
        if i >= self.max_tokens {
            self.tx
                .end(TokenEvent::Finished(FinishReason::Length.into()));
            return false;
        }
        if self.tx.send(token_text(i)).await.is_err() {
            engine.lock().cancelled += 1;
            return false;
        }
        self.next += 1;
        if self.next >= self.max_tokens {
            // Its place is free for the next step, as the runtime frees it.
            self.tx
                .end(TokenEvent::Finished(FinishReason::Length.into()));
            return false;
        }
        true
    }
}

/// Queues `stream` for its model's batch, starting the model's stepper if none runs.
pub(super) fn enqueue(engine: &SimEngine, model_id: &str, batching: Batching, stream: BatchStream) {
    let start = {
        let mut s = engine.lock();
        let batch = s.batches.entry(model_id.to_owned()).or_default();
        batch.waiting.push_back(stream);
        !std::mem::replace(&mut batch.stepping, true)
    };
    if start {
        tokio::spawn(run_steps(engine.clone(), model_id.to_owned(), batching));
    }
}

/// Drops the waiting generations of `model_id` whose consumer is gone (outside the lock: each
/// gives its place back).
pub(super) fn purge(engine: &SimEngine, model_id: &str) {
    let gone = {
        let mut s = engine.lock();
        let Some(batch) = s.batches.get_mut(model_id) else {
            return;
        };
        let (open, gone): (VecDeque<_>, VecDeque<_>) = batch
            .waiting
            .drain(..)
            .partition(|stream| !stream.tx.is_closed());
        batch.waiting = open;
        s.cancelled += gone.len() as u64;
        gone
    };
    drop(gone);
}

/// Clears the model's `stepping` mark when its stepper is dropped before it stopped by itself
/// (its host went down with it), so that the next generation starts another.
struct Stepping {
    engine: SimEngine,
    model_id: String,
    armed: bool,
}

impl Drop for Stepping {
    fn drop(&mut self) {
        if self.armed
            && let Some(batch) = self.engine.lock().batches.get_mut(&self.model_id)
        {
            batch.stepping = false;
        }
    }
}

/// The stepper of one batched model: steps until the model has no generation left.
async fn run_steps(engine: SimEngine, model_id: String, batching: Batching) {
    let mut stepping = Stepping {
        engine: engine.clone(),
        model_id: model_id.clone(),
        armed: true,
    };
    let mut running: Vec<BatchStream> = Vec::with_capacity(batching.capacity);
    loop {
        purge(&engine, &model_id);
        {
            let mut s = engine.lock();
            let batch = s.batches.entry(model_id.clone()).or_default();
            while running.len() < batching.capacity {
                match batch.waiting.pop_front() {
                    Some(stream) => running.push(stream),
                    None => break,
                }
            }
            batch.running_peak = batch.running_peak.max(running.len());
            batch.queued_peak = batch.queued_peak.max(batch.waiting.len());
            if running.is_empty() {
                // Under the lock that queues generations: the next one starts a stepper.
                batch.stepping = false;
                stepping.armed = false;
                return;
            }
        }
        if !batching.step_latency.is_zero() {
            tokio::time::sleep(batching.step_latency).await;
        }
        let mut kept = Vec::with_capacity(running.len());
        for mut stream in std::mem::take(&mut running) {
            if stream.step(&engine).await {
                kept.push(stream);
            }
        }
        running = kept;
    }
}
