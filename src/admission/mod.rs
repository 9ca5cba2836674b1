//! Admission: which accepted requests run, which wait and how long, and how those that never
//! run end — as a pure state machine.
//!
//! Sans-IO. [`Event`]s go in: a request arrived (with its decoded fields and the time), one
//! arrived that failed validation, a cancel, a running request finished, time passed, the
//! engine runs fewer of a model at once than planned, the drain started, everything is to end. [`Action`]s come out: start this one, refuse that one, end a
//! waiting one, stop a running one, answer a duplicate. [`Admission`] owns all request state —
//! the table of accepted requests with the caller's payload, the waiting requests' deadlines,
//! cancels that arrived before their request, and the [`Scheduler`] — and takes its limits as
//! plain values; the caller decodes, feeds events and carries out the actions.
//!
//! Promises, held by the proptest in `tests.rs` over random event sequences: every accepted
//! request gets exactly one end (it ends while waiting, or it starts and later finishes);
//! nothing runs or waits beyond the limits; a cancel latched before its request arrives ends
//! that request `CANCELLED`; waiting requests start by priority, oldest first within one.
//!
//! The scheduler counts running requests per tier and per model: a model at its bound (the
//! engine's capacity for it) holds its requests in the worker's own queue, as a full tier does,
//! so the engine is never handed a stream it cannot run.

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, info};

use crate::clock::millis;
use crate::limits::{LATCHED_CANCEL_TTL, LATCHED_CANCELS_MAX};
use crate::mutation::{Mutation, Mutations};
use crate::plan::{ModelTier, SchedulerLimits};
use crate::protocol::{ErrorCode, Priority};
use crate::scheduler::{self, ModelCount, Scheduler};

/// The bounds admission works within.
#[derive(Clone, Debug, PartialEq)]
pub struct AdmissionLimits {
    /// How many requests run and wait, overall and per tier.
    pub scheduler: SchedulerLimits,
    /// A request's deadline from receipt; a request's own timeout may only shorten it.
    pub request_timeout: Duration,
}

/// A request that passed validation.
#[derive(Clone, Debug, PartialEq)]
pub struct Arrival<T> {
    /// Its id.
    pub id: String,
    /// The model it asks for.
    pub model: String,
    /// Its priority.
    pub priority: Priority,
    /// Its own deadline from receipt, when it set one.
    pub timeout: Option<Duration>,
    /// Whether a model queue group routed it here (those are taken even while draining).
    pub from_group: bool,
    /// How long it waited before it reached the worker (in a work queue): its deadline is
    /// that much nearer, and one that waited past it ends `TIMEOUT` at once.
    pub waited: Duration,
    /// What the caller needs to run it, handed back in [`Action::Start`] and [`Action::Cancel`].
    pub payload: T,
}

/// Something that happened.
#[derive(Clone, Debug, PartialEq)]
pub enum Event<T> {
    /// A valid request arrived at `now`.
    Arrived {
        /// The request.
        request: Arrival<T>,
        /// When.
        now: Instant,
    },
    /// A request that failed validation arrived at `now`; its id could be read.
    Invalid {
        /// Its id.
        id: String,
        /// Why it failed.
        code: ErrorCode,
        /// The same, in words.
        text: String,
        /// When.
        now: Instant,
    },
    /// A cancel for `id` arrived at `now`.
    Cancel {
        /// The request it names.
        id: String,
        /// When.
        now: Instant,
    },
    /// A running request ended: its terminal message is out.
    Finished {
        /// The request.
        id: String,
    },
    /// Time passed: waiting requests whose deadline is not after `now` end.
    Tick {
        /// The time.
        now: Instant,
    },
    /// The models served are now `models` (id → tier): a rescan of the model directories
    /// found models added or gone. Requests already taken go on.
    Models {
        /// Every model served.
        models: HashMap<String, ModelTier>,
    },
    /// The engine runs at most `streams_max` requests of `model` at once (a load said so):
    /// the model's running limit falls to it when it is lower. Requests already running go on.
    ModelCapacity {
        /// The model.
        model: String,
        /// Its requests the engine runs at once.
        streams_max: usize,
    },
    /// The drain started: only requests routed by the model groups are taken from now on.
    DrainStarted,
    /// The stop: waiting requests end at once, running ones are stopped.
    AbortAll,
}

