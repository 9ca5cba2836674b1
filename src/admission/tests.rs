// Goal: admission keeps its promises whatever order events come in: every accepted request gets
// exactly one end, nothing runs or waits beyond the limits (overall, per tier, and per model:
// the engine's capacity, which may fall as loads answer), a cancel latched before its request
// ends it, waiting requests start by priority then age, and refusals give the documented code.
// Method: scripted event sequences on small limits for each rule and its text, plus a proptest
// of random sequences (arrivals with colliding ids, cancels, finishes, time, drain, stop) checked
// against a bookkeeping of what each action promised, ending every sequence with a stop.

use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;

use super::*;
use crate::clock::{Clock, SystemClock};
use crate::plan::TierLimit;
use ModelTier::{Huge, Tiny};
use Priority::{High, Low, Medium};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Requests running at once, overall.
const INFLIGHT_MAX: usize = 3;
/// Requests waiting, overall.
const QUEUE_MAX: usize = 5;
/// Per tier: requests running at once, requests waiting.
const TIERS: [(ModelTier, usize, usize); 2] = [(Huge, 1, 2), (Tiny, 2, 4)];
/// Per model: requests running at once (the engine's capacity), where it binds before the tier.
const MODEL_LIMITS: [(&str, usize); 1] = [("narrow", 1)];

/// Admission serving `huge`, `tiny` and `narrow` (a `<3B` model the engine runs one of at a
/// time) within [`INFLIGHT_MAX`], [`QUEUE_MAX`], [`TIERS`] and [`MODEL_LIMITS`]; payloads are
/// plain numbers.
fn admission() -> Admission<u32> {
    let tiers = TIERS
        .into_iter()
        .map(|(t, max_concurrent, queue_depth)| {
            (
                t,
                TierLimit {
                    max_concurrent,
                    queue_depth,
                },
            )
        })
        .collect();
    let limits = AdmissionLimits {
        scheduler: SchedulerLimits {
            inflight_max: INFLIGHT_MAX,
            queue_depth_max: QUEUE_MAX,
            tiers,
            models: MODEL_LIMITS
                .into_iter()
                .map(|(m, n)| (m.to_owned(), n))
                .collect(),
        },
        request_timeout: REQUEST_TIMEOUT,
    };
    let models = HashMap::from([
        ("huge".to_owned(), Huge),
        ("tiny".to_owned(), Tiny),
        ("narrow".to_owned(), Tiny),
    ]);
    Admission::new(limits, models, Mutations::NONE)
}

fn arrival(id: &str, model: &str, priority: Priority) -> Arrival<u32> {
    Arrival {
        id: id.to_owned(),
        model: model.to_owned(),
        priority,
        timeout: None,
        from_group: false,
        waited: Duration::ZERO,
        payload: 7,
    }
}

fn arrive(a: &mut Admission<u32>, now: Instant, id: &str, model: &str) -> Vec<Action<u32>> {
    a.handle(Event::Arrived {
        request: arrival(id, model, Medium),
        now,
    })
}

/// The ids and codes of the actions, in order, as `start x`, `refuse x CODE`, `end x CODE`,
/// `dup x`, `cancel x CODE`.
fn names(actions: &[Action<u32>]) -> Vec<String> {
    actions
        .iter()
        .map(|a| match a {
            Action::Start { id, .. } => format!("start {id}"),
            Action::Refuse(e) => format!("refuse {} {}", e.id, e.code),
            Action::EndWaiting(e) => format!("end {} {}", e.id, e.code),
            Action::Duplicate { id } => format!("dup {id}"),
            Action::Cancel { id, code, .. } => format!("cancel {id} {code}"),
        })
        .collect()
}

fn check(actions: &[Action<u32>], expected: &[&str]) {
    assert_eq!(names(actions), expected);
}

