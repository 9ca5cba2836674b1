//! Running a scenario on a seed, reporting failures with the command that replays them.

use std::time::Duration;

use mlx_worker::mutation::Mutations;
use mlx_worker::protocol::StreamMessage;
use mlx_worker_sim::invariants::received_stream;
use mlx_worker_sim::world::seed_or;
use mlx_worker_sim::{FaultKind, SimEngineConfig, Violation, World, WorldConfig};

/// A scenario: its name (also its test's name), the worker's extra YAML, a change to the
/// world's engine (`None`: the default one), and its script. The script returns
/// scenario-specific expectations as violations of the `scenario` invariant.
pub(crate) struct Scenario {
    pub(crate) name: &'static str,
    pub(crate) yaml: &'static str,
    pub(crate) engine: Option<fn(&mut SimEngineConfig)>,
    pub(crate) run: fn(&mut World) -> Result<Vec<Violation>, String>,
}

/// What one run produced.
pub(crate) struct Outcome {
    pub(crate) violations: Vec<Violation>,
    pub(crate) hash: u64,
    pub(crate) faults: std::collections::BTreeMap<FaultKind, u64>,
    pub(crate) dump: String,
}

/// Runs `scenario` on `seed` with `mutations`.
pub(crate) fn run(scenario: &Scenario, seed: u64, mutations: Mutations) -> Outcome {
    let mut config = WorldConfig::new(seed);
    config.worker_yaml = scenario.yaml.to_owned();
    config.mutations = mutations;
    if let Some(engine) = scenario.engine {
        engine(&mut config.engine);
    }
    let mut world = World::new(config).expect("world builds");
    let mut violations = match (scenario.run)(&mut world) {
        Ok(v) => v,
        Err(e) => vec![Violation {
            invariant: "scenario",
            detail: e,
        }],
    };
    violations.extend(world.finish());
    Outcome {
        violations,
        hash: world.trace.hash(),
        faults: world.trace.fault_counts(),
        dump: world.trace.dump(),
    }
}

/// The test of the scenario `name`: the chaos scenario's lives with the sweep, the delivery
/// scenarios' in `delivery`, the others' in `scenarios`.
pub(crate) fn test_path(name: &str) -> String {
    let module = if name == "chaos" {
        "sweep"
    } else if crate::delivery::ALL.iter().any(|(s, _)| s.name == name) {
        "delivery"
    } else {
        "scenarios"
    };
    format!("{module}::{name}")
}

/// The command that replays `name` on `seed`.
pub(crate) fn replay(filter: &str, seed: u64) -> String {
    format!(
        "SIM_SEED={seed} cargo test -p mlx-worker-sim --test scenarios {filter} -- --exact --nocapture"
    )
}

/// Runs the scenario on `SIM_SEED` or its pinned seed and fails with every violation.
pub(crate) fn check_clean(scenario: &Scenario, pinned: u64) {
    let seed = seed_or(pinned);
    let filter = test_path(scenario.name);
    eprintln!(
        "{}: seed {seed} (replay: {})",
        scenario.name,
        replay(&filter, seed)
    );
    let outcome = run(scenario, seed, Mutations::NONE);
    eprintln!(
        "{}: {} events, trace hash {:016x}",
        scenario.name,
        outcome.dump.lines().count(),
        outcome.hash
    );
    #[allow(clippy::disallowed_methods)] // A debugging knob: print the whole trace.
    if std::env::var_os("SIM_DUMP").is_some() {
        eprintln!("{}", outcome.dump);
    }
    if !outcome.violations.is_empty() {
        let list: Vec<String> = outcome
            .violations
            .iter()
            .map(|v| format!("  {v}"))
            .collect();
        let tail: Vec<&str> = outcome.dump.lines().rev().take(60).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        panic!(
            "{} failed on seed {seed}:\n{}\nreplay: {}\nlast events:\n{}",
            scenario.name,
            list.join("\n"),
            replay(&filter, seed),
            tail.join("\n")
        );
    }
}

/// A scenario expectation.
pub(crate) fn expect(ok: bool, what: impl Into<String>) -> Option<Violation> {
    (!ok).then(|| Violation {
        invariant: "scenario",
        detail: what.into(),
    })
}

/// The terminal the controller received for `id`: `Some("done")` or the error code.
pub(crate) fn terminal(w: &World, id: &str) -> Option<String> {
    received_stream(&w.trace.events(), id)
        .into_iter()
        .find_map(|m| match m {
            StreamMessage::Done { .. } => Some("done".to_owned()),
            StreamMessage::Error { code, .. } => Some(code),
            StreamMessage::Token { .. } => None,
        })
}

/// Tokens the controller received for `id`.
pub(crate) fn tokens(w: &World, id: &str) -> usize {
    received_stream(&w.trace.events(), id)
        .iter()
        .filter(|m| !m.is_terminal())
        .count()
}

/// Milliseconds.
pub(crate) fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}
