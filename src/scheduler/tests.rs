// Goal: the scheduler's admission decisions respect every bound (overall, per tier, per model)
// and start waiting work in the right order as soon as a slot frees; a model at its bound holds
// up its own requests only; a model's bound that falls holds its new starts until fewer run,
// and never rises.
// Method: scripted admit/finish sequences on small limits, plus a proptest of random sequences
// over two tiers and three models against the bounds and the no-idle-slot invariant (checked
// inside the scheduler).

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::plan::TierLimit;

fn limits(inflight: usize, queue: usize, tiers: &[(ModelTier, usize, usize)]) -> SchedulerLimits {
    SchedulerLimits {
        inflight_max: inflight,
        queue_depth_max: queue,
        tiers: tiers
            .iter()
            .map(|&(t, max_concurrent, queue_depth)| {
                (
                    t,
                    TierLimit {
                        max_concurrent,
                        queue_depth,
                    },
                )
            })
            .collect::<BTreeMap<_, _>>(),
        models: BTreeMap::new(),
    }
}

/// `limits` with per-model bounds on requests running at once.
fn with_models(limits: SchedulerLimits, models: &[(&str, usize)]) -> SchedulerLimits {
    SchedulerLimits {
        models: models.iter().map(|&(m, n)| (m.to_owned(), n)).collect(),
        ..limits
    }
}

use ModelTier::{Huge, Tiny};
use Priority::{High, Low, Medium};

/// The model of the requests of the tier tests, which bounds nothing.
const MODEL: &str = "m";

#[test]
fn requests_start_until_the_tier_limit_then_wait_then_are_refused() {
    let mut s = Scheduler::new(limits(8, 10, &[(Huge, 1, 2), (Tiny, 4, 10)]));
    assert_eq!(s.admit("a".into(), Huge, MODEL, Medium), Admission::Start);
    assert_eq!(s.admit("b".into(), Huge, MODEL, Medium), Admission::Queued);
    assert_eq!(s.admit("c".into(), Huge, MODEL, Medium), Admission::Queued);
    assert_eq!(
        s.admit("d".into(), Huge, MODEL, Medium),
        Admission::Full {
            waiting: 2,
            limit: 2
        }
    );
    // Another tier is not blocked by the first.
    assert_eq!(s.admit("t".into(), Tiny, MODEL, Medium), Admission::Start);
    assert_eq!((s.running(), s.queued()), (2, 2));
    assert_eq!(s.finish(Huge, MODEL), vec!["b".to_owned()]);
    assert_eq!(s.finish(Huge, MODEL), vec!["c".to_owned()]);
    assert_eq!(s.finish(Huge, MODEL), Vec::<String>::new());
}

#[test]
fn the_global_limits_bind_across_tiers() {
    let mut s = Scheduler::new(limits(2, 1, &[(Huge, 2, 5), (Tiny, 2, 5)]));
    assert_eq!(s.admit("a".into(), Huge, MODEL, Medium), Admission::Start);
    assert_eq!(s.admit("b".into(), Tiny, MODEL, Medium), Admission::Start);
    assert_eq!(s.admit("c".into(), Tiny, MODEL, Medium), Admission::Queued);
    assert_eq!(
        s.admit("d".into(), Huge, MODEL, High),
        Admission::Full {
            waiting: 1,
            limit: 1
        }
    );
    // A finish in one tier starts the waiting request of another.
    assert_eq!(s.finish(Huge, MODEL), vec!["c".to_owned()]);
}

#[test]
fn waiting_requests_start_by_priority_then_arrival() {
    let mut s = Scheduler::new(limits(1, 10, &[(Huge, 1, 10), (Tiny, 1, 10)]));
    assert_eq!(s.admit("run".into(), Tiny, MODEL, Medium), Admission::Start);
    for (id, tier, p) in [
        ("low", Tiny, Low),
        ("m1", Huge, Medium),
        ("high", Tiny, High),
        ("m2", Tiny, Medium),
    ] {
        assert_eq!(s.admit(id.into(), tier, MODEL, p), Admission::Queued);
    }
    let mut order = Vec::new();
    let mut tier = Tiny;
    for _ in 0..4 {
        let started = s.finish(tier, MODEL);
        assert_eq!(started.len(), 1);
        tier = if started[0] == "m1" { Huge } else { Tiny };
        order.extend(started);
    }
    assert_eq!(order, ["high", "m1", "m2", "low"]);
}

