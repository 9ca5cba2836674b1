//! [`World`]: one deterministic simulated cluster — a broker host, a worker host and a
//! controller host on turmoil's network — driven by a scenario from the outside.
//!
//! Everything random comes from the seed: turmoil's network (latency, its own rng), the
//! message latency bound and the worker's clock skew. The worker host builds its worker from
//! the configuration each time it starts, so a scenario can crash it, bounce it, or stop it
//! (drain) and start it again. The controller host executes [`Command`]s a scenario queues:
//! subscribe, publish, publish with a reply inbox. A scenario then advances simulated time with
//! [`World::run_for`]; the safety invariants are checked every [`CHECK_EVERY`] of simulated
//! time, and [`World::finish`] checks them all at the end.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use mlx_worker::config::NodeConfig;
use mlx_worker::identity::Identity;
use mlx_worker::mutation::Mutations;
use mlx_worker::worker::{Deps, RunReport, Worker};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};

use crate::broker::{BROKER_PORT, Broker, BrokerConfig};
use crate::invariants::{self, Limits, Violation};
use crate::trace::{EventKind, FaultKind, Trace};
use crate::transport::{SimTransport, SimTransportConfig};
use crate::{Fault, SimClock, SimEngine, SimEngineConfig, SimProbe, Skew};

/// The worker's id in every world.
pub const WORKER_ID: &str = "w1";
/// The model every world serves.
pub const MODEL: &str = "sim/tiny";
/// How often the safety invariants are checked while a world runs.
pub const CHECK_EVERY: Duration = Duration::from_millis(500);

/// The seed: `SIM_SEED` when set, else `default`. Always printed, with how to replay it.
pub fn seed_or(default: u64) -> u64 {
    #[allow(clippy::disallowed_methods)] // The one documented knob of the simulation suite.
    let var = std::env::var("SIM_SEED");
    var.ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(default)
}

/// How to build a world.
#[derive(Clone, Debug)]
pub struct WorldConfig {
    /// The seed.
    pub seed: u64,
    /// YAML lines added under `worker:` (two-space indented).
    pub worker_yaml: String,
    /// The engine's behaviour.
    pub engine: SimEngineConfig,
    /// Planted bugs.
    pub mutations: Mutations,
}

impl WorldConfig {
    /// A world with the defaults for `seed`.
    pub fn new(seed: u64) -> WorldConfig {
        WorldConfig {
            seed,
            worker_yaml: String::new(),
            engine: SimEngineConfig {
                token_latency: Duration::from_millis(20),
                load_latency: Duration::from_millis(50),
                ..SimEngineConfig::default()
            },
            mutations: Mutations::NONE,
        }
    }
}

/// What the controller host does next.
#[derive(Clone, Debug)]
pub enum Command {
    /// Subscribe to a subject (and keep the subscription for the rest of the run).
    Subscribe(String),
    /// Publish.
    Publish(String, Bytes),
    /// Subscribe to `reply`, then publish with it as the reply subject.
    PublishWithReply(String, String, Bytes),
    /// Read inbound frames this slowly from now on (zero: at full speed).
    ReadDelay(Duration),
}

/// The seeded randomness a scenario may draw from.
pub type SimRng = StdRng;

/// One simulated cluster.
pub struct World {
    sim: turmoil::Sim<'static>,
    /// The trace every host records into.
    pub trace: Trace,
    /// The engine (shared by every incarnation of the worker, like a separate process).
    pub engine: SimEngine,
    /// The worker's configuration.
    pub node: NodeConfig,
    /// Randomness for the scenario, from the seed.
    pub rng: SimRng,
    seed: u64,
    commands: Arc<Mutex<VecDeque<Command>>>,
    stop: Arc<AtomicBool>,
    reports: Arc<Mutex<Vec<RunReport>>>,
    clock: Arc<Mutex<Option<Arc<SimClock>>>>,
    skew: Arc<Mutex<Skew>>,
    /// Messages dropped by a full subscription buffer, any client, any incarnation.
    drops: Arc<AtomicU64>,
    next_check: Duration,
    violations: Vec<Violation>,
    _tracing: tracing::subscriber::DefaultGuard,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Records the worker's lifecycle moves (logged by `LifecycleCell::advance`) into the trace.
struct LifecycleLayer {
    trace: Trace,
    /// `SIM_LOG` set: also print every worker log line (debugging).
    log: bool,
}

/// Formats a log event's fields.
#[derive(Default)]
struct Line(String);

impl Visit for Line {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push_str(&format!(" {}={value:?}", field.name()));
    }
}

#[derive(Default)]
struct Moves {
    from: String,
    to: String,
}