#[test]
fn a_request_starts_with_its_payload_and_deadline_or_waits_or_is_refused_when_full() {
    let t0 = SystemClock.now();
    let mut a = admission();
    let started = a.handle(Event::Arrived {
        request: Arrival {
            timeout: Some(ms(500)),
            ..arrival("h1", "huge", Medium)
        },
        now: t0,
    });
    assert_eq!(
        started,
        [Action::Start {
            id: "h1".to_owned(),
            payload: 7,
            received_at: t0,
            deadline: t0 + ms(500),
        }]
    );
    check(&arrive(&mut a, t0, "h2", "huge"), &[]);
    // A request's own timeout cannot outlast the configured one.
    let later = a.handle(Event::Arrived {
        request: Arrival {
            timeout: Some(REQUEST_TIMEOUT * 2),
            ..arrival("h3", "huge", Medium)
        },
        now: t0 + ms(1),
    });
    check(&later, &[]);
    assert_eq!(a.next_deadline(), Some(t0 + REQUEST_TIMEOUT));
    let full = arrive(&mut a, t0, "h4", "huge");
    assert!(
        matches!(&full[..], [Action::Refuse(e)]
            if e.code == ErrorCode::QueueFull && e.text == "queue is full (2 waiting, limit 2)"
                && e.model == "huge" && e.received_at == t0),
        "{full:?}"
    );
    assert_eq!((a.running(), a.queued(), a.accepted()), (1, 2, 3));
    assert!(a.is_running("h1") && !a.is_running("h2"));
}

#[test]
fn duplicates_of_an_accepted_id_are_answered_as_duplicates_valid_or_not() {
    let t0 = SystemClock.now();
    let mut a = admission();
    arrive(&mut a, t0, "x", "tiny");
    check(&arrive(&mut a, t0, "x", "tiny"), &["dup x"]);
    let invalid = |id: &str| Event::Invalid {
        id: id.to_owned(),
        code: ErrorCode::InvalidRequest,
        text: "field \"prompt\" is missing".to_owned(),
        now: t0,
    };
    check(&a.handle(invalid("x")), &["dup x"]);
    let refused = a.handle(invalid("y"));
    assert!(
        matches!(&refused[..], [Action::Refuse(e)]
            if e.model == "-" && e.text == "field \"prompt\" is missing"),
        "{refused:?}"
    );
    assert_eq!(
        a.accepted(),
        1,
        "neither the copies nor the invalid one were accepted"
    );
}

#[test]
fn an_unserved_model_is_refused_naming_what_is_served() {
    let t0 = SystemClock.now();
    let mut a = admission();
    let refused = arrive(&mut a, t0, "m", "other/model");
    let Action::Refuse(e) = &refused[0] else {
        panic!("{refused:?}")
    };
    assert_eq!(e.code, ErrorCode::ModelNotFound);
    assert!(
        e.text
            .starts_with("model \"other/model\" is not served by this worker (it serves "),
        "{}",
        e.text
    );
    assert!(
        e.text.contains("huge") && e.text.contains("tiny"),
        "{}",
        e.text
    );
    let mut none: Admission<u32> = Admission::new(
        AdmissionLimits {
            scheduler: SchedulerLimits {
                inflight_max: 1,
                queue_depth_max: 1,
                tiers: BTreeMap::new(),
                models: BTreeMap::new(),
            },
            request_timeout: REQUEST_TIMEOUT,
        },
        HashMap::new(),
        Mutations::NONE,
    );
    let refused = arrive(&mut none, t0, "m", "tiny");
    assert!(
        matches!(&refused[..], [Action::Refuse(e)]
            if e.text == "model \"tiny\" is not served by this worker (it serves none)"),
        "{refused:?}"
    );
}

#[test]
fn cancels_stop_running_requests_end_waiting_ones_and_wait_for_unknown_ones() {
    let t0 = SystemClock.now();
    let mut a = admission();
    arrive(&mut a, t0, "run", "huge");
    arrive(&mut a, t0, "wait", "huge");
    let cancel = |id: &str, now| Event::Cancel {
        id: id.to_owned(),
        now,
    };
    check(&a.handle(cancel("run", t0)), &["cancel run CANCELLED"]);
    assert!(
        a.is_running("run"),
        "it runs until its task reports the end"
    );
    check(&a.handle(cancel("wait", t0)), &["end wait CANCELLED"]);
    assert_eq!(a.next_deadline(), None);
    // Latched: the request, when it comes, ends at once.
    check(&a.handle(cancel("early", t0)), &[]);
    check(
        &arrive(&mut a, t0 + ms(10), "early", "tiny"),
        &["refuse early CANCELLED"],
    );
    // A latch is used once: the id's next request runs.
    check(
        &arrive(&mut a, t0 + ms(20), "early", "tiny"),
        &["start early"],
    );
}

