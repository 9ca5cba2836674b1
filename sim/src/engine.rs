//! [`SimEngine`]: a scripted [`Engine`] with per-token latency, load latency, a capacity per
//! model and injectable faults (load failure, failure mid-stream, crash, hang).
//!
//! Like the MLX runtime, it holds a bounded number of live generations of each model (its
//! catalog says how many, and a load may answer fewer, as the runtime does for a model whose
//! cache cannot be batched) and refuses a `generate` past that at once, with the error the MLX
//! engine gives for the runtime's refusal; it counts the refusals and the most it held.
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
    ModelEntry, TokenEvent, TokenStream,
};
use mlx_worker::limits::{RUNTIME_STREAMS_LIVE_DEFAULT, TOKEN_CHANNEL_CAPACITY};
use tokio::sync::{mpsc, watch};

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
    /// does by default.
    pub streams_max: BTreeMap<String, usize>,
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
    live: Vec<mpsc::Sender<TokenEvent>>,
    /// Live generations by model, and the most each model had at once.
    live_by_model: BTreeMap<String, usize>,
    live_peak: BTreeMap<String, usize>,
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
            let _ = tx.try_send(TokenEvent::Failed(EngineError::Crashed {
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
        let place = self.admit_stream(&request.model_id)?;
        let fault = self.take_fault(|f| *f != Fault::LoadFails);
        let (tx, rx) = mpsc::channel(TOKEN_CHANNEL_CAPACITY);
        {
            let mut s = self.lock();
            s.generations += 1;
            s.live.retain(|t| !t.is_closed());
            s.live.push(tx.clone());
        }
        let engine = self.clone();
        let latency = self.config.token_latency;
        tokio::spawn(async move {
            // Held until this task ends: the generation is live until its last event.
            let _place = place;
            for i in 0..request.max_tokens {
                match &fault {
                    Some(Fault::FailAfter(n)) if *n == i => {
                        let _ = tx
                            .send(TokenEvent::Failed(EngineError::Generation {
                                reason: "simulated failure".to_owned(),
                            }))
                            .await;
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
                let text = if i == 0 {
                    "tok0".to_owned()
                } else {
                    format!(" tok{i}")
                };
                if tx.send(TokenEvent::Token(text)).await.is_err() {
                    engine.lock().cancelled += 1;
                    return;
                }
                if i + 1 == request.max_tokens {
                    // The last token is out: the generation completes.
                    engine.count_completed(&request);
                }
            }
            let _ = tx.send(TokenEvent::Finished(FinishReason::Length)).await;
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
        }
    }

    async fn read_to_end(mut rx: TokenStream) -> TokenEvent {
        loop {
            match rx.recv().await {
                Some(TokenEvent::Token(_)) => {}
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
            TokenEvent::Finished(FinishReason::Length)
        );
        let _third = engine.generate(request("a3", "a")).await.unwrap();
        assert_eq!(engine.stats().refused, 1);
        assert_eq!(engine.live_peak("a"), 2);
        assert_eq!(engine.live_peak("b"), 1);
    }
}