impl Visit for Moves {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "from" => self.from = format!("{value:?}"),
            "to" => self.to = format!("{value:?}"),
            _ => {}
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for LifecycleLayer {
    fn enabled(&self, metadata: &tracing::Metadata<'_>, _: Context<'_, S>) -> bool {
        metadata.target() == "mlx_worker::lifecycle"
            || (self.log && metadata.target().starts_with("mlx_worker"))
    }

    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        if self.log {
            let mut line = Line::default();
            event.record(&mut line);
            let at = turmoil::sim_elapsed().unwrap_or_default().as_millis();
            eprintln!("{at:>6} ms {}{}", event.metadata().target(), line.0);
        }
        if event.metadata().target() != "mlx_worker::lifecycle" {
            return;
        }
        let mut moves = Moves::default();
        event.record(&mut moves);
        if !moves.to.is_empty() {
            self.trace.record(
                "worker",
                EventKind::Lifecycle {
                    from: moves.from,
                    to: moves.to,
                },
            );
        }
    }
}

/// The worker's configuration for a world.
pub fn node_config(worker_yaml: &str) -> Result<NodeConfig, String> {
    let mut yaml =
        format!("discovery:\n  heartbeatIntervalMs: 200\nworker:\n  workerId: {WORKER_ID}\n");
    for (key, value) in [
        ("lateSubscriberWaitMs", "300"),
        ("drainTimeoutMs", "1000"),
        ("requestTimeoutMs", "3000"),
    ] {
        if !worker_yaml.contains(key) {
            yaml.push_str(&format!("  {key}: {value}\n"));
        }
    }
    yaml.push_str(worker_yaml);
    mlx_worker::config::from_yaml(&yaml, Path::new("sim.yaml"))
        .map(|c| c.node)
        .map_err(|e| format!("sim config: {e}"))
}

