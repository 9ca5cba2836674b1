//! The dispatcher: the one task that owns the worker's request state. It reads the inference
//! and cancel subscriptions, decides admission (validation, duplicate ids, drain, model,
//! queue bound), starts request tasks through the scheduler, hears their ends, times out
//! waiting requests, publishes its figures after each change, and at stop drains.
//!
//! Every request it accepts ends with exactly one terminal message, sent either by its request
//! task or — for requests refused or ended while waiting — by a short responder task here.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use super::figures::{FAULT_MIN_SAMPLES, FAULT_WINDOW, FaultAging, Figures, IntakeCounters};
use super::request::{self, Abort, Finished, Job, RequestContext};
use super::responder::Responder;
use crate::clock::millis;
use crate::config::NodeConfig;
use crate::engine::GenerateRequest;
use crate::metrics::{Collector, Outcome, RequestRecord, Snapshot};
use crate::mutation::Mutation;
use crate::protocol::request::{ValidRequest, decode_cancel, decode_request};
use crate::protocol::{self, ErrorCode, ErrorMessage};
use crate::scheduler::{Admission, Scheduler};
use crate::tier::ModelTier;
use crate::transport::InboundMessage;

/// Responder tasks for refused requests that may wait for a listener at once; past this, a
/// refusal is published without waiting, so a flood cannot pile up tasks.
const REFUSAL_TASKS_MAX: usize = 256;
/// Cancels remembered for requests that have not arrived yet.
const LATCHED_CANCELS_MAX: usize = 1024;
/// How long a latched cancel waits for its request.
const LATCHED_CANCEL_TTL: Duration = Duration::from_secs(60);

/// A request the dispatcher accepted.
struct Tracked {
    generate: GenerateRequest,
    tier: ModelTier,
    received_at: Instant,
    deadline: Instant,
    abort: Arc<Abort>,
    running: bool,
}

/// Cancels that arrived before their request, bounded in number and age.
#[derive(Default)]
struct Latch {
    order: VecDeque<(Instant, String)>,
}

impl Latch {
    fn insert(&mut self, now: Instant, id: String) {
        self.expire(now);
        if self.order.len() == LATCHED_CANCELS_MAX {
            self.order.pop_front();
        }
        self.order.push_back((now, id));
    }

    fn take(&mut self, now: Instant, id: &str) -> bool {
        self.expire(now);
        match self.order.iter().position(|(_, latched)| latched == id) {
            Some(pos) => {
                self.order.remove(pos);
                true
            }
            None => false,
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some((at, _)) = self.order.front() {
            if now.saturating_duration_since(*at) <= LATCHED_CANCEL_TTL {
                break;
            }
            self.order.pop_front();
        }
    }
}

/// The dispatcher's state.
pub(crate) struct Dispatcher {
    config: NodeConfig,
    /// Model id → tier, for every model the engine serves.
    tiers: HashMap<String, ModelTier>,
    scheduler: Scheduler,
    requests: HashMap<String, Tracked>,
    /// Deadlines of waiting requests, earliest first.
    queued_deadlines: BTreeSet<(Instant, String)>,
    latch: Latch,
    metrics: Collector,
    /// Requests recorded in `metrics` so far.
    recorded: u64,
    counters: IntakeCounters,
    /// Where the figures are published for presence, service discovery and `/metrics`.
    figures: watch::Sender<Figures>,
    /// What the last published figures were built from, to build them only when it changed.
    published: Option<Published>,
    /// When the fault ratio next changes by itself.
    aging: FaultAging,
    ctx: Arc<RequestContext>,
    /// Request and responder tasks; waited for at the end of a drain.
    tasks: TaskTracker,
    /// Bounds the responder tasks of refusals.
    refusals: Arc<Semaphore>,
    draining: bool,
}

/// What the figures change with, besides the metrics collector's records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Published {
    recorded: u64,
    running: usize,
    queued: usize,
    intake: IntakeCounters,
}

/// What the run loop reports when it ends.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DispatchReport {
    /// The collector's final reading.
    pub metrics: Snapshot,
    /// Inbound messages that never became requests.
    pub intake: IntakeCounters,
    /// Requests still without a terminal message when the worker gave up waiting (always 0
    /// unless the link was gone at the end).
    pub abandoned: usize,
}