#[test]
fn latched_cancels_expire_and_are_bounded() {
    let t0 = SystemClock.now();
    let mut a = admission();
    a.handle(Event::Cancel {
        id: "old".to_owned(),
        now: t0,
    });
    check(
        &arrive(&mut a, t0 + LATCHED_CANCEL_TTL + ms(1), "old", "tiny"),
        &["start old"],
    );
    for i in 0..=LATCHED_CANCELS_MAX {
        a.handle(Event::Cancel {
            id: format!("c{i}"),
            now: t0,
        });
    }
    check(&arrive(&mut a, t0, "c0", "tiny"), &["start c0"]);
    check(&arrive(&mut a, t0, "c1", "tiny"), &["refuse c1 CANCELLED"]);
}

#[test]
fn waiting_requests_end_at_their_deadline_with_how_long_they_waited() {
    let t0 = SystemClock.now();
    let mut a = admission();
    arrive(&mut a, t0, "run", "huge");
    a.handle(Event::Arrived {
        request: Arrival {
            timeout: Some(ms(300)),
            ..arrival("short", "huge", Medium)
        },
        now: t0,
    });
    arrive(&mut a, t0, "long", "huge");
    check(&a.handle(Event::Tick { now: t0 + ms(299) }), &[]);
    let ended = a.handle(Event::Tick { now: t0 + ms(300) });
    assert!(
        matches!(&ended[..], [Action::EndWaiting(e)]
            if e.id == "short" && e.code == ErrorCode::Timeout && e.model == "huge"
                && e.text == "request waited past its deadline of 300 ms for a slot"),
        "{ended:?}"
    );
    assert_eq!(a.next_deadline(), Some(t0 + REQUEST_TIMEOUT));
    // A running request's deadline is its task's to keep.
    check(
        &a.handle(Event::Tick { now: t0 + ms(5000) }),
        &["end long TIMEOUT"],
    );
    assert!(a.is_running("run"));
}

#[test]
fn a_finish_starts_the_waiting_requests_by_priority_then_age() {
    let t0 = SystemClock.now();
    let mut a = admission();
    for id in ["t1", "t2"] {
        arrive(&mut a, t0, id, "tiny");
    }
    arrive(&mut a, t0, "h0", "huge");
    for (id, p) in [("low", Low), ("m1", Medium), ("high", High), ("m2", Medium)] {
        let queued = a.handle(Event::Arrived {
            request: arrival(id, "tiny", p),
            now: t0,
        });
        check(&queued, &[]);
    }
    let finish = |a: &mut Admission<u32>, id: &str| a.handle(Event::Finished { id: id.to_owned() });
    check(&finish(&mut a, "t1"), &["start high"]);
    check(&finish(&mut a, "high"), &["start m1"]);
    check(&finish(&mut a, "t2"), &["start m2"]);
    check(&finish(&mut a, "m1"), &["start low"]);
    // A finish of a request that is not running changes nothing.
    check(&finish(&mut a, "nobody"), &[]);
    assert_eq!((a.running(), a.queued()), (3, 0));
}

#[test]
fn a_model_at_its_engine_capacity_waits_until_one_of_its_own_ends() {
    let t0 = SystemClock.now();
    let mut a = admission();
    check(&arrive(&mut a, t0, "n1", "narrow"), &["start n1"]);
    // Its tier and the whole have room; the model has none.
    check(&arrive(&mut a, t0, "n2", "narrow"), &[]);
    check(&arrive(&mut a, t0, "t1", "tiny"), &["start t1"]);
    assert_eq!((a.running(), a.queued()), (2, 1));
    let finish = |a: &mut Admission<u32>, id: &str| a.handle(Event::Finished { id: id.to_owned() });
    check(&finish(&mut a, "t1"), &[]);
    check(&finish(&mut a, "n1"), &["start n2"]);
    check(&finish(&mut a, "n2"), &[]);
    assert!(a.is_idle());
}

