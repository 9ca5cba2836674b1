//! Proof that the suite bites: each planted bug of `mlx_worker::mutation` breaks at least one
//! invariant in the scenarios that exercise it, and the same scenarios hold without it.

use mlx_worker::mutation::{Mutation, Mutations};

use crate::harness::{replay, run, test_path};
use crate::scenarios::named;

/// The scenarios that exercise each planted bug.
fn scenarios_for(m: Mutation) -> &'static [&'static str] {
    match m {
        Mutation::SkipReregistration => &["partition_during_streaming", "broker_crash_and_restart"],
        Mutation::DropTerminalOnTimeout => &["engine_hang"],
        Mutation::ForgetLatchedCancel => &["cancel_before_and_after_first_token"],
        Mutation::DrainWithoutWaiting => &["drain_with_running_and_queued"],
        Mutation::TokenAfterDone => &["late_subscriber", "duplicate_request_ids"],
        Mutation::IgnoreQueueBound => &["flood_past_queue_bound"],
        Mutation::AbandonOnFirstPublishTimeout => &["long_broker_outage"],
        Mutation::IgnoreEngineCapacity => {
            &["burst_past_engine_capacity", "load_answers_fewer_streams"]
        }
        Mutation::OneIndexPerBatch => &["batched_engine_narrower_than_the_worker"],
    }
}

#[test]
fn every_planted_bug_breaks_an_invariant() {
    let mut table = Vec::new();
    let mut missed = Vec::new();
    for m in Mutation::ALL {
        let mut caught = Vec::new();
        for name in scenarios_for(m) {
            let (scenario, seed) = named(name);
            let clean = run(scenario, *seed, Mutations::NONE);
            assert!(
                clean.violations.is_empty(),
                "{name} fails without any mutation on seed {seed}: {:?}\nreplay: {}",
                clean.violations,
                replay(&test_path(name), *seed)
            );
            let mutated = run(scenario, *seed, Mutations::NONE.with(m));
            let mut invariants: Vec<&str> = mutated
                .violations
                .iter()
                .map(|v| v.invariant)
                .filter(|i| *i != "scenario")
                .collect();
            invariants.dedup();
            for v in &mutated.violations {
                if v.invariant != "scenario" {
                    caught.push(format!(
                        "{m:?} -> {} -> {name} seed {seed}: {}",
                        v.invariant, v.detail
                    ));
                    break;
                }
            }
            table.push(format!(
                "{:<28} {:<36} seed {:<3} {}",
                format!("{m:?}"),
                name,
                seed,
                invariants.join(", ")
            ));
        }
        if caught.is_empty() {
            missed.push(m);
        }
        for line in caught {
            eprintln!("{line}");
        }
    }
    eprintln!(
        "mutant                       scenario                             seed    invariants broken"
    );
    for line in &table {
        eprintln!("{line}");
    }
    assert!(missed.is_empty(), "no invariant caught {missed:?}");
}