#[test]
fn removed_and_drained_requests_leave_the_queue() {
    let mut s = Scheduler::new(limits(1, 10, &[(Tiny, 1, 10)]));
    s.admit("run".into(), Tiny, MODEL, Medium);
    s.admit("a".into(), Tiny, MODEL, Low);
    s.admit("b".into(), Tiny, MODEL, High);
    s.admit("c".into(), Tiny, MODEL, Medium);
    assert!(s.remove_queued("c"));
    assert!(!s.remove_queued("c"));
    assert!(!s.remove_queued("run"));
    assert_eq!(s.take_queued(), ["b", "a"]);
    assert_eq!(s.queued(), 0);
    assert_eq!(s.finish(Tiny, MODEL), Vec::<String>::new());
}

#[test]
fn a_tier_without_limits_takes_nothing() {
    let mut s = Scheduler::new(limits(4, 4, &[(Tiny, 1, 1)]));
    assert_eq!(
        s.admit("x".into(), Huge, MODEL, Medium),
        Admission::Full {
            waiting: 0,
            limit: 0
        }
    );
}

#[test]
fn a_model_at_its_bound_waits_while_another_model_of_its_tier_starts() {
    let mut s = Scheduler::new(with_models(limits(8, 10, &[(Tiny, 4, 10)]), &[("a", 1)]));
    assert_eq!(s.admit("a1".into(), Tiny, "a", Medium), Admission::Start);
    assert_eq!(s.admit("a2".into(), Tiny, "a", Medium), Admission::Queued);
    assert_eq!(s.admit("b1".into(), Tiny, "b", Medium), Admission::Start);
    assert_eq!(s.admit("b2".into(), Tiny, "b", Medium), Admission::Start);
    assert_eq!((s.running(), s.queued()), (3, 1));
    // Another model's slot is no slot for "a".
    assert_eq!(s.finish(Tiny, "b"), Vec::<String>::new());
    assert_eq!(s.finish(Tiny, "a"), vec!["a2".to_owned()]);
    assert_eq!(s.finish(Tiny, "a"), Vec::<String>::new());
}

#[test]
fn the_next_to_start_is_the_best_ranked_of_the_models_that_may_start() {
    let mut s = Scheduler::new(with_models(limits(2, 10, &[(Tiny, 2, 10)]), &[("a", 1)]));
    assert_eq!(s.admit("a1".into(), Tiny, "a", Medium), Admission::Start);
    assert_eq!(s.admit("b1".into(), Tiny, "b", Medium), Admission::Start);
    assert_eq!(s.admit("a2".into(), Tiny, "a", High), Admission::Queued);
    assert_eq!(s.admit("b2".into(), Tiny, "b", Low), Admission::Queued);
    // "a" is at its bound, so the low-priority request of "b" takes the free slot.
    assert_eq!(s.finish(Tiny, "b"), vec!["b2".to_owned()]);
    assert_eq!(s.finish(Tiny, "a"), vec!["a2".to_owned()]);
}

#[test]
fn a_model_at_its_bound_waits_within_the_queue_bounds() {
    let mut s = Scheduler::new(with_models(limits(8, 10, &[(Tiny, 4, 1)]), &[("a", 1)]));
    assert_eq!(s.admit("a1".into(), Tiny, "a", Medium), Admission::Start);
    assert_eq!(s.admit("a2".into(), Tiny, "a", Medium), Admission::Queued);
    assert_eq!(
        s.admit("a3".into(), Tiny, "a", High),
        Admission::Full {
            waiting: 1,
            limit: 1
        }
    );
    assert!(s.remove_queued("a2"));
    assert_eq!(s.finish(Tiny, "a"), Vec::<String>::new());
    assert_eq!((s.running(), s.queued()), (0, 0));
    assert!(s.tiers[&Tiny].lanes.is_empty(), "idle lanes are dropped");
}