impl Dispatcher {
    pub(crate) fn new(
        config: NodeConfig,
        tiers: HashMap<String, ModelTier>,
        scheduler: Scheduler,
        ctx: Arc<RequestContext>,
        figures: watch::Sender<Figures>,
    ) -> Dispatcher {
        let mut dispatcher = Dispatcher {
            config,
            tiers,
            scheduler,
            requests: HashMap::new(),
            queued_deadlines: BTreeSet::new(),
            latch: Latch::default(),
            metrics: Collector::default(),
            recorded: 0,
            counters: IntakeCounters::default(),
            figures,
            published: None,
            aging: FaultAging::default(),
            ctx,
            tasks: TaskTracker::new(),
            refusals: Arc::new(Semaphore::new(REFUSAL_TASKS_MAX)),
            draining: false,
        };
        dispatcher.publish();
        dispatcher
    }

    /// Whether any accepted request lacks its terminal message.
    pub(crate) fn is_idle(&self) -> bool {
        self.requests.is_empty()
    }

    /// The earliest deadline of a waiting request.
    pub(crate) fn next_queued_deadline(&self) -> Option<Instant> {
        self.queued_deadlines.first().map(|(at, _)| *at)
    }

    /// Handles one message of `worker.{id}.inference`, or of a model queue group
    /// (`from_group`): those were routed here before the worker left its groups, so they are
    /// served even while draining.
    pub(crate) fn on_request(&mut self, msg: InboundMessage, from_group: bool) {
        let now = self.ctx.clock.now();
        match decode_request(&msg.payload, &self.config.request_limits) {
            Ok(request) => self.admit(request, msg.reply, now, from_group),
            Err(rejection) => match rejection.request_id.clone() {
                Some(id) if self.requests.contains_key(&id) => {
                    self.duplicate(&id, msg.reply);
                }
                Some(id) => {
                    debug!(request_id = %id, cause = %rejection.error, "invalid request");
                    self.refuse(&id, "-", rejection.code(), rejection.error.to_string(), now);
                }
                None => {
                    self.counters.unreadable += 1;
                    warn!(
                        cause = %rejection.error,
                        bytes = msg.payload.len(),
                        "request without a readable id dropped"
                    );
                    if let Some(reply) = msg.reply {
                        let text = rejection.error.to_string();
                        let message = ErrorMessage::anonymous(rejection.code(), &text);
                        self.reply(reply, &message);
                    }
                }
            },
        }
    }

    fn admit(
        &mut self,
        request: ValidRequest,
        reply: Option<String>,
        now: Instant,
        from_group: bool,
    ) {
        let id = request.request_id.clone();
        if self.requests.contains_key(&id) {
            self.duplicate(&id, reply);
            return;
        }
        if self.draining && !from_group {
            self.refuse(
                &id,
                &request.model_id,
                ErrorCode::WorkerShutdown,
                "the worker is draining and takes no new requests".to_owned(),
                now,
            );
            return;
        }
        let Some(&tier) = self.tiers.get(&request.model_id) else {
            let served: Vec<&str> = self.tiers.keys().map(String::as_str).collect();
            let text = format!(
                "model {:?} is not served by this worker (it serves {})",
                request.model_id,
                if served.is_empty() {
                    "none".to_owned()
                } else {
                    served.join(", ")
                }
            );
            self.refuse(&id, &request.model_id, ErrorCode::ModelNotFound, text, now);
            return;
        };
        if self.latch.take(now, &id) {
            self.refuse(
                &id,
                &request.model_id,
                ErrorCode::Cancelled,
                "the request was cancelled before it arrived".to_owned(),
                now,
            );
            return;
        }
        let timeout = request.timeout.map_or(self.config.request_timeout, |t| {
            t.min(self.config.request_timeout)
        });
        let defaults = &self.config.generation_defaults;
        let generate = GenerateRequest {
            stream_id: id.clone(),
            model_id: request.model_id.clone(),
            prompt: request.prompt,
            max_tokens: request.max_tokens.unwrap_or(defaults.max_tokens),
            temperature: request.temperature.unwrap_or(defaults.temperature),
            top_p: request.top_p.unwrap_or(defaults.top_p),
        };
        let tracked = Tracked {
            generate,
            tier,
            received_at: now,
            deadline: now + timeout,
            abort: Arc::new(Abort::default()),
            running: false,
        };
        match self.scheduler.admit(id.clone(), tier, request.priority) {
            Admission::Start => {
                self.requests.insert(id.clone(), tracked);
                self.start(&id);
            }
            Admission::Queued => {
                self.queued_deadlines.insert((tracked.deadline, id.clone()));
                self.requests.insert(id, tracked);
            }
            Admission::Full { waiting, limit } => {
                let text = format!("queue is full ({waiting} waiting, limit {limit})");
                self.refuse(
                    &id,
                    &tracked.generate.model_id,
                    ErrorCode::QueueFull,
                    text,
                    now,
                );
            }
        }
    }

