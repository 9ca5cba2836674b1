// Goal: the worker's presence tells the truth about itself: `/metrics` counts every registration
// it publishes; a registration never calls `online` a worker whose heartbeat says `degraded`;
// another process announcing the same worker id is noticed — counted on `/metrics` and in
// `$SRV.STATS`, and logged once per quiet period — while the worker's own heartbeats and
// registrations, which NATS echoes back to it, never count, also under the shipped
// least-privilege account.
// Method: a worker (simulated engine) over the production transport on a real nats-server; a
// controller-side client listens to the presence subjects and plays the second process. The
// worker's warnings are captured on the test's thread (a current-thread runtime, so every task
// of the worker logs there). Counters are read in a bounded poll, since a counter moving is no
// event one could await.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use mlx_worker::clock::{Clock, SystemClock};
use mlx_worker::config::WorkerConfig;
use mlx_worker::metrics::prometheus::render;
use mlx_worker::protocol::service::StatsResponse;
use mlx_worker::transport::nats::NatsTransport;
use mlx_worker::transport::{Subscription, Transport};
use mlx_worker::worker::Observer;
use mlx_worker_sim::{Fault, SimEngine, SimEngineConfig, SimProbe};
use serde_json::{Value, json};
use tracing_subscriber::layer::SubscriberExt;

use testkit::*;

use crate::privilege::{
    least_privilege_controller, least_privilege_server, least_privilege_worker_config,
};

const REGISTRATIONS: &str = "mlx_worker_registrations_sent_total";
const CONFLICTS: &str = "mlx_worker_id_conflicts_total";

/// Starts worker `id` with `config` and `engine` over `transport`, and waits until it is ready.
async fn start(
    id: &str,
    config: &WorkerConfig,
    engine: SimEngine,
    transport: Arc<NatsTransport>,
) -> RunningWorker {
    let mut worker = RunningWorker::start_with(
        id,
        config.node.clone(),
        Arc::new(engine),
        vec![],
        transport,
        Arc::new(SimProbe::new()),
    );
    worker.ready().await;
    worker
}

/// The value of the sample `name` (without labels) on the worker's `/metrics`.
fn metric(worker: &Observer, name: &str) -> f64 {
    let text = render(&worker.metrics());
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} is not on /metrics:\n{text}"))
}

