//! The worker's presence in the cluster: waiting for the link, registering (retried with a
//! [`Backoff`]), the first heartbeat at once, then a heartbeat every interval, each preceded by
//! a registration every `reregisterEveryHeartbeats` heartbeats (by default every one), and a
//! registration after every reconnect.
//!
//! A controller drops heartbeats from ids it does not know, so after it restarts only a
//! registration makes a worker routable again: registering with every heartbeat bounds the
//! time a restarted controller goes without a worker by one heartbeat interval.
//!
//! Heartbeats are not sent while the link is down, and a missed tick is skipped, not replayed.
//! The heartbeat's `status` is `online` only when the worker is ready and healthy; `degraded`
//! only for a recoverable cause that clears by itself (engine restarting, a burst of faults in
//! the recent window); `offline` while not ready (starting, reconnecting, draining). A
//! registration carries the status the worker would report once ready, so re-registering never
//! makes a degraded worker look `online` to the controller.

use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::figures::Figures;
use crate::backoff::{self, Backoff};
use crate::clock::Clock;
use crate::config::NodeConfig;
use crate::engine::EngineHealth;
use crate::hardware::HardwareProbe;
use crate::identity::Identity;
use crate::lifecycle::{Lifecycle, LifecycleCell};
use crate::limits::{REGISTER_BACKOFF_MAX, REGISTER_BACKOFF_MIN};
use crate::metrics::telemetry::{Telemetry, bump};
use crate::mutation::{Mutation, Mutations};
use crate::protocol::{
    self, HardwareProfile, ModelSkills, WorkerCapabilities, WorkerHeartbeat, WorkerMetrics,
    WorkerRegistration, WorkerStatus, subject,
};
use crate::transport::{ConnectionState, Transport, TransportError};

/// What the registration says about the worker, fixed at start.
#[derive(Clone, Debug)]
pub(crate) struct Announcement {
    pub(crate) identity: Identity,
    pub(crate) skills: ModelSkills,
    pub(crate) hardware: HardwareProfile,
    pub(crate) capabilities: WorkerCapabilities,
}

/// The presence task's parts.
pub(crate) struct Presence {
    pub(crate) config: NodeConfig,
    pub(crate) announcement: Announcement,
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) hardware: Arc<dyn HardwareProbe>,
    pub(crate) engine_health: watch::Receiver<EngineHealth>,
    pub(crate) lifecycle: Arc<LifecycleCell>,
    /// The dispatcher's figures, as last published.
    pub(crate) figures: watch::Receiver<Figures>,
    /// Shared counters.
    pub(crate) telemetry: Arc<Telemetry>,
    /// Planted bugs (always empty outside the simulation suite).
    pub(crate) mutations: Mutations,
}

impl Presence {
    /// Runs until `stop` fires.
    pub(crate) async fn run(mut self, stop: CancellationToken) {
        let mut connection = self.transport.connection();
        loop {
            // Waiting for the link.
            self.lifecycle.advance(Lifecycle::Connecting);
            let ready = tokio::select! {
                () = stop.cancelled() => return,
                up = connection.wait_for(|c| c.connected) => up.is_ok(),
            };
            if !ready {
                return;
            }
            if !self.lifecycle.advance(Lifecycle::Registering) {
                // Draining: the worker has deregistered and must not come back.
                self.heartbeats_only(stop).await;
                return;
            }
            let skip = self.mutations.has(Mutation::SkipReregistration)
                && connection.borrow().reconnects > 0;
            if !skip && !self.register_until_done(&stop, &mut connection).await {
                if stop.is_cancelled() {
                    return;
                }
                continue;
            }
            self.lifecycle.advance(Lifecycle::Ready);
            self.heartbeat().await;
            let reconnects = connection.borrow().reconnects;
            self.beat_while_connected(&stop, &mut connection, reconnects)
                .await;
            if stop.is_cancelled() {
                return;
            }
        }
    }

    /// Registers, retrying with backoff; false when the link dropped or `stop` fired first.
    async fn register_until_done(
        &self,
        stop: &CancellationToken,
        connection: &mut watch::Receiver<ConnectionState>,
    ) -> bool {
        let mut backoff = Backoff::new(
            REGISTER_BACKOFF_MIN,
            REGISTER_BACKOFF_MAX,
            backoff::seed(&self.announcement.identity.worker_id),
        );
        loop {
            let err = match self.register().await {
                Ok(()) => {
                    info!(worker_id = %self.announcement.identity.worker_id, "registered");
                    return true;
                }
                Err(err) => err,
            };
            // Without an attempt limit there is always a next delay.
            let Some(delay) = backoff.next_delay() else {
                return false;
            };
            warn!(cause = %err, retry_ms = delay.as_millis() as u64, "registration failed");
            tokio::select! {
                () = stop.cancelled() => return false,
                () = tokio::time::sleep(delay) => {}
            }
            if !connection.borrow_and_update().connected {
                return false;
            }
        }
    }

