//! The worker's presence in the cluster: waiting for the link, registering (retried with a
//! [`Backoff`]), the first heartbeat at once, then a heartbeat every interval, each preceded by
//! a registration every `reregisterEveryHeartbeats` heartbeats (by default every one), and a
//! registration after every reconnect. Beside that, a watch on the presence subjects for
//! another process announcing the same worker id.
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
//!
//! Each heartbeat carries, inside `metrics` (the object the existing controller keeps as sent
//! and whose unknown fields its schema lets through), the batching figures of every model in
//! play under `models`: batch size, requests running and waiting, batch occupancy, and the
//! prompt and generation tokens per second and mean prefill time over the interval since the
//! previous heartbeat ([`RateMeter`]), from the streams that completed in it. `$SRV.STATS`
//! shows the rates of the last heartbeat.
//!
//! Two processes with one id split its traffic and its cancels. NATS echoes what a connection
//! publishes to that connection's own subscriptions, so the worker remembers a fingerprint of
//! each presence message it publishes ([`OwnAnnouncements`]); a registration or heartbeat for
//! its id that it does not recognise came from another process, and is counted
//! (`mlx_worker_id_conflicts_total`, `$SRV.STATS`) and logged at most once per
//! [`ID_CONFLICT_WARN_INTERVAL`]. Nothing is added to the wire for this: the controller's
//! schemas know no instance field, and presence messages carry no headers.

use std::borrow::Cow;
use std::collections::{BTreeMap, VecDeque};
use std::hash::{Hash as _, Hasher as _};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use futures::stream::SelectAll;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::figures::{Figures, count, model_metrics, round2};
use super::health::ModelHealth;
use crate::backoff::{self, Backoff};
use crate::clock::Clock;
use crate::config::NodeConfig;
use crate::engine::{Catalog, Engine, EngineHealth};
use crate::hardware::HardwareProbe;
use crate::identity::Identity;
use crate::lifecycle::{Lifecycle, LifecycleCell};
use crate::limits::{
    ID_CONFLICT_WARN_INTERVAL, OWN_ANNOUNCEMENTS_REMEMBERED, REGISTER_BACKOFF_MAX,
    REGISTER_BACKOFF_MIN,
};
use crate::metrics::models::{ModelRates, RateMeter};
use crate::metrics::telemetry::{Telemetry, bump};
use crate::mutation::{Mutation, Mutations};
use crate::protocol::{
    self, HardwareProfile, ModelSkills, WorkerCapabilities, WorkerHeartbeat, WorkerMetrics,
    WorkerRegistration, WorkerStatus, subject,
};
use crate::transport::{ConnectionState, InboundMessage, Subscription, Transport, TransportError};

/// What the registration says about the worker: fixed at start but for its models, which
/// follow the model directories' scans.
#[derive(Clone, Debug)]
pub(crate) struct Announcement {
    pub(crate) identity: Identity,
    /// The models on disk, as the last scan found them.
    pub(crate) catalogs: watch::Receiver<Catalog>,
    pub(crate) hardware: HardwareProfile,
    pub(crate) capabilities: WorkerCapabilities,
}

impl Announcement {
    /// The skills a registration announces now: every model on disk but the withdrawn ones.
    fn skills(&self, health: &ModelHealth, now_ms: u64) -> ModelSkills {
        let catalog = self.catalogs.borrow();
        let withdrawn = health.withdrawn();
        let served = catalog
            .models
            .iter()
            .filter(|(id, _)| !withdrawn.contains_key(*id));
        ModelSkills {
            available_models: served.clone().map(|(id, _)| id.clone()).collect(),
            model_paths: served
                .map(|(id, m)| (id.clone(), m.path.display().to_string()))
                .collect(),
            total_model_size: catalog.total_size_bytes(),
            last_scanned: now_ms,
        }
    }
}

/// The presence task's parts.
pub(crate) struct Presence {
    pub(crate) config: NodeConfig,
    pub(crate) announcement: Announcement,
    /// The withdrawn models, left out of the registrations.
    pub(crate) health: Arc<ModelHealth>,
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
    /// The presence messages this run published lately.
    pub(crate) own: Arc<OwnAnnouncements>,
    /// The engine, for its figures of each model.
    pub(crate) engine: Arc<dyn Engine>,
    /// Takes the rates of each model at every heartbeat.
    pub(crate) meter: RateMeter,
    /// Where the rates of the last heartbeat are published, for `$SRV.STATS`.
    pub(crate) rates: watch::Sender<BTreeMap<String, ModelRates>>,
}

impl Presence {
    /// Announces the worker and watches for another process with its id, until `stop` fires.
    pub(crate) async fn run(self, stop: CancellationToken) {
        let watch = ConflictWatch {
            worker_id: self.announcement.identity.worker_id.clone(),
            transport: self.transport.clone(),
            clock: self.clock.clone(),
            own: self.own.clone(),
            telemetry: self.telemetry.clone(),
            warnings: WarnLimiter::new(ID_CONFLICT_WARN_INTERVAL),
        };
        tokio::join!(watch.run(stop.clone()), self.announce(stop));
    }

