//! Time, behind the [`Clock`] seam.
//!
//! The worker reads monotonic time for deadlines and latencies and wall-clock time for the
//! `timestamp` fields of its messages. Both come from a [`Clock`], so simulations control them;
//! sleeps and timeouts use `tokio::time`, which paused runtimes and simulators already drive.
//! This is the only module that reads the system's time.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// A source of monotonic and wall-clock time.
pub trait Clock: Send + Sync + 'static {
    /// Monotonic time, for deadlines and durations.
    fn now(&self) -> Instant;

    /// Wall-clock time, for timestamps sent to peers.
    fn wall_clock(&self) -> SystemTime;

    /// Wall-clock time as Unix epoch milliseconds (0 before 1970).
    fn unix_millis(&self) -> u64 {
        self.wall_clock()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

/// The operating system's clocks.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[allow(clippy::disallowed_methods)] // The one place that reads monotonic time.
    fn now(&self) -> Instant {
        Instant::now()
    }

    #[allow(clippy::disallowed_methods)] // The one place that reads wall-clock time.
    fn wall_clock(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// Milliseconds in `d`, saturating.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