    /// Heartbeats every interval until the link drops or `stop` fires.
    async fn beat_while_connected(
        &mut self,
        stop: &CancellationToken,
        connection: &mut watch::Receiver<ConnectionState>,
        reconnects: u64,
    ) {
        let mut ticker = tokio::time::interval(self.config.heartbeat_interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
        ticker.tick().await; // The first tick is immediate; the first heartbeat is already sent.
        let mut beats: u32 = 0;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticker.tick() => {
                    beats = beats.wrapping_add(1);
                    if beats.is_multiple_of(self.config.reregister_every)
                        && self.lifecycle.get() == Lifecycle::Ready
                        && let Err(err) = self.register().await
                    {
                        warn!(cause = %err, "periodic re-registration failed");
                    }
                    self.heartbeat().await;
                }
                changed = connection.changed() => {
                    let state = *connection.borrow_and_update();
                    if changed.is_err() || !state.connected || state.reconnects != reconnects {
                        warn!("link lost; will re-register once it is back");
                        return;
                    }
                }
                changed = self.engine_health.changed() => {
                    if changed.is_ok() {
                        if *self.engine_health.borrow() == EngineHealth::Restarting {
                            bump(&self.telemetry.engine_restarts);
                        }
                        // Tell the controller at once, so it routes away or back quickly.
                        self.heartbeat().await;
                    }
                }
            }
        }
    }

    /// While draining: heartbeats (with status `offline`) but no registration.
    async fn heartbeats_only(&self, stop: CancellationToken) {
        let mut ticker = tokio::time::interval(self.config.heartbeat_interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticker.tick() => {
                    if self.transport.connection().borrow().connected {
                        self.heartbeat().await;
                    }
                }
            }
        }
    }

    /// Publishes the registration, and counts it once published.
    async fn register(&self) -> Result<(), TransportError> {
        self.publish(subject::REGISTER, &self.registration())
            .await?;
        bump(&self.telemetry.registrations_sent);
        Ok(())
    }

    fn registration(&self) -> WorkerRegistration {
        let fault_ratio = self.figures.borrow().fault_ratio;
        let status = status(
            Lifecycle::Ready,
            &self.engine_health.borrow(),
            fault_ratio,
            self.config.degraded_error_ratio,
        );
        let a = &self.announcement;
        WorkerRegistration {
            worker_id: a.identity.worker_id.clone(),
            hostname: a.identity.hostname.clone(),
            ip: a.identity.ip.clone(),
            port: a.identity.port,
            skills: a.skills.clone(),
            hardware: a.hardware.clone(),
            capabilities: a.capabilities.clone(),
            tags: self.config.tags.clone(),
            priority: self.config.priority,
            status,
            timestamp: self.clock.unix_millis(),
        }
    }

    async fn heartbeat(&self) {
        let figures = self.figures.borrow().clone();
        let sample = self.hardware.sample().await;
        let health = self.engine_health.borrow().clone();
        let models_loaded = match &health {
            EngineHealth::Up { loaded } => loaded.clone(),
            _ => Vec::new(),
        };
        let status = status(
            self.lifecycle.get(),
            &health,
            figures.fault_ratio,
            self.config.degraded_error_ratio,
        );
        let message = WorkerHeartbeat {
            worker_id: self.announcement.identity.worker_id.clone(),
            status,
            metrics: WorkerMetrics {
                cpu_usage_percent: round2(sample.cpu_usage_percent.clamp(0.0, 100.0)),
                memory_used_gb: round2(sample.memory_used_gb()),
                gpu_utilization_percent: round2(
                    sample
                        .gpu_utilization_percent
                        .unwrap_or(0.0)
                        .clamp(0.0, 100.0),
                ),
                active_requests: count(figures.running + figures.queued),
                total_requests_handled: figures.snapshot.total,
                avg_latency_ms: round2(figures.snapshot.latency.avg.as_secs_f64() * 1000.0),
                models_loaded,
                queue_depth: count(figures.queued),
                queue_capacity: count(figures.queue_capacity),
                inflight_capacity: count(figures.inflight_capacity),
                tokens_per_second: round2(figures.snapshot.tokens_per_second),
            },
            timestamp: self.clock.unix_millis(),
        };
        match self.publish(subject::HEARTBEAT, &message).await {
            Ok(()) => bump(&self.telemetry.heartbeats_sent),
            Err(err) => debug!(cause = %err, "heartbeat not sent"),
        }
    }

    async fn publish<T: Serialize>(
        &self,
        subject: &str,
        message: &T,
    ) -> Result<(), TransportError> {
        let payload = protocol::encode(message).map_err(|e| TransportError::Refused {
            reason: format!("cannot encode {subject}: {e}"),
        })?;
        self.transport
            .publish(subject.to_owned(), Bytes::from(payload))
            .await
    }
}

/// The status a heartbeat reports.
pub(crate) fn status(
    lifecycle: Lifecycle,
    health: &EngineHealth,
    fault_ratio: f64,
    degraded_ratio: f64,
) -> WorkerStatus {
    if lifecycle != Lifecycle::Ready {
        return WorkerStatus::Offline;
    }
    match health {
        EngineHealth::Restarting | EngineHealth::Down => WorkerStatus::Degraded,
        _ if fault_ratio > degraded_ratio => WorkerStatus::Degraded,
        _ => WorkerStatus::Online,
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
