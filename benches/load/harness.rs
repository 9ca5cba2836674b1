//! What drives the system under measurement: the bench's connections, workers and engines,
//! and one run of each kind of traffic, each returning the times it saw. No statistics here
//! (`measurement`), no formatting (`report`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use mlx_worker::client::{Client, Target};
use mlx_worker::clock::SystemClock;
use mlx_worker::config;
use mlx_worker::engine::{
    Catalog, Engine, EngineError, EngineHealth, GenerateRequest, LoadedModel, TokenEvent,
    TokenStream, token_channel,
};
use mlx_worker::limits::{INFLIGHT_REQUESTS_MAX, TOKEN_CHANNEL_CAPACITY};
use mlx_worker::protocol::{InferenceRequest, StreamMessage, TokenMessage, encode};
use mlx_worker::transport::Transport;
use mlx_worker::transport::nats::NatsTransport;
use mlx_worker_sim::{SimEngine, SimEngineConfig};
use serde_json::json;
use testkit::RunningWorker;
use tokio::sync::watch;

/// The simulated engine's model.
pub(crate) const SIM_MODEL: &str = "sim/tiny";
/// The model `ci/setup.sh` generates for the real runtime.
pub(crate) const TINY_MODEL: &str = testkit::runtime::TINY;
/// The paced engine's delay before each token.
pub(crate) const PACE: Duration = Duration::from_millis(1);
/// Messages a bench client's subscription may buffer (async-nats' default is 65,536).
const CLIENT_BUFFER: usize = 1 << 20;
/// Longest a bench waits for any one message of a stream.
const PATIENCE: Duration = Duration::from_secs(60);

/// A plain async-nats connection with room for the bench's bursts.
pub(crate) async fn client(url: &str) -> async_nats::Client {
    async_nats::ConnectOptions::new()
        .subscription_capacity(CLIENT_BUFFER)
        .connect(url)
        .await
        .unwrap()
}

/// A path in the repository.
pub(crate) fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Whether a stream message is a token (looked at, not decoded).
fn is_token(payload: &[u8]) -> bool {
    const TOKEN: &[u8] = br#""type":"token""#;
    payload.windows(TOKEN.len()).any(|w| w == TOKEN)
}

/// Raw floor: `n` token messages published by one connection, read by another.
pub(crate) async fn raw_tokens(url: &str, n: usize) -> Duration {
    let publisher = client(url).await;
    let subscriber = client(url).await;
    let mut sub = subscriber.subscribe("response.raw").await.unwrap();
    subscriber.flush().await.unwrap();
    let _ = publisher.request("bench.sync", Bytes::new()).await;
    let payload = Bytes::from(
        encode(&TokenMessage::new(
            "3f1c1d52-8a0b-4b8e-9d7e-2f5d0c1b6a90",
            " tok1",
            1,
        ))
        .unwrap(),
    );
    let start = Instant::now();
    let reader = tokio::spawn(async move {
        for _ in 0..n {
            assert!(is_token(&sub.next().await.unwrap().payload));
        }
    });
    for _ in 0..n {
        publisher
            .publish("response.raw", payload.clone())
            .await
            .unwrap();
    }
    reader.await.unwrap();
    start.elapsed()
}

/// Two connections, one echoing what the other sends it: the raw request/reply floor.
pub(crate) struct RawEcho {
    asker: async_nats::Client,
}

impl RawEcho {
    /// Connects both sides and waits until the echo answers.
    pub(crate) async fn start(url: &str) -> RawEcho {
        let asker = client(url).await;
        let echoer = client(url).await;
        let mut echo = echoer.subscribe("bench.echo").await.unwrap();
        echoer.flush().await.unwrap();
        tokio::spawn(async move {
            while let Some(m) = echo.next().await {
                if let Some(reply) = m.reply {
                    echoer.publish(reply, m.payload).await.unwrap();
                }
            }
        });
        let _ = asker.request("bench.echo", Bytes::new()).await;
        RawEcho { asker }
    }

    /// One round trip.
    pub(crate) async fn round_trip(&self) -> Duration {
        let t = Instant::now();
        self.asker
            .request("bench.echo", Bytes::from_static(b"x"))
            .await
            .unwrap();
        t.elapsed()
    }
}

