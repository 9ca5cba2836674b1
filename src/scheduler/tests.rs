// Goal: the scheduler's admission decisions respect every bound and start waiting work in the
// right order as soon as a slot frees.
// Method: scripted admit/finish sequences on small limits, plus a proptest of random sequences
// against the bounds and the no-idle-slot invariant (checked inside the scheduler).

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
    }
}

use ModelTier::{Huge, Tiny};
use Priority::{High, Low, Medium};

#[test]
fn requests_start_until_the_tier_limit_then_wait_then_are_refused() {
    let mut s = Scheduler::new(limits(8, 10, &[(Huge, 1, 2), (Tiny, 4, 10)]));
    assert_eq!(s.admit("a".into(), Huge, Medium), Admission::Start);
    assert_eq!(s.admit("b".into(), Huge, Medium), Admission::Queued);
    assert_eq!(s.admit("c".into(), Huge, Medium), Admission::Queued);
    assert_eq!(
        s.admit("d".into(), Huge, Medium),
        Admission::Full {
            waiting: 2,
            limit: 2
        }
    );
    // Another tier is not blocked by the first.
    assert_eq!(s.admit("t".into(), Tiny, Medium), Admission::Start);
    assert_eq!((s.running(), s.queued()), (2, 2));
    assert_eq!(s.finish(Huge), vec!["b".to_owned()]);
    assert_eq!(s.finish(Huge), vec!["c".to_owned()]);
    assert_eq!(s.finish(Huge), Vec::<String>::new());
}

#[test]
fn the_global_limits_bind_across_tiers() {
    let mut s = Scheduler::new(limits(2, 1, &[(Huge, 2, 5), (Tiny, 2, 5)]));
    assert_eq!(s.admit("a".into(), Huge, Medium), Admission::Start);
    assert_eq!(s.admit("b".into(), Tiny, Medium), Admission::Start);
    assert_eq!(s.admit("c".into(), Tiny, Medium), Admission::Queued);
    assert_eq!(
        s.admit("d".into(), Huge, High),
        Admission::Full {
            waiting: 1,
            limit: 1
        }
    );
    // A finish in one tier starts the waiting request of another.
    assert_eq!(s.finish(Huge), vec!["c".to_owned()]);
}

#[test]
fn waiting_requests_start_by_priority_then_arrival() {
    let mut s = Scheduler::new(limits(1, 10, &[(Huge, 1, 10), (Tiny, 1, 10)]));
    assert_eq!(s.admit("run".into(), Tiny, Medium), Admission::Start);
    for (id, tier, p) in [
        ("low", Tiny, Low),
        ("m1", Huge, Medium),
        ("high", Tiny, High),
        ("m2", Tiny, Medium),
    ] {
        assert_eq!(s.admit(id.into(), tier, p), Admission::Queued);
    }
    let mut order = Vec::new();
    let mut tier = Tiny;
    for _ in 0..4 {
        let started = s.finish(tier);
        assert_eq!(started.len(), 1);
        tier = if started[0] == "m1" { Huge } else { Tiny };
        order.extend(started);
    }
    assert_eq!(order, ["high", "m1", "m2", "low"]);
}

#[test]
fn removed_and_drained_requests_leave_the_queue() {
    let mut s = Scheduler::new(limits(1, 10, &[(Tiny, 1, 10)]));
    s.admit("run".into(), Tiny, Medium);
    s.admit("a".into(), Tiny, Low);
    s.admit("b".into(), Tiny, High);
    s.admit("c".into(), Tiny, Medium);
    assert!(s.remove_queued("c"));
    assert!(!s.remove_queued("c"));
    assert!(!s.remove_queued("run"));
    assert_eq!(s.take_queued(), ["b", "a"]);
    assert_eq!(s.queued(), 0);
    assert_eq!(s.finish(Tiny), Vec::<String>::new());
}

#[test]
fn a_tier_without_limits_takes_nothing() {
    let mut s = Scheduler::new(limits(4, 4, &[(Tiny, 1, 1)]));
    assert_eq!(
        s.admit("x".into(), Huge, Medium),
        Admission::Full {
            waiting: 0,
            limit: 0
        }
    );
}

#[derive(Clone, Debug)]
enum Op {
    Admit(bool, u8),
    Finish(bool),
    Remove(u8),
}

proptest! {
    #[test]
    fn random_sequences_never_break_a_bound(ops in proptest::collection::vec(
        prop_oneof![
            (any::<bool>(), 0u8..3).prop_map(|(t, p)| Op::Admit(t, p)),
            any::<bool>().prop_map(Op::Finish),
            (0u8..50).prop_map(Op::Remove),
        ], 0..200)
    ) {
        let mut s = Scheduler::new(limits(3, 5, &[(Huge, 1, 3), (Tiny, 2, 4)]));
        let mut running: BTreeMap<ModelTier, usize> = BTreeMap::new();
        let mut next = 0u32;
        for op in ops {
            match op {
                Op::Admit(huge, p) => {
                    let tier = if huge { Huge } else { Tiny };
                    let priority = [High, Medium, Low][usize::from(p)];
                    next += 1;
                    if s.admit(next.to_string(), tier, priority) == Admission::Start {
                        *running.entry(tier).or_default() += 1;
                    }
                }
                Op::Finish(huge) => {
                    let tier = if huge { Huge } else { Tiny };
                    if running.get(&tier).copied().unwrap_or(0) > 0 {
                        *running.entry(tier).or_default() -= 1;
                        let (running_before, queued_before) = (s.running() - 1, s.queued());
                        let started = s.finish(tier);
                        // Whatever starts leaves the queue and runs: the counts move by as
                        // many as `finish` names, and none of them twice.
                        prop_assert_eq!(s.running(), running_before + started.len());
                        prop_assert_eq!(s.queued(), queued_before - started.len());
                        let distinct: std::collections::HashSet<_> = started.iter().collect();
                        prop_assert_eq!(distinct.len(), started.len());
                        // The tier that finished may start its own or another tier's work;
                        // the scheduler's own counts tell which.
                        running.clear();
                        running.insert(Huge, s.tiers[&Huge].running);
                        running.insert(Tiny, s.tiers[&Tiny].running);
                    }
                }
                Op::Remove(id) => {
                    s.remove_queued(&id.to_string());
                }
            }
            prop_assert!(s.running() <= 3);
            prop_assert!(s.queued() <= 5);
            prop_assert!(s.tiers[&Huge].running <= 1);
            prop_assert!(s.tiers[&Tiny].running <= 2);
        }
    }
}