#[test]
fn a_model_whose_engine_capacity_falls_runs_no_more_than_the_new_figure_once_below_it() {
    let t0 = SystemClock.now();
    let mut a = admission();
    check(&arrive(&mut a, t0, "t1", "tiny"), &["start t1"]);
    check(&arrive(&mut a, t0, "t2", "tiny"), &["start t2"]);
    let capacity = |a: &mut Admission<u32>, streams_max: usize| {
        a.handle(Event::ModelCapacity {
            model: "tiny".to_owned(),
            streams_max,
        })
    };
    check(&capacity(&mut a, 1), &[]);
    assert_eq!(a.limits().models["tiny"], 1);
    // Both running go on; the next one waits, also once its tier has room.
    check(&arrive(&mut a, t0, "t3", "tiny"), &[]);
    let finish = |a: &mut Admission<u32>, id: &str| a.handle(Event::Finished { id: id.to_owned() });
    check(&finish(&mut a, "t1"), &[]);
    check(&arrive(&mut a, t0, "n1", "narrow"), &["start n1"]);
    // A higher figure does not raise it again.
    check(&capacity(&mut a, 2), &[]);
    assert_eq!(a.limits().models["tiny"], 1);
    check(&finish(&mut a, "t2"), &["start t3"]);
    check(&finish(&mut a, "t3"), &[]);
    check(&finish(&mut a, "n1"), &[]);
    assert!(a.is_idle());
}

#[test]
fn the_drain_refuses_new_requests_except_those_the_groups_route_here() {
    let t0 = SystemClock.now();
    let mut a = admission();
    arrive(&mut a, t0, "before", "huge");
    check(&a.handle(Event::DrainStarted), &[]);
    let refused = arrive(&mut a, t0, "late", "tiny");
    assert!(
        matches!(&refused[..], [Action::Refuse(e)]
            if e.code == ErrorCode::WorkerShutdown
                && e.text == "the worker is draining and takes no new requests"),
        "{refused:?}"
    );
    let routed = a.handle(Event::Arrived {
        request: Arrival {
            from_group: true,
            waited: Duration::ZERO,
            ..arrival("routed", "tiny", Medium)
        },
        now: t0,
    });
    check(&routed, &["start routed"]);
    // Accepted work goes on.
    check(&arrive(&mut a, t0, "before", "huge"), &["dup before"]);
}

#[test]
fn the_stop_ends_waiting_requests_in_start_order_then_stops_running_ones_in_id_order() {
    let t0 = SystemClock.now();
    let mut a = admission();
    for id in ["t2", "t1", "h1"] {
        arrive(&mut a, t0, id, if id == "h1" { "huge" } else { "tiny" });
    }
    for (id, p) in [("wl", Low), ("wh", High)] {
        a.handle(Event::Arrived {
            request: arrival(id, "tiny", p),
            now: t0,
        });
    }
    let stop = a.handle(Event::AbortAll);
    check(
        &stop,
        &[
            "end wh WORKER_SHUTDOWN",
            "end wl WORKER_SHUTDOWN",
            "cancel h1 WORKER_SHUTDOWN",
            "cancel t1 WORKER_SHUTDOWN",
            "cancel t2 WORKER_SHUTDOWN",
        ],
    );
    assert!(
        matches!(&stop[0], Action::EndWaiting(e)
            if e.text == "the worker stopped before the request could run"),
        "{stop:?}"
    );
    assert_eq!((a.queued(), a.accepted()), (0, 3));
    for id in ["h1", "t1", "t2"] {
        a.handle(Event::Finished { id: id.to_owned() });
    }
    assert!(a.is_idle());
}

// The random sequences.

const IDS: u8 = 12;
const MODELS: [&str; 4] = ["huge", "tiny", "narrow", "other"];

#[derive(Clone, Debug)]
enum Op {
    Arrive {
        id: u8,
        model: u8,
        priority: u8,
        from_group: bool,
        timeout_ms: Option<u64>,
    },
    Invalid(u8),
    Cancel(u8),
    /// Finishes the running request at this position (in id order), if any runs.
    Finish(u8),
    Advance(u64),
    Tick,
    /// The engine runs this many of the model at this position of [`MODELS`] at once.
    Capacity(u8, u8),
    Drain,
    AbortAll,
}

fn op() -> impl Strategy<Value = Op> {
    let arrive = (
        0..IDS,
        0u8..4,
        0u8..3,
        any::<bool>(),
        proptest::option::of(1u64..3000),
    )
        .prop_map(|(id, model, priority, from_group, timeout_ms)| Op::Arrive {
            id,
            model,
            priority,
            from_group,
            timeout_ms,
        });
    prop_oneof![
        8 => arrive,
        1 => (0..IDS).prop_map(Op::Invalid),
        3 => (0..IDS).prop_map(Op::Cancel),
        5 => any::<u8>().prop_map(Op::Finish),
        3 => (0u64..800).prop_map(Op::Advance),
        1 => (0u64..70_000).prop_map(Op::Advance),
        2 => Just(Op::Tick),
        1 => (0u8..4, 1u8..4).prop_map(|(m, n)| Op::Capacity(m, n)),
        1 => Just(Op::Drain),
        1 => Just(Op::AbortAll),
    ]
}

