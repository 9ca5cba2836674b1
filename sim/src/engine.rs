//! [`SimEngine`]: a scripted [`Engine`] with per-token latency, load latency, a capacity per
//! model and injectable faults (load failure, failure mid-stream, crash, hang).
//!
//! Like the MLX runtime, it holds a bounded number of live generations of each model (its
//! catalog says how many, and a load may answer fewer, as the runtime does for a model whose
//! cache cannot be batched) and refuses a `generate` past that at once, with the error the MLX
//! engine gives for the runtime's refusal; it counts the refusals and the most it held.
//!
//! A model runs its generations each on its own, a token every `token_latency`, or, when the
//! configuration gives it a [`Batching`], in batches as the MLX runtime's batch generator does
//! ([`batch`]): one step every `step_latency` yields one token of every running generation.
//!
//! Tokens are `tok0`, ` tok1`, … (deterministic, so tests can check order and content); a
//! generation yields `max_tokens` of them unless a fault intervenes. Its figures of each model
//! are scripted too: a completed generation counts its prompt's words as prompt tokens. Time is `tokio::time`, so
//! paused runtimes and turmoil drive it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use mlx_worker::engine::{
    Catalog, Engine, EngineError, EngineHealth, FinishReason, GenerateRequest, LoadedModel,
    ModelEntry, TokenEvent, TokenSender, TokenStream, token_channel,
};
use mlx_worker::limits::{RUNTIME_STREAMS_LIVE_DEFAULT, TOKEN_CHANNEL_CAPACITY};
use tokio::sync::watch;

pub mod batch;

pub use self::batch::Batching;
use self::batch::{Batch, BatchStream};

/// A fault the engine injects into the next generations.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// Loading fails.
    LoadFails,
    /// The generation fails after this many tokens.
    FailAfter(u32),
    /// The engine crashes after this many tokens: every live stream ends with `Crashed`, the
    /// health goes `Restarting` for `restart` and then back `Up` with no model loaded.
    CrashAfter {
        /// Tokens before the crash.
        tokens: u32,
        /// Time the restart takes.
        restart: Duration,
    },
    /// The generation stops producing tokens after this many, forever.
    HangAfter(u32),
}

/// How the simulated engine behaves.
#[derive(Clone, Debug)]
pub struct SimEngineConfig {
    /// Models served, with their parameter counts.
    pub models: BTreeMap<String, u64>,
    /// Delay before each token.
    pub token_latency: Duration,
    /// Time a load takes.
    pub load_latency: Duration,
    /// Live generations of a model (from `generate` to its last event) the engine holds at
    /// once; a model not named here holds [`RUNTIME_STREAMS_LIVE_DEFAULT`], as the MLX runtime
    /// does by default. A batched model's count includes the generations waiting for room in
    /// its batch.
    pub streams_max: BTreeMap<String, usize>,
    /// Models run in batches, by id, with their batch's capacity and step time; the others run
    /// each generation on its own, a token every `token_latency`.
    pub batches: BTreeMap<String, Batching>,
    /// Events each generation's token channel holds before the engine holds tokens back.
    pub token_channel_capacity: usize,
    /// Live generations of a model its load answers the engine holds, when fewer than its
    /// catalog's figure (as the MLX runtime answers a batch of 1 for a model whose cache cannot
    /// be batched); from the load on, the engine holds no more than this. The runtime would
    /// queue the surplus; refusing it makes a worker that hands it more visible.
    pub loaded_streams_max: BTreeMap<String, usize>,
}

impl SimEngineConfig {
    /// Live generations of `model_id` the engine holds at once.
    pub fn streams_max(&self, model_id: &str) -> usize {
        self.streams_max
            .get(model_id)
            .copied()
            .unwrap_or(RUNTIME_STREAMS_LIVE_DEFAULT)
    }
}

