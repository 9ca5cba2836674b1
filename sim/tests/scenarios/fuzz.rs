//! Lifecycle fuzzing with proptest-state-machine: random, state-dependent sequences of start,
//! link loss and recovery, requests, cancels, engine faults, drain and crash, applied to a
//! simulated world and compared with a reference model of the lifecycle. After every step the
//! worker must be in the state the model predicts and no invariant may be broken; a failing
//! sequence shrinks, and proptest keeps it under `sim/proptest-regressions/`.

use std::time::Duration;

use mlx_worker_sim::{Fault, World, WorldConfig};
use proptest::prelude::*;
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest, prop_state_machine};

use crate::harness::ms;

/// What the model knows of the world.
#[derive(Clone, Debug)]
pub(crate) struct Model {
    seed: u64,
    running: bool,
    link_up: bool,
    sent: u32,
}

/// One step.
#[derive(Clone, Debug)]
pub(crate) enum Step {
    Start,
    LinkLost,
    LinkOk,
    Request(u32),
    Cancel(u32),
    EngineFault(u8),
    Drain,
    Crash,
}

pub(crate) struct Lifecycle;

impl ReferenceStateMachine for Lifecycle {
    type State = Model;
    type Transition = Step;

    fn init_state() -> BoxedStrategy<Model> {
        any::<u64>()
            .prop_map(|seed| Model {
                seed,
                running: true,
                link_up: true,
                sent: 0,
            })
            .boxed()
    }

    fn transitions(state: &Model) -> BoxedStrategy<Step> {
        let link = if state.link_up {
            Step::LinkLost
        } else {
            Step::LinkOk
        };
        if state.running {
            let sent = state.sent.max(1);
            prop_oneof![
                4 => (1u32..20).prop_map(Step::Request),
                2 => (0..sent).prop_map(Step::Cancel),
                1 => (0u8..4).prop_map(Step::EngineFault),
                2 => Just(link),
                1 => Just(Step::Drain),
                1 => Just(Step::Crash),
            ]
            .boxed()
        } else {
            prop_oneof![3 => Just(Step::Start), 1 => Just(link)].boxed()
        }
    }

    fn apply(mut state: Model, step: &Step) -> Model {
        match step {
            Step::Start => state.running = true,
            Step::LinkLost => state.link_up = false,
            Step::LinkOk => state.link_up = true,
            Step::Request(_) => state.sent += 1,
            Step::Drain | Step::Crash => state.running = false,
            Step::Cancel(_) | Step::EngineFault(_) => {}
        }
        state
    }

    fn preconditions(state: &Model, step: &Step) -> bool {
        match step {
            Step::Start => !state.running,
            Step::LinkLost => state.link_up,
            Step::LinkOk => !state.link_up,
            _ => state.running,
        }
    }
}

pub(crate) struct LifecycleTest;

fn fail(w: &World, what: String) -> ! {
    let tail: Vec<String> = w
        .trace
        .dump()
        .lines()
        .rev()
        .take(30)
        .map(str::to_owned)
        .collect();
    let tail: Vec<String> = tail.into_iter().rev().collect();
    panic!("{what} (world seed {})\n{}", w.seed(), tail.join("\n"))
}

impl StateMachineTest for LifecycleTest {
    type SystemUnderTest = World;
    type Reference = Lifecycle;

    fn init_test(model: &Model) -> World {
        let mut config = WorldConfig::new(model.seed);
        config.worker_yaml = "  maxConcurrent: 2\n  requestQueue:\n    maxDepth: 3\n".to_owned();
        let mut w = World::new(config).unwrap();
        if let Err(e) = w.run_until_lifecycle("ready", ms(3000)) {
            fail(&w, e);
        }
        w
    }

    fn apply(mut w: World, model: &Model, step: Step) -> World {
        let outcome = match step {
            Step::Start => {
                w.restart_worker();
                if model.link_up {
                    w.run_until_lifecycle("ready", ms(3000))
                } else {
                    w.run_until_lifecycle("connecting", ms(500))
                }
            }
            Step::LinkLost => {
                w.partition();
                let r = w.run_for(ms(800));
                match (r, model.running, w.lifecycle().as_deref()) {
                    (Err(e), _, _) => Err(e),
                    (Ok(()), true, Some("connecting" | "draining" | "stopped"))
                    | (Ok(()), false, _) => Ok(()),
                    (Ok(()), true, other) => {
                        Err(format!("the link is down and the worker is {other:?}"))
                    }
                }
            }
            Step::LinkOk => {
                w.repair();
                if model.running {
                    w.run_until_lifecycle("ready", ms(3000))
                } else {
                    w.run_for(ms(200))
                }
            }
            Step::Request(tokens) => {
                let id = format!("q{}", model.sent);
                w.subscribe_response(&id);
                w.send_request(&id, tokens);
                w.run_for(ms(100))
            }
            Step::Cancel(i) => {
                w.send_cancel(&format!("q{i}"));
                w.run_for(ms(50))
            }
            Step::EngineFault(k) => {
                w.engine_fault(match k {
                    0 => Fault::FailAfter(1),
                    1 => Fault::HangAfter(1),
                    2 => Fault::CrashAfter {
                        tokens: 1,
                        restart: ms(100),
                    },
                    _ => Fault::LoadFails,
                });
                w.run_for(ms(50))
            }
            Step::Drain => {
                w.stop_worker();
                w.run_until_lifecycle("stopped", Duration::from_secs(15))
            }
            Step::Crash => {
                w.crash_worker();
                w.run_for(ms(50))
            }
        };
        if let Err(e) = outcome {
            fail(&w, format!("after {step:?}: {e}"));
        }
        w
    }

    fn check_invariants(w: &World, _: &Model) {
        if !w.violations().is_empty() {
            fail(w, format!("invariants broken: {:?}", w.violations()));
        }
    }

    fn teardown(mut w: World, _: Model) {
        w.repair();
        if let Err(e) = w.run_for(Duration::from_secs(6)) {
            fail(&w, e);
        }
        let violations = w.finish();
        if !violations.is_empty() {
            fail(&w, format!("invariants broken at the end: {violations:?}"));
        }
    }
}

prop_state_machine! {
    #![proptest_config(ProptestConfig {
        cases: 24,
        max_shrink_iters: 200,
        .. ProptestConfig::default()
    })]

    /// Random lifecycle sequences keep the worker where the model says and every invariant.
    #[test]
    fn lifecycle_follows_the_model(sequential 1..14 => LifecycleTest);
}
