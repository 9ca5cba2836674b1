//! [`Observer`]: a read-only view of a worker for health checks and metrics, valid across runs.
//! It reads the lifecycle, the engine's health, the connection and the dispatcher's figures
//! from their `watch` channels, and the engine's figures of each model from the engine, and
//! never waits on a running task.

use std::sync::Arc;

use tokio::sync::watch;

use super::figures::Figures;
use crate::engine::{Engine, EngineHealth};
use crate::lifecycle::Lifecycle;
use crate::metrics::prometheus::MetricsView;
use crate::metrics::telemetry::{self, Telemetry};
use crate::transport::ConnectionState;

/// A read-only view of a worker: whether it is alive and ready, and its metrics.
#[derive(Clone)]
pub struct Observer {
    pub(super) worker_id: String,
    pub(super) lifecycle: watch::Receiver<Lifecycle>,
    pub(super) engine_health: watch::Receiver<EngineHealth>,
    pub(super) connection: watch::Receiver<ConnectionState>,
    pub(super) telemetry: Arc<Telemetry>,
    /// The dispatcher's figures, as last published.
    pub(super) figures: watch::Receiver<Figures>,
    /// The engine, for its figures of each model.
    pub(super) engine: Arc<dyn Engine>,
    /// Whether the run's preload has ended (every model it names loaded, warm-up included, or
    /// failed); true when it names none.
    pub(super) preloaded: watch::Receiver<bool>,
}

impl Observer {
    /// Whether the process serves at all (`/healthz`): not stopped.
    pub fn is_alive(&self) -> bool {
        *self.lifecycle.borrow() != Lifecycle::Stopped
    }

    /// Whether the worker takes work (`/readyz`): registered, connected, engine up, not
    /// draining, and done with its preload (so its first requests do not wait for a model's
    /// load and warm-up).
    pub fn is_ready(&self) -> bool {
        *self.lifecycle.borrow() == Lifecycle::Ready
            && *self.preloaded.borrow()
            && self.connection.borrow().connected
            && matches!(
                *self.engine_health.borrow(),
                EngineHealth::Up { .. } | EngineHealth::Starting
            )
    }

    /// Waits until the run's preload has ended: every model it names loaded (warm-up
    /// included) or failed; at once when it names none.
    pub async fn preload_ended(&self) {
        let mut preloaded = self.preloaded.clone();
        // A closed channel: the worker is gone, and nothing is left to wait for.
        let _ = preloaded.wait_for(|ended| *ended).await;
    }

    /// Everything `/metrics` shows, without waiting: the dispatcher's figures as last
    /// published (the defaults while not running), and the engine's figures of each model.
    pub fn metrics(&self) -> MetricsView {
        let dispatch = self.figures.borrow().clone();
        let models = dispatch.model_loads(&self.engine.model_figures());
        let t = &self.telemetry;
        MetricsView {
            worker_id: self.worker_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            lifecycle: self.lifecycle.borrow().as_str().to_owned(),
            ready: self.is_ready(),
            snapshot: dispatch.snapshot,
            running: dispatch.running,
            queued: dispatch.queued,
            queue_capacity: dispatch.queue_capacity,
            inflight_capacity: dispatch.inflight_capacity,
            unreadable: dispatch.intake.unreadable,
            duplicates: dispatch.intake.duplicates,
            bad_cancels: dispatch.intake.bad_cancels,
            handed_back: dispatch.intake.handed_back,
            reconnects: self.connection.borrow().reconnects,
            heartbeats_sent: telemetry::read(&t.heartbeats_sent),
            registrations_sent: telemetry::read(&t.registrations_sent),
            id_conflicts: telemetry::read(&t.id_conflicts),
            engine_restarts: telemetry::read(&t.engine_restarts),
            request_duration: t.request_duration.read(),
            time_to_first_token: t.time_to_first_token.read(),
            inter_token: t.inter_token.read(),
            models,
            model_unloads: t.unloads(),
        }
    }
}