/// What the test knows of one accepted request.
#[derive(Clone, Debug)]
struct Known {
    model: &'static str,
    tier: ModelTier,
    /// Priority slot (0 highest), then arrival number: the lower, the sooner it should start.
    rank: (usize, u64),
    deadline: Instant,
    running: bool,
}

fn tier_of(model: &str) -> Option<ModelTier> {
    match model {
        "huge" => Some(Huge),
        "tiny" | "narrow" => Some(Tiny),
        _ => None,
    }
}

/// Requests of `model` that may run at once at first, when the engine's capacity bounds it.
fn model_max(model: &str) -> Option<usize> {
    MODEL_LIMITS
        .iter()
        .find(|(m, _)| *m == model)
        .map(|(_, n)| *n)
}

fn tier_max(tier: ModelTier) -> usize {
    TIERS
        .iter()
        .find(|(t, ..)| *t == tier)
        .map_or(0, |(_, n, _)| *n)
}

fn tier_queue_max(tier: ModelTier) -> usize {
    TIERS
        .iter()
        .find(|(t, ..)| *t == tier)
        .map_or(0, |(.., n)| *n)
}

fn slot(priority: Priority) -> usize {
    match priority {
        High => 0,
        Medium => 1,
        Low => 2,
    }
}

/// The bookkeeping the actions are checked against: what the actions so far promised.
#[derive(Default)]
struct Book {
    accepted: BTreeMap<String, Known>,
    /// Cancels sent for requests not accepted, oldest first.
    latched: Vec<(Instant, String)>,
    draining: bool,
    arrivals: u64,
    admitted: u64,
    ended: u64,
    /// Per model: the running limit the capacity events lowered it to, where they did, and
    /// how many of its running requests started before it fell there (each end takes one off).
    lowered: BTreeMap<&'static str, (usize, usize)>,
}

impl Book {
    fn running(&self, tier: Option<ModelTier>) -> usize {
        self.accepted
            .values()
            .filter(|k| k.running && tier.is_none_or(|t| k.tier == t))
            .count()
    }

    fn running_model(&self, model: &str) -> usize {
        self.accepted
            .values()
            .filter(|k| k.running && k.model == model)
            .count()
    }

    fn waiting(&self, tier: Option<ModelTier>) -> impl Iterator<Item = (&String, &Known)> {
        self.accepted
            .iter()
            .filter(move |(_, k)| !k.running && tier.is_none_or(|t| k.tier == t))
    }

    /// Requests of `model` that may run at once now.
    fn model_max(&self, model: &str) -> Option<usize> {
        self.lowered
            .get(model)
            .map(|(max, _)| *max)
            .or_else(|| model_max(model))
    }

    /// Whether a request like `k` (its model, its tier) could start now.
    fn has_slot(&self, k: &Known) -> bool {
        self.running(None) < INFLIGHT_MAX
            && self.running(Some(k.tier)) < tier_max(k.tier)
            && self
                .model_max(k.model)
                .is_none_or(|max| self.running_model(k.model) < max)
    }

    /// The engine runs `max` of `model` at once: the limit falls to it when it is lower.
    fn capacity(&mut self, model: &'static str, max: usize) {
        if self.model_max(model).is_none_or(|now| max < now) {
            let over = self.running_model(model).saturating_sub(max);
            self.lowered.insert(model, (max, over));
        }
    }

    /// A running request of `model` ended.
    fn ended_running(&mut self, model: &str) {
        if let Some((_, over)) = self.lowered.get_mut(model) {
            *over = over.saturating_sub(1);
        }
    }

    /// Takes the latched cancel for `id` at `now`, if one is still valid.
    fn take_latch(&mut self, id: &str, now: Instant) -> bool {
        self.latched
            .retain(|(at, _)| now.saturating_duration_since(*at) <= LATCHED_CANCEL_TTL);
        match self.latched.iter().position(|(_, l)| l == id) {
            Some(pos) => {
                self.latched.remove(pos);
                true
            }
            None => false,
        }
    }