/// What the caller is to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action<T> {
    /// Run the request now.
    Start {
        /// Its id.
        id: String,
        /// The payload it arrived with.
        payload: T,
        /// When it arrived.
        received_at: Instant,
        /// When it must have ended.
        deadline: Instant,
    },
    /// The request will not run: end it with this error on its response subject.
    Refuse(Ending),
    /// The request waited and will not run: end it with this error on its response subject.
    EndWaiting(Ending),
    /// The message copies a request in flight: answer on its reply subject only, never on the
    /// response subject the first one streams on.
    Duplicate {
        /// The id in flight.
        id: String,
    },
    /// Stop the running request; its end, with `code`, comes back as [`Event::Finished`].
    Cancel {
        /// Its id.
        id: String,
        /// The code its terminal message gives.
        code: ErrorCode,
        /// The payload it arrived with.
        payload: T,
    },
}

/// How a request that does not run ends.
#[derive(Clone, Debug, PartialEq)]
pub struct Ending {
    /// Its id.
    pub id: String,
    /// The model it asked for (`-` when it never got that far).
    pub model: String,
    /// The error code.
    pub code: ErrorCode,
    /// The error, in words.
    pub text: String,
    /// When it arrived.
    pub received_at: Instant,
    /// Its deadline: past it, nobody waits for the error any more.
    pub deadline: Instant,
}

/// An accepted request.
#[derive(Debug)]
struct Entry<T> {
    model: String,
    tier: ModelTier,
    received_at: Instant,
    deadline: Instant,
    payload: T,
    running: bool,
}

/// Cancels that arrived before their request, bounded in number and age.
#[derive(Debug, Default)]
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

/// The admission state machine; `T` is the caller's payload of each request.
#[derive(Debug)]
pub struct Admission<T> {
    request_timeout: Duration,
    /// Model id → tier, for every model served.
    models: HashMap<String, ModelTier>,
    scheduler: Scheduler,
    /// Every accepted request without its end yet, waiting or running.
    requests: HashMap<String, Entry<T>>,
    /// Deadlines of the waiting requests, earliest first.
    deadlines: BTreeSet<(Instant, String)>,
    latch: Latch,
    draining: bool,
    /// Planted bugs (always empty outside the simulation suite).
    mutations: Mutations,
}

impl<T: Clone> Admission<T> {
    /// Admission within `limits` for the models of `models` (id → tier), taking everything.
    pub fn new(
        limits: AdmissionLimits,
        models: HashMap<String, ModelTier>,
        mutations: Mutations,
    ) -> Admission<T> {
        Admission {
            request_timeout: limits.request_timeout,
            models,
            scheduler: Scheduler::new(limits.scheduler),
            requests: HashMap::new(),
            deadlines: BTreeSet::new(),
            latch: Latch::default(),
            draining: false,
            mutations,
        }
    }

    /// Takes in one event; returns what to do, in order.
    pub fn handle(&mut self, event: Event<T>) -> Vec<Action<T>> {
        let mut out = Vec::new();
        match event {
            Event::Arrived { request, now } => self.arrive(request, now, &mut out),
            Event::Invalid {
                id,
                code,
                text,
                now,
            } => self.invalid(id, code, text, now, &mut out),
            Event::Cancel { id, now } => self.cancel(id, now, &mut out),
            Event::Finished { id } => self.finish(&id, &mut out),
            Event::Tick { now } => self.expire(now, &mut out),
            Event::ModelCapacity { model, streams_max } => {
                self.lower_model_limit(&model, streams_max);
            }
            Event::Models { models } => self.models = models,
            Event::DrainStarted => self.draining = true,
            Event::AbortAll => self.abort_all(&mut out),
        }
        out
    }

    /// Whether every accepted request has had its end.
    pub fn is_idle(&self) -> bool {
        self.requests.is_empty()
    }

    /// Accepted requests without their end, waiting or running.
    pub fn accepted(&self) -> usize {
        self.requests.len()
    }

    /// Whether `id` is accepted: waiting or running.
    pub fn is_accepted(&self, id: &str) -> bool {
        self.requests.contains_key(id)
    }

    /// Whether `id` is running.
    pub fn is_running(&self, id: &str) -> bool {
        self.requests.get(id).is_some_and(|e| e.running)
    }

