//! [`Backoff`]: the delays of a retry loop — capped exponential, with jitter, and optionally a
//! limited number of attempts.
//!
//! The jitter is a function of a seed and the attempt alone: workers given different seeds
//! (their ids, say) spread their retries instead of retrying in step, while a seeded simulation
//! replays every delay exactly. This module only computes delays; the loops sleep themselves,
//! with `tokio::time`, so paused runtimes and simulators drive them.

#[cfg(test)]
mod tests;

use std::hash::{Hash, Hasher};
use std::time::Duration;

/// The delays of one retry loop.
///
/// Attempt `n` (counted from 1) has the cap `min · 2ⁿ⁻¹`, at most `max`, and waits between half
/// the cap and the cap, as the jitter of `(seed, n)` says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    seed: u64,
    attempts_max: Option<u32>,
    /// Attempts whose delay [`Backoff::next_delay`] has handed out since the last reset.
    attempts: u32,
}

impl Backoff {
    /// Delays from `min` doubling up to `max`, jittered by `seed`, without an attempt limit.
    pub fn new(min: Duration, max: Duration, seed: u64) -> Backoff {
        assert!(
            min <= max,
            "a backoff's first delay {min:?} exceeds its cap {max:?}"
        );
        Backoff {
            min,
            max,
            seed,
            attempts_max: None,
            attempts: 0,
        }
    }

    /// The same delays, for at most `attempts_max` attempts.
    pub fn with_attempts_max(self, attempts_max: u32) -> Backoff {
        Backoff {
            attempts_max: Some(attempts_max),
            ..self
        }
    }

    /// The cap of attempt `attempt` (counted from 1; 0 counts as 1): `min · 2ⁿ⁻¹`, at most
    /// `max`. Never decreases from one attempt to the next.
    pub fn cap(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(31);
        self.min.saturating_mul(1 << doublings).min(self.max)
    }

    /// The delay of attempt `attempt`: between half its [`cap`](Backoff::cap) and the cap,
    /// the same for the same seed and attempt.
    pub fn delay(&self, attempt: u32) -> Duration {
        let cap = u64::try_from(self.cap(attempt).as_nanos()).unwrap_or(u64::MAX);
        let half = cap / 2;
        // The jitter's top 32 bits, as a fraction of the other half.
        let share = (u128::from(cap - half) * u128::from(jitter(self.seed, attempt) >> 32)) >> 32;
        Duration::from_nanos(half + u64::try_from(share).unwrap_or(0))
    }

    /// The delay before the next attempt, or `None` once the attempt limit is spent.
    pub fn next_delay(&mut self) -> Option<Duration> {
        if self.attempts_max.is_some_and(|max| self.attempts >= max) {
            return None;
        }
        self.attempts = self.attempts.saturating_add(1);
        Some(self.delay(self.attempts))
    }

    /// Attempts handed out since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Starts over from the first delay, with the attempt limit whole again (after a success).
    pub fn reset(&mut self) {
        self.attempts = 0;
    }
}

/// A seed made of any hashable value (a worker id, an address): equal values give equal seeds.
pub fn seed(value: impl Hash) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

/// 64 uniformly spread bits, a fixed function of the seed and the attempt.
fn jitter(seed: u64, attempt: u32) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    (seed, attempt).hash(&mut hasher);
    hasher.finish()
}
