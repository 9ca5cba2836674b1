//! The worker node: [`Worker::run`] takes a worker from `idle` through registration to `ready`,
//! serves requests until told to stop, then drains and stops.
//!
//! The task tree of one run:
//!
//! - the **dispatcher** (this task): reads `worker.{id}.inference`, `worker.{id}.cancel` and
//!   the model groups, feeds what arrives to [`crate::admission`], which holds all request
//!   state, carries out its decisions, and publishes the figures (see `dispatcher`, `figures`);
//! - one **request task** per running request, plus short responder tasks for refusals, tracked
//!   so a drain waits for them (see `request`);
//! - the **presence** task: registration, heartbeats, re-registration after reconnects, and the
//!   watch for another process announcing the same id (see `presence`);
//! - the **service** task: `$SRV` discovery answers, with the figures (see `service`);
//! - a **preload** task loading the configured models in the background.
//!
//! The worker reaches the outside only through [`Deps`]: the transport, the engine, the clock
//! and the hardware probe.

mod control;
mod dispatcher;
mod figures;
mod group;
mod health;
mod keeper;
mod observer;
mod phase;
mod presence;
mod pull;
mod request;
mod responder;
mod service;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

pub use dispatcher::DispatchReport;
pub use figures::IntakeCounters;
pub use observer::Observer;

use crate::admission::{Admission, AdmissionLimits};
use crate::clock::Clock;
use crate::config::{ModelSubjects, NodeConfig};
use crate::engine::{Catalog, Engine};
use crate::hardware::{HardwareProbe, HostProfile};
use crate::identity::Identity;
use crate::lifecycle::{Lifecycle, LifecycleCell};
use crate::limits::{
    ENGINE_STOP_GRACE, FLUSH_TIMEOUT, GROUP_QUIET, INFLIGHT_REQUESTS_MAX, TERMINAL_GRACE,
};
use crate::metrics::models::RateMeter;
use crate::metrics::telemetry::Telemetry;
use crate::mutation::{Mutation, Mutations};
use crate::plan::{Plan, ServedModel};
use crate::protocol::{self, WorkerDeregistration, subject};
use crate::transport::{Subscription, Transport, TransportError};

use dispatcher::Dispatcher;
use figures::Figures;
use group::ModelGroups;
use health::ModelHealth;
use keeper::Keeper;
use phase::Phase;
use presence::{Announcement, Presence};
use pull::{ModelQueues, Pulled};
use request::{Finished, Loader, RequestContext};

/// The worker's four seams.
#[derive(Clone)]
pub struct Deps {
    /// The message bus.
    pub transport: Arc<dyn Transport>,
    /// The inference engine.
    pub engine: Arc<dyn Engine>,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// The host.
    pub hardware: Arc<dyn HardwareProbe>,
}

/// Why a run failed before it could serve.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A subscription the worker needs was refused.
    #[error("cannot subscribe to {subject}: {source}")]
    Subscribe {
        /// The subject.
        subject: String,
        /// The transport's error.
        source: TransportError,
    },
    /// The model work queue (`modelSubjects.mode: jetstream`) could not be created or found.
    #[error("cannot use the model work queue (stream {stream}): {source}")]
    WorkQueue {
        /// The stream's name.
        stream: String,
        /// The transport's error.
        source: TransportError,
    },
    /// `run` was called while a run was in progress.
    #[error("the worker is already running (state {state})")]
    AlreadyRunning {
        /// The state it was in.
        state: Lifecycle,
    },
}

/// What a finished run reports.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunReport {
    /// Requests, errors and intake counts over the run.
    pub dispatch: DispatchReport,
}

/// A worker node. Build it with [`Worker::new`] (no side effects), run it with [`Worker::run`];
/// a stopped worker can run again.
pub struct Worker {
    identity: Identity,
    config: NodeConfig,
    preload: Vec<String>,
    deps: Deps,
    lifecycle: Arc<LifecycleCell>,
    mutations: Mutations,
    /// Counters and histograms shared by the worker's tasks and read by `/metrics`.
    telemetry: Arc<Telemetry>,
    /// The dispatcher's figures: published by the running dispatcher, the defaults outside a
    /// run; read by presence, service discovery and every [`Observer`].
    figures: watch::Sender<Figures>,
    /// Whether the run's preload has ended (true when there is none to do).
    preloaded: watch::Sender<bool>,
}

