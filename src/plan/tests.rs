// Goal: the plan runs at once the smaller of the configured figure (`maxConcurrent`, else the
// hardware table's) and the engine's (the most streams it runs at once of any served model),
// announces that figure, and logs one line naming both and which one bounds; each model whose
// engine figure is known runs at most that many (and at most the configured figure).
// Method: plans of a hand-built host for hand-built model lists; the log line captured by a
// subscriber for the duration of one `Plan::new`.

use std::io;
use std::sync::{Arc, Mutex};

use super::*;
use crate::hardware::ChipVariant;

/// An M1 with 16 GiB: it serves `<3B` only, whose table figure there is 10.
fn m1() -> HostProfile {
    HostProfile {
        chip_model: "M1".to_owned(),
        chip_generation: 1,
        variant: ChipVariant::Base,
        cpu_brand: "Apple M1".to_owned(),
        cpu_cores: 8,
        performance_cores: 4,
        efficiency_cores: 4,
        gpu_cores: 8,
        gpus: Vec::new(),
        memory_bytes: 16 << 30,
        metal_version: None,
        os_version: "14.0".to_owned(),
    }
}

const TABLE_TINY_ON_M1: usize = 10;

fn settings(inflight_max: Option<usize>) -> Settings {
    Settings {
        inflight_max,
        queue_depth_max: 100,
        tier_limits: BTreeMap::new(),
    }
}

/// A model of a million parameters (`<3B`) the engine runs `streams_max` of at once.
fn tiny(name: &str, streams_max: Option<usize>) -> ServedModel<'_> {
    ServedModel {
        facts: ModelFacts {
            parameter_count: Some(1_000_000),
            name,
            disk_bytes: Some(2_000_000),
        },
        streams_max,
    }
}

#[test]
fn the_engines_figure_bounds_a_larger_configured_one() {
    let plan = Plan::new(&m1(), &settings(Some(200)), &[tiny("a", Some(64))]);
    assert_eq!(
        plan.inflight,
        InflightChoice {
            configured: 200,
            configured_source: LimitSource::Configured,
            engine: Some(64),
            chosen: 64,
        }
    );
    assert!(plan.inflight.engine_bounds());
    assert_eq!(plan.scheduler.inflight_max, 64);
    assert_eq!(plan.capabilities.max_concurrent, 64);
}

#[test]
fn a_smaller_configured_figure_stands() {
    let plan = Plan::new(&m1(), &settings(Some(8)), &[tiny("a", Some(64))]);
    assert_eq!(plan.scheduler.inflight_max, 8);
    assert!(!plan.inflight.engine_bounds());
    assert_eq!(plan.capabilities.max_concurrent, 8);
}

#[test]
fn the_engines_figure_bounds_the_hardware_tables_too() {
    let plan = Plan::new(&m1(), &settings(None), &[tiny("a", Some(4))]);
    assert_eq!(plan.inflight.configured, TABLE_TINY_ON_M1);
    assert_eq!(plan.inflight.configured_source, LimitSource::Detected);
    assert_eq!(plan.scheduler.inflight_max, 4);
    let plan = Plan::new(&m1(), &settings(None), &[tiny("a", Some(64))]);
    assert_eq!(plan.scheduler.inflight_max, TABLE_TINY_ON_M1);
}

#[test]
fn an_engine_that_states_no_figure_leaves_the_configured_one() {
    let plan = Plan::new(&m1(), &settings(Some(200)), &[tiny("a", None)]);
    assert_eq!(plan.inflight.engine, None);
    assert!(!plan.inflight.engine_bounds());
    assert_eq!(plan.scheduler.inflight_max, 200);
    // No model at all: the hardware table's figure for the largest tier the host serves.
    let plan = Plan::new(&m1(), &settings(None), &[]);
    assert_eq!(plan.scheduler.inflight_max, TABLE_TINY_ON_M1);
}

#[test]
fn the_engines_figure_is_the_largest_of_its_models() {
    let models = [tiny("a", Some(8)), tiny("b", Some(32)), tiny("c", None)];
    let plan = Plan::new(&m1(), &settings(Some(200)), &models);
    assert_eq!(plan.inflight.engine, Some(32));
    assert_eq!(plan.scheduler.inflight_max, 32);
}

#[test]
fn equal_figures_are_bound_by_the_configuration_and_zero_runs_one() {
    let plan = Plan::new(&m1(), &settings(Some(64)), &[tiny("a", Some(64))]);
    assert_eq!(plan.scheduler.inflight_max, 64);
    assert!(!plan.inflight.engine_bounds());
    let plan = Plan::new(&m1(), &settings(Some(64)), &[tiny("a", Some(0))]);
    assert_eq!(plan.scheduler.inflight_max, 1);
}

#[test]
fn each_model_runs_at_most_the_engines_figure_for_it_and_the_configured_one() {
    let models = [tiny("a", Some(8)), tiny("b", Some(300)), tiny("c", None)];
    let plan = Plan::new(&m1(), &settings(Some(200)), &models);
    assert_eq!(
        plan.scheduler.models,
        BTreeMap::from([("a".to_owned(), 8), ("b".to_owned(), 200)])
    );
    assert_eq!(plan.scheduler.inflight_max, 200);
    let plan = Plan::new(&m1(), &settings(None), &models);
    assert_eq!(
        plan.scheduler.models,
        BTreeMap::from([("a".to_owned(), 8), ("b".to_owned(), TABLE_TINY_ON_M1)])
    );
}

#[test]
fn models_are_planned_by_their_tier_and_an_unknown_size_as_mid_sized() {
    let unknown = ServedModel {
        facts: ModelFacts {
            parameter_count: None,
            name: "my-finetune",
            disk_bytes: None,
        },
        streams_max: Some(64),
    };
    let plan = Plan::new(&m1(), &settings(None), &[tiny("a", Some(64)), unknown]);
    assert_eq!(plan.model_tiers["a"], ModelTier::Tiny);
    assert_eq!(plan.model_tiers["my-finetune"], ModelTier::Medium);
    // The most permissive tier of the served models sets the table's figure.
    assert_eq!(plan.inflight.configured, TABLE_TINY_ON_M1);
}

/// A writer into a shared buffer, for capturing log lines.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The log lines of one `Plan::new` with these figures.
fn plan_log(configured: Option<usize>, engine: Option<usize>) -> Vec<String> {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .without_time()
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        Plan::new(&m1(), &settings(configured), &[tiny("a", engine)])
    });
    let bytes = captured.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
    String::from_utf8_lossy(&bytes)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn one_info_line_names_both_figures_and_the_one_that_bounds() {
    let lines = plan_log(Some(200), Some(64));
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    for part in [
        "INFO",
        "inflight_max=64",
        "engine=64",
        "configured=200",
        "configured_source=\"configured\"",
        "bound_by=\"engine\"",
    ] {
        assert!(line.contains(part), "{part} missing from {line}");
    }
    let lines = plan_log(None, None);
    assert_eq!(lines.len(), 1, "{lines:?}");
    for part in [
        "inflight_max=10",
        "engine=unstated",
        "configured=10",
        "configured_source=\"detected\"",
        "bound_by=\"configuration\"",
    ] {
        assert!(lines[0].contains(part), "{part} missing from {}", lines[0]);
    }
}