impl Default for SimEngineConfig {
    fn default() -> Self {
        SimEngineConfig {
            models: BTreeMap::from([("sim/tiny".to_owned(), 1_000_000)]),
            token_latency: Duration::ZERO,
            load_latency: Duration::ZERO,
            streams_max: BTreeMap::new(),
            batches: BTreeMap::new(),
            token_channel_capacity: TOKEN_CHANNEL_CAPACITY,
            loaded_streams_max: BTreeMap::new(),
        }
    }
}

struct State {
    loaded: BTreeSet<String>,
    faults: Vec<Fault>,
    loads: u64,
    generations: u64,
    cancelled: u64,
    refused: u64,
    shut_down: bool,
    /// The counters of [`Engine::model_figures`], by model.
    completed: BTreeMap<String, mlx_worker::engine::ModelFigures>,
    /// Every live generation's sender, so a crash can end them all.
    live: Vec<TokenSender>,
    /// Live generations by model, and the most each model had at once.
    live_by_model: BTreeMap<String, usize>,
    live_peak: BTreeMap<String, usize>,
    /// The batched models' waiting generations and figures.
    batches: BTreeMap<String, Batch>,
}

/// A scripted engine.
#[derive(Clone)]
pub struct SimEngine {
    config: SimEngineConfig,
    state: Arc<Mutex<State>>,
    health: Arc<watch::Sender<EngineHealth>>,
}

/// Counts of what the engine was asked to do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimEngineStats {
    /// Loads that actually loaded (not no-ops).
    pub loads: u64,
    /// Generations started.
    pub generations: u64,
    /// Generations whose receiver was dropped before the end.
    pub cancelled: u64,
    /// Generations refused because their model had as many live as it holds.
    pub refused: u64,
}

/// One live generation of a model; dropped when the generation has sent its last event.
struct LiveStream {
    engine: SimEngine,
    model_id: String,
}

impl Drop for LiveStream {
    fn drop(&mut self) {
        if let Some(live) = self.engine.lock().live_by_model.get_mut(&self.model_id) {
            *live = live.saturating_sub(1);
        }
    }
}

impl SimEngine {
    /// An engine with this behaviour and no faults.
    pub fn new(config: SimEngineConfig) -> SimEngine {
        SimEngine {
            config,
            state: Arc::new(Mutex::new(State {
                loaded: BTreeSet::new(),
                faults: Vec::new(),
                loads: 0,
                generations: 0,
                cancelled: 0,
                refused: 0,
                shut_down: false,
                completed: BTreeMap::new(),
                live: Vec::new(),
                live_by_model: BTreeMap::new(),
                live_peak: BTreeMap::new(),
                batches: BTreeMap::new(),
            })),
            health: Arc::new(watch::Sender::new(EngineHealth::Up { loaded: Vec::new() })),
        }
    }

    /// Injects `fault` into the next generation (or load, for `LoadFails`).
    pub fn inject(&self, fault: Fault) {
        self.lock().faults.push(fault);
    }

    /// What the engine was asked to do so far.
    pub fn stats(&self) -> SimEngineStats {
        let s = self.lock();
        SimEngineStats {
            loads: s.loads,
            generations: s.generations,
            cancelled: s.cancelled,
            refused: s.refused,
        }
    }

    /// The most generations of `model_id` that were live at once so far.
    pub fn live_peak(&self, model_id: &str) -> usize {
        self.lock().live_peak.get(model_id).copied().unwrap_or(0)
    }

    /// The most generations of the batched model `model_id` that one step ran so far.
    pub fn batch_peak(&self, model_id: &str) -> usize {
        self.lock()
            .batches
            .get(model_id)
            .map_or(0, |b| b.running_peak)
    }

    /// The most generations of the batched model `model_id` that waited at once for room in
    /// its batch so far.
    pub fn queued_peak(&self, model_id: &str) -> usize {
        self.lock()
            .batches
            .get(model_id)
            .map_or(0, |b| b.queued_peak)
    }

