//! One accepted request, from the start of its work to its single terminal message: load the
//! model if needed, generate, publish each token with a contiguous index (the tokens ready
//! together, in one event or several, in one hand-off to the transport), then exactly one
//! `done` or one `error`, and report the outcome to the dispatcher.
//!
//! The request ends early when its [`Abort`] fires (cancel message, drain deadline), its
//! deadline passes, or its stream breaks because the link to the message server was lost (see
//! `responder`); the engine's token stream is dropped then, which cancels the generation. A
//! broken stream ends with `STREAM_INTERRUPTED` once the link is back, never with `done`. A
//! terminal whose link is not back by the deadline has nobody left to tell: the request counts
//! as undeliverable.

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use super::health::ModelHealth;
use super::keeper::Keeper;
use super::responder::{Failure, Responder, Sent, Window};
use crate::clock::{Clock, millis};
use crate::engine::{Engine, EngineError, GenerateRequest, LoadedModel, PromptUsage, TokenEvent};
use crate::limits::{TOKENS_PUBLISHED_TOGETHER_MAX, WORK_QUEUE_ACK_WAIT};
use crate::metrics::telemetry::Telemetry;
use crate::metrics::{Outcome, RequestRecord};
use crate::mutation::{Mutation, Mutations};
use crate::protocol::{DoneMessage, ErrorCode, ErrorMessage, TokenMessage};
use crate::transport::work_queue::Settle;
use crate::transport::{Transport, TransportError};

/// Stops a request from outside, with the reason its terminal message will give.
#[derive(Debug, Default)]
pub(crate) struct Abort {
    token: CancellationToken,
    reason: OnceLock<ErrorCode>,
}

impl Abort {
    /// Stops the request with `reason`; the first reason given wins.
    pub(crate) fn fire(&self, reason: ErrorCode) {
        let _ = self.reason.set(reason);
        self.token.cancel();
    }

    fn reason(&self) -> ErrorCode {
        self.reason.get().copied().unwrap_or(ErrorCode::Cancelled)
    }
}

/// Loads models, sharing one load among the requests that need the same model at once, and
/// keeps each model's health: a model whose load failed is withdrawn ([`ModelHealth`]) and
/// not loaded again until its retry. Before a load, the [`Keeper`] makes room for it.
pub(crate) struct Loader {
    in_flight: Mutex<HashMap<String, SharedLoad>>,
    /// How many requests of each model the engine runs at once, as its last load said; the
    /// run loop hands changes to the dispatcher, which lowers the model's running limit.
    capacities: watch::Sender<BTreeMap<String, usize>>,
    /// The withdrawn models.
    pub(crate) health: Arc<ModelHealth>,
    /// Which models stay loaded.
    pub(crate) keeper: Arc<Keeper>,
}

type SharedLoad = Shared<BoxFuture<'static, Result<LoadedModel, EngineError>>>;

impl Loader {
    /// A loader whose loads `keeper` makes room for.
    pub(crate) fn new(keeper: Arc<Keeper>) -> Loader {
        Loader {
            in_flight: Mutex::default(),
            capacities: watch::Sender::default(),
            health: Arc::default(),
            keeper,
        }
    }

    /// Ensures `model` is loaded; concurrent callers wait on the same load. A withdrawn model
    /// is refused with its load's reason, without loading it again.
    pub(crate) async fn ensure(
        self: &Arc<Self>,
        engine: &Arc<dyn Engine>,
        clock: &Arc<dyn Clock>,
        model: &str,
    ) -> Result<LoadedModel, EngineError> {
        if let Some(w) = self.health.withdrawal(model) {
            return Err(EngineError::LoadFailed {
                model: model.to_owned(),
                reason: format!(
                    "withdrawn after {} failed load(s), retried in {} s: {}",
                    w.failures,
                    w.retry_at
                        .saturating_sub(clock.unix_millis())
                        .div_ceil(1000),
                    w.reason
                ),
            });
        }
        self.load(engine, clock, model).await
    }

    /// Loads `model`, withdrawn or not (its retry); records how it went.
    pub(crate) async fn load(
        self: &Arc<Self>,
        engine: &Arc<dyn Engine>,
        clock: &Arc<dyn Clock>,
        model: &str,
    ) -> Result<LoadedModel, EngineError> {
        let result = match self.keeper.make_room(engine, model).await {
            Ok(_room) => self.shared_load(engine, model).await,
            Err(err) => Err(err),
        };
        match &result {
            Ok(_) => {
                self.health.loaded(model);
                self.keeper.loaded_at(model, clock.now());
            }
            Err(EngineError::LoadFailed { reason, .. }) => {
                warn!(%model, %reason, "the model failed to load; it is withdrawn until its retry");
                self.health
                    .failed(model, reason, clock.now(), clock.unix_millis());
            }
            Err(_) => {}
        }
        result
    }