    /// A request starts: it must be accepted and not running, no waiting request that
    /// outranks it may have a free slot, and no limit may be passed.
    fn start(&mut self, id: &str, arrived: Option<&(String, Known)>) -> Result<(), String> {
        let known = match (self.accepted.get(id), arrived) {
            (Some(k), _) if k.running => return Err(format!("{id} started twice")),
            (Some(k), _) => k.clone(),
            (None, Some((arrived, k))) if arrived == id => {
                self.admitted += 1;
                k.clone()
            }
            (None, _) => return Err(format!("{id} started without being accepted")),
        };
        for (other, k) in self.waiting(None) {
            if other != id && k.rank < known.rank && self.has_slot(k) {
                return Err(format!("{id} started before {other}, which outranks it"));
            }
        }
        if !self.has_slot(&known) {
            return Err(format!("starting {id} runs past a limit"));
        }
        self.accepted.insert(
            id.to_owned(),
            Known {
                running: true,
                ..known
            },
        );
        Ok(())
    }

    /// Applies one action of `event`; `arrived` is the request the event brought, if it got
    /// past the duplicate, drain and model checks.
    fn apply(
        &mut self,
        action: &Action<u32>,
        event: &Event<u32>,
        arrived: Option<&(String, Known)>,
    ) -> Result<(), String> {
        match action {
            Action::Start { id, payload, .. } if *payload == 7 => self.start(id, arrived),
            Action::Start { id, payload, .. } => Err(format!("{id} started with {payload}")),
            Action::EndWaiting(e) => {
                let Some(k) = self.accepted.remove(&e.id).filter(|k| !k.running) else {
                    return Err(format!("{} ended while waiting, but it did not wait", e.id));
                };
                let fits = match event {
                    Event::Tick { now } => e.code == ErrorCode::Timeout && k.deadline <= *now,
                    Event::Cancel { id, .. } => e.code == ErrorCode::Cancelled && *id == e.id,
                    Event::AbortAll => e.code == ErrorCode::WorkerShutdown,
                    _ => false,
                };
                self.ended += 1;
                fits.then_some(())
                    .ok_or_else(|| format!("{} ended {} on {event:?}", e.id, e.code))
            }
            Action::Cancel { id, code, .. } => {
                let fits = match event {
                    Event::Cancel { id: named, .. } => named == id && *code == ErrorCode::Cancelled,
                    Event::AbortAll => *code == ErrorCode::WorkerShutdown,
                    _ => false,
                };
                let running = self.accepted.get(id).is_some_and(|k| k.running);
                (fits && running)
                    .then_some(())
                    .ok_or_else(|| format!("{id} cancelled with {code} on {event:?}"))
            }
            Action::Refuse(e) if !self.accepted.contains_key(&e.id) => Ok(()),
            Action::Refuse(e) => Err(format!("{} refused while accepted", e.id)),
            Action::Duplicate { id } if self.accepted.contains_key(id) => Ok(()),
            Action::Duplicate { id } => Err(format!("{id} answered as a duplicate")),
        }
    }

    /// What an arrival that got past the duplicate, drain and model checks gave.
    fn arrived(
        &mut self,
        (id, known): (String, Known),
        latched: bool,
        actions: &[Action<u32>],
    ) -> Result<(), String> {
        let cancelled = matches!(actions, [Action::Refuse(e)] if e.code == ErrorCode::Cancelled);
        if latched != cancelled {
            return Err(format!("{id} was latched: {latched}; it got {actions:?}"));
        }
        match actions {
            // It waits.
            [] => {
                self.admitted += 1;
                self.accepted.insert(id, known);
            }
            // Counted by `start`, or the latched cancel checked above.
            [Action::Start { .. }] => {}
            [Action::Refuse(_)] if cancelled => {}
            [Action::Refuse(e)] if e.code == ErrorCode::QueueFull => {
                let at_bound = self.waiting(None).count() == QUEUE_MAX
                    || self.waiting(Some(known.tier)).count() == tier_queue_max(known.tier);
                if self.has_slot(&known) || !at_bound {
                    return Err(format!("{id} refused as full with room to run or wait"));
                }
            }
            _ => return Err(format!("{id} arrived and got {actions:?}")),
        }
        Ok(())
    }

