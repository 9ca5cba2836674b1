//! Each model's health: a model whose load failed is *withdrawn*: the registrations leave it
//! out of `skills.availableModels` (so the controller routes it elsewhere) while the worker
//! serves its other models and stays `online`; a request that names it is answered at once
//! with `MODEL_LOAD_FAILED` and the load's reason, without loading again. It is retried after
//! a backoff (30 s, doubling to 10 min), by the model rescan; a load that succeeds, by that
//! retry or any other, restores it. A model the engine cannot load is the model's fault, not
//! the worker's: `degraded` stays for faults of the worker and its engine.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::protocol::service::WithdrawnModel;

/// Wait after a model's first failed load before it is retried.
const RETRY_AFTER_MIN: Duration = Duration::from_secs(30);
/// Longest wait between retries.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(600);
/// Longest load failure reason kept, in bytes.
const REASON_BYTES_MAX: usize = 1024;

/// A withdrawn model.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Withdrawal {
    /// The last load's failure, as the engine told it (the host's paths left out).
    pub(crate) reason: String,
    /// When the last load failed, Unix milliseconds.
    pub(crate) failed_at: u64,
    /// Loads failed in a row.
    pub(crate) failures: u32,
    /// When it is retried, Unix milliseconds.
    pub(crate) retry_at: u64,
    retry_due: Instant,
}

impl Withdrawal {
    /// The withdrawal as `$SRV.INFO` and the control subject show it.
    pub(crate) fn shown(&self) -> WithdrawnModel {
        WithdrawnModel {
            reason: self.reason.clone(),
            failed_at: self.failed_at,
            failures: self.failures,
            retry_at: self.retry_at,
        }
    }
}

/// Every withdrawn model; a change is announced on [`ModelHealth::changes`].
#[derive(Debug)]
pub(crate) struct ModelHealth {
    withdrawn: Mutex<BTreeMap<String, Withdrawal>>,
    changed: watch::Sender<u64>,
}

impl Default for ModelHealth {
    fn default() -> ModelHealth {
        ModelHealth {
            withdrawn: Mutex::new(BTreeMap::new()),
            changed: watch::Sender::new(0),
        }
    }
}

impl ModelHealth {
    fn book(&self) -> MutexGuard<'_, BTreeMap<String, Withdrawal>> {
        // The book holds plain values: one a panic left half-written is still a book.
        self.withdrawn
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Records that loading `model` failed at `now` (`now_ms` in Unix milliseconds).
    pub(crate) fn failed(&self, model: &str, reason: &str, now: Instant, now_ms: u64) {
        let mut cut = reason.len().min(REASON_BYTES_MAX);
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        let mut book = self.book();
        let failures = book.get(model).map_or(0, |w| w.failures).saturating_add(1);
        let wait = RETRY_AFTER_MIN
            .saturating_mul(1 << (failures - 1).min(16))
            .min(RETRY_AFTER_MAX);
        book.insert(
            model.to_owned(),
            Withdrawal {
                reason: reason[..cut].to_owned(),
                failed_at: now_ms,
                failures,
                retry_at: now_ms.saturating_add(crate::clock::millis(wait)),
                retry_due: now + wait,
            },
        );
        drop(book);
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Records that `model` loaded: it is served again.
    pub(crate) fn loaded(&self, model: &str) {
        if self.book().remove(model).is_some() {
            self.changed.send_modify(|v| *v = v.wrapping_add(1));
        }
    }

    /// Why `model` is withdrawn, when it is.
    pub(crate) fn withdrawal(&self, model: &str) -> Option<Withdrawal> {
        self.book().get(model).cloned()
    }

    /// Every withdrawn model.
    pub(crate) fn withdrawn(&self) -> BTreeMap<String, Withdrawal> {
        self.book().clone()
    }

    /// The withdrawn models whose retry is due at `now`.
    pub(crate) fn due(&self, now: Instant) -> Vec<String> {
        self.book()
            .iter()
            .filter(|(_, w)| w.retry_due <= now)
            .map(|(m, _)| m.clone())
            .collect()
    }

    /// Forgets models no longer on disk.
    pub(crate) fn retain(&self, models: impl Fn(&str) -> bool) {
        let mut book = self.book();
        let before = book.len();
        book.retain(|m, _| models(m));
        let changed = book.len() != before;
        drop(book);
        if changed {
            self.changed.send_modify(|v| *v = v.wrapping_add(1));
        }
    }

    /// Follows changes of the withdrawn set.
    pub(crate) fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock as _;

    #[tokio::test(start_paused = true)]
    async fn a_failed_model_is_withdrawn_retried_after_a_doubling_wait_and_restored_by_a_load() {
        let health = ModelHealth::default();
        let mut changes = health.changes();
        let t0 = crate::clock::SystemClock.now();
        health.failed("org/bad", "config.json is not JSON", t0, 1_000);
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        let w = health.withdrawal("org/bad").unwrap();
        assert_eq!((w.failures, w.retry_at), (1, 31_000));
        assert!(health.due(t0 + Duration::from_secs(29)).is_empty());
        assert_eq!(health.due(t0 + Duration::from_secs(30)), ["org/bad"]);
        health.failed("org/bad", "still not JSON", t0, 1_000);
        assert_eq!(health.withdrawal("org/bad").unwrap().retry_at, 61_000);
        for _ in 0..10 {
            health.failed("org/bad", "still not JSON", t0, 1_000);
        }
        assert_eq!(health.withdrawal("org/bad").unwrap().retry_at, 601_000);
        assert!(health.withdrawal("org/good").is_none());
        health.loaded("org/bad");
        assert!(health.withdrawn().is_empty() && changes.has_changed().unwrap());
        let long = "é".repeat(2000);
        health.failed("org/x", &long, t0, 0);
        assert!(health.withdrawal("org/x").unwrap().reason.len() <= REASON_BYTES_MAX);
        health.retain(|m| m != "org/x");
        assert!(health.withdrawn().is_empty());
    }
}