    async fn shared_load(
        self: &Arc<Self>,
        engine: &Arc<dyn Engine>,
        model: &str,
    ) -> Result<LoadedModel, EngineError> {
        let load = {
            let mut map = self
                .in_flight
                .lock()
                .map_err(|_| EngineError::Unavailable {
                    reason: "model loader state is poisoned".to_owned(),
                })?;
            map.entry(model.to_owned())
                .or_insert_with(|| {
                    let engine = engine.clone();
                    let model = model.to_owned();
                    let loader = self.clone();
                    async move {
                        let result = engine.load(&model).await;
                        if let Ok(LoadedModel {
                            streams_max: Some(n),
                            ..
                        }) = &result
                        {
                            loader.note_capacity(&model, *n);
                        }
                        // The next request asks the engine again, which is cheap for a
                        // loaded model and reloads one lost in an engine restart.
                        if let Ok(mut map) = loader.in_flight.lock() {
                            map.remove(&model);
                        }
                        result
                    }
                    .boxed()
                    .shared()
                })
                .clone()
        };
        load.await
    }

    /// Follows what the loads said of each model's capacity.
    pub(crate) fn capacities(&self) -> watch::Receiver<BTreeMap<String, usize>> {
        self.capacities.subscribe()
    }

    fn note_capacity(&self, model: &str, streams_max: usize) {
        self.capacities
            .send_if_modified(|c| c.insert(model.to_owned(), streams_max) != Some(streams_max));
    }
}

/// Everything a request task needs, shared by all of them.
pub(crate) struct RequestContext {
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) engine: Arc<dyn Engine>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) loader: Arc<Loader>,
    pub(crate) late_subscriber_wait: Duration,
    /// Shortest time from a request's receipt to the first message of its stream.
    pub(crate) late_subscriber_min_delay: Duration,
    /// Where finished requests are reported; the dispatcher reads it.
    pub(crate) finished: mpsc::Sender<Finished>,
    /// Planted bugs (always empty outside the simulation suite).
    pub(crate) mutations: Mutations,
    /// Shared counters and histograms.
    pub(crate) telemetry: Arc<Telemetry>,
}

/// A request ready to run.
#[derive(Debug)]
pub(crate) struct Job {
    pub(crate) request_id: String,
    pub(crate) generate: GenerateRequest,
    pub(crate) received_at: Instant,
    pub(crate) deadline: Instant,
    pub(crate) abort: Arc<Abort>,
    /// The work-queue message it came in, to acknowledge as it starts.
    pub(crate) taken: Option<Box<dyn Settle>>,
}

/// A request's end, as reported to the dispatcher.
#[derive(Debug)]
pub(crate) struct Finished {
    pub(crate) request_id: String,
    pub(crate) record: RequestRecord,
}

/// What the generation phase ended with, before the terminal message.
enum End {
    /// With the prompt's figures, when the engine stated them.
    Done(Option<PromptUsage>),
    Failed(ErrorCode, String),
    /// The stream broke with the link: it ends `STREAM_INTERRUPTED` once the link is back.
    Interrupted(String),
    /// The stream is abandoned without a terminal (a planted bug only).
    Lost(String),
}

/// Runs one request to its terminal message and reports it.
pub(crate) async fn run(ctx: Arc<RequestContext>, job: Job) {
    let span = info_span!("request", request_id = %job.request_id, model = %job.generate.model_id);
    async move {
        let mut progress = Progress::default();
        let outcome = match &job.taken {
            Some(taken) if let Err(cause) = confirm_start(taken.as_ref()).await => {
                // Not run here, and nothing published: the queue delivers it again, to a
                // worker that can confirm it. Running it unconfirmed could run it twice.
                warn!(%cause, "the work queue did not confirm the start; left to the queue");
                Outcome::Failed(ErrorCode::WorkerShutdown)
            }
            _ => generate(&ctx, &job, &mut progress).await,
        };
        let record = RequestRecord {
            model: job.generate.model_id.clone(),
            outcome,
            latency: ctx.clock.now().saturating_duration_since(job.received_at),
            time_to_first_token: progress.first_token_at,
            tokens: progress.tokens,
            finished_at: ctx.clock.now(),
        };
        if ctx
            .finished
            .send(Finished {
                request_id: job.request_id.clone(),
                record,
            })
            .await
            .is_err()
        {
            debug!("dispatcher gone before the request finished");
        }
    }
    .instrument(span)
    .await
}