    /// Live generations of `model_id` the engine holds once loaded: its catalog's figure, or
    /// fewer when its load answers fewer.
    fn capacity(&self, model_id: &str) -> usize {
        let planned = self.config.streams_max(model_id);
        self.config
            .loaded_streams_max
            .get(model_id)
            .map_or(planned, |&loaded| loaded.min(planned))
    }

    /// Takes a place for a generation of `model_id`, or refuses as the MLX runtime does when
    /// the model has as many live as it holds.
    fn admit_stream(&self, model_id: &str) -> Result<LiveStream, EngineError> {
        let max = self.capacity(model_id);
        let mut s = self.lock();
        let live = s.live_by_model.get(model_id).copied().unwrap_or(0);
        if live >= max {
            s.refused += 1;
            return Err(EngineError::Generation {
                reason: format!("{live} streams are live, limit {max} (code -32099)"),
            });
        }
        s.live_by_model.insert(model_id.to_owned(), live + 1);
        let peak = s.live_peak.entry(model_id.to_owned()).or_default();
        *peak = (*peak).max(live + 1);
        Ok(LiveStream {
            engine: self.clone(),
            model_id: model_id.to_owned(),
        })
    }

    /// Counts a completed generation in the model's figures, as scripted: the prompt's
    /// whitespace-separated words are its tokens, its prefill is the first token's latency and
    /// its decode the latency of the others.
    fn count_completed(&self, request: &GenerateRequest) {
        let latency = self.config.token_latency.as_secs_f64();
        let generated = u64::from(request.max_tokens);
        let mut s = self.lock();
        let figures = s.completed.entry(request.model_id.clone()).or_default();
        figures.prompt_tokens += request.prompt.split_whitespace().count() as u64;
        figures.prompt_seconds += latency;
        figures.generated_tokens += generated;
        figures.decode_seconds += latency * generated.saturating_sub(1) as f64;
        figures.streams_completed += 1;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock is a bug in the simulator itself.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn take_fault(&self, pick: impl Fn(&Fault) -> bool) -> Option<Fault> {
        let mut s = self.lock();
        let pos = s.faults.iter().position(pick)?;
        Some(s.faults.remove(pos))
    }

    fn publish_health(&self) {
        let loaded: Vec<String> = self.lock().loaded.iter().cloned().collect();
        self.health.send_replace(EngineHealth::Up { loaded });
    }

    fn crash(&self, restart: Duration) {
        let live = {
            let mut s = self.lock();
            s.loaded.clear();
            std::mem::take(&mut s.live)
        };
        self.health.send_replace(EngineHealth::Restarting);
        for tx in live {
            tx.end(TokenEvent::Failed(EngineError::Crashed {
                reason: "simulated crash".to_owned(),
            }));
        }
        let engine = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(restart).await;
            engine.publish_health();
        });
    }
}

#[async_trait]
impl Engine for SimEngine {
    async fn catalog(&self) -> Result<Catalog, EngineError> {
        Ok(Catalog {
            models: self
                .config
                .models
                .iter()
                .map(|(id, &params)| {
                    (
                        id.clone(),
                        ModelEntry {
                            path: PathBuf::from(id),
                            size_bytes: params * 2,
                            parameter_count: Some(params),
                            streams_max: Some(self.config.streams_max(id)),
                        },
                    )
                })
                .collect(),
        })
    }

    async fn load(&self, model_id: &str) -> Result<LoadedModel, EngineError> {
        let Some(&params) = self.config.models.get(model_id) else {
            return Err(EngineError::ModelNotFound {
                model: model_id.to_owned(),
            });
        };
        if matches!(*self.health.borrow(), EngineHealth::Restarting) {
            return Err(EngineError::Unavailable {
                reason: "restarting".to_owned(),
            });
        }
        if self.take_fault(|f| *f == Fault::LoadFails).is_some() {
            return Err(EngineError::LoadFailed {
                model: model_id.to_owned(),
                reason: "simulated load failure".to_owned(),
            });
        }
        let already = self.lock().loaded.contains(model_id);
        if !already {
            tokio::time::sleep(self.config.load_latency).await;
            let mut s = self.lock();
            s.loaded.insert(model_id.to_owned());
            s.loads += 1;
        }
        self.publish_health();
        Ok(LoadedModel {
            model_id: model_id.to_owned(),
            context_length: 2048,
            parameter_count: Some(params),
            streams_max: self.config.loaded_streams_max.get(model_id).copied(),
        })
    }