impl World {
    /// Builds the world and starts its three hosts.
    pub fn new(config: WorldConfig) -> Result<World, String> {
        let trace = Trace::new();
        let guard =
            tracing::subscriber::set_default(tracing_subscriber::registry().with(LifecycleLayer {
                trace: trace.clone(),
                #[allow(clippy::disallowed_methods)] // A debugging knob: print the worker's logs.
                log: std::env::var_os("SIM_LOG").is_some(),
            }));
        let mut rng = StdRng::seed_from_u64(config.seed);
        let node = node_config(&config.worker_yaml)?;
        let max_latency = Duration::from_millis(rng.random_range(2..=12));
        let epoch_ms: u64 = 1_700_000_000_000 + rng.random_range(0..1_000_000_000);
        let mut sim = turmoil::Builder::new()
            .rng_seed(config.seed)
            .epoch(UNIX_EPOCH + Duration::from_millis(epoch_ms))
            .simulation_duration(Duration::from_secs(3600))
            .tick_duration(Duration::from_millis(1))
            .min_message_latency(Duration::from_millis(1))
            .max_message_latency(max_latency)
            .tcp_capacity(1 << 16)
            .build();

        let broker_trace = trace.clone();
        sim.host("broker", move || {
            Broker::new(BrokerConfig::default(), broker_trace.clone()).serve()
        });

        let engine = SimEngine::new(config.engine.clone());
        let stop = Arc::new(AtomicBool::new(false));
        let reports: Arc<Mutex<Vec<RunReport>>> = Arc::default();
        let clock: Arc<Mutex<Option<Arc<SimClock>>>> = Arc::default();
        let skew: Arc<Mutex<Skew>> = Arc::default();
        // Messages any client's subscription dropped for a full buffer, over every incarnation.
        let drops = Arc::new(AtomicU64::new(0));
        {
            let drops = drops.clone();
            let (trace, engine, node, stop, reports, clock, skew) = (
                trace.clone(),
                engine.clone(),
                node.clone(),
                stop.clone(),
                reports.clone(),
                clock.clone(),
                skew.clone(),
            );
            let mutations = config.mutations;
            sim.host("worker", move || {
                let (trace, engine, node, stop, reports, clock_slot, skew) = (
                    trace.clone(),
                    engine.clone(),
                    node.clone(),
                    stop.clone(),
                    reports.clone(),
                    clock.clone(),
                    *lock(&skew),
                );
                let drops = drops.clone();
                async move {
                    trace.record("worker", EventKind::Incarnation);
                    let transport = SimTransport::connect(
                        SimTransportConfig {
                            slow_consumer_drops: drops,
                            ..SimTransportConfig::new(&format!("broker:{BROKER_PORT}"), "worker")
                        },
                        trace.clone(),
                    );
                    let clock = Arc::new(SimClock::new(epoch_ms));
                    clock.set_skew(skew);
                    *lock(&clock_slot) = Some(clock.clone());
                    let identity = Identity {
                        worker_id: WORKER_ID.to_owned(),
                        hostname: "sim-host".to_owned(),
                        ip: "10.0.0.2".to_owned(),
                        port: 8080,
                    };
                    let deps = Deps {
                        transport: Arc::new(transport),
                        engine: Arc::new(engine),
                        clock,
                        hardware: Arc::new(SimProbe::new()),
                    };
                    let worker =
                        Worker::new(identity, node, Vec::new(), deps).with_mutations(mutations);
                    let shutdown = async {
                        while !stop.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    };
                    let report = worker.run(shutdown).await?;
                    lock(&reports).push(report);
                    Ok(())
                }
            });
        }

        let commands: Arc<Mutex<VecDeque<Command>>> = Arc::default();
        {
            let (trace, commands, drops) = (trace.clone(), commands.clone(), drops.clone());
            sim.host("controller", move || {
                controller(trace.clone(), commands.clone(), drops.clone())
            });
        }

        Ok(World {
            sim,
            trace,
            engine,
            node,
            rng,
            seed: config.seed,
            commands,
            stop,
            reports,
            clock,
            skew,
            drops,
            next_check: CHECK_EVERY,
            violations: Vec::new(),
            _tracing: guard,
        })
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Simulated time since the start.
    pub fn elapsed(&self) -> Duration {
        self.sim.elapsed()
    }

    /// The limits the invariants check against.
    pub fn limits(&self) -> Limits {
        Limits::from_node(WORKER_ID, &self.node)
    }

    /// Advances simulated time by `d`, checking the safety invariants on the way.
    pub fn run_for(&mut self, d: Duration) -> Result<(), String> {
        let end = self.sim.elapsed() + d;
        while self.sim.elapsed() < end {
            self.sim.step().map_err(|e| format!("a host failed: {e}"))?;
            if self.sim.elapsed() >= self.next_check {
                self.next_check += CHECK_EVERY;
                if self.violations.is_empty() {
                    self.violations =
                        invariants::check(&self.trace.events(), &self.limits(), false);
                }
            }
        }
        Ok(())
    }

    /// Advances time until the worker's last recorded lifecycle state is `state`, at most `max`.
    pub fn run_until_lifecycle(&mut self, state: &str, max: Duration) -> Result<(), String> {
        let end = self.sim.elapsed() + max;
        while self.lifecycle().as_deref() != Some(state) {
            if self.sim.elapsed() >= end {
                return Err(format!(
                    "the worker did not become {state} within {max:?} (it is {:?})",
                    self.lifecycle()
                ));
            }
            self.run_for(Duration::from_millis(5))?;
        }
        Ok(())
    }

    /// The worker's last recorded lifecycle state.
    pub fn lifecycle(&self) -> Option<String> {
        self.trace
            .events()
            .iter()
            .rev()
            .find_map(|e| match &e.kind {
                EventKind::Lifecycle { to, .. } => Some(to.clone()),
                EventKind::Incarnation | EventKind::Crashed => Some("idle".to_owned()),
                _ => None,
            })
    }

    /// Queues a command for the controller host.
    pub fn command(&mut self, command: Command) {
        lock(&self.commands).push_back(command);
    }

    /// Subscribes the controller to `response.{id}`.
    pub fn subscribe_response(&mut self, id: &str) {
        self.command(Command::Subscribe(format!("response.{id}")));
    }

    /// Sends an inference request to the worker.
    pub fn send_request(&mut self, id: &str, max_tokens: u32) {
        self.send_json(&request(id, max_tokens));
    }

    /// Sends any JSON body on the worker's inference subject.
    pub fn send_json(&mut self, body: &serde_json::Value) {
        let subject = format!("worker.{WORKER_ID}.inference");
        self.command(Command::Publish(subject, Bytes::from(body.to_string())));
    }

    /// Sends a cancel for `id`.
    pub fn send_cancel(&mut self, id: &str) {
        let subject = format!("worker.{WORKER_ID}.cancel");
        let body = serde_json::json!({ "requestId": id });
        self.command(Command::Publish(subject, Bytes::from(body.to_string())));
        self.fault(FaultKind::Cancel);
    }

    /// Records that a scenario injected `kind`.
    pub fn fault(&mut self, kind: FaultKind) {
        self.trace
            .record_at(self.sim.elapsed(), "world", EventKind::Fault(kind));
    }

    /// Injects an engine fault into the next generation (or load).
    pub fn engine_fault(&mut self, fault: Fault) {
        let kind = match fault {
            Fault::LoadFails => FaultKind::LoadFailure,
            Fault::FailAfter(_) => FaultKind::MidStreamFailure,
            Fault::CrashAfter { .. } => FaultKind::EngineCrash,
            Fault::HangAfter(_) => FaultKind::EngineHang,
        };
        self.engine.inject(fault);
        self.fault(kind);
    }

    /// Cuts the worker's link to the broker.
    pub fn partition(&mut self) {
        self.sim.partition("worker", "broker");
        self.fault(FaultKind::Partition);
    }

    /// Heals the worker's link to the broker.
    pub fn repair(&mut self) {
        self.sim.repair("worker", "broker");
    }

    /// Crashes the broker (all its state is lost).
    pub fn crash_broker(&mut self) {
        self.sim.crash("broker");
        self.fault(FaultKind::BrokerCrash);
    }

    /// Restarts the crashed broker.
    pub fn restart_broker(&mut self) {
        self.sim.bounce("broker");
    }

    /// Crashes the worker host: its worker vanishes without a drain.
    pub fn crash_worker(&mut self) {
        self.sim.crash("worker");
        self.trace
            .record_at(self.sim.elapsed(), "worker", EventKind::Crashed);
    }

    /// Starts the worker host again (a fresh worker built from the configuration).
    pub fn restart_worker(&mut self) {
        self.stop.store(false, Ordering::SeqCst);
        self.sim.bounce("worker");
    }

    /// Asks the worker to stop (drain); `run` returns once it has.
    pub fn stop_worker(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Skews the worker's wall clock (this incarnation and the next ones).
    pub fn skew_clock(&mut self, skew: Skew) {
        *lock(&self.skew) = skew;
        if let Some(clock) = lock(&self.clock).as_ref() {
            clock.set_skew(skew);
        }
        self.fault(FaultKind::ClockSkew);
    }

    /// Steps the worker's wall clock by `ms`.
    pub fn step_clock(&mut self, ms: i64) {
        if let Some(clock) = lock(&self.clock).as_ref() {
            clock.step(ms);
        }
        self.fault(FaultKind::ClockSkew);
    }

    /// The reports of the worker's finished runs.
    pub fn reports(&self) -> Vec<RunReport> {
        lock(&self.reports).clone()
    }

    /// Violations seen so far (the first batch found while running, if any).
    pub fn violations(&self) -> &[Violation] {
        &self.violations
    }

    /// Checks every invariant on the whole trace, and that no subscription dropped a message and
    /// the engine refused no generation for want of capacity (`engine-capacity`: the worker
    /// handed it no more of a model than it runs); returns the violations found while running
    /// (if any) or else the final check's.
    pub fn finish(&mut self) -> Vec<Violation> {
        if !self.violations.is_empty() {
            return self.violations.clone();
        }
        let mut found = invariants::check(&self.trace.events(), &self.limits(), true);
        // Nothing in a scenario may overflow a subscription: a drop there would be a loss the
        // invariants on the trace could blame on the worker.
        let drops = self.drops.load(Ordering::Relaxed);
        if drops > 0 {
            found.push(Violation {
                invariant: "no-slow-consumer-drop",
                detail: format!("{drops} messages dropped by a full subscription buffer"),
            });
        }
        let refused = self.engine.stats().refused;
        if refused > 0 {
            found.push(Violation {
                invariant: "engine-capacity",
                detail: format!(
                    "the engine refused {refused} generations: it was handed more of a model \
                     than it runs"
                ),
            });
        }
        found
    }
}

/// An inference request body as the controller writes it.
pub fn request(id: &str, max_tokens: u32) -> serde_json::Value {
    serde_json::json!({"requestId": id, "modelId": MODEL, "prompt": "Hello", "maxTokens": max_tokens})
}

/// The controller host: executes queued commands, keeps its subscriptions read.
async fn controller(
    trace: Trace,
    commands: Arc<Mutex<VecDeque<Command>>>,
    drops: Arc<AtomicU64>,
) -> turmoil::Result {
    let transport = Arc::new(SimTransport::connect(
        SimTransportConfig {
            slow_consumer_drops: drops,
            ..SimTransportConfig::new(&format!("broker:{BROKER_PORT}"), "controller")
        },
        trace,
    ));
    use mlx_worker::transport::Transport as _;
    loop {
        let next = lock(&commands).pop_front();
        let Some(command) = next else {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        };
        match command {
            Command::Subscribe(subject) => {
                let mut sub = transport.subscribe(subject, None).await?;
                tokio::spawn(async move { while sub.next().await.is_some() {} });
            }
            Command::Publish(subject, payload) => transport.publish(subject, payload).await?,
            Command::PublishWithReply(subject, reply, payload) => {
                let mut sub = transport.subscribe(reply.clone(), None).await?;
                tokio::spawn(async move { while sub.next().await.is_some() {} });
                transport.publish_with_reply(subject, reply, payload);
            }
            Command::ReadDelay(d) => transport.set_read_delay(d),
        }
    }
}
