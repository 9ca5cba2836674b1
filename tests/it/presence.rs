// Goal: the worker's presence tells the truth about itself: `/metrics` counts every registration
// it publishes, and a registration never calls `online` a worker whose heartbeat says
// `degraded`.
// Method: a worker (simulated engine) over the production transport on a real nats-server; a
// controller-side client listens to the presence subjects. Counters are read once the run is
// over and everything it published has reached the client.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use mlx_worker::config::WorkerConfig;
use mlx_worker::metrics::prometheus::render;
use mlx_worker::transport::nats::NatsTransport;
use mlx_worker::transport::{Subscription, Transport};
use mlx_worker::worker::Observer;
use mlx_worker_sim::{Fault, SimEngine, SimEngineConfig, SimProbe};
use serde_json::{Value, json};

use testkit::*;

const REGISTRATIONS: &str = "mlx_worker_registrations_sent_total";

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
