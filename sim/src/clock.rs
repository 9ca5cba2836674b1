//! [`SimClock`]: monotonic time from `tokio::time` (virtual under paused runtimes and turmoil)
//! and a wall clock that starts at a seeded epoch and can be skewed, drift and step per node.

use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mlx_worker::clock::Clock;
use tokio::time::Instant;

/// A node's wall-clock error.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Skew {
    /// Fixed offset, milliseconds (may be negative).
    pub offset_ms: i64,
    /// Drift, parts per million of elapsed time (may be negative).
    pub drift_ppm: i64,
}

/// A simulated clock.
#[derive(Debug)]
pub struct SimClock {
    start: Instant,
    epoch: SystemTime,
    skew: Mutex<Skew>,
}

impl SimClock {
    /// A clock whose wall time starts at `epoch_ms` (Unix milliseconds) now.
    pub fn new(epoch_ms: u64) -> SimClock {
        SimClock {
            #[allow(clippy::disallowed_methods)] // The simulator's own time base.
            start: Instant::now(),
            epoch: UNIX_EPOCH + Duration::from_millis(epoch_ms),
            skew: Mutex::new(Skew::default()),
        }
    }

    /// Sets this node's skew from now on.
    pub fn set_skew(&self, skew: Skew) {
        *self.skew.lock().unwrap_or_else(|p| p.into_inner()) = skew;
    }

    /// Steps the wall clock by `ms` (may be negative).
    pub fn step(&self, ms: i64) {
        self.skew
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .offset_ms += ms;
    }
}

impl Clock for SimClock {
    fn now(&self) -> Instant {
        #[allow(clippy::disallowed_methods)] // Virtual under the simulator.
        Instant::now()
    }

    fn wall_clock(&self) -> SystemTime {
        let elapsed = self.now().saturating_duration_since(self.start);
        let skew = *self.skew.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed_ms = i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX);
        let error_ms = skew.offset_ms + elapsed_ms.saturating_mul(skew.drift_ppm) / 1_000_000;
        let base = self.epoch + elapsed;
        if error_ms >= 0 {
            base + Duration::from_millis(error_ms.unsigned_abs())
        } else {
            base.checked_sub(Duration::from_millis(error_ms.unsigned_abs()))
                .unwrap_or(UNIX_EPOCH)
        }
    }
}
