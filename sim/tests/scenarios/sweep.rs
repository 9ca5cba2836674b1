//! The sweep: a seeded chaos scenario that mixes every fault type, run on 60 seeds, with every
//! invariant checked on each and a table of how often each fault type fired across the sweep
//! (a fault type that never fired fails the test).

use std::collections::BTreeMap;

use mlx_worker::mutation::Mutations;
use mlx_worker_sim::world::{Command, WORKER_ID, request};
use mlx_worker_sim::{Fault, FaultKind, Skew, Violation, World};
use rand::Rng;

use crate::harness::{Scenario, ms, replay, run};

/// Seeds of the sweep.
const SWEEP: std::ops::Range<u64> = 1000..1060;

/// A random mix of requests and faults drawn from the seed, then time to settle.
pub(crate) fn chaos_script(w: &mut World) -> Result<Vec<Violation>, String> {
    w.run_until_lifecycle("ready", ms(3000))?;
    let mut rng = w.rng.clone();
    let mut n = 0;
    let steps = rng.random_range(6..12);
    for _ in 0..steps {
        n += 1;
        let id = format!("r{n}");
        match rng.random_range(0..13) {
            0 => {
                w.partition();
                let d = rng.random_range(100..900);
                w.subscribe_response(&id);
                w.send_request(&id, 10);
                w.run_for(ms(d))?;
                w.repair();
            }
            1 => {
                w.crash_broker();
                w.run_for(ms(rng.random_range(50..600)))?;
                w.restart_broker();
            }
            2 => {
                let tokens = rng.random_range(0..5);
                w.engine_fault(Fault::CrashAfter {
                    tokens,
                    restart: ms(150),
                });
                w.subscribe_response(&id);
                w.send_request(&id, 8);
            }
            3 => {
                w.engine_fault(Fault::HangAfter(rng.random_range(0..4)));
                w.subscribe_response(&id);
                let mut body = request(&id, 8);
                body["timeoutMs"] = serde_json::json!(rng.random_range(200..600));
                w.send_json(&body);
            }
            4 => {
                w.engine_fault(Fault::LoadFails);
                use mlx_worker::engine::Engine as _;
                let engine = w.engine.clone();
                futures::executor::block_on(engine.unload(mlx_worker_sim::world::MODEL))
                    .map_err(|e| e.to_string())?;
                w.subscribe_response(&id);
                w.send_request(&id, 3);
            }
            5 => {
                w.engine_fault(Fault::FailAfter(rng.random_range(0..5)));
                w.subscribe_response(&id);
                w.send_request(&id, 8);
            }
            6 => {
                let offset_ms = rng.random_range(-10_000..10_000);
                let drift_ppm = rng.random_range(-50_000..50_000);
                w.skew_clock(Skew {
                    offset_ms,
                    drift_ppm,
                });
            }
            7 => {
                w.fault(FaultKind::SlowConsumer);
                w.command(Command::ReadDelay(ms(rng.random_range(5..20))));
                w.subscribe_response(&id);
                w.send_request(&id, 10);
                w.run_for(ms(400))?;
                w.command(Command::ReadDelay(ms(0)));
            }
            8 => {
                w.fault(FaultKind::LateSubscriber);
                w.send_request(&id, 5);
                w.run_for(ms(rng.random_range(1..150)))?;
                w.subscribe_response(&id);
            }
            9 => {
                w.fault(FaultKind::Duplicate);
                w.subscribe_response(&id);
                w.send_request(&id, 10);
                w.run_for(ms(40))?;
                w.command(Command::PublishWithReply(
                    format!("worker.{WORKER_ID}.inference"),
                    format!("reply.{id}"),
                    bytes::Bytes::from(request(&id, 10).to_string()),
                ));
            }
            10 => {
                w.fault(FaultKind::Flood);
                for k in 0..8 {
                    let id = format!("{id}-{k}");
                    w.subscribe_response(&id);
                    w.send_request(&id, 4);
                }
            }
            11 => {
                w.subscribe_response(&id);
                if rng.random_bool(0.5) {
                    w.send_cancel(&id);
                    w.run_for(ms(20))?;
                    w.send_request(&id, 5);
                } else {
                    w.send_request(&id, 20);
                    w.run_for(ms(rng.random_range(10..300)))?;
                    w.send_cancel(&id);
                }
            }
            _ => {
                w.subscribe_response(&id);
                w.send_request(&id, rng.random_range(1..15));
            }
        }
        w.run_for(ms(rng.random_range(50..500)))?;
    }
    if rng.random_bool(0.3) {
        w.stop_worker();
    }
    w.run_for(ms(4500))?;
    Ok(Vec::new())
}

/// The chaos scenario.
pub(crate) const CHAOS: Scenario = Scenario {
    name: "chaos",
    yaml: "  maxConcurrent: 2\n  requestQueue:\n    maxDepth: 3\n",
    engine: None,
    run: chaos_script,
};

/// The chaos scenario on `SIM_SEED` (or its pinned seed).
#[test]
fn chaos() {
    crate::harness::check_clean(&CHAOS, 42);
}

#[test]
fn sweep_of_seeds_holds_every_invariant_and_fires_every_fault() {
    let mut coverage: BTreeMap<FaultKind, u64> = FaultKind::ALL.iter().map(|k| (*k, 0)).collect();
    let mut failures = Vec::new();
    for seed in SWEEP {
        let outcome = run(&CHAOS, seed, Mutations::NONE);
        for (kind, n) in outcome.faults {
            *coverage.entry(kind).or_insert(0) += n;
        }
        if !outcome.violations.is_empty() {
            failures.push(format!(
                "seed {seed}: {}\n  replay: {}",
                outcome
                    .violations
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; "),
                replay("sweep::chaos", seed)
            ));
        }
    }
    eprintln!("fault coverage over seeds {SWEEP:?}:");
    for (kind, n) in &coverage {
        eprintln!("  {:<18} {n}", format!("{kind:?}"));
    }
    let never: Vec<&FaultKind> = coverage
        .iter()
        .filter(|(_, n)| **n == 0)
        .map(|(k, _)| k)
        .collect();
    assert!(
        failures.is_empty(),
        "{} seeds failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(never.is_empty(), "fault types that never fired: {never:?}");
}