/// Waits until the sample `name` reads `value`, and fails if it went past it.
async fn metric_reaches(worker: &Observer, name: &str, value: f64) {
    within(&format!("{name} to reach {value}"), async {
        while metric(worker, name) < value {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert_eq!(metric(worker, name), value, "{name} went past {value}");
}

/// The next message on `sub` as (subject, JSON body).
async fn next(sub: &mut Subscription) -> (String, Value) {
    let msg = within("a presence message", sub.next()).await.unwrap();
    let body = serde_json::from_slice(&msg.payload).unwrap_or(Value::Null);
    (msg.subject, body)
}

/// Waits for `n` messages of worker `id` on `subject`, other than those in `not`.
async fn wait_for(sub: &mut Subscription, subject: &str, id: &str, n: usize, not: &[Value]) {
    let mut seen = 0;
    while seen < n {
        let (s, body) = next(sub).await;
        if s == subject && body["workerId"] == id && !not.contains(&body) {
            seen += 1;
        }
    }
}

/// A worker on a fresh nats-server, and a controller that listens to `worker.*` (registrations,
/// heartbeats, the goodbye, in the order the worker's one connection sent them) since before it
/// started.
struct Cluster {
    /// Bind it when taking the cluster apart: the server stops when it is dropped.
    _server: NatsServer,
    controller: Controller,
    sub: Subscription,
    worker: RunningWorker,
    /// The worker's connection.
    transport: Arc<NatsTransport>,
}

impl Cluster {
    /// Worker `id`, configured with `extra_yaml` (lines under `worker:`), running `engine`.
    async fn start(id: &str, extra_yaml: &str, engine: SimEngine) -> Cluster {
        let server = NatsServer::start().await;
        let controller = Controller::connect(&server.url()).await;
        let sub = controller.subscribe("worker.*").await;
        let config = test_config(&server.url(), extra_yaml);
        let transport = Arc::new(NatsTransport::connect(&config.nats).await.unwrap());
        let worker = start(id, &config, engine, transport.clone()).await;
        Cluster {
            _server: server,
            controller,
            sub,
            worker,
            transport,
        }
    }
}

#[tokio::test]
async fn the_registration_counter_counts_every_registration_published() {
    // A registration every other heartbeat: beats with one and beats without.
    let Cluster {
        _server,
        mut sub,
        worker,
        transport,
        ..
    } = Cluster::start(
        "w-count",
        "  reregisterEveryHeartbeats: 2\n",
        SimEngine::new(SimEngineConfig::default()),
    )
    .await;
    // The first registration and a few periodic ones.
    wait_for(&mut sub, "worker.register", "w-count", 4, &[]).await;
    let observer = worker.observer.clone();
    worker.stop().await;
    // The run is over: every registration it published precedes this marker on the worker's
    // connection.
    transport
        .publish("worker.end-of-test".to_owned(), Bytes::new())
        .await
        .unwrap();
    transport.flush().await.unwrap();
    let mut seen = 4;
    loop {
        let (subject, body) = next(&mut sub).await;
        match subject.as_str() {
            "worker.end-of-test" => break,
            "worker.register" if body["workerId"] == "w-count" => seen += 1,
            _ => {}
        }
    }
    assert_eq!(
        metric(&observer, REGISTRATIONS),
        seen as f64,
        "registrations seen by a subscriber"
    );
}

#[tokio::test]
async fn a_registration_while_the_engine_restarts_says_degraded_as_the_heartbeat_does() {
    let engine = SimEngine::new(SimEngineConfig::default());
    let Cluster {
        _server,
        controller,
        mut sub,
        worker,
        ..
    } = Cluster::start(
        "w-restart",
        "  reregisterEveryHeartbeats: 1\n",
        engine.clone(),
    )
    .await;
    wait_for(&mut sub, "worker.heartbeat", "w-restart", 1, &[]).await;

    // A crash on the first token: the engine restarts for a while, a registration each interval.
    engine.inject(Fault::CrashAfter {
        tokens: 0,
        restart: Duration::from_millis(1500),
    });
    let stream = controller
        .infer(
            "w-restart",
            json!({"requestId": "r-crash", "modelId": "sim/tiny", "prompt": "x", "maxTokens": 3}),
        )
        .await;
    assert_eq!(error_code(&stream), "ENGINE_CRASHED");

    // The registrations from the first degraded heartbeat to the first online one after it.
    let registrations = within("the restart, told by the heartbeats", async {
        let mut restarting = false;
        let mut registrations = Vec::new();
        loop {
            let (subject, body) = next(&mut sub).await;
            if body["workerId"] != "w-restart" {
                continue;
            }
            match (subject.as_str(), body["status"].as_str()) {
                ("worker.heartbeat", Some("degraded")) => restarting = true,
                ("worker.heartbeat", Some("online")) if restarting => return registrations,
                ("worker.register", Some(status)) if restarting => {
                    registrations.push(status.to_owned())
                }
                _ => {}
            }
        }
    })
    .await;
    // The engine may come back between the last registration and its heartbeat.
    let before_the_last = &registrations[..registrations.len().saturating_sub(1)];
    assert!(before_the_last.len() >= 3, "{registrations:?}");
    assert!(
        before_the_last.iter().all(|s| s == "degraded"),
        "registrations while the engine restarted: {registrations:?}"
    );
    worker.stop().await;
}

/// The warnings logged on this thread, each as its fields.
#[derive(Clone, Default)]
struct Warnings(Arc<Mutex<Vec<String>>>);

impl Warnings {
    /// Those that mention `text`.
    fn mentioning(&self, text: &str) -> Vec<String> {
        let all = self.0.lock().unwrap();
        all.iter().filter(|w| w.contains(text)).cloned().collect()
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Warnings {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if *event.metadata().level() != tracing::Level::WARN {
            return;
        }
        let mut line = String::new();
        event.record(
            &mut |field: &tracing::field::Field, value: &dyn std::fmt::Debug| {
                line.push_str(&format!(" {}={value:?}", field.name()));
            },
        );
        self.0.lock().unwrap().push(line);
    }
}

/// What a second process with the id `id` sends: a heartbeat and a registration from another
/// host.
fn twin(id: &str) -> (Value, Value) {
    let now = SystemClock.unix_millis();
    let heartbeat = json!({
        "workerId": id,
        "status": "online",
        "metrics": {
            "cpuUsagePercent": 3.0, "memoryUsedGB": 1.0, "gpuUtilizationPercent": 0.0,
            "activeRequests": 0, "totalRequestsHandled": 17, "avgLatencyMs": 0.0,
            "modelsLoaded": []
        },
        "timestamp": now,
    });
    let registration = json!({
        "workerId": id, "hostname": "other-host", "ip": "192.0.2.7", "port": 8080,
        "skills": {"availableModels": [], "modelPaths": {}, "totalModelSize": 0, "lastScanned": now},
        "status": "online", "timestamp": now,
    });
    (heartbeat, registration)
}

/// Publishes `body` on `subject` from the controller's connection, and waits until the server
/// has routed it.
async fn announce(controller: &Controller, subject: &str, body: &Value) {
    controller
        .transport
        .publish(subject.to_owned(), Bytes::from(body.to_string()))
        .await
        .unwrap();
    controller.sync().await;
}

#[tokio::test]
async fn another_process_announcing_our_id_is_counted_and_logged_and_our_own_are_not() {
    let warnings = Warnings::default();
    let _logs =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(warnings.clone()));
    let Cluster {
        _server,
        controller,
        mut sub,
        worker,
        ..
    } = Cluster::start("w-twin", "", SimEngine::new(SimEngineConfig::default())).await;
    let (heartbeat, registration) = twin("w-twin");
    let twins = [heartbeat.clone(), registration.clone()];

    // The worker's own announcements come back to it a few times first.
    wait_for(&mut sub, "worker.heartbeat", "w-twin", 3, &twins).await;
    wait_for(&mut sub, "worker.register", "w-twin", 1, &twins).await;
    assert_eq!(
        metric(&worker.observer, CONFLICTS),
        0.0,
        "our own announcements"
    );

    // Another process heartbeats with our id: counted, and a warning names the id.
    announce(&controller, "worker.heartbeat", &heartbeat).await;
    metric_reaches(&worker.observer, CONFLICTS, 1.0).await;
    let warned = warnings.mentioning("w-twin");
    assert_eq!(warned.len(), 1, "{warned:?}");

    // It registers too: counted, and not logged again so soon.
    announce(&controller, "worker.register", &registration).await;
    metric_reaches(&worker.observer, CONFLICTS, 2.0).await;

    // More of the worker's own, then the other process once more: of all that came back to
    // the worker, only the other's three messages counted.
    wait_for(&mut sub, "worker.heartbeat", "w-twin", 2, &twins).await;
    wait_for(&mut sub, "worker.register", "w-twin", 1, &twins).await;
    announce(&controller, "worker.heartbeat", &heartbeat).await;
    metric_reaches(&worker.observer, CONFLICTS, 3.0).await;
    assert_eq!(warnings.mentioning("w-twin").len(), 1, "rate-limited");

    // `$SRV.STATS` tells it too.
    let answer = within(
        "$SRV.STATS",
        controller
            .nats
            .request("$SRV.STATS.mlx-worker.w-twin", Bytes::new()),
    )
    .await
    .unwrap();
    let stats: StatsResponse = serde_json::from_slice(&answer.payload).unwrap();
    let data = &stats.endpoints[0].data;
    assert_eq!(data["idConflicts"], 3, "{data:?}");
    worker.stop().await;
}

#[tokio::test]
async fn the_least_privilege_account_lets_the_worker_watch_for_its_id() {
    let (server, _account) = least_privilege_server().await;
    let controller = least_privilege_controller(&server).await;
    let mut sub = controller.subscribe("worker.*").await;
    let config = least_privilege_worker_config(&server);
    let transport = Arc::new(NatsTransport::connect(&config.nats).await.unwrap());
    let worker = start(
        "w-priv-twin",
        &config,
        SimEngine::new(SimEngineConfig::default()),
        transport,
    )
    .await;
    let (heartbeat, _) = twin("w-priv-twin");
    wait_for(&mut sub, "worker.heartbeat", "w-priv-twin", 2, &[]).await;
    announce(&controller, "worker.heartbeat", &heartbeat).await;
    metric_reaches(&worker.observer, CONFLICTS, 1.0).await;
    worker.stop().await;
}
