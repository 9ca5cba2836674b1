//! Determinism: a seed gives a byte-identical trace twice in one process and in two processes;
//! another seed gives another trace.

use std::process::Command;

use mlx_worker::mutation::Mutations;
use mlx_worker_sim::world::seed_or;

use crate::harness::run;
use crate::sweep::CHAOS;

const SEED: u64 = 7;

#[test]
fn same_seed_same_trace_in_one_process_and_another_seed_differs() {
    let a = run(&CHAOS, SEED, Mutations::NONE);
    let b = run(&CHAOS, SEED, Mutations::NONE);
    let c = run(&CHAOS, SEED + 1, Mutations::NONE);
    eprintln!(
        "seed {SEED}: {:016x} {:016x}; seed {}: {:016x}",
        a.hash,
        b.hash,
        SEED + 1,
        c.hash
    );
    assert_eq!(a.dump, b.dump, "seed {SEED} gave two traces");
    assert_eq!(a.hash, b.hash);
    assert_ne!(
        a.hash,
        c.hash,
        "seeds {SEED} and {} gave the same trace",
        SEED + 1
    );
}

/// Prints the chaos trace's hash for `SIM_SEED` (the cross-process test runs this one).
#[test]
fn print_trace_hash() {
    let seed = seed_or(SEED);
    let outcome = run(&CHAOS, seed, Mutations::NONE);
    eprintln!("TRACE_HASH={:016x}", outcome.hash);
}

fn hash_in_child(seed: u64) -> String {
    let exe = std::env::current_exe().unwrap();
    let out = Command::new(exe)
        .args([
            "determinism::print_trace_hash",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("SIM_SEED", seed.to_string())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed: {stderr}");
    stderr
        .lines()
        .find_map(|l| l.strip_prefix("TRACE_HASH=").map(str::to_owned))
        .unwrap_or_else(|| panic!("no hash printed: {stderr}"))
}

#[test]
fn same_seed_same_trace_in_two_processes() {
    let first = hash_in_child(SEED);
    let second = hash_in_child(SEED);
    let here = format!("{:016x}", run(&CHAOS, SEED, Mutations::NONE).hash);
    eprintln!("seed {SEED}: child {first}, child {second}, here {here}");
    assert_eq!(
        first, second,
        "two processes gave different traces for seed {SEED}"
    );
    assert_eq!(
        first, here,
        "a child and this process gave different traces for seed {SEED}"
    );
}