    async fn unload(&self, model_id: &str) -> Result<(), EngineError> {
        self.lock().loaded.remove(model_id);
        self.publish_health();
        Ok(())
    }

    async fn generate(&self, request: GenerateRequest) -> Result<TokenStream, EngineError> {
        if !self.lock().loaded.contains(&request.model_id) {
            return Err(EngineError::Generation {
                reason: format!("model not loaded: {}", request.model_id),
            });
        }
        let batching = self.config.batches.get(&request.model_id).cloned();
        if batching.is_some() {
            // Generations abandoned while they waited give their places back first.
            batch::purge(self, &request.model_id);
        }
        let place = self.admit_stream(&request.model_id)?;
        let fault = self.take_fault(|f| *f != Fault::LoadFails);
        let (tx, rx) = token_channel(self.config.token_channel_capacity);
        {
            let mut s = self.lock();
            s.generations += 1;
            s.live.retain(|t| !t.is_closed());
            s.live.push(tx.clone());
        }
        if let Some(batching) = batching {
            let stream = BatchStream::new(tx, request.max_tokens, fault, place);
            batch::enqueue(self, &request.model_id, batching, stream);
            return Ok(rx);
        }
        let engine = self.clone();
        let latency = self.config.token_latency;
        tokio::spawn(async move {
            // Held until this task ends: the generation is live until its last event.
            let _place = place;
            for i in 0..request.max_tokens {
                match &fault {
                    Some(Fault::FailAfter(n)) if *n == i => {
                        tx.end(TokenEvent::Failed(EngineError::Generation {
                            reason: "simulated failure".to_owned(),
                        }));
                        return;
                    }
                    Some(Fault::CrashAfter { tokens, restart }) if *tokens == i => {
                        engine.crash(*restart);
                        return;
                    }
                    Some(Fault::HangAfter(n)) if *n == i => {
                        tx.closed().await;
                        engine.lock().cancelled += 1;
                        return;
                    }
                    _ => {}
                }
                if !latency.is_zero() {
                    tokio::time::sleep(latency).await;
                }
                if tx.send(token_text(i)).await.is_err() {
                    engine.lock().cancelled += 1;
                    return;
                }
                if i + 1 == request.max_tokens {
                    // The last token is out: the generation completes.
                    engine.count_completed(&request);
                }
            }
            tx.end(TokenEvent::Finished(FinishReason::Length.into()));
        });
        Ok(rx)
    }

    fn health(&self) -> watch::Receiver<EngineHealth> {
        self.health.subscribe()
    }

    /// Every model loaded or with a completed generation; a loaded model's batch size is its
    /// capacity.
    fn model_figures(&self) -> BTreeMap<String, mlx_worker::engine::ModelFigures> {
        let s = self.lock();
        let mut figures = s.completed.clone();
        for model in &s.loaded {
            figures.entry(model.clone()).or_default().batch_size = self.capacity(model);
        }
        figures
    }

    async fn shutdown(&self, _grace: Duration) {
        self.lock().shut_down = true;
    }
}

