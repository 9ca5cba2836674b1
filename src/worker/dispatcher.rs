//! The dispatcher: the one task between the subscriptions and admission. It decodes what
//! arrives on the inference and cancel subscriptions and the request tasks' ends, feeds them to
//! [`Admission`] as events, and carries out its actions: it spawns request tasks, publishes
//! refusals, answers duplicates and trips abort tokens. It records every end in the metrics
//! collector and publishes its figures after each change.
//!
//! Every request admission accepts ends with exactly one terminal message, sent either by its
//! request task or — for requests refused or ended while waiting — by a short responder task
//! here.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use super::figures::{FaultAging, Figures, IntakeCounters};
use super::request::{self, Abort, Finished, Job, RequestContext};
use super::responder::{Responder, Window};
use crate::admission::{Action, Admission, Arrival, Ending, Event};
use crate::config::GenerationDefaults;
use crate::engine::{Catalog, GenerateRequest};
use crate::limits::{FAULT_MIN_SAMPLES, FAULT_WINDOW, REFUSAL_TASKS_MAX};
use crate::metrics::{Collector, Outcome, RequestRecord, Snapshot};
use crate::mutation::Mutation;
use crate::plan::model_size::planned_tier;
use crate::protocol::request::{RequestLimits, ValidRequest, decode_cancel, decode_request};
use crate::protocol::{self, ErrorCode, ErrorMessage};
use crate::transport::InboundMessage;
use crate::transport::work_queue::{Settle, WorkItem};

/// What admission keeps of each accepted request for the dispatcher: what its task generates,
/// and the abort that stops the task.
#[derive(Debug)]
pub(crate) struct Work {
    generate: GenerateRequest,
    abort: Arc<Abort>,
}

/// How long a work-queue message waited before it reached this worker: from when the server
/// stored it to `now_unix_ms` (0 when the server did not say, or the clocks disagree).
fn waited(published_unix_ms: Option<u64>, now_unix_ms: u64) -> Duration {
    published_unix_ms.map_or(Duration::ZERO, |at| {
        Duration::from_millis(now_unix_ms.saturating_sub(at))
    })
}

