// Goal: the worker keeps its promises under partitions, crashes, hangs, floods, skew and
// misbehaving clients, deterministically per seed — and the suite provably catches the planted
// bugs of `mlx_worker::mutation`.
// Method: every scenario builds a `World` (turmoil: broker, worker, controller hosts) from a seed
// (`SIM_SEED`, else a pinned default; always printed with the command that replays it), drives it
// through simulated time, and checks the invariants of `mlx_worker_sim::invariants` on the trace
// while it runs and at the end. One test binary: scenarios, mutant proof, determinism, sweep with
// fault coverage, and lifecycle fuzzing with proptest-state-machine.

//! The simulation suite's one test binary; see the comment above.

#![allow(clippy::unwrap_used)]

mod delivery;
mod determinism;
mod fuzz;
mod harness;
mod mutants;
mod scenarios;
mod sweep;