impl Worker {
    /// A worker with this identity and configuration, over these seams. `preload` names the
    /// models loaded in the background once the worker is registered.
    pub fn new(identity: Identity, config: NodeConfig, preload: Vec<String>, deps: Deps) -> Worker {
        let preloaded = watch::Sender::new(preload.is_empty());
        Worker {
            identity,
            config,
            preload,
            deps,
            lifecycle: Arc::new(LifecycleCell::default()),
            mutations: Mutations::NONE,
            telemetry: Arc::new(Telemetry::default()),
            figures: watch::Sender::new(Figures::default()),
            preloaded,
        }
    }

    /// A read-only view of the worker, for health checks and metrics; valid across runs.
    pub fn observer(&self) -> Observer {
        Observer {
            worker_id: self.identity.worker_id.clone(),
            lifecycle: self.lifecycle.subscribe(),
            engine_health: self.deps.engine.health(),
            connection: self.deps.transport.connection(),
            telemetry: self.telemetry.clone(),
            figures: self.figures.subscribe(),
            engine: self.deps.engine.clone(),
            preloaded: self.preloaded.subscribe(),
        }
    }

    /// The same worker with planted bugs, for the simulation suite's own tests.
    #[cfg(feature = "mutation")]
    pub fn with_mutations(mut self, mutations: Mutations) -> Worker {
        self.mutations = mutations;
        self
    }

    /// The worker id.
    pub fn id(&self) -> &str {
        &self.identity.worker_id
    }

    /// Follows the lifecycle state.
    pub fn lifecycle(&self) -> watch::Receiver<Lifecycle> {
        self.lifecycle.subscribe()
    }

