// Goal: the restart budget admits at most `restarts_max` restarts per sliding window, frees
// room as the window passes, and spaces restarts by a delay that doubles up to its cap.
// Method: the budget driven with instants built from one reading of the clock, no waiting.

use super::*;
use crate::clock::SystemClock;

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