/// Generates `job`'s answer and sends its terminal message; how it ended.
async fn generate(ctx: &Arc<RequestContext>, job: &Job, progress: &mut Progress) -> Outcome {
    let window = Window {
        not_before: job.received_at + ctx.late_subscriber_min_delay,
        listener_wait: ctx.late_subscriber_wait,
        deadline: job.deadline,
    };
    let mut responder = Responder::new(
        ctx.transport.clone(),
        ctx.clock.clone(),
        &job.request_id,
        window,
        ctx.mutations,
    );
    let end = tokio::select! {
        end = stream(ctx, job, &mut responder, progress) => end,
        () = job.abort.token.cancelled() => {
            let code = job.abort.reason();
            End::Failed(code, abort_message(code))
        }
        () = tokio::time::sleep_until(job.deadline) => End::Failed(
            ErrorCode::Timeout,
            format!(
                "request ran past its deadline of {} ms",
                millis(job.deadline.saturating_duration_since(job.received_at))
            ),
        ),
    };
    finish(ctx, job, &mut responder, progress, end).await
}

/// Acknowledges a work-queue message as its request starts, within [`WORK_QUEUE_ACK_WAIT`].
async fn confirm_start(taken: &dyn Settle) -> Result<(), TransportError> {
    tokio::time::timeout(WORK_QUEUE_ACK_WAIT, taken.ack())
        .await
        .unwrap_or(Err(TransportError::TimedOut {
            millis: millis(WORK_QUEUE_ACK_WAIT),
        }))
}

fn abort_message(code: ErrorCode) -> String {
    match code {
        ErrorCode::WorkerShutdown => "the worker is shutting down".to_owned(),
        ErrorCode::Cancelled => "the request was cancelled".to_owned(),
        other => format!("the request was stopped ({other})"),
    }
}

/// Tokens sent so far; survives the generation future being dropped on abort.
#[derive(Default)]
struct Progress {
    tokens: u64,
    first_token_at: Option<Duration>,
    last_token: Option<Instant>,
}

impl Progress {
    /// Counts `sent` tokens that just went out together, for the request received at
    /// `received_at`: the first of the stream is its time to first token, each after it
    /// one gap between tokens (none, between tokens that went out together).
    fn count(&mut self, ctx: &RequestContext, received_at: Instant, sent: usize) {
        if sent == 0 {
            return;
        }
        let now = ctx.clock.now();
        match self.last_token {
            None => self.first_token_at = Some(now.saturating_duration_since(received_at)),
            Some(last) => ctx
                .telemetry
                .inter_token
                .observe(now.saturating_duration_since(last)),
        }
        for _ in 1..sent {
            ctx.telemetry.inter_token.observe(Duration::ZERO);
        }
        self.last_token = Some(now);
        self.tokens += sent as u64;
    }
}