/// The worker's configuration for every bench worker: room for 512 streams and a deep queue.
fn worker_config(url: &str, late_wait_ms: u64) -> config::WorkerConfig {
    worker_config_with(url, late_wait_ms, "").unwrap()
}

/// [`worker_config`] with `settings` (whole YAML sections the base lacks, such as `runtime:`)
/// added; the error is why the worker rejects them.
pub(crate) fn worker_config_with(
    url: &str,
    late_wait_ms: u64,
    settings: &str,
) -> Result<config::WorkerConfig, String> {
    let yaml = format!(
        "nats:\n  serverUrl: {url}\nworker:\n  port: 0\n  maxConcurrent: 512\n  lateSubscriberWaitMs: {late_wait_ms}\n  requestQueue:\n    maxDepth: 10000\n  tierLimits:\n    '<3B': {{ maxConcurrent: 512, queueDepth: 10000 }}\n{settings}"
    );
    config::from_yaml(&yaml, Path::new("bench.yaml")).map_err(|e| e.to_string())
}

/// Starts a bench worker over `engine` ([`worker_config`]) and waits for its registration.
pub(crate) async fn start_worker(
    url: &str,
    id: &str,
    late_wait_ms: u64,
    engine: Arc<dyn Engine>,
    preload: Vec<String>,
) -> RunningWorker {
    RunningWorker::start(id, &worker_config(url, late_wait_ms), engine, preload).await
}

/// A simulated engine for [`SIM_MODEL`] that holds as many streams at once as a worker may run
/// (`INFLIGHT_REQUESTS_MAX`), so the rows measure the relay at their stream counts rather than
/// the runtime's default capacity.
pub(crate) fn sim_engine(token_latency: Duration) -> Arc<dyn Engine> {
    Arc::new(SimEngine::new(SimEngineConfig {
        token_latency,
        streams_max: [(SIM_MODEL.to_owned(), INFLIGHT_REQUESTS_MAX)].into(),
        ..SimEngineConfig::default()
    }))
}

/// `streams` requests of `tokens` each at once; returns the time until every `done` arrived.
pub(crate) async fn worker_tokens(
    url: &str,
    worker: &str,
    model: &str,
    streams: usize,
    tokens: u32,
    tag: &str,
) -> Duration {
    let client = client(url).await;
    // Request ids cannot hold `.`, so one wildcard subscription takes every stream's messages.
    let mut responses = client.subscribe("response.>").await.unwrap();
    let mine = format!("response.{tag}-");
    let _ = client.request("bench.sync", Bytes::new()).await;
    let start = Instant::now();
    for s in 0..streams {
        let body = json!({"requestId": format!("{tag}-{s}"), "modelId": model, "prompt": "x", "maxTokens": tokens});
        client
            .publish(
                format!("worker.{worker}.inference"),
                body.to_string().into(),
            )
            .await
            .unwrap();
    }
    client.flush().await.unwrap();
    let mut done = 0;
    while done < streams {
        let m = responses.next().await.unwrap();
        // Only the terminal messages are decoded, so the client costs what the raw floor's
        // reader costs: one look at each message.
        if !m.subject.as_str().starts_with(&mine) || is_token(&m.payload) {
            continue;
        }
        let msg: StreamMessage = serde_json::from_slice(&m.payload).unwrap();
        match msg {
            StreamMessage::Done { .. } => done += 1,
            StreamMessage::Error { error, .. } => panic!("{error}"),
            StreamMessage::Token { .. } => {}
        }
    }
    start.elapsed()
}

/// `streams` generations of `tokens` each at once on `engine` itself, no worker, no NATS;
/// returns the time until every one ended and the tokens produced.
pub(crate) async fn engine_tokens(
    engine: &Arc<dyn Engine>,
    model: &str,
    streams: usize,
    tokens: u32,
    tag: &str,
) -> (Duration, usize) {
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(streams);
    for s in 0..streams {
        let mut rx = engine
            .generate(GenerateRequest {
                stream_id: format!("{tag}-{s}"),
                model_id: model.to_owned(),
                prompt: "x".to_owned(),
                max_tokens: tokens,
                temperature: 0.0,
                top_p: 1.0,
                session_id: None,
            })
            .await
            .unwrap();
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while let Some(event) = rx.recv().await {
                match event {
                    TokenEvent::Tokens(texts) => n += texts.len(),
                    TokenEvent::Finished(_) => return n,
                    TokenEvent::Failed(err) => panic!("{err}"),
                }
            }
            panic!("the generation ended without an end event");
        }));
    }
    let mut produced = 0;
    for t in tasks {
        produced += t.await.unwrap();
    }
    (start.elapsed(), produced)
}

