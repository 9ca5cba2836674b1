//! The worker's figures: what the dispatcher knows of its load and history, published on a
//! `watch` channel after each change and read without waiting by the heartbeat (`presence`),
//! the `$SRV.STATS` answer (`service`) and `/metrics` (the `Observer`).
//!
//! The dispatcher is the only writer. A reader borrows the last published [`Figures`], so no
//! reader can hold up the dispatcher or be held up by it; outside a run the channel holds the
//! defaults.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::limits::{FAULT_WINDOW, METRICS_WINDOW_REQUESTS};
use crate::metrics::Snapshot;

/// Counts of inbound messages that never became requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IntakeCounters {
    /// Messages whose request id could not be read.
    pub unreadable: u64,
    /// Requests whose id was already in flight.
    pub duplicates: u64,
    /// Cancel messages that could not be read.
    pub bad_cancels: u64,
    /// Refusals published without waiting for a listener, because too many were pending.
    pub refusals_unprotected: u64,
}

/// Everything the dispatcher tells about itself.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Figures {
    /// The metrics collector's reading.
    pub(crate) snapshot: Snapshot,
    /// Requests running.
    pub(crate) running: usize,
    /// Requests waiting.
    pub(crate) queued: usize,
    /// Bound of the queue.
    pub(crate) queue_capacity: usize,
    /// Requests that may run at once.
    pub(crate) inflight_capacity: usize,
    /// Inbound messages that never became requests.
    pub(crate) intake: IntakeCounters,
    /// Share of the requests finished within [`FAULT_WINDOW`] that failed by a fault.
    pub(crate) fault_ratio: f64,
}

/// Slack after a request leaves the fault window before the ratio is taken again: a ratio taken
/// at the window's very end still counts the request, and timers fire on whole milliseconds.
const AGING_SLACK: Duration = Duration::from_millis(1);

/// When the fault ratio changes by itself: each finished request stops counting once it is
/// [`FAULT_WINDOW`] old, with nothing happening at that moment. Holds those moments, earliest
/// first, at most one per request of the metrics window (an older request has left the window).
#[derive(Debug, Default)]
pub(crate) struct FaultAging {
    /// Moments at which a request has just left the fault window, sorted.
    pending: VecDeque<Instant>,
}

impl FaultAging {
    /// A request finished at `finished_at`.
    pub(crate) fn note(&mut self, finished_at: Instant) {
        if self.pending.len() == METRICS_WINDOW_REQUESTS {
            self.pending.pop_front();
        }
        let at = finished_at + FAULT_WINDOW + AGING_SLACK;
        // Requests finish in nearly the order they are reported, so this is nearly always the end.
        let pos = self.pending.partition_point(|t| *t <= at);
        self.pending.insert(pos, at);
    }

    /// The next moment the fault ratio may change without any event.
    pub(crate) fn next(&self) -> Option<Instant> {
        self.pending.front().copied()
    }

    /// Forgets the moments up to `now`; true when there was one (the ratio is due again).
    pub(crate) fn pass(&mut self, now: Instant) -> bool {
        let before = self.pending.len();
        while self.pending.front().is_some_and(|at| *at <= now) {
            self.pending.pop_front();
        }
        self.pending.len() != before
    }
}

#[cfg(test)]
mod tests {
    // Goal: the moments the fault ratio changes by itself are each request's exit from the
    // window, in time order, bounded in number.
    // Method: note finish times out of order and past the bound, then pass time.

    use super::*;
    use crate::clock::{Clock, SystemClock};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn aging_yields_each_exit_from_the_window_in_time_order() {
        let t0 = SystemClock.now();
        let mut aging = FaultAging::default();
        assert_eq!(aging.next(), None);
        aging.note(t0 + ms(20));
        aging.note(t0 + ms(10));
        aging.note(t0 + ms(30));
        let first = t0 + ms(10) + FAULT_WINDOW + AGING_SLACK;
        assert_eq!(aging.next(), Some(first));
        assert!(
            !aging.pass(first - ms(1)),
            "nothing has left the window yet"
        );
        assert!(aging.pass(first + ms(10)), "two requests left it");
        assert_eq!(aging.next(), Some(t0 + ms(30) + FAULT_WINDOW + AGING_SLACK));
        assert!(aging.pass(t0 + ms(30) + FAULT_WINDOW + AGING_SLACK));
        assert_eq!(aging.next(), None);
    }

    #[test]
    fn aging_keeps_one_moment_per_request_of_the_metrics_window() {
        let t0 = SystemClock.now();
        let mut aging = FaultAging::default();
        for i in 0..=METRICS_WINDOW_REQUESTS as u64 {
            aging.note(t0 + ms(i));
        }
        assert_eq!(aging.pending.len(), METRICS_WINDOW_REQUESTS);
        assert_eq!(aging.next(), Some(t0 + ms(1) + FAULT_WINDOW + AGING_SLACK));
    }
}