#[test]
fn the_requests_in_hand_are_counted_by_model() {
    let mut s = Scheduler::new(with_models(limits(8, 10, &[(Tiny, 4, 10)]), &[("a", 2)]));
    assert_eq!(s.by_model(), BTreeMap::new(), "nothing in hand, no entry");
    for id in ["a1", "a2", "a3", "a4", "a5"] {
        s.admit(id.into(), Tiny, "a", Medium);
    }
    s.admit("b1".into(), Tiny, "b", Medium);
    let count = |running, queued| ModelCount { running, queued };
    assert_eq!(
        s.by_model(),
        BTreeMap::from([("a".to_owned(), count(2, 3)), ("b".to_owned(), count(1, 0))])
    );
    assert_eq!(s.finish(Tiny, "a"), vec!["a3".to_owned()]);
    assert_eq!(s.finish(Tiny, "b"), Vec::<String>::new());
    assert_eq!(
        s.by_model(),
        BTreeMap::from([("a".to_owned(), count(2, 2))]),
        "a model with nothing in hand has no entry"
    );
}

#[test]
fn a_fallen_model_limit_holds_new_starts_until_fewer_than_it_run() {
    let mut s = Scheduler::new(with_models(limits(8, 10, &[(Tiny, 4, 10)]), &[("a", 3)]));
    for id in ["a1", "a2", "a3"] {
        assert_eq!(s.admit(id.into(), Tiny, "a", Medium), Admission::Start);
    }
    assert!(s.lower_model_limit("a", 1));
    assert_eq!(s.limits().models["a"], 1);
    // The three running go on; the next waits for the model, not for its tier.
    assert_eq!(s.admit("a4".into(), Tiny, "a", Medium), Admission::Queued);
    assert_eq!(s.admit("b1".into(), Tiny, "b", Medium), Admission::Start);
    assert_eq!(s.finish(Tiny, "a"), Vec::<String>::new());
    assert_eq!(s.finish(Tiny, "a"), Vec::<String>::new());
    assert_eq!(s.finish(Tiny, "a"), vec!["a4".to_owned()]);
    assert_eq!(s.admit("a5".into(), Tiny, "a", Medium), Admission::Queued);
    // The limit only falls: a higher figure, or the same, changes nothing.
    assert!(!s.lower_model_limit("a", 2));
    assert!(!s.lower_model_limit("a", 1));
    assert!(!s.lower_model_limit("a", 0), "a model runs at least one");
    assert_eq!(s.limits().models["a"], 1);
    assert_eq!(s.finish(Tiny, "a"), vec!["a5".to_owned()]);
    // A model without a limit gets one.
    assert!(s.lower_model_limit("b", 1));
    assert_eq!(s.admit("b2".into(), Tiny, "b", Medium), Admission::Queued);
    assert_eq!(s.finish(Tiny, "b"), vec!["b2".to_owned()]);
}

/// The proptest's models and their tiers; "a" runs at most [`A_MAX`] at once.
const MODELS: [(&str, ModelTier); 3] = [("h", Huge), ("a", Tiny), ("b", Tiny)];
const A_MAX: usize = 1;

#[derive(Clone, Debug)]
enum Op {
    /// Admits a request of the model at this position of [`MODELS`], at this priority.
    Admit(u8, u8),
    /// Finishes a running request of the model at this position, if one runs.
    Finish(u8),
    Remove(u8),
    /// Lowers the limit of the model at this position to this figure.
    Lower(u8, u8),
}

/// Requests of `model`, of `tier`, running in `s`.
fn running_of(s: &Scheduler, tier: ModelTier, model: &str) -> usize {
    s.tiers[&tier]
        .lanes
        .get(model)
        .map_or(0, |lane| lane.running)
}

#[test]
fn free_slots_are_the_least_room_of_the_inflight_tier_and_model_bounds() {
    let mut s = Scheduler::new(with_models(
        limits(3, 10, &[(Huge, 1, 2), (Tiny, 2, 4)]),
        &[("narrow", 1)],
    ));
    assert_eq!(s.free_slots(Tiny, "narrow"), 1, "the model's bound");
    assert_eq!(s.free_slots(Tiny, "wide"), 2, "the tier's bound");
    assert_eq!(
        s.admit("n1".into(), Tiny, "narrow", Medium),
        Admission::Start
    );
    assert_eq!(s.free_slots(Tiny, "narrow"), 0);
    assert_eq!(s.free_slots(Tiny, "wide"), 1);
    assert_eq!(s.admit("h1".into(), Huge, "big", Medium), Admission::Start);
    assert_eq!(s.free_slots(Huge, "big"), 0);
    assert_eq!(s.admit("w1".into(), Tiny, "wide", Medium), Admission::Start);
    assert_eq!(s.free_slots(Tiny, "wide"), 0, "the in-flight bound: 3 run");
    s.finish(Huge, "big");
    assert_eq!(s.free_slots(Tiny, "wide"), 0, "the tier is still full");
    assert_eq!(s.free_slots(Huge, "big"), 1);
}