/// An engine that counts every token its inner engine generates, empty pieces included
/// (the worker does not send those), so that a bench reading the worker's streams also knows
/// how many tokens were generated behind them. Each token takes one more channel hop, a few
/// microseconds, on its way to the worker.
pub(crate) struct CountingEngine {
    inner: Arc<dyn Engine>,
    tokens: Arc<AtomicU64>,
}

impl CountingEngine {
    /// Counts what `inner` generates.
    pub(crate) fn new(inner: Arc<dyn Engine>) -> CountingEngine {
        CountingEngine {
            inner,
            tokens: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Tokens generated since the engine started.
    pub(crate) fn tokens(&self) -> u64 {
        self.tokens.load(Ordering::Relaxed)
    }
}

#[async_trait::async_trait]
impl Engine for CountingEngine {
    async fn catalog(&self) -> Result<Catalog, EngineError> {
        self.inner.catalog().await
    }

    async fn load(&self, model_id: &str) -> Result<LoadedModel, EngineError> {
        self.inner.load(model_id).await
    }

    async fn unload(&self, model_id: &str) -> Result<(), EngineError> {
        self.inner.unload(model_id).await
    }

    async fn generate(&self, request: GenerateRequest) -> Result<TokenStream, EngineError> {
        let mut inner = self.inner.generate(request).await?;
        let (tx, rx) = token_channel(TOKEN_CHANNEL_CAPACITY);
        let tokens = self.tokens.clone();
        tokio::spawn(async move {
            while let Some(event) = inner.recv().await {
                match event {
                    TokenEvent::Tokens(texts) => {
                        tokens.fetch_add(texts.len() as u64, Ordering::Relaxed);
                        // A receiver gone is a generation the worker dropped: dropping `inner`
                        // with this task cancels it on the engine too.
                        if tx.send_all(texts).await.is_err() {
                            return;
                        }
                    }
                    last => {
                        tx.end(last);
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }

    fn health(&self) -> watch::Receiver<EngineHealth> {
        self.inner.health()
    }

    async fn shutdown(&self, grace: Duration) {
        self.inner.shutdown(grace).await;
    }
}

/// The library's client over its own `NatsTransport`.
pub(crate) async fn stream_client(url: &str) -> Client {
    let nats = worker_config(url, 0).nats;
    let transport = NatsTransport::connect(&nats).await.unwrap();
    let mut connection = transport.connection();
    connection.wait_for(|c| c.connected).await.unwrap();
    Client::new(Arc::new(transport), Arc::new(SystemClock))
}

/// A greedy request as the bench sends it.
fn request(id: &str, model: &str, prompt: &str, max_tokens: u32) -> InferenceRequest {
    sampled_request(id, model, prompt, max_tokens, Sampling::GREEDY)
}

/// How a request samples its tokens.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sampling {
    pub(crate) temperature: f64,
    pub(crate) top_p: Option<f64>,
}

impl Sampling {
    /// Greedy decoding, the worker's default nucleus.
    pub(crate) const GREEDY: Sampling = Sampling {
        temperature: 0.0,
        top_p: None,
    };
}

/// A request with its sampling given.
pub(crate) fn sampled_request(
    id: &str,
    model: &str,
    prompt: &str,
    max_tokens: u32,
    sampling: Sampling,
) -> InferenceRequest {
    InferenceRequest {
        request_id: id.to_owned(),
        model_id: model.to_owned(),
        prompt: prompt.to_owned(),
        max_tokens: Some(max_tokens),
        temperature: Some(sampling.temperature),
        top_p: sampling.top_p,
        session_id: None,
        stream: None,
        priority: None,
        timeout_ms: None,
    }
}

/// Request sent → first token, for one request of one token to `worker` (the client
/// subscribes first); reads the stream to its end.
pub(crate) async fn first_token(client: &Client, worker: &str, id: &str) -> Duration {
    let mut stream = client
        .send(
            &Target::Worker(worker.to_owned()),
            &request(id, SIM_MODEL, "x", 1),
        )
        .await
        .unwrap();
    let first = stream.next(PATIENCE).await.unwrap();
    stream.collect(PATIENCE, Duration::ZERO).await.unwrap(); // done
    first.at - stream.sent_at()
}

/// The gaps between consecutive token arrivals.
pub(crate) fn gaps(arrivals: &[Instant]) -> Vec<Duration> {
    arrivals.windows(2).map(|w| w[1] - w[0]).collect()
}

/// One request through the worker: (tokens, gaps between token arrivals).
pub(crate) async fn worker_stream(
    client: &Client,
    worker: &str,
    model: &str,
    id: &str,
    tokens: u32,
) -> (usize, Vec<Duration>) {
    let request = request(id, model, "Hello world", tokens);
    let (_, arrivals) = worker_arrivals(client, worker, &request, PATIENCE).await;
    (arrivals.len(), gaps(&arrivals))
}

/// One request's answer as its client saw it.
pub(crate) struct Answer {
    /// When it was sent.
    pub(crate) sent: Instant,
    /// When each of its tokens arrived.
    pub(crate) arrivals: Vec<Instant>,
    /// Its `done` message's prompt figures.
    pub(crate) prompt_tokens: Option<u64>,
    pub(crate) cached_tokens: Option<u64>,
}

/// One request through the worker as its client sees it, to its `done`; waits at most
/// `patience` for any one message. An `error` answer, or none, is the error.
pub(crate) async fn worker_answer(
    client: &Client,
    worker: &str,
    request: &InferenceRequest,
    patience: Duration,
) -> Result<Answer, String> {
    let id = &request.request_id;
    let mut stream = client
        .send(&Target::Worker(worker.to_owned()), request)
        .await
        .map_err(|e| format!("{id}: {e}"))?;
    let mut arrivals = Vec::new();
    loop {
        let arrival = stream
            .next(patience)
            .await
            .map_err(|e| format!("{id}: {e}"))?;
        match arrival.message {
            StreamMessage::Token { .. } => arrivals.push(arrival.at.into_std()),
            StreamMessage::Done {
                prompt_tokens,
                cached_tokens,
                ..
            } => {
                return Ok(Answer {
                    sent: stream.sent_at().into_std(),
                    arrivals,
                    prompt_tokens,
                    cached_tokens,
                });
            }
            StreamMessage::Error { error, code, .. } => {
                return Err(format!("{id}: {code}: {error}"));
            }
        }
    }
}

/// [`worker_answer`]'s send time and token arrivals; a failed request fails the bench.
pub(crate) async fn worker_arrivals(
    client: &Client,
    worker: &str,
    request: &InferenceRequest,
    patience: Duration,
) -> (Instant, Vec<Instant>) {
    match worker_answer(client, worker, request, patience).await {
        Ok(answer) => (answer.sent, answer.arrivals),
        Err(why) => panic!("{why}"),
    }
}

/// One generation on the engine itself: (non-empty tokens, gaps between them).
pub(crate) async fn engine_stream(
    engine: &Arc<dyn Engine>,
    model: &str,
    id: &str,
    tokens: u32,
) -> (usize, Vec<Duration>) {
    let mut rx = engine
        .generate(GenerateRequest {
            stream_id: id.to_owned(),
            model_id: model.to_owned(),
            prompt: "Hello world".to_owned(),
            max_tokens: tokens,
            temperature: 0.0,
            top_p: 1.0,
            session_id: None,
        })
        .await
        .unwrap();
    let mut arrivals = Vec::new();
    while let Some(event) = rx.recv().await {
        match event {
            // As the worker does, an empty piece (half a character) is not a token.
            TokenEvent::Tokens(texts) => {
                let now = Instant::now();
                arrivals.extend(texts.iter().filter(|t| !t.is_empty()).map(|_| now));
            }
            TokenEvent::Finished(_) => return (arrivals.len(), gaps(&arrivals)),
            TokenEvent::Failed(err) => panic!("{err}"),
        }
    }
    panic!("the generation ended without an end event");
}

/// The resident memory of this process, in KiB (0 when it cannot be read).
pub(crate) fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}