/// The text of a generation's token `i`: `tok0`, ` tok1`, …
fn token_text(i: u32) -> String {
    if i == 0 {
        "tok0".to_owned()
    } else {
        format!(" tok{i}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(stream_id: &str, model_id: &str) -> GenerateRequest {
        GenerateRequest {
            stream_id: stream_id.to_owned(),
            model_id: model_id.to_owned(),
            prompt: "Hello".to_owned(),
            max_tokens: 3,
            temperature: 0.0,
            top_p: 1.0,
            session_id: None,
        }
    }

    async fn read_to_end(mut rx: TokenStream) -> TokenEvent {
        loop {
            match rx.recv().await {
                Some(TokenEvent::Tokens(_)) => {}
                Some(end) => return end,
                None => panic!("the stream closed without an end event"),
            }
        }
    }

    #[tokio::test]
    async fn figures_count_completed_generations_and_the_batch_of_loaded_models() {
        let engine = SimEngine::new(SimEngineConfig {
            token_latency: Duration::from_millis(1),
            streams_max: BTreeMap::from([("sim/tiny".to_owned(), 4)]),
            ..SimEngineConfig::default()
        });
        assert_eq!(engine.model_figures(), BTreeMap::new());
        engine.load("sim/tiny").await.unwrap();
        let mut hello = request("a", "sim/tiny");
        hello.prompt = "Hello there world".to_owned();
        read_to_end(engine.generate(hello).await.unwrap()).await;
        engine.inject(Fault::FailAfter(1));
        read_to_end(engine.generate(request("b", "sim/tiny")).await.unwrap()).await;
        let figures = engine.model_figures();
        let tiny = &figures["sim/tiny"];
        assert_eq!(
            (
                tiny.batch_size,
                tiny.prompt_tokens,
                tiny.generated_tokens,
                tiny.streams_completed
            ),
            (4, 3, 3, 1),
            "the failed generation does not count"
        );
        assert!((tiny.prompt_seconds - 0.001).abs() < 1e-9);
        assert!((tiny.decode_seconds - 0.002).abs() < 1e-9);
        engine.unload("sim/tiny").await.unwrap();
        assert_eq!(
            engine.model_figures()["sim/tiny"].batch_size,
            0,
            "not loaded"
        );
        assert_eq!(engine.model_figures()["sim/tiny"].streams_completed, 1);
    }

    #[tokio::test]
    async fn generations_past_a_models_capacity_are_refused_until_one_ends() {
        let engine = SimEngine::new(SimEngineConfig {
            models: BTreeMap::from([("a".to_owned(), 1_000_000), ("b".to_owned(), 1_000_000)]),
            streams_max: BTreeMap::from([("a".to_owned(), 2)]),
            ..SimEngineConfig::default()
        });
        let catalog = engine.catalog().await.unwrap();
        assert_eq!(catalog.models["a"].streams_max, Some(2));
        assert_eq!(
            catalog.models["b"].streams_max,
            Some(RUNTIME_STREAMS_LIVE_DEFAULT)
        );
        engine.load("a").await.unwrap();
        engine.load("b").await.unwrap();
        let first = engine.generate(request("a1", "a")).await.unwrap();
        let _second = engine.generate(request("a2", "a")).await.unwrap();
        let refused = engine.generate(request("a3", "a")).await.unwrap_err();
        assert_eq!(
            refused,
            EngineError::Generation {
                reason: "2 streams are live, limit 2 (code -32099)".to_owned()
            }
        );
        // Another model's capacity is its own.
        let _other = engine.generate(request("b1", "b")).await.unwrap();
        assert_eq!(
            read_to_end(first).await,
            TokenEvent::Finished(FinishReason::Length.into())
        );
        let _third = engine.generate(request("a3", "a")).await.unwrap();
        assert_eq!(engine.stats().refused, 1);
        assert_eq!(engine.live_peak("a"), 2);
        assert_eq!(engine.live_peak("b"), 1);
    }

    /// An engine whose model `b` runs in batches of `capacity`, a step every 10 ms, and holds
    /// `streams_max` live generations.
    fn batched(capacity: usize, streams_max: usize) -> SimEngine {
        SimEngine::new(SimEngineConfig {
            models: BTreeMap::from([("b".to_owned(), 1_000_000)]),
            streams_max: BTreeMap::from([("b".to_owned(), streams_max)]),
            batches: BTreeMap::from([(
                "b".to_owned(),
                Batching {
                    capacity,
                    step_latency: Duration::from_millis(10),
                },
            )]),
            ..SimEngineConfig::default()
        })
    }

    /// When each token of `rx` arrived after `start`, and its texts, up to its end.
    async fn arrivals(mut rx: TokenStream, start: tokio::time::Instant) -> Vec<(Duration, String)> {
        let mut seen = Vec::new();
        loop {
            match rx.recv().await {
                Some(TokenEvent::Tokens(texts)) => {
                    seen.extend(texts.into_iter().map(|t| (start.elapsed(), t)));
                }
                Some(TokenEvent::Finished(f)) if f.reason == FinishReason::Length => return seen,
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_steps_every_running_generation_together_and_the_rest_wait_in_order() {
        let engine = batched(2, 8);
        engine.load("b").await.unwrap();
        #[allow(clippy::disallowed_methods)] // Paused virtual time, the engine's own clock.
        let start = tokio::time::Instant::now();
        let mut streams = Vec::new();
        for id in ["b1", "b2", "b3"] {
            streams.push(engine.generate(request(id, "b")).await.unwrap());
        }
        let seen =
            futures::future::join_all(streams.into_iter().map(|rx| arrivals(rx, start))).await;
        let ms = Duration::from_millis;
        let texts = || ["tok0", " tok1", " tok2"].map(str::to_owned);
        let at = |times: [u64; 3]| -> Vec<(Duration, String)> {
            times.into_iter().map(ms).zip(texts()).collect()
        };
        // One token of each running generation per step; the third takes the first place free.
        assert_eq!(seen[0], at([10, 20, 30]));
        assert_eq!(seen[1], at([10, 20, 30]));
        assert_eq!(seen[2], at([40, 50, 60]));
        assert_eq!(engine.batch_peak("b"), 2);
        assert_eq!(engine.queued_peak("b"), 1);
        assert_eq!(engine.stats().refused, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_generations_count_as_live_until_their_consumer_drops_them() {
        let engine = batched(1, 2);
        engine.load("b").await.unwrap();
        let running = engine.generate(request("b1", "b")).await.unwrap();
        let waiting = engine.generate(request("b2", "b")).await.unwrap();
        let refused = engine.generate(request("b3", "b")).await.unwrap_err();
        assert_eq!(
            refused,
            EngineError::Generation {
                reason: "2 streams are live, limit 2 (code -32099)".to_owned()
            }
        );
        drop(waiting);
        let next = engine.generate(request("b4", "b")).await.unwrap();
        #[allow(clippy::disallowed_methods)] // Paused virtual time, the engine's own clock.
        let start = tokio::time::Instant::now();
        assert_eq!(arrivals(running, start).await.len(), 3);
        assert_eq!(arrivals(next, start).await.len(), 3);
        assert_eq!(engine.stats().refused, 1);
        assert_eq!(engine.stats().cancelled, 1);
        assert_eq!(engine.live_peak("b"), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn faults_apply_to_batched_generations_at_their_token() {
        let engine = batched(4, 8);
        engine.load("b").await.unwrap();
        engine.inject(Fault::FailAfter(1));
        let failing = engine.generate(request("b1", "b")).await.unwrap();
        let beside = engine.generate(request("b2", "b")).await.unwrap();
        assert_eq!(
            read_to_end(failing).await,
            TokenEvent::Failed(EngineError::Generation {
                reason: "simulated failure".to_owned()
            })
        );
        assert_eq!(
            read_to_end(beside).await,
            TokenEvent::Finished(FinishReason::Length.into())
        );
        engine.inject(Fault::CrashAfter {
            tokens: 1,
            restart: Duration::from_millis(50),
        });
        let crashing = engine.generate(request("b3", "b")).await.unwrap();
        let other = engine.generate(request("b4", "b")).await.unwrap();
        let crashed = TokenEvent::Failed(EngineError::Crashed {
            reason: "simulated crash".to_owned(),
        });
        assert_eq!(read_to_end(crashing).await, crashed);
        assert_eq!(read_to_end(other).await, crashed);
    }
}