    /// Registers and heartbeats until `stop` fires.
    async fn announce(mut self, stop: CancellationToken) {
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
        // A model withdrawn or restored, added or gone: the next tick registers, whatever
        // `reregisterEveryHeartbeats` says.
        let mut withdrawn = self.health.changes();
        let mut catalogs = self.announcement.catalogs.clone();
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticker.tick() => {
                    beats = beats.wrapping_add(1);
                    let models_changed = withdrawn.has_changed().unwrap_or(false)
                        || catalogs.has_changed().unwrap_or(false);
                    withdrawn.mark_unchanged();
                    catalogs.mark_unchanged();
                    if (models_changed || beats.is_multiple_of(self.config.reregister_every))
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
    async fn heartbeats_only(&mut self, stop: CancellationToken) {
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
        let now_ms = self.clock.unix_millis();
        WorkerRegistration {
            worker_id: a.identity.worker_id.clone(),
            hostname: a.identity.hostname.clone(),
            ip: a.identity.ip.clone(),
            port: a.identity.port,
            skills: a.skills(&self.health, now_ms),
            hardware: a.hardware.clone(),
            capabilities: a.capabilities.clone(),
            tags: self.config.tags.clone(),
            priority: self.config.priority,
            status,
            timestamp: now_ms,
        }
    }

    /// Publishes a heartbeat. Its batching rates are those over the time since the previous
    /// heartbeat (zero in a run's first, which only sets the baseline), and are published for
    /// `$SRV.STATS` too.
    async fn heartbeat(&mut self) {
        let figures = self.figures.borrow().clone();
        let engine = self.engine.model_figures();
        let rates = self.meter.sample(self.clock.now(), &engine);
        let models = model_metrics(&figures.model_loads(&engine), &rates);
        self.rates.send_replace(rates);
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
                models,
            },
            timestamp: self.clock.unix_millis(),
        };
        match self.publish(subject::HEARTBEAT, &message).await {
            Ok(()) => bump(&self.telemetry.heartbeats_sent),
            Err(err) => debug!(cause = %err, "heartbeat not sent"),
        }
    }

    /// Publishes a presence message, noted first so that its echo is recognised.
    async fn publish<T: Serialize>(
        &self,
        subject: &str,
        message: &T,
    ) -> Result<(), TransportError> {
        let payload = protocol::encode(message).map_err(|e| TransportError::Refused {
            reason: format!("cannot encode {subject}: {e}"),
        })?;
        self.own.note(subject, &payload);
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

/// Fingerprints of the presence messages a run published lately, oldest first, at most
/// [`OWN_ANNOUNCEMENTS_REMEMBERED`]: what NATS echoes back is recognised by its subject and
/// bytes.
#[derive(Debug, Default)]
pub(crate) struct OwnAnnouncements {
    recent: Mutex<VecDeque<u64>>,
}

impl OwnAnnouncements {
    /// Notes a message about to be published.
    fn note(&self, subject: &str, payload: &[u8]) {
        let mut recent = self.lock();
        if recent.len() == OWN_ANNOUNCEMENTS_REMEMBERED {
            recent.pop_front();
        }
        recent.push_back(fingerprint(subject, payload));
    }

    /// Whether a message that came back is one this run published; each is recognised once.
    fn recognise(&self, subject: &str, payload: &[u8]) -> bool {
        let print = fingerprint(subject, payload);
        let mut recent = self.lock();
        match recent.iter().position(|p| *p == print) {
            Some(at) => {
                recent.remove(at);
                true
            }
            None => false,
        }
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<u64>> {
        // The fingerprints stay valid whatever a panicking holder did.
        self.recent.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn fingerprint(subject: &str, payload: &[u8]) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    (subject, payload).hash(&mut hasher);
    hasher.finish()
}

/// What the watch reads of a registration or heartbeat; everything else is skipped, so any
/// worker's messages are read, whatever else they carry.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Announced<'a> {
    #[serde(borrow)]
    worker_id: Cow<'a, str>,
    #[serde(borrow)]
    hostname: Option<Cow<'a, str>>,
    #[serde(borrow)]
    ip: Option<Cow<'a, str>>,
}

/// Watches `worker.register` and `worker.heartbeat` for this worker's id in messages this run
/// did not publish.
struct ConflictWatch {
    worker_id: String,
    transport: Arc<dyn Transport>,
    clock: Arc<dyn Clock>,
    own: Arc<OwnAnnouncements>,
    telemetry: Arc<Telemetry>,
    warnings: WarnLimiter,
}

impl ConflictWatch {
    /// Watches until `stop` fires or the subscriptions end.
    async fn run(mut self, stop: CancellationToken) {
        let mut subs: SelectAll<Subscription> = SelectAll::new();
        for subject in [subject::REGISTER, subject::HEARTBEAT] {
            match self.transport.subscribe(subject.to_owned(), None).await {
                Ok(sub) => subs.push(sub),
                Err(err) => warn!(%subject, cause = %err, "cannot watch for a duplicate worker id"),
            }
        }
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                msg = subs.next() => match msg {
                    Some(msg) => self.check(&msg),
                    None => return,
                },
            }
        }
    }

    /// Counts, and warns of, a message for this worker's id that another process published.
    fn check(&mut self, msg: &InboundMessage) {
        let Ok(announced) = serde_json::from_slice::<Announced<'_>>(&msg.payload) else {
            return;
        };
        if announced.worker_id != self.worker_id || self.own.recognise(&msg.subject, &msg.payload) {
            return;
        }
        bump(&self.telemetry.id_conflicts);
        if let Some(seen) = self.warnings.occurred(self.clock.now()) {
            warn!(
                worker_id = %self.worker_id,
                subject = %msg.subject,
                hostname = announced.hostname.as_deref().unwrap_or("?"),
                ip = announced.ip.as_deref().unwrap_or("?"),
                seen,
                "another process announces this worker id; the two split its requests: give \
                 each worker its own worker.workerId (or stateDir)"
            );
        }
    }
}