/// The dispatcher's state.
pub(crate) struct Dispatcher {
    /// Bounds of inbound requests.
    request_limits: RequestLimits,
    /// Generation parameters a request leaves out.
    defaults: GenerationDefaults,
    /// All request state: accepted requests, deadlines, latched cancels, the scheduler.
    admission: Admission<Arc<Work>>,
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
    /// The work-queue messages of accepted requests not started yet, by request id: each is
    /// acknowledged as its request starts or ends without running.
    taken: HashMap<String, Box<dyn Settle>>,
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
        request_limits: RequestLimits,
        defaults: GenerationDefaults,
        admission: Admission<Arc<Work>>,
        ctx: Arc<RequestContext>,
        figures: watch::Sender<Figures>,
    ) -> Dispatcher {
        let mut dispatcher = Dispatcher {
            request_limits,
            defaults,
            admission,
            metrics: Collector::default(),
            recorded: 0,
            counters: IntakeCounters::default(),
            figures,
            published: None,
            aging: FaultAging::default(),
            ctx,
            tasks: TaskTracker::new(),
            refusals: Arc::new(Semaphore::new(REFUSAL_TASKS_MAX)),
            taken: HashMap::new(),
        };
        dispatcher.publish();
        dispatcher
    }

    /// How many more requests of `model` could start now: what a work queue is pulled for.
    pub(crate) fn free_slots(&self, model: &str) -> usize {
        self.admission.free_slots(model)
    }

    /// Whether every accepted request has its terminal message.
    pub(crate) fn is_idle(&self) -> bool {
        self.admission.is_idle()
    }

    /// The earliest deadline of a waiting request.
    pub(crate) fn next_queued_deadline(&self) -> Option<Instant> {
        self.admission.next_deadline()
    }

    /// Handles one message of `worker.{id}.inference`, or of a model queue group
    /// (`from_group`): those were routed here before the worker left its groups, so they are
    /// served even while draining.
    pub(crate) fn on_request(&mut self, msg: InboundMessage, from_group: bool) {
        self.on_message(msg, from_group, Duration::ZERO, None);
    }

    /// Handles one message taken from the model work queue. Whatever becomes of it, the queue
    /// hears of it once: acknowledged as its request starts, or as it ends without running
    /// (refused, invalid, a duplicate, unreadable), or handed back when no slot is free.
    pub(crate) fn on_work_item(&mut self, item: WorkItem) {
        let waited = waited(item.published_unix_ms, self.ctx.clock.unix_millis());
        self.on_message(item.message, true, waited, Some(item.settle));
    }

    fn on_message(
        &mut self,
        msg: InboundMessage,
        from_group: bool,
        waited: Duration,
        taken: Option<Box<dyn Settle>>,
    ) {
        let now = self.ctx.clock.now();
        let decoded = decode_request(&msg.payload, &self.request_limits);
        let id = match &decoded {
            Ok(request) => Some(request.request_id.clone()),
            Err(rejection) => rejection.request_id.clone(),
        };
        if let Some(settle) = taken {
            let held = id
                .as_ref()
                .is_some_and(|id| self.taken.contains_key(id) || self.admission.is_accepted(id));
            match (&decoded, &id) {
                // A second delivery of a request this worker holds is answered as a duplicate;
                // its message is settled at once, the first one's stays with its request.
                _ if held => self.settle_now(settle),
                // One that could not start now (the worker's own subject took the slot it was
                // pulled for) goes back to the queue rather than wait here, where its ack wait
                // would run out and another worker would run it too.
                (Ok(request), _)
                    if self.admission.serves(&request.model_id)
                        && self.admission.free_slots(&request.model_id) == 0 =>
                {
                    debug!(request_id = %request.request_id, "no free slot now; handed back to the work queue");
                    self.counters.handed_back += 1;
                    self.hand_back(settle);
                    return;
                }
                (_, Some(id)) => {
                    self.taken.insert(id.clone(), settle);
                }
                // Unreadable: dropped below, settled here.
                (_, None) => self.settle_now(settle),
            }
        }
        let event = match decoded {
            Ok(request) => Event::Arrived {
                request: self.arrival(request, from_group, waited),
                now,
            },
            Err(rejection) => match rejection.request_id {
                Some(id) => Event::Invalid {
                    id,
                    code: rejection.error.code(),
                    text: rejection.error.to_string(),
                    now,
                },
                None => {
                    self.counters.unreadable += 1;
                    warn!(
                        cause = %rejection.error,
                        bytes = msg.payload.len(),
                        "request without a readable id dropped"
                    );
                    if let Some(reply) = msg.reply {
                        let text = rejection.error.to_string();
                        let message = ErrorMessage::anonymous(rejection.error.code(), &text);
                        self.reply(reply, &message);
                    }
                    return;
                }
            },
        };
        self.feed(event, msg.reply);
    }

    /// Hands a work-queue message back to the queue at once, for any worker, in the
    /// background (a draining worker's last pulls, a request with no free slot).
    pub(crate) fn hand_back(&self, settle: Box<dyn Settle>) {
        self.tasks.spawn(async move {
            if let Err(err) = settle.release().await {
                debug!(cause = %err, "work-queue message not handed back; redelivered after the ack wait");
            }
        });
    }

    /// Acknowledges a work-queue message that will not run here, in the background.
    fn settle_now(&self, settle: Box<dyn Settle>) {
        self.tasks.spawn(async move {
            if let Err(err) = settle.ack().await {
                debug!(cause = %err, "work-queue message not acknowledged");
            }
        });
    }

    /// The request as admission sees it, with the work its task will do.
    fn arrival(
        &self,
        request: ValidRequest,
        from_group: bool,
        waited: Duration,
    ) -> Arrival<Arc<Work>> {
        let defaults = &self.defaults;
        let generate = GenerateRequest {
            stream_id: request.request_id.clone(),
            model_id: request.model_id.clone(),
            prompt: request.prompt,
            max_tokens: request.max_tokens.unwrap_or(defaults.max_tokens),
            temperature: request.temperature.unwrap_or(defaults.temperature),
            top_p: request.top_p.unwrap_or(defaults.top_p),
            session_id: request.session_id,
        };
        Arrival {
            id: request.request_id,
            model: request.model_id,
            priority: request.priority,
            timeout: request.timeout,
            from_group,
            waited,
            payload: Arc::new(Work {
                generate,
                abort: Arc::new(Abort::default()),
            }),
        }
    }

    /// Feeds one event to admission and carries out what it decides; `reply` is the reply
    /// subject of the message the event came from, for a duplicate's answer.
    fn feed(&mut self, event: Event<Arc<Work>>, mut reply: Option<String>) {
        for action in self.admission.handle(event) {
            match action {
                Action::Start {
                    id,
                    payload,
                    received_at,
                    deadline,
                } => {
                    let taken = self.taken.remove(&id);
                    let job = Job {
                        request_id: id,
                        generate: payload.generate.clone(),
                        received_at,
                        deadline,
                        abort: payload.abort.clone(),
                        taken,
                    };
                    self.tasks.spawn(request::run(self.ctx.clone(), job));
                }
                Action::Refuse(ending) | Action::EndWaiting(ending) => {
                    if let Some(settle) = self.taken.remove(&ending.id) {
                        self.settle_now(settle);
                    }
                    self.refuse(ending);
                }
                Action::Duplicate { id } => self.duplicate(&id, reply.take()),
                Action::Cancel { code, payload, .. } => payload.abort.fire(code),
            }
        }
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

    /// Ends a request that will not run with an error on its response subject.
    fn refuse(&mut self, ending: Ending) {
        let Ending {
            id,
            model,
            code,
            text,
            received_at,
            deadline,
        } = ending;
        debug!(request_id = %id, %code, reason = %text, "request refused");
        self.record(RequestRecord {
            model,
            outcome: Outcome::Failed(code),
            latency: self.ctx.clock.now().saturating_duration_since(received_at),
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
        self.tasks.spawn(async move {
            // Past the bound, refusals go out at once, without waiting for a listener or for
            // the link.
            let now = ctx.clock.now();
            let window = if wait.is_some() {
                Window {
                    not_before: received_at + ctx.late_subscriber_min_delay,
                    listener_wait: ctx.late_subscriber_wait,
                    deadline,
                }
            } else {
                Window {
                    not_before: now,
                    listener_wait: Duration::ZERO,
                    deadline: now,
                }
            };
            let mut responder = Responder::new(
                ctx.transport.clone(),
                ctx.clock.clone(),
                &id,
                window,
                ctx.mutations,
            );
            let message = ErrorMessage::new(&id, code, &text);
            if let Err(err) = responder.terminal(&message, &message).await {
                warn!(request_id = %id, cause = %err, "refusal could not be published");
            }
            drop(wait);
        });
    }

    /// Handles one message of `worker.{id}.cancel`.
    pub(crate) fn on_cancel(&mut self, msg: InboundMessage) {
        let now = self.ctx.clock.now();
        match decode_cancel(&msg.payload) {
            Ok(id) => self.feed(Event::Cancel { id, now }, None),
            Err(err) => {
                self.counters.bad_cancels += 1;
                warn!(cause = %err, "unreadable cancel message dropped");
            }
        }
    }

    /// Ends waiting requests whose deadline has passed.
    pub(crate) fn expire_queued(&mut self) {
        let now = self.ctx.clock.now();
        self.feed(Event::Tick { now }, None);
    }

    /// A request task ended.
    pub(crate) fn on_finished(&mut self, finished: Finished) {
        let id = finished.request_id;
        if !self.admission.is_running(&id) {
            error!(request_id = %id, "finish of a request that is not running");
            return;
        }
        let telemetry = &self.ctx.telemetry;
        telemetry.request_duration.observe(finished.record.latency);
        if let Some(ttft) = finished.record.time_to_first_token {
            telemetry.time_to_first_token.observe(ttft);
        }
        self.record(finished.record);
        self.feed(Event::Finished { id }, None);
    }

    fn record(&mut self, record: RequestRecord) {
        self.aging.note(record.finished_at);
        self.metrics.record(record);
        self.recorded += 1;
    }

    /// Publishes the figures if anything they show changed since they were last published.
    /// The requests by model change only with the totals (an event starts, queues or ends
    /// requests, and a start from the queue lowers the queued total), so the totals tell.
    pub(crate) fn publish(&mut self) {
        let now = Published {
            recorded: self.recorded,
            running: self.admission.running(),
            queued: self.admission.queued(),
            intake: self.counters,
        };
        if self.published == Some(now) {
            return;
        }
        self.published = Some(now);
        let limits = self.admission.limits();
        self.figures.send_replace(Figures {
            snapshot: self.metrics.snapshot(),
            running: now.running,
            queued: now.queued,
            queue_capacity: limits.queue_depth_max,
            inflight_capacity: limits.inflight_max,
            intake: now.intake,
            fault_ratio: self.fault_ratio(),
            models: self.admission.by_model(),
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

    /// The engine's loads said how many requests of each model it runs at once (model id →
    /// figure): a model's running limit falls to its figure when that is lower.
    pub(crate) fn on_capacities(&mut self, capacities: &BTreeMap<String, usize>) {
        // A planted bug ignores the engine's capacity entirely, this too.
        if self.ctx.mutations.has(Mutation::IgnoreEngineCapacity) {
            return;
        }
        for (model, &streams_max) in capacities {
            let model = model.clone();
            self.feed(Event::ModelCapacity { model, streams_max }, None);
        }
    }

    /// The models on disk changed: requests for a new one are taken (at its tier), requests for
    /// one gone are refused; what runs or waits goes on.
    pub(crate) fn on_models(&mut self, catalog: &Catalog) {
        let models = catalog
            .models
            .iter()
            .map(|(id, entry)| (id.clone(), planned_tier(&entry.facts(id))))
            .collect();
        self.feed(Event::Models { models }, None);
    }

    /// Stops taking new requests; accepted ones go on.
    pub(crate) fn start_drain(&mut self) {
        self.feed(Event::DrainStarted, None);
        info!(
            running = self.admission.running(),
            waiting = self.admission.queued(),
            "draining"
        );
    }

    /// Ends everything still accepted with `WORKER_SHUTDOWN`: waiting requests at once,
    /// running ones through their abort.
    pub(crate) fn abort_all(&mut self) {
        self.feed(Event::AbortAll, None);
    }

    /// Waits for every spawned task, at most `limit`; returns the report.
    pub(crate) async fn finish_tasks(
        mut self,
        finished: &mut mpsc::Receiver<Finished>,
        limit: Duration,
    ) -> DispatchReport {
        self.tasks.close();
        let deadline = self.ctx.clock.now() + limit;
        while !self.admission.is_idle() {
            tokio::select! {
                Some(f) = finished.recv() => self.on_finished(f),
                () = tokio::time::sleep_until(deadline) => break,
            }
            self.publish();
        }
        let _ = tokio::time::timeout_at(deadline, self.tasks.wait()).await;
        let abandoned = self.admission.accepted();
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