    /// The promises that hold between events.
    fn check(&self, a: &Admission<u32>, event: &Event<u32>) -> Result<(), String> {
        let waiting = self.waiting(None).count();
        if (a.running(), a.queued()) != (self.running(None), waiting) {
            return Err(format!(
                "admission counts {} running and {} waiting; its actions said {} and {waiting}",
                a.running(),
                a.queued(),
                self.running(None)
            ));
        }
        let past_tier_bound = TIERS
            .iter()
            .any(|(t, _, max)| self.waiting(Some(*t)).count() > *max);
        if waiting > QUEUE_MAX || past_tier_bound {
            return Err(format!("{waiting} waiting, past a bound"));
        }
        if let Some((id, _)) = self.waiting(None).find(|(_, k)| self.has_slot(k)) {
            return Err(format!("{id} waits while a slot of its tier is free"));
        }
        for (model, max) in MODEL_LIMITS {
            let running = self.running_model(model);
            if running > max {
                return Err(format!("{running} of {model} run, past its limit of {max}"));
            }
        }
        for (model, (max, over)) in &self.lowered {
            let running = self.running_model(model);
            if running > max + over {
                return Err(format!(
                    "{running} of {model} run, past its lowered limit of {max} and the {over} \
                     that ran before it fell"
                ));
            }
        }
        if let Event::Tick { now } = event
            && let Some((id, _)) = self.waiting(None).find(|(_, k)| k.deadline <= *now)
        {
            return Err(format!("{id} still waits past its deadline after a tick"));
        }
        if matches!(event, Event::AbortAll) && waiting > 0 {
            return Err("the stop left requests waiting".to_owned());
        }
        let next = self.waiting(None).map(|(_, k)| k.deadline).min();
        if a.next_deadline() != next {
            return Err(format!(
                "next deadline {:?}, not {next:?}",
                a.next_deadline()
            ));
        }
        Ok(())
    }
}

/// One event of a sequence, with what the test expects of it.
struct Step {
    event: Event<u32>,
    /// The request it brings, when that gets past the duplicate, drain and model checks.
    arrived: Option<(String, Known)>,
    /// Whether a latched cancel waits for that request.
    latched: bool,
}

/// The step `op` makes at `now`; `None` when it makes no event.
fn step(op: Op, now: &mut Instant, book: &mut Book) -> Option<Step> {
    let now_at = *now;
    let event = match op {
        Op::Arrive {
            id,
            model,
            priority,
            from_group,
            timeout_ms,
        } => {
            let id = format!("r{id}");
            let model = MODELS[usize::from(model)];
            let priority = [High, Medium, Low][usize::from(priority)];
            let timeout = timeout_ms.map(ms);
            let open = !book.accepted.contains_key(&id) && (from_group || !book.draining);
            let mut arrived = None;
            let mut latched = false;
            if let (true, Some(tier)) = (open, tier_of(model)) {
                latched = book.take_latch(&id, now_at);
                book.arrivals += 1;
                let deadline = now_at + timeout.map_or(REQUEST_TIMEOUT, |t| t.min(REQUEST_TIMEOUT));
                let known = Known {
                    model,
                    tier,
                    rank: (slot(priority), book.arrivals),
                    deadline,
                    running: false,
                };
                arrived = Some((id.clone(), known));
            }
            let request = Arrival {
                id,
                model: model.to_owned(),
                priority,
                timeout,
                from_group,
                waited: Duration::ZERO,
                payload: 7,
            };
            let event = Event::Arrived {
                request,
                now: now_at,
            };
            return Some(Step {
                event,
                arrived,
                latched,
            });
        }
        Op::Invalid(id) => Event::Invalid {
            id: format!("r{id}"),
            code: ErrorCode::InvalidRequest,
            text: "invalid".to_owned(),
            now: now_at,
        },
        Op::Cancel(id) => {
            let id = format!("r{id}");
            if !book.accepted.contains_key(&id) {
                book.latched.push((now_at, id.clone()));
            }
            Event::Cancel { id, now: now_at }
        }
        Op::Finish(pick) => {
            let running: Vec<&String> = book
                .accepted
                .iter()
                .filter(|(_, k)| k.running)
                .map(|(id, _)| id)
                .collect();
            if running.is_empty() {
                return None;
            }
            let id = running[usize::from(pick) % running.len()].clone();
            if let Some(known) = book.accepted.remove(&id) {
                book.ended_running(known.model);
            }
            book.ended += 1;
            Event::Finished { id }
        }
        Op::Advance(d) => {
            *now += ms(d);
            return None;
        }
        Op::Tick => Event::Tick { now: now_at },
        Op::Capacity(model, max) => {
            let model = MODELS[usize::from(model)];
            book.capacity(model, usize::from(max));
            Event::ModelCapacity {
                model: model.to_owned(),
                streams_max: usize::from(max),
            }
        }
        Op::Drain => {
            book.draining = true;
            Event::DrainStarted
        }
        Op::AbortAll => Event::AbortAll,
    };
    Some(Step {
        event,
        arrived: None,
        latched: false,
    })
}

