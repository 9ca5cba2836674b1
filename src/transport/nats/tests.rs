// Goal: the reconnect delays handed to the client double from 100 ms up to the configured
// bound, never exceed it (even a bound under 100 ms), and are spread by the seed.
// Method: the backoff the transport builds, read at the attempt numbers the client passes.

use std::time::Duration;

use super::reconnect_backoff;

const MS: Duration = Duration::from_millis(1);

#[test]
fn reconnect_delays_double_from_100_ms_up_to_the_configured_bound() {
    let backoff = reconnect_backoff(2000 * MS, 9);
    let caps: Vec<u64> = (1..=7).map(|n| backoff.cap(n).as_millis() as u64).collect();
    assert_eq!(caps, [100, 200, 400, 800, 1600, 2000, 2000]);
    for n in 1..=7 {
        let delay = backoff.delay(n);
        assert!(
            delay >= backoff.cap(n) / 2 && delay <= backoff.cap(n),
            "{delay:?}"
        );
    }
}

#[test]
fn a_bound_under_100_ms_caps_the_first_delay_too() {
    let backoff = reconnect_backoff(10 * MS, 9);
    assert_eq!(backoff.cap(1), 10 * MS);
    assert_eq!(backoff.cap(20), 10 * MS);
}