/// When to warn of something that may recur often: at once the first time, then at most once
/// per interval, telling how often it occurred since the last warning.
#[derive(Debug)]
struct WarnLimiter {
    interval: Duration,
    last: Option<Instant>,
    unreported: u64,
}

impl WarnLimiter {
    fn new(interval: Duration) -> WarnLimiter {
        WarnLimiter {
            interval,
            last: None,
            unreported: 0,
        }
    }

    /// It occurred at `now`: `Some(occurrences since the last warning, this one included)`
    /// when a warning is due.
    fn occurred(&mut self, now: Instant) -> Option<u64> {
        self.unreported = self.unreported.saturating_add(1);
        if self.last.is_some_and(|at| now < at + self.interval) {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.unreported))
    }
}

#[cfg(test)]
mod tests {
    // Goal: the watch's parts tell our own messages from another's with bounded memory, warn
    // at a bounded rate without losing count, and read any worker's id.
    // Method: the pure parts, fed directly.

    use super::*;
    use crate::clock::SystemClock;

    #[test]
    fn own_messages_are_recognised_once_and_only_the_latest_are_remembered() {
        let own = OwnAnnouncements::default();
        own.note(subject::HEARTBEAT, b"beat-1");
        own.note(subject::REGISTER, b"reg-1");
        assert!(
            !own.recognise(subject::HEARTBEAT, b"reg-1"),
            "same bytes, other subject"
        );
        assert!(
            !own.recognise(subject::HEARTBEAT, b"beat-2"),
            "never published"
        );
        assert!(own.recognise(subject::REGISTER, b"reg-1"));
        assert!(
            !own.recognise(subject::REGISTER, b"reg-1"),
            "recognised once"
        );
        assert!(own.recognise(subject::HEARTBEAT, b"beat-1"));

        for i in 0..=OWN_ANNOUNCEMENTS_REMEMBERED {
            own.note(subject::HEARTBEAT, format!("b{i}").as_bytes());
        }
        assert_eq!(own.lock().len(), OWN_ANNOUNCEMENTS_REMEMBERED);
        assert!(
            !own.recognise(subject::HEARTBEAT, b"b0"),
            "the oldest is forgotten"
        );
        assert!(own.recognise(subject::HEARTBEAT, b"b1"));
    }

    #[test]
    fn warnings_come_at_most_once_per_interval_and_count_what_came_between() {
        let t0 = SystemClock.now();
        let interval = Duration::from_secs(60);
        let mut limiter = WarnLimiter::new(interval);
        assert_eq!(limiter.occurred(t0), Some(1), "the first warns at once");
        assert_eq!(limiter.occurred(t0 + Duration::from_secs(1)), None);
        assert_eq!(limiter.occurred(t0 + interval / 2), None);
        assert_eq!(limiter.occurred(t0 + interval), Some(3));
        assert_eq!(limiter.occurred(t0 + interval * 3), Some(1));
    }

    #[test]
    fn the_watch_reads_the_id_of_any_workers_message() {
        let registration: Announced<'_> = serde_json::from_str(
            r#"{"workerId":"w-1","hostname":"h","ip":"192.0.2.1","skills":{"availableModels":[]},"status":"online"}"#,
        )
        .unwrap();
        assert_eq!(
            (
                registration.worker_id.as_ref(),
                registration.hostname.as_deref()
            ),
            ("w-1", Some("h"))
        );
        let heartbeat: Announced<'_> =
            serde_json::from_str(r#"{"workerId":"w\u002d2","status":"online","metrics":{}}"#)
                .unwrap();
        assert_eq!((heartbeat.worker_id.as_ref(), heartbeat.ip), ("w-2", None));
    }
}