async fn stream(
    ctx: &RequestContext,
    job: &Job,
    responder: &mut Responder,
    progress: &mut Progress,
) -> End {
    // Held to the end of the stream: the model is in use, so neither idle nor evicted.
    let _in_use = ctx.loader.keeper.hold(&job.generate.model_id, &ctx.clock);
    if let Err(err) = ctx
        .loader
        .ensure(&ctx.engine, &ctx.clock, &job.generate.model_id)
        .await
    {
        return End::Failed(err.code(), err.to_string());
    }
    let mut tokens = match ctx.engine.generate(job.generate.clone()).await {
        Ok(stream) => stream,
        Err(err) => return End::Failed(err.code(), err.to_string()),
    };
    // An event taken from the stream while gathering tokens, not yet handled.
    let mut next: Option<TokenEvent> = None;
    loop {
        let event = match next.take() {
            Some(event) => event,
            None => match tokens.recv().await {
                Some(event) => event,
                None => break,
            },
        };
        match event {
            TokenEvent::Tokens(mut texts) => {
                // What else is ready goes out with these, in one hand-off.
                while texts.len() < TOKENS_PUBLISHED_TOGETHER_MAX {
                    match tokens.try_recv() {
                        Ok(TokenEvent::Tokens(more)) => texts.extend(more),
                        Ok(end) => {
                            next = Some(end);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                // An empty piece (half of a multi-byte character) is not a token for the client.
                let texts: Vec<&str> = texts
                    .iter()
                    .map(String::as_str)
                    .filter(|t| !t.is_empty())
                    .collect();
                if let Err(end) = publish_tokens(ctx, job, responder, progress, &texts).await {
                    return end;
                }
            }
            TokenEvent::Finished(finish) => return End::Done(finish.usage),
            TokenEvent::Failed(err) => return End::Failed(err.code(), err.to_string()),
        }
    }
    End::Failed(
        ErrorCode::EngineCrashed,
        "the engine ended the stream without finishing it".to_owned(),
    )
}

/// Publishes `texts` as the stream's next tokens, with contiguous indices, and counts them. The
/// stream's first token goes alone, so that its time is the time to the first token; the
/// others go in one hand-off.
async fn publish_tokens(
    ctx: &RequestContext,
    job: &Job,
    responder: &mut Responder,
    progress: &mut Progress,
    texts: &[&str],
) -> Result<(), End> {
    let alone = usize::from(progress.tokens == 0).min(texts.len());
    let (first, rest) = texts.split_at(alone);
    for part in [first, rest] {
        if part.is_empty() {
            continue;
        }
        let from = progress.tokens;
        let one_index = ctx.mutations.has(Mutation::OneIndexPerBatch);
        let messages: Vec<TokenMessage<'_>> = (from..)
            .zip(part)
            .map(|(index, text)| {
                let index = if one_index { from } else { index };
                TokenMessage::new(&job.request_id, text, index)
            })
            .collect();
        let published = responder.tokens(&messages).await;
        let sent = published.as_ref().map_or_else(|b| b.sent, |()| part.len());
        progress.count(ctx, job.received_at, sent);
        if let Err(broken) = published {
            let timed_out = matches!(
                broken.cause,
                Failure::Transport(TransportError::TimedOut { .. })
            );
            if broken.first
                && timed_out
                && ctx.mutations.has(Mutation::AbandonOnFirstPublishTimeout)
            {
                return Err(End::Lost(broken.to_string()));
            }
            return Err(End::Interrupted(broken.to_string()));
        }
    }
    Ok(())
}

async fn finish(
    ctx: &RequestContext,
    job: &Job,
    responder: &mut Responder,
    progress: &Progress,
    end: End,
) -> Outcome {
    let latency = millis(ctx.clock.now().saturating_duration_since(job.received_at));
    let interrupted_text = interrupted_text(progress.tokens);
    let interrupted = ErrorMessage::new(
        &job.request_id,
        ErrorCode::StreamInterrupted,
        &interrupted_text,
    );
    let (sent, outcome) = match end {
        End::Done(usage) if responder.is_intact() => {
            let done = DoneMessage::new(&job.request_id, progress.tokens, latency)
                .with_usage(usage.map(|u| (u.prompt_tokens, u.cached_tokens)));
            let sent = responder.terminal(&done, &interrupted).await;
            if ctx.mutations.has(Mutation::TokenAfterDone) {
                let stray = TokenMessage::new(&job.request_id, "stray", progress.tokens);
                responder.publish_stray(&stray).await;
            }
            (sent, Outcome::Success)
        }
        End::Done(_) | End::Interrupted(_) => {
            if let End::Interrupted(cause) = &end {
                info!(%cause, tokens = progress.tokens, "stream interrupted by the link");
            }
            (
                responder.terminal(&interrupted, &interrupted).await,
                Outcome::Failed(ErrorCode::StreamInterrupted),
            )
        }
        End::Failed(ErrorCode::Timeout, _)
            if ctx.mutations.has(Mutation::DropTerminalOnTimeout) =>
        {
            return Outcome::Failed(ErrorCode::Timeout);
        }
        End::Failed(code, text) => {
            let error = ErrorMessage::new(&job.request_id, code, &text);
            (
                responder.terminal(&error, &error).await,
                Outcome::Failed(code),
            )
        }
        End::Lost(reason) => {
            warn!(cause = %reason, "response stream lost; no terminal message can be sent");
            return Outcome::Undeliverable;
        }
    };
    match sent {
        Ok(Sent::AsIs) => outcome,
        // Only a `done` is replaced, by `STREAM_INTERRUPTED`; an error is sent again as it is.
        Ok(Sent::Retry) if outcome == Outcome::Success => {
            Outcome::Failed(ErrorCode::StreamInterrupted)
        }
        Ok(Sent::Retry) => outcome,
        Err(err) => {
            warn!(cause = %err, "terminal message could not be published");
            Outcome::Undeliverable
        }
    }
}

/// The text of `STREAM_INTERRUPTED`, for whoever reads it: the existing controller passes only
/// the text on to its HTTP client.
fn interrupted_text(tokens: u64) -> String {
    format!(
        "the response is incomplete: the worker lost its connection to the message server \
         while it streamed the answer ({tokens} tokens sent), so some tokens may be missing; \
         send the request again"
    )
}
