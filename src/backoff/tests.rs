// Goal: a backoff's delays double from the first up to the cap, stay within half the cap and
// the cap, repeat exactly for the same seed, spread over seeds, and stop at the attempt limit.
// Method: fixed schedules checked against hand-computed caps, and properties over random
// bounds, seeds and attempts.

use std::time::Duration;

use proptest::prelude::*;

use super::{Backoff, seed};

const MS: Duration = Duration::from_millis(1);

#[test]
fn caps_double_from_the_first_delay_and_stop_at_the_cap() {
    let backoff = Backoff::new(100 * MS, 1000 * MS, 7);
    let caps: Vec<u64> = (1..=7).map(|n| backoff.cap(n).as_millis() as u64).collect();
    assert_eq!(caps, [100, 200, 400, 800, 1000, 1000, 1000]);
    assert_eq!(backoff.cap(0), 100 * MS, "attempt 0 counts as the first");
    assert_eq!(
        backoff.cap(u32::MAX),
        1000 * MS,
        "no overflow, however many attempts"
    );
}

#[test]
fn the_delays_handed_out_are_those_of_attempts_one_two_three() {
    let mut backoff = Backoff::new(10 * MS, 80 * MS, 42);
    let expected: Vec<Duration> = (1..=6).map(|n| backoff.delay(n)).collect();
    let handed: Vec<Duration> = (0..6).filter_map(|_| backoff.next_delay()).collect();
    assert_eq!(handed, expected);
    assert_eq!(backoff.attempts(), 6);
    backoff.reset();
    assert_eq!(backoff.attempts(), 0);
    assert_eq!(
        backoff.next_delay(),
        Some(expected[0]),
        "a reset starts over"
    );
}

#[test]
fn the_attempt_limit_ends_the_delays_until_a_reset() {
    let mut backoff = Backoff::new(MS, 10 * MS, 1).with_attempts_max(3);
    assert!(backoff.next_delay().is_some());
    assert!(backoff.next_delay().is_some());
    assert!(backoff.next_delay().is_some());
    assert_eq!(backoff.next_delay(), None);
    assert_eq!(backoff.next_delay(), None, "a spent limit stays spent");
    backoff.reset();
    assert!(backoff.next_delay().is_some());
    let mut none = Backoff::new(MS, 10 * MS, 1).with_attempts_max(0);
    assert_eq!(none.next_delay(), None);
}

#[test]
fn jitter_is_a_fixed_function_of_seed_and_attempt_spread_over_seeds() {
    let a = Backoff::new(1000 * MS, 1000 * MS, seed("w-1"));
    let again = Backoff::new(1000 * MS, 1000 * MS, seed("w-1"));
    for attempt in 1..50 {
        assert_eq!(a.delay(attempt), again.delay(attempt));
    }
    // With a flat cap of one second, a fleet's first delays spread over [0.5 s, 1 s).
    let firsts: Vec<Duration> = (0..20)
        .map(|i| Backoff::new(1000 * MS, 1000 * MS, seed(format!("w-{i}"))).delay(1))
        .collect();
    let lo = firsts.iter().min().copied().unwrap_or_default();
    let hi = firsts.iter().max().copied().unwrap_or_default();
    assert!(hi - lo > 250 * MS, "{firsts:?}");
    // One seed's delays differ from attempt to attempt too.
    let same_cap: Vec<Duration> = (1..20).map(|n| a.delay(n)).collect();
    assert!(same_cap.windows(2).any(|w| w[0] != w[1]), "{same_cap:?}");
}

#[test]
fn a_zero_first_delay_stays_zero() {
    let backoff = Backoff::new(Duration::ZERO, 10 * MS, 3);
    assert_eq!(backoff.delay(5), Duration::ZERO);
}

fn bounds() -> impl Strategy<Value = (Duration, Duration)> {
    (0u64..10_000_000, 0u64..3_600_000_000).prop_map(|(min, extra)| {
        (
            Duration::from_micros(min),
            Duration::from_micros(min + extra),
        )
    })
}

proptest! {
    #[test]
    fn delays_stay_within_half_the_cap_and_the_cap(
        (min, max) in bounds(),
        seed in any::<u64>(),
        attempt in any::<u32>(),
    ) {
        let backoff = Backoff::new(min, max, seed);
        let cap = backoff.cap(attempt);
        prop_assert!(min <= cap && cap <= max, "cap {cap:?} outside [{min:?}, {max:?}]");
        let delay = backoff.delay(attempt);
        prop_assert!(delay <= cap, "delay {delay:?} over cap {cap:?}");
        prop_assert!(delay >= cap / 2, "delay {delay:?} under half of cap {cap:?}");
        prop_assert_eq!(delay, Backoff::new(min, max, seed).delay(attempt));
    }

    #[test]
    fn caps_never_decrease(
        (min, max) in bounds(),
        seed in any::<u64>(),
        attempt in 0u32..200,
    ) {
        let backoff = Backoff::new(min, max, seed);
        prop_assert!(backoff.cap(attempt) <= backoff.cap(attempt + 1));
    }

    #[test]
    fn exactly_the_attempt_limit_of_delays_is_handed_out(
        (min, max) in bounds(),
        seed in any::<u64>(),
        limit in 0u32..100,
    ) {
        let mut backoff = Backoff::new(min, max, seed).with_attempts_max(limit);
        let handed = std::iter::from_fn(|| backoff.next_delay()).take(200).count();
        prop_assert_eq!(handed, limit as usize);
        prop_assert_eq!(backoff.attempts(), limit);
    }
}