    /// Requests running.
    pub fn running(&self) -> usize {
        self.scheduler.running()
    }

    /// Requests waiting.
    pub fn queued(&self) -> usize {
        self.scheduler.queued()
    }

    /// Requests running and waiting, by model, for the models with any.
    pub fn by_model(&self) -> BTreeMap<String, ModelCount> {
        self.scheduler.by_model()
    }

    /// Whether requests for `model` are taken (it is among the models served).
    pub fn serves(&self, model: &str) -> bool {
        self.models.contains_key(model)
    }

    /// How many more requests of `model` could start now (0 for a model not served, and
    /// while draining).
    pub fn free_slots(&self, model: &str) -> usize {
        if self.draining {
            return 0;
        }
        self.models
            .get(model)
            .map_or(0, |&tier| self.scheduler.free_slots(tier, model))
    }

    /// The scheduler's bounds.
    pub fn limits(&self) -> &SchedulerLimits {
        self.scheduler.limits()
    }

    /// The earliest deadline of a waiting request: when an [`Event::Tick`] is due.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|(at, _)| *at)
    }

    fn lower_model_limit(&mut self, model: &str, streams_max: usize) {
        if self.scheduler.lower_model_limit(model, streams_max) {
            info!(
                model,
                streams_max,
                "the engine runs fewer of this model at once than planned; its requests wait for them"
            );
        }
    }

    fn arrive(&mut self, request: Arrival<T>, now: Instant, out: &mut Vec<Action<T>>) {
        let Arrival {
            id,
            model,
            priority,
            timeout,
            from_group,
            waited,
            payload,
        } = request;
        if self.requests.contains_key(&id) {
            out.push(Action::Duplicate { id });
            return;
        }
        let limit = self.request_timeout;
        let allowed = timeout.map_or(limit, |t| t.min(limit));
        let deadline = now + allowed.saturating_sub(waited);
        let refuse = |code, text| refusal(&id, &model, code, text, now, deadline);
        if waited >= allowed {
            let text = format!(
                "waited {} ms in the work queue, past its deadline of {} ms",
                millis(waited),
                millis(allowed)
            );
            out.push(refuse(ErrorCode::Timeout, text));
            return;
        }
        if self.draining && !from_group {
            let text = "the worker is draining and takes no new requests".to_owned();
            out.push(refuse(ErrorCode::WorkerShutdown, text));
            return;
        }
        let Some(&tier) = self.models.get(&model) else {
            let text = self.not_served(&model);
            out.push(refuse(ErrorCode::ModelNotFound, text));
            return;
        };
        if self.latch.take(now, &id) {
            let text = "the request was cancelled before it arrived".to_owned();
            out.push(refuse(ErrorCode::Cancelled, text));
            return;
        }
        let starts = match self.scheduler.admit(id.clone(), tier, &model, priority) {
            scheduler::Admission::Start => true,
            scheduler::Admission::Queued => false,
            scheduler::Admission::Full { waiting, limit } => {
                let text = format!("queue is full ({waiting} waiting, limit {limit})");
                out.push(refuse(ErrorCode::QueueFull, text));
                return;
            }
        };
        let entry = Entry {
            model,
            tier,
            received_at: now,
            deadline,
            payload,
            running: false,
        };
        self.requests.insert(id.clone(), entry);
        if starts {
            self.start(&id, out);
        } else {
            self.deadlines.insert((deadline, id));
        }
    }

    fn not_served(&self, model: &str) -> String {
        let served: Vec<&str> = self.models.keys().map(String::as_str).collect();
        let served = if served.is_empty() {
            "none".to_owned()
        } else {
            served.join(", ")
        };
        format!("model {model:?} is not served by this worker (it serves {served})")
    }

    fn invalid(
        &mut self,
        id: String,
        code: ErrorCode,
        text: String,
        now: Instant,
        out: &mut Vec<Action<T>>,
    ) {
        if self.requests.contains_key(&id) {
            out.push(Action::Duplicate { id });
            return;
        }
        debug!(request_id = %id, cause = %text, "invalid request");
        let deadline = now + self.request_timeout;
        out.push(refusal(&id, "-", code, text, now, deadline));
    }

    /// Marks an accepted request running and says so.
    fn start(&mut self, id: &str, out: &mut Vec<Action<T>>) {
        let Some(entry) = self.requests.get_mut(id) else {
            return;
        };
        entry.running = true;
        self.deadlines.remove(&(entry.deadline, id.to_owned()));
        out.push(Action::Start {
            id: id.to_owned(),
            payload: entry.payload.clone(),
            received_at: entry.received_at,
            deadline: entry.deadline,
        });
    }

    fn cancel(&mut self, id: String, now: Instant, out: &mut Vec<Action<T>>) {
        match self.requests.get(&id) {
            Some(entry) if entry.running => {
                info!(request_id = %id, "cancelling a running request");
                let payload = entry.payload.clone();
                out.push(Action::Cancel {
                    id,
                    code: ErrorCode::Cancelled,
                    payload,
                });
            }
            Some(_) => {
                info!(request_id = %id, "cancelling a waiting request");
                let text = "the request was cancelled".to_owned();
                self.end_waiting(&id, ErrorCode::Cancelled, text, out);
            }
            None if self.mutations.has(Mutation::ForgetLatchedCancel) => {}
            None => {
                debug!(request_id = %id, "cancel for an unknown request latched");
                self.latch.insert(now, id);
            }
        }
    }

    /// Ends a waiting request.
    fn end_waiting(&mut self, id: &str, code: ErrorCode, text: String, out: &mut Vec<Action<T>>) {
        if !self.scheduler.remove_queued(id) {
            return;
        }
        if let Some(entry) = self.requests.remove(id) {
            self.deadlines.remove(&(entry.deadline, id.to_owned()));
            out.push(Action::EndWaiting(Ending {
                id: id.to_owned(),
                model: entry.model,
                code,
                text,
                received_at: entry.received_at,
                deadline: entry.deadline,
            }));
        }
    }

    /// Ends the waiting requests whose deadline is not after `now`.
    fn expire(&mut self, now: Instant, out: &mut Vec<Action<T>>) {
        while let Some((at, id)) = self.deadlines.first().cloned() {
            if at > now {
                break;
            }
            let waited = self
                .requests
                .get(&id)
                .map_or(0, |e| millis(at.saturating_duration_since(e.received_at)));
            let text = format!("request waited past its deadline of {waited} ms for a slot");
            self.end_waiting(&id, ErrorCode::Timeout, text, out);
            self.deadlines.remove(&(at, id));
        }
    }

    /// A running request ended; the waiting ones its slot frees start.
    fn finish(&mut self, id: &str, out: &mut Vec<Action<T>>) {
        if !self.is_running(id) {
            return;
        }
        let Some(entry) = self.requests.remove(id) else {
            return;
        };
        for next in self.scheduler.finish(entry.tier, &entry.model) {
            self.start(&next, out);
        }
    }

    /// Ends waiting requests at once, in the order they would have started, then stops the
    /// running ones, in id order (so simulations replay the same terminals in the same order).
    fn abort_all(&mut self, out: &mut Vec<Action<T>>) {
        for id in self.scheduler.take_queued() {
            if let Some(entry) = self.requests.remove(&id) {
                self.deadlines.remove(&(entry.deadline, id.clone()));
                out.push(Action::EndWaiting(Ending {
                    id,
                    model: entry.model,
                    code: ErrorCode::WorkerShutdown,
                    text: "the worker stopped before the request could run".to_owned(),
                    received_at: entry.received_at,
                    deadline: entry.deadline,
                }));
            }
        }
        let mut running: Vec<(&String, &Entry<T>)> = self.requests.iter().collect();
        running.sort_unstable_by_key(|(id, _)| *id);
        out.extend(running.into_iter().map(|(id, entry)| Action::Cancel {
            id: id.clone(),
            code: ErrorCode::WorkerShutdown,
            payload: entry.payload.clone(),
        }));
    }
}

/// Refuses a request on arrival; `deadline` is the one it would have had.
fn refusal<T>(
    id: &str,
    model: &str,
    code: ErrorCode,
    text: String,
    now: Instant,
    deadline: Instant,
) -> Action<T> {
    Action::Refuse(Ending {
        id: id.to_owned(),
        model: model.to_owned(),
        code,
        text,
        received_at: now,
        deadline,
    })
}