    /// Runs the worker until `shutdown` completes, then drains: new requests are refused with
    /// `WORKER_SHUTDOWN`, `worker.deregister` is published, accepted requests get
    /// `drainTimeoutMs` to finish, what is left ends with `WORKER_SHUTDOWN`, the transport is
    /// flushed and the engine stopped.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> Result<RunReport, WorkerError> {
        let state = self.lifecycle.get();
        if !matches!(state, Lifecycle::Idle | Lifecycle::Stopped) {
            return Err(WorkerError::AlreadyRunning { state });
        }
        let span = info_span!("worker", node_id = %self.identity.worker_id);
        self.run_inner(shutdown).instrument(span).await
    }

    async fn run_inner(
        &self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<RunReport, WorkerError> {
        self.lifecycle.advance(Lifecycle::Connecting);
        // Subscribe before anything announces the worker, so no routed request is missed.
        let (inference, cancel) = match self.subscribe().await {
            Ok(subs) => subs,
            Err(err) => {
                self.lifecycle.advance(Lifecycle::Draining);
                self.lifecycle.advance(Lifecycle::Stopped);
                return Err(err);
            }
        };
        let (profile, catalog, plan) = self.plan().await;
        // The work queue's stream and consumers before anything announces the worker: a server
        // or account without JetStream is a configuration error, said at once.
        let queues = match &self.config.model_subjects {
            ModelSubjects::QueueGroup => None,
            ModelSubjects::JetStream(config) => {
                let mut queues = ModelQueues::new(config, catalog.models.keys());
                if let Err(source) = queues.open(&self.deps.transport).await {
                    self.lifecycle.advance(Lifecycle::Draining);
                    self.lifecycle.advance(Lifecycle::Stopped);
                    return Err(WorkerError::WorkQueue {
                        stream: config.stream.clone(),
                        source,
                    });
                }
                Some(queues)
            }
        };
        let catalogs = watch::Sender::new(catalog.clone());
        let (finished_tx, finished) = mpsc::channel::<Finished>(INFLIGHT_REQUESTS_MAX);
        let ctx = Arc::new(RequestContext {
            transport: self.deps.transport.clone(),
            engine: self.deps.engine.clone(),
            clock: self.deps.clock.clone(),
            loader: Arc::new(Loader::new(Arc::new(self.keeper(&plan, &catalogs)))),
            late_subscriber_wait: self.config.late_subscriber_wait,
            late_subscriber_min_delay: self.config.late_subscriber_min_delay,
            finished: finished_tx,
            mutations: self.mutations,
            telemetry: self.telemetry.clone(),
        });
        // Before anything can load a model, so the dispatcher hears of every load.
        let capacities = ctx.loader.capacities();
        let mut dispatcher = self.dispatcher(&plan, ctx.clone());
        let models = catalogs.subscribe();
        let health = ctx.loader.health.clone();
        let background = self.start_background(&profile, &plan, ctx, catalogs);
        let mut intake =
            Intake {
                inference,
                cancel,
                // In the work-queue mode the stream takes the model subjects' messages; a queue group
                // beside it would receive them a second time.
                groups: ModelGroups::new(catalog.models.keys().filter(|_| {
                    !matches!(self.config.model_subjects, ModelSubjects::JetStream(_))
                })),
                queues,
                finished,
                capacities,
                models,
                health,
            };
        intake.groups.join(&self.deps.transport).await;
        self.serve(&mut dispatcher, &mut intake, shutdown).await;
        Ok(self.stop(dispatcher, intake, background).await)
    }

    /// Which models stay loaded: the preloaded ones, the others until their keep-alive; within
    /// the configured model memory, or the memory the plan makes available.
    fn keeper(&self, plan: &Plan, catalogs: &watch::Sender<Catalog>) -> Keeper {
        let planned = (plan.capabilities.available_memory_gb * f64::from(1u32 << 30)) as u64;
        Keeper::new(
            self.preload.iter().cloned(),
            self.config.keep_alive,
            self.config.model_memory_bytes.unwrap_or(planned),
            catalogs.subscribe(),
            self.telemetry.clone(),
        )
    }

    /// The host's profile, the engine's models and the plan for both.
    async fn plan(&self) -> (HostProfile, Catalog, Plan) {
        let profile = self.deps.hardware.profile().await;
        let catalog = match self.deps.engine.catalog().await {
            Ok(catalog) => catalog,
            Err(err) => {
                warn!(cause = %err, "cannot list the engine's models; serving none");
                Default::default()
            }
        };
        let models: Vec<ServedModel<'_>> = catalog
            .models
            .iter()
            .map(|(id, entry)| ServedModel {
                facts: entry.facts(id),
                streams_max: entry.streams_max,
            })
            .collect();
        let plan = Plan::new(&profile, &self.config.plan_settings(), &models);
        info!(
            models = catalog.models.len(),
            inflight_max = plan.scheduler.inflight_max,
            queue_depth_max = plan.scheduler.queue_depth_max,
            "plan"
        );
        (profile, catalog, plan)
    }

    fn dispatcher(&self, plan: &Plan, ctx: Arc<RequestContext>) -> Dispatcher {
        let mut limits = plan.scheduler.clone();
        if self.mutations.has(Mutation::IgnoreQueueBound) {
            limits.queue_depth_max = usize::MAX;
            limits
                .tiers
                .values_mut()
                .for_each(|t| t.queue_depth = usize::MAX);
        }
        if self.mutations.has(Mutation::IgnoreEngineCapacity) {
            limits.models.clear();
        }
        let admission = Admission::new(
            AdmissionLimits {
                scheduler: limits,
                request_timeout: self.config.request_timeout,
            },
            plan.model_tiers.clone(),
            self.mutations,
        );
        Dispatcher::new(
            self.config.request_limits,
            self.config.generation_defaults,
            admission,
            ctx,
            self.figures.clone(),
        )
    }

    /// Spawns the presence, service discovery, preload and model rescan tasks.
    fn start_background(
        &self,
        profile: &HostProfile,
        plan: &Plan,
        ctx: Arc<RequestContext>,
        catalogs: watch::Sender<Catalog>,
    ) -> Background {
        let deps = &self.deps;
        let background = Background {
            tasks: TaskTracker::new(),
            stop: CancellationToken::new(),
        };
        let (rates, rates_seen) = watch::channel(BTreeMap::new());
        let presence = Presence {
            config: self.config.clone(),
            announcement: self.announcement(profile, plan, catalogs.subscribe()),
            health: ctx.loader.health.clone(),
            transport: deps.transport.clone(),
            clock: deps.clock.clone(),
            hardware: deps.hardware.clone(),
            engine_health: deps.engine.health(),
            lifecycle: self.lifecycle.clone(),
            figures: self.figures.subscribe(),
            telemetry: self.telemetry.clone(),
            mutations: self.mutations,
            own: Arc::default(),
            engine: deps.engine.clone(),
            meter: RateMeter::default(),
            rates,
        };
        background.tasks.spawn(
            presence
                .run(background.stop.clone())
                .instrument(info_span!("presence")),
        );
        let service = service::Service {
            worker_id: self.identity.worker_id.clone(),
            transport: deps.transport.clone(),
            figures: self.figures.subscribe(),
            telemetry: self.telemetry.clone(),
            started_ms: deps.clock.unix_millis(),
            engine: deps.engine.clone(),
            rates: rates_seen,
            health: ctx.loader.health.clone(),
        };
        background.tasks.spawn(
            service
                .run(background.stop.clone())
                .instrument(info_span!("service")),
        );
        if let Some(every) = ctx.loader.keeper.check_every() {
            let (ctx, stop) = (ctx.clone(), background.stop.clone());
            background.tasks.spawn(
                async move {
                    loop {
                        tokio::select! {
                            () = stop.cancelled() => return,
                            () = tokio::time::sleep(every) => {}
                        }
                        ctx.loader
                            .keeper
                            .unload_idle(&ctx.engine, ctx.clock.now())
                            .await;
                    }
                }
                .instrument(info_span!("keep-alive")),
            );
        }
        let catalogs = Arc::new(catalogs);
        let control = control::Control {
            worker_id: self.identity.worker_id.clone(),
            ctx: ctx.clone(),
            catalogs: catalogs.clone(),
        };
        background.tasks.spawn(
            control
                .run(background.stop.clone())
                .instrument(info_span!("control")),
        );
        if let Some(every) = self.config.model_rescan {
            background.tasks.spawn(
                rescan(ctx.clone(), catalogs, every, background.stop.clone())
                    .instrument(info_span!("rescan")),
            );
        }
        self.preloaded.send_replace(self.preload.is_empty());
        let preloaded = self.preloaded.clone();
        let models = self.preload.clone();
        let lifecycle = self.lifecycle.subscribe();
        background.tasks.spawn(
            async move {
                preload(ctx, models, lifecycle).await;
                preloaded.send_replace(true);
            }
            .instrument(info_span!("preload")),
        );
        background
    }

    /// What the registration says about this worker; its skills follow `catalogs`.
    fn announcement(
        &self,
        profile: &HostProfile,
        plan: &Plan,
        catalogs: watch::Receiver<Catalog>,
    ) -> Announcement {
        let clock = &self.deps.clock;
        Announcement {
            identity: self.identity.clone(),
            catalogs,
            hardware: plan.hardware_wire(profile, clock.unix_millis()),
            capabilities: plan.capabilities.clone(),
        }
    }

    /// The run loop: serves until `shutdown` completes (or the inference subscription ends),
    /// then drains until the accepted work is done and the model groups are quiet, or the
    /// drain deadline passes.
    async fn serve(
        &self,
        dispatcher: &mut Dispatcher,
        intake: &mut Intake,
        shutdown: impl Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let clock = &self.deps.clock;
        let mut phase = Phase::Serving;
        let mut inference_open = true;
        loop {
            if !phase.is_draining()
                && let Some(queues) = intake.queues.as_mut()
            {
                let withdrawn = intake.health.withdrawn();
                let free = |model: &str| {
                    if withdrawn.contains_key(model) {
                        0
                    } else {
                        dispatcher.free_slots(model)
                    }
                };
                queues.refill(&self.deps.transport, free, clock.now()).await;
            }
            dispatcher.publish();
            let idle = dispatcher.is_idle();
            let pulls_open = intake.queues.as_ref().is_some_and(|q| !q.is_idle());
            if phase.may_leave(idle && !pulls_open, intake.groups.is_empty(), clock.now())
                || (phase.is_draining() && self.mutations.has(Mutation::DrainWithoutWaiting))
            {
                return;
            }
            let serving = !phase.is_draining();
            let (drain_deadline, group_quiet_at) = phase.timers();
            let queued_deadline = dispatcher.next_queued_deadline();
            let pull_retry = intake.queues.as_ref().and_then(ModelQueues::next_retry);
            let fault_aging = dispatcher.next_fault_aging();
            tokio::select! {
                () = &mut shutdown, if serving => phase = self.begin_drain(dispatcher).await,
                msg = intake.groups.next() => {
                    phase.group_active(clock.now());
                    dispatcher.on_request(msg, true);
                }
                pulled = next_pulled(&mut intake.queues, || clock.now()) => match pulled {
                    Pulled::Item { item, .. } if serving => dispatcher.on_work_item(item),
                    // The last pulls of a draining worker: back to the queue, for another.
                    Pulled::Item { item, .. } => dispatcher.hand_back(item.settle),
                    Pulled::Ended { .. } => {}
                },
                () = sleep_until_opt(pull_retry) => {}
                msg = intake.inference.next(), if inference_open => match msg {
                    Some(msg) => dispatcher.on_request(msg, false),
                    None => {
                        inference_open = false;
                        if serving {
                            warn!("inference subscription ended; stopping");
                            phase = self.begin_drain(dispatcher).await;
                        }
                    }
                },
                Some(msg) = intake.cancel.next() => dispatcher.on_cancel(msg),
                Some(finished) = intake.finished.recv() => dispatcher.on_finished(finished),
                Ok(()) = intake.capacities.changed() => {
                    let capacities = intake.capacities.borrow_and_update().clone();
                    dispatcher.on_capacities(&capacities);
                }
                Ok(()) = intake.models.changed() => {
                    let catalog = intake.models.borrow_and_update().clone();
                    dispatcher.on_models(&catalog);
                    if serving {
                        match intake.queues.as_mut() {
                            Some(queues) => queues.add(catalog.models.keys()),
                            None => {
                                intake.groups.add(&self.deps.transport, catalog.models.keys()).await;
                            }
                        }
                    }
                }
                () = sleep_until_opt(queued_deadline) => dispatcher.expire_queued(),
                () = sleep_until_opt(fault_aging) => dispatcher.age_faults(),
                () = sleep_until_opt(group_quiet_at.filter(|_| idle)) => {}
                () = sleep_until_opt(drain_deadline) => {
                    warn!("drain deadline reached; ending what is left with WORKER_SHUTDOWN");
                    return;
                }
            }
        }
    }

    /// Draining: refuse new work, say goodbye, let accepted work finish.
    async fn begin_drain(&self, dispatcher: &mut Dispatcher) -> Phase {
        self.lifecycle.advance(Lifecycle::Draining);
        dispatcher.start_drain();
        self.deregister().await;
        let deadline = self.deps.clock.now() + self.config.drain_timeout;
        // The model groups keep routing here until the worker leaves them, and core NATS drops
        // what is in flight at that moment; so leave only once idle and quiet for a while.
        let group_quiet_at = self.deps.clock.now() + GROUP_QUIET;
        Phase::Draining {
            deadline,
            group_quiet_at,
        }
    }

    /// Ends what is left, waits for the tasks, and stops the engine.
    async fn stop(
        &self,
        mut dispatcher: Dispatcher,
        intake: Intake,
        background: Background,
    ) -> RunReport {
        let Intake {
            inference,
            cancel,
            mut groups,
            mut finished,
            ..
        } = intake;
        groups.leave();
        dispatcher.abort_all();
        dispatcher.publish();
        let grace = self.config.late_subscriber_wait + TERMINAL_GRACE;
        let dispatch = dispatcher.finish_tasks(&mut finished, grace).await;
        drop(inference);
        drop(cancel);
        background.stop.cancel();
        background.tasks.close();
        background.tasks.wait().await;
        if let Err(err) = self.flush().await {
            warn!(cause = %err, "final flush failed");
        }
        self.deps.engine.shutdown(ENGINE_STOP_GRACE).await;
        // Outside a run, readers see the defaults.
        self.figures.send_replace(Figures::default());
        self.lifecycle.advance(Lifecycle::Stopped);
        info!(
            handled = dispatch.metrics.total,
            abandoned = dispatch.abandoned,
            "stopped"
        );
        RunReport { dispatch }
    }

    async fn subscribe(&self) -> Result<(Subscription, Subscription), WorkerError> {
        let id = &self.identity.worker_id;
        let inference = self.subscribe_one(subject::inference(id)).await?;
        let cancel = self.subscribe_one(subject::cancel(id)).await?;
        Ok((inference, cancel))
    }

    async fn subscribe_one(&self, subject: String) -> Result<Subscription, WorkerError> {
        self.deps
            .transport
            .subscribe(subject.clone(), None)
            .await
            .map_err(|source| WorkerError::Subscribe { subject, source })
    }

    async fn deregister(&self) {
        let message = WorkerDeregistration {
            worker_id: self.identity.worker_id.clone(),
            timestamp: self.deps.clock.unix_millis(),
        };
        let Ok(payload) = protocol::encode(&message) else {
            return;
        };
        match self
            .deps
            .transport
            .publish(subject::DEREGISTER.to_owned(), payload.into())
            .await
        {
            Ok(()) => info!("deregistered"),
            Err(err) => warn!(cause = %err, "deregistration not sent"),
        }
        // The controller should hear the goodbye before any late terminal messages.
        if let Err(err) = self.flush().await {
            debug!(cause = %err, "flush after the goodbye failed");
        }
    }

    /// Pushes what was published to the server, if the link is up, within [`FLUSH_TIMEOUT`]:
    /// async-nats holds a flush until a lost link is back, and an outage must not hold up a
    /// drain or a stop.
    async fn flush(&self) -> Result<(), TransportError> {
        if !self.deps.transport.connection().borrow().connected {
            return Err(TransportError::Disconnected);
        }
        tokio::time::timeout(FLUSH_TIMEOUT, self.deps.transport.flush())
            .await
            .unwrap_or(Err(TransportError::TimedOut {
                millis: crate::clock::millis(FLUSH_TIMEOUT),
            }))
    }
}