proptest! {
    #[test]
    fn random_sequences_never_break_a_bound(ops in proptest::collection::vec(
        prop_oneof![
            (0u8..3, 0u8..3).prop_map(|(m, p)| Op::Admit(m, p)),
            (0u8..3).prop_map(Op::Finish),
            (0u8..50).prop_map(Op::Remove),
            (0u8..3, 0u8..3).prop_map(|(m, n)| Op::Lower(m, n)),
        ], 0..200)
    ) {
        let limits = limits(3, 5, &[(Huge, 1, 3), (Tiny, 2, 4)]);
        let mut s = Scheduler::new(with_models(limits, &[("a", A_MAX)]));
        let mut next = 0u32;
        for op in ops {
            let (totals_before, by_model_before) = ((s.running(), s.queued()), s.by_model());
            match op {
                Op::Admit(m, p) => {
                    let (model, tier) = MODELS[usize::from(m)];
                    let priority = [High, Medium, Low][usize::from(p)];
                    next += 1;
                    // The free slots a work queue pulls for: a request starts exactly when
                    // there is one, and takes one.
                    let free = s.free_slots(tier, model);
                    let decision = s.admit(next.to_string(), tier, model, priority);
                    prop_assert_eq!(decision == Admission::Start, free > 0);
                    if decision == Admission::Start {
                        prop_assert_eq!(s.free_slots(tier, model), free - 1);
                    }
                }
                Op::Finish(m) => {
                    let (model, tier) = MODELS[usize::from(m)];
                    if running_of(&s, tier, model) > 0 {
                        let (running_before, queued_before) = (s.running() - 1, s.queued());
                        // The model that finished may start its own or another's work; the
                        // scheduler's own counts tell which.
                        let started = s.finish(tier, model);
                        // Whatever starts leaves the queue and runs: the counts move by as
                        // many as `finish` names, and none of them twice.
                        prop_assert_eq!(s.running(), running_before + started.len());
                        prop_assert_eq!(s.queued(), queued_before - started.len());
                        let distinct: std::collections::HashSet<_> = started.iter().collect();
                        prop_assert_eq!(distinct.len(), started.len());
                    }
                }
                Op::Remove(id) => {
                    s.remove_queued(&id.to_string());
                }
                // The scheduler checks after it that no model runs past its limit but for
                // what ran before it fell, and that nothing that could start waits.
                Op::Lower(m, n) => {
                    let (model, _) = MODELS[usize::from(m)];
                    let before = s.limits().models.get(model).copied();
                    let lowered = s.lower_model_limit(model, usize::from(n));
                    let after = s.limits().models.get(model).copied();
                    prop_assert_eq!(lowered, before != after);
                    prop_assert!(after.unwrap_or(usize::MAX) <= before.unwrap_or(usize::MAX));
                }
            }
            prop_assert!(s.running() <= 3);
            prop_assert!(s.queued() <= 5);
            prop_assert!(s.tiers[&Huge].running <= 1);
            prop_assert!(s.tiers[&Tiny].running <= 2);
            prop_assert!(running_of(&s, Tiny, "a") <= A_MAX);
            // The counts by model add up to the totals, and change only with them (what the
            // dispatcher's figures rely on to publish them only when the totals change).
            let by_model = s.by_model();
            let sum = by_model.values().fold((0, 0), |(r, q), c| (r + c.running, q + c.queued));
            prop_assert_eq!(sum, (s.running(), s.queued()));
            prop_assert!(by_model.values().all(|c| c.running + c.queued > 0));
            if by_model != by_model_before {
                prop_assert_ne!((s.running(), s.queued()), totals_before);
            }
        }
    }
}