/// Runs `ops`, then a stop and the ends of what still runs, checking every promise on the way.
fn run(ops: Vec<Op>) -> Result<(), String> {
    let mut now = SystemClock.now();
    let mut a = admission();
    let mut book = Book::default();
    for op in ops.into_iter().chain([Op::AbortAll]) {
        let Some(Step {
            event,
            arrived,
            latched,
        }) = step(op, &mut now, &mut book)
        else {
            continue;
        };
        // What a cancel must do: stop a running request, end a waiting one, or wait.
        let cancelled = match &event {
            Event::Cancel { id, .. } => Some(book.accepted.get(id).map(|k| k.running)),
            _ => None,
        };
        let actions = a.handle(event.clone());
        let fits = match (cancelled, &actions[..]) {
            (Some(Some(true)), [Action::Cancel { .. }])
            | (Some(Some(false)), [Action::EndWaiting(_)])
            | (Some(None), [])
            | (None, _) => true,
            (Some(_), _) => false,
        };
        if !fits {
            return Err(format!("{event:?} gave {actions:?}"));
        }
        let one = matches!(event, Event::Arrived { .. } | Event::Invalid { .. });
        if one && actions.len() > 1 {
            return Err(format!("{event:?} gave {actions:?}"));
        }
        for action in &actions {
            book.apply(action, &event, arrived.as_ref())?;
        }
        if let Some(arrived) = arrived {
            book.arrived(arrived, latched, &actions)?;
        }
        if matches!(event, Event::AbortAll) {
            let cancelled = actions
                .iter()
                .filter(|x| matches!(x, Action::Cancel { .. }))
                .count();
            if cancelled != book.running(None) {
                return Err(format!(
                    "the stop cancelled {cancelled} of {}",
                    book.running(None)
                ));
            }
        }
        book.check(&a, &event)?;
    }
    // The stopped requests' tasks report their ends.
    let running: Vec<String> = book.accepted.keys().cloned().collect();
    for id in running {
        let actions = a.handle(Event::Finished { id: id.clone() });
        if !actions.is_empty() {
            return Err(format!("after the stop, the end of {id} gave {actions:?}"));
        }
        book.ended += 1;
    }
    if !a.is_idle() || book.ended != book.admitted {
        return Err(format!(
            "{} accepted, {} ended, admission idle: {}",
            book.admitted,
            book.ended,
            a.is_idle()
        ));
    }
    Ok(())
}

proptest! {
    #[test]
    fn random_event_sequences_keep_every_promise(ops in proptest::collection::vec(op(), 0..200)) {
        if let Err(broken) = run(ops) {
            prop_assert!(false, "{}", broken);
        }
    }
}

#[test]
fn a_request_that_waited_in_a_work_queue_has_that_much_less_time_or_ends_timeout() {
    let t0 = SystemClock.now();
    let mut a = admission();
    let mut late = arrival("late", "tiny", Medium);
    late.timeout = Some(Duration::from_secs(2));
    late.waited = Duration::from_secs(2);
    let actions = a.handle(Event::Arrived {
        request: late,
        now: t0,
    });
    check(&actions, &["refuse late TIMEOUT"]);
    let mut waited = arrival("waited", "tiny", Medium);
    waited.timeout = Some(Duration::from_secs(2));
    waited.waited = Duration::from_millis(500);
    let actions = a.handle(Event::Arrived {
        request: waited,
        now: t0,
    });
    match actions.as_slice() {
        [Action::Start { deadline, .. }] => {
            assert_eq!(*deadline, t0 + Duration::from_millis(1500));
        }
        other => panic!("expected a start, got {:?}", names(other)),
    }
    assert_eq!(a.free_slots("tiny"), 1, "the tiny tier runs 2, one runs");
    a.handle(Event::DrainStarted);
    assert_eq!(a.free_slots("tiny"), 0, "a draining worker pulls nothing");
    assert_eq!(a.free_slots("unknown"), 0);
}