/// Where one run's work comes from.
struct Intake {
    /// `worker.{id}.inference`.
    inference: Subscription,
    /// `worker.{id}.cancel`.
    cancel: Subscription,
    /// `inference.{model}` in the model queue groups.
    groups: ModelGroups,
    /// `inference.{model}` pulled from the work queue, in that mode.
    queues: Option<ModelQueues>,
    /// Which models are withdrawn (none is pulled for).
    health: Arc<ModelHealth>,
    /// Ends reported by the request tasks.
    finished: mpsc::Receiver<Finished>,
    /// What the engine's loads said of each model's capacity (the loader sends it).
    capacities: watch::Receiver<BTreeMap<String, usize>>,
    /// The models on disk, as the last scan found them (the rescan sends it).
    models: watch::Receiver<Catalog>,
}

/// The presence, service discovery and preload tasks of one run.
struct Background {
    /// The tasks, waited for at the end of the stop.
    tasks: TaskTracker,
    /// Tells them to stop, once the requests have ended.
    stop: CancellationToken,
}

/// The next message or end of the work queue's pulls; never, without a work queue.
async fn next_pulled(queues: &mut Option<ModelQueues>, now: impl Fn() -> Instant) -> Pulled {
    match queues {
        Some(queues) => queues.next(now).await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Loads the configured models once the worker is ready, one after the other.
async fn preload(
    ctx: Arc<RequestContext>,
    models: Vec<String>,
    mut lifecycle: watch::Receiver<Lifecycle>,
) {
    if models.is_empty() {
        return;
    }
    if lifecycle
        .wait_for(|s| matches!(s, Lifecycle::Ready | Lifecycle::Draining))
        .await
        .is_err()
    {
        return;
    }
    for model in models {
        if *lifecycle.borrow() != Lifecycle::Ready {
            return;
        }
        match ctx.loader.ensure(&ctx.engine, &ctx.clock, &model).await {
            Ok(loaded) => info!(model = %loaded.model_id, "preloaded"),
            Err(err) => warn!(%model, cause = %err, "preload failed"),
        }
    }
}

/// Scans the model directories every `every` until `stop` fires ([`scan_models`]), then
/// loads again the withdrawn models due for a retry, one at a time.
async fn rescan(
    ctx: Arc<RequestContext>,
    catalogs: Arc<watch::Sender<Catalog>>,
    every: std::time::Duration,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        if let Err(err) = scan_models(&ctx, &catalogs).await {
            warn!(cause = %err, "the model rescan failed; keeping the models as they were");
            continue;
        }
        for model in ctx.loader.health.due(ctx.clock.now()) {
            if stop.is_cancelled() {
                return;
            }
            info!(%model, "retrying a withdrawn model");
            if ctx
                .loader
                .load(&ctx.engine, &ctx.clock, &model)
                .await
                .is_ok()
            {
                info!(%model, "the withdrawn model loaded; it is served again");
            }
        }
    }
}

/// Scans the model directories: a change (a model added, deleted or moved) goes to
/// `catalogs`, which the registrations, the dispatcher and the model groups follow; withdrawn
/// models no longer on disk are forgotten.
pub(crate) async fn scan_models(
    ctx: &RequestContext,
    catalogs: &watch::Sender<Catalog>,
) -> Result<(), crate::engine::EngineError> {
    let catalog = ctx.engine.catalog().await?;
    ctx.loader
        .health
        .retain(|model| catalog.models.contains_key(model));
    catalogs.send_if_modified(|current| {
        if *current == catalog {
            return false;
        }
        let added: Vec<&String> = catalog
            .models
            .keys()
            .filter(|m| !current.models.contains_key(*m))
            .collect();
        let removed: Vec<&String> = current
            .models
            .keys()
            .filter(|m| !catalog.models.contains_key(*m))
            .collect();
        info!(
            ?added,
            ?removed,
            models = catalog.models.len(),
            "the model directories changed"
        );
        *current = catalog.clone();
        true
    });
    Ok(())
}