    fn start(&mut self, id: &str) {
        let Some(tracked) = self.requests.get_mut(id) else {
            return;
        };
        tracked.running = true;
        self.queued_deadlines
            .remove(&(tracked.deadline, id.to_owned()));
        let job = Job {
            request_id: id.to_owned(),
            generate: tracked.generate.clone(),
            received_at: tracked.received_at,
            deadline: tracked.deadline,
            abort: tracked.abort.clone(),
        };
        self.tasks.spawn(request::run(self.ctx.clone(), job));
    }

    fn duplicate(&mut self, id: &str, reply: Option<String>) {
        self.counters.duplicates += 1;
        warn!(request_id = %id, "duplicate of a request in flight; the first one continues");
        // Never on response.{id}: a second terminal there would end the first stream.
        if let Some(reply) = reply {
            let text = format!("request {id} is already in flight on this worker");
            let message = ErrorMessage::new(id, ErrorCode::DuplicateRequest, &text);
            self.reply(reply, &message);
        }
    }

    /// Ends a request that will not run with an error on its response subject.
    fn refuse(&mut self, id: &str, model: &str, code: ErrorCode, text: String, received: Instant) {
        debug!(request_id = %id, %code, reason = %text, "request refused");
        self.record(RequestRecord {
            model: model.to_owned(),
            outcome: Outcome::Failed(code),
            latency: self.ctx.clock.now().saturating_duration_since(received),
            time_to_first_token: None,
            tokens: 0,
            finished_at: self.ctx.clock.now(),
        });
        let wait = match self.refusals.clone().try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) => {
                self.counters.refusals_unprotected += 1;
                None
            }
        };
        let ctx = self.ctx.clone();
        let id = id.to_owned();
        self.tasks.spawn(async move {
            // Past the bound, refusals go out without waiting for a listener.
            let late_wait = if wait.is_some() {
                ctx.late_subscriber_wait
            } else {
                Duration::ZERO
            };
            let mut responder =
                Responder::new(ctx.transport.clone(), ctx.clock.clone(), &id, late_wait);
            let message = ErrorMessage::new(&id, code, &text);
            if let Err(err) = responder.send(&message).await {
                warn!(request_id = %id, cause = %err, "refusal could not be published");
            }
            drop(wait);
        });
    }

    fn reply(&self, subject: String, message: &ErrorMessage<'_>) {
        let Ok(payload) = protocol::encode(message) else {
            return;
        };
        let transport = self.ctx.transport.clone();
        self.tasks.spawn(async move {
            if let Err(err) = transport.publish(subject, Bytes::from(payload)).await {
                debug!(cause = %err, "reply not sent");
            }
        });
    }

    /// Handles one message of `worker.{id}.cancel`.
    pub(crate) fn on_cancel(&mut self, msg: InboundMessage) {
        let now = self.ctx.clock.now();
        let id = match decode_cancel(&msg.payload) {
            Ok(id) => id,
            Err(err) => {
                self.counters.bad_cancels += 1;
                warn!(cause = %err, "unreadable cancel message dropped");
                return;
            }
        };
        match self.requests.get(&id) {
            Some(t) if t.running => {
                info!(request_id = %id, "cancelling a running request");
                t.abort.fire(ErrorCode::Cancelled);
            }
            Some(_) => {
                info!(request_id = %id, "cancelling a waiting request");
                self.end_waiting(
                    &id,
                    ErrorCode::Cancelled,
                    "the request was cancelled".to_owned(),
                );
            }
            None if self.ctx.mutations.has(Mutation::ForgetLatchedCancel) => {}
            None => {
                debug!(request_id = %id, "cancel for an unknown request latched");
                self.latch.insert(now, id);
            }
        }
    }

    /// Ends a waiting request with an error.
    fn end_waiting(&mut self, id: &str, code: ErrorCode, text: String) {
        if !self.scheduler.remove_queued(id) {
            return;
        }
        if let Some(t) = self.requests.remove(id) {
            self.queued_deadlines.remove(&(t.deadline, id.to_owned()));
            self.refuse(id, &t.generate.model_id, code, text, t.received_at);
        }
    }

    /// Ends waiting requests whose deadline has passed.
    pub(crate) fn expire_queued(&mut self) {
        let now = self.ctx.clock.now();
        while let Some((at, id)) = self.queued_deadlines.first().cloned() {
            if at > now {
                break;
            }
            let waited = self
                .requests
                .get(&id)
                .map_or(0, |t| millis(at.saturating_duration_since(t.received_at)));
            self.end_waiting(
                &id,
                ErrorCode::Timeout,
                format!("request waited past its deadline of {waited} ms for a slot"),
            );
            self.queued_deadlines.remove(&(at, id));
        }
    }

    /// A request task ended.
    pub(crate) fn on_finished(&mut self, finished: Finished) {
        let Some(tracked) = self.requests.remove(&finished.request_id) else {
            error!(request_id = %finished.request_id, "finish of an unknown request");
            return;
        };
        debug_assert!(tracked.running, "only running requests finish");
        let telemetry = &self.ctx.telemetry;
        telemetry.request_duration.observe(finished.record.latency);
        if let Some(ttft) = finished.record.time_to_first_token {
            telemetry.time_to_first_token.observe(ttft);
        }
        self.record(finished.record);
        for id in self.scheduler.finish(tracked.tier) {
            self.start(&id);
        }
    }

    fn record(&mut self, record: RequestRecord) {
        self.aging.note(record.finished_at);
        self.metrics.record(record);
        self.recorded += 1;
    }

    /// Publishes the figures if anything they show changed since they were last published.
    pub(crate) fn publish(&mut self) {
        let now = Published {
            recorded: self.recorded,
            running: self.scheduler.running(),
            queued: self.scheduler.queued(),
            intake: self.counters,
        };
        if self.published == Some(now) {
            return;
        }
        self.published = Some(now);
        let limits = self.scheduler.limits();
        self.figures.send_replace(Figures {
            snapshot: self.metrics.snapshot(),
            running: now.running,
            queued: now.queued,
            queue_capacity: limits.queue_depth_max,
            inflight_capacity: limits.inflight_max,
            intake: now.intake,
            fault_ratio: self.fault_ratio(),
        });
    }

    fn fault_ratio(&self) -> f64 {
        self.metrics
            .fault_ratio(self.ctx.clock.now(), FAULT_WINDOW, FAULT_MIN_SAMPLES)
    }

    /// When the fault ratio next changes with time alone.
    pub(crate) fn next_fault_aging(&self) -> Option<Instant> {
        self.aging.next()
    }

    /// Takes the fault ratio again once requests have left its window, and publishes it.
    pub(crate) fn age_faults(&mut self) {
        if !self.aging.pass(self.ctx.clock.now()) {
            return;
        }
        let ratio = self.fault_ratio();
        self.figures.send_if_modified(|f| {
            let changed = f.fault_ratio != ratio;
            f.fault_ratio = ratio;
            changed
        });
    }

    /// Stops taking new requests; accepted ones go on.
    pub(crate) fn start_drain(&mut self) {
        self.draining = true;
        info!(
            running = self.scheduler.running(),
            waiting = self.scheduler.queued(),
            "draining"
        );
    }

    /// Ends everything still accepted with `WORKER_SHUTDOWN`: waiting requests at once,
    /// running ones through their abort.
    pub(crate) fn abort_all(&mut self) {
        for id in self.scheduler.take_queued() {
            if let Some(t) = self.requests.remove(&id) {
                self.queued_deadlines.remove(&(t.deadline, id.clone()));
                self.refuse(
                    &id,
                    &t.generate.model_id,
                    ErrorCode::WorkerShutdown,
                    "the worker stopped before the request could run".to_owned(),
                    t.received_at,
                );
            }
        }
        // In id order, so simulations replay the same terminals in the same order.
        let mut running: Vec<(&String, &Tracked)> = self.requests.iter().collect();
        running.sort_unstable_by_key(|(id, _)| *id);
        for (_, t) in running {
            t.abort.fire(ErrorCode::WorkerShutdown);
        }
    }

    /// Waits for every spawned task, at most `limit`; returns the report.
    pub(crate) async fn finish_tasks(
        mut self,
        finished: &mut mpsc::Receiver<Finished>,
        limit: Duration,
    ) -> DispatchReport {
        self.tasks.close();
        let deadline = self.ctx.clock.now() + limit;
        while !self.requests.is_empty() {
            tokio::select! {
                Some(f) = finished.recv() => self.on_finished(f),
                () = tokio::time::sleep_until(deadline) => break,
            }
            self.publish();
        }
        let _ = tokio::time::timeout_at(deadline, self.tasks.wait()).await;
        let abandoned = self.requests.len();
        if abandoned > 0 {
            error!(abandoned, "requests left without a terminal message");
        }
        DispatchReport {
            metrics: self.metrics.snapshot(),
            intake: self.counters,
            abandoned,
        }
    }
}
