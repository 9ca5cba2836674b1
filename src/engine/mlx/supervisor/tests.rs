// Goal: the restart budget admits at most `restarts_max` restarts per sliding window, frees
// room as the window passes, and spaces restarts by a delay that doubles up to its cap; the
// streams a runtime holds at once are its stated figure, kept in range, else the default.
// Method: the budget driven with instants built from one reading of the clock, no waiting;
// `runtime/info` answers of both runtimes' shapes.

use serde_json::json;

use super::*;
use crate::clock::SystemClock;
use crate::engine::rpc::decode_result;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn millis(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

#[test]
fn the_budget_admits_restarts_max_restarts_within_the_window() {
    let t0 = SystemClock.now();
    let mut budget = RestartBudget::new(secs(60), 3);
    assert_eq!(budget.admit(t0), Some(millis(250)));
    assert_eq!(budget.admit(t0 + secs(1)), Some(millis(500)));
    assert_eq!(budget.admit(t0 + secs(2)), Some(millis(1000)));
    assert_eq!(budget.admit(t0 + secs(3)), None);
    assert_eq!(budget.admit(t0 + secs(59)), None);
}

#[test]
fn restarts_older_than_the_window_free_their_place() {
    let t0 = SystemClock.now();
    let mut budget = RestartBudget::new(secs(60), 2);
    assert!(budget.admit(t0).is_some());
    assert!(budget.admit(t0 + secs(30)).is_some());
    assert_eq!(budget.admit(t0 + secs(59)), None);
    // The first restart is a full window old: one place is free, the delay keeps growing.
    assert_eq!(budget.admit(t0 + secs(60)), Some(millis(1000)));
    assert_eq!(budget.admit(t0 + secs(61)), None);
}

#[test]
fn the_delay_doubles_up_to_its_cap() {
    let t0 = SystemClock.now();
    let mut budget = RestartBudget::new(secs(1), 1);
    let delays: Vec<u64> = (0..10)
        .map(|i| budget.admit(t0 + secs(i)).map(crate::clock::millis))
        .collect::<Option<_>>()
        .unwrap();
    assert_eq!(
        delays,
        [250, 500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
    );
}

#[test]
fn a_zero_budget_admits_no_restart() {
    let mut budget = RestartBudget::new(secs(60), 0);
    assert_eq!(budget.admit(SystemClock.now()), None);
}

#[test]
fn the_streams_a_runtime_holds_are_its_stated_figure_kept_in_range_else_the_default() {
    let stated = |limits: serde_json::Value| {
        streams_max(&decode_result::<Info>(json!({
            "version": "0.1.0", "limits": limits
        })))
    };
    assert_eq!(stated(json!({"streams_live_max": 8})), 8);
    assert_eq!(stated(json!({"streams_live_max": 64})), 64);
    assert_eq!(stated(json!({"streams_live_max": 0})), 1);
    assert_eq!(
        stated(json!({"streams_live_max": 1_000_000})),
        INFLIGHT_REQUESTS_MAX
    );
    // No figure, or one of another type: the existing runtime's case.
    assert_eq!(
        stated(json!({"line_bytes_max": 1})),
        RUNTIME_STREAMS_LIVE_DEFAULT
    );
    assert_eq!(
        stated(json!({"streams_live_max": "64"})),
        RUNTIME_STREAMS_LIVE_DEFAULT
    );
    let existing = decode_result::<Info>(json!({"version": "0.1.0", "capabilities": []}));
    assert_eq!(streams_max(&existing), RUNTIME_STREAMS_LIVE_DEFAULT);
}
