// Goal: the work-queue mode on a three-node JetStream cluster (an R3 stream) rides out the
// loss of the node the workers are connected to, and a node's graceful shutdown: after a
// kill -9 nothing is lost that was not running on a worker at that moment, the workers
// reconnect to another node and keep pulling; a node entering lame duck mode loses its workers
// to the other nodes before it exits.
// Method: three real nats-server processes routed to each other on loopback, two real worker
// binaries with the real MLX runtime given all three URLs, the library client on a node that is
// never stopped; which node each worker is on comes from the nodes' `/connz`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use mlx_worker::client::{Client, ClientError, Target};
use mlx_worker::clock::{Clock, SystemClock};
use mlx_worker::protocol::{InferenceRequest, StreamMessage};
use tokio::sync::watch;

use testkit::runtime::TINY;
use testkit::*;

use crate::http::get_from;

const REQUESTS: usize = 200;
const WORKERS: usize = 2;
const PER_WORKER: usize = 4;
const IN_FLIGHT: usize = 2 * WORKERS * PER_WORKER;
const KILL_AFTER: usize = 50;
const LAME_DUCK_AFTER: usize = 120;
const LOST_AFTER: Duration = Duration::from_secs(30);
/// The worker processes' connection name.
const WORKER_NAME: &str = "mlx-worker";

/// How many worker connections node `monitor` holds (0 once it stopped answering).
async fn workers_on(monitor: u16) -> usize {
    let Ok((200, body)) = get_from(("127.0.0.1", monitor), "/connz").await else {
        return 0;
    };
    let connz: serde_json::Value = serde_json::from_str(&body).unwrap();
    connz["connections"]
        .as_array()
        .map_or(0, |c| c.iter().filter(|c| c["name"] == WORKER_NAME).count())
}

/// The workers each node holds, by node index.
async fn placement(cluster: &NatsCluster) -> Vec<usize> {
    let mut out = Vec::new();
    for &port in &cluster.monitor_ports {
        out.push(workers_on(port).await);
    }
    out
}

/// Waits until the cluster's JetStream answers (its meta leader is elected).
async fn jetstream_ready(url: &str) {
    let nats = async_nats::connect(url).await.unwrap();
    within("JetStream on the cluster", async {
        loop {
            if let Ok(Ok(answer)) = tokio::time::timeout(
                Duration::from_secs(1),
                nats.request("$JS.API.INFO", bytes::Bytes::new()),
            )
            .await
            {
                let info: serde_json::Value = serde_json::from_slice(&answer.payload).unwrap();
                if info.get("error").is_none() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_node_killed_or_in_lame_duck_mode_loses_no_waiting_request() {
    let _ = crate::engine::engine_config(); // fails clearly when setup has not run
    let mut cluster = NatsCluster::start(3).await;
    let urls = cluster.urls();
    jetstream_ready(&urls[0]).await;
    let all = urls.join(",");
    let binary = worker_binary!();
    let per_worker = PER_WORKER.to_string();
    let _workers: Vec<WorkerProcess> = (0..WORKERS)
        .map(|n| {
            let id = format!("cluster-{n}");
            let args = [
                &["--nats-url", &all, "--worker-id", &id][..],
                &SERVING_TINY,
                &[
                    "--max-concurrent",
                    &per_worker,
                    "--queue-depth",
                    &per_worker,
                ],
                &["--model-subjects", "jetstream"],
            ]
            .concat();
            let envs = [
                ("MLX_WORKER_MODEL_SUBJECTS_ACK_WAIT_MS", "2000"),
                ("MLX_WORKER_MODEL_SUBJECTS_REPLICAS", "3"),
            ];
            WorkerProcess::spawn_with_env(&binary, &args, &envs)
        })
        .collect();
    within_for("both workers connected", FLEET_START_PATIENCE, async {
        while placement(&cluster).await.iter().sum::<usize>() < WORKERS {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let before = placement(&cluster).await;
    let victim = (0..3).max_by_key(|&n| before[n]).unwrap();
    let home = (0..3).find(|&n| n != victim).unwrap();

    // The client and the observer live on a node that is never stopped.
    let mut config = test_config(
        &urls[home],
        "modelSubjects:\n  mode: jetstream\n  replicas: 3\n",
    );
    config.nats.name = "cluster-client".into();
    // Named apart from the workers, whose connections /connz counts.
    let mut observer = test_config(&urls[home], "").nats;
    observer.name = "cluster-observer".into();
    let controller = Controller::connect_with(&observer, async_nats::ConnectOptions::new()).await;
    let mut heartbeats = controller.subscribe("worker.heartbeat").await;
    let mut loaded = std::collections::BTreeSet::new();
    within_for("both workers' model loaded", FLEET_START_PATIENCE, async {
        while loaded.len() < WORKERS {
            let msg = heartbeats.next().await.unwrap();
            let beat: mlx_worker::protocol::WorkerHeartbeat =
                serde_json::from_slice(&msg.payload).unwrap();
            if beat.metrics.models_loaded.iter().any(|m| m == TINY) {
                loaded.insert(beat.worker_id);
            }
        }
    })
    .await;
    let transport = connected(&config.nats, "the cluster's client").await;
    let client = Client::new(Arc::new(transport), Arc::new(SystemClock))
        .with_model_subjects(&config.node.model_subjects);

    let sent = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let (completed_tx, mut completed) = watch::channel(0usize);
    let completed_tx = Arc::new(completed_tx);
    let mut senders = tokio::task::JoinSet::new();
    for s in 0..IN_FLIGHT {
        let (client, sent, refused, completed_tx) = (
            client.clone(),
            sent.clone(),
            refused.clone(),
            completed_tx.clone(),
        );
        senders.spawn(async move {
            let mut ends = Vec::new();
            let mut attempt = 0;
            while sent.load(Ordering::Relaxed) < REQUESTS {
                attempt += 1;
                let request = InferenceRequest {
                    request_id: format!("cl-{s}-{attempt}"),
                    model_id: TINY.to_owned(),
                    prompt: format!("Request {s} {attempt}"),
                    max_tokens: Some(16),
                    temperature: Some(0.0),
                    top_p: None,
                    session_id: None,
                    stream: Some(true),
                    priority: None,
                    timeout_ms: None,
                };
                let mut stream = match client.send(&Target::Model(TINY.to_owned()), &request).await
                {
                    Ok(stream) => stream,
                    // The stream did not store it, or did not say (no leader for a moment):
                    // the sender knows, and sends another.
                    Err(ClientError::NotQueued { .. } | ClientError::Publish { .. }) => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                    Err(err) => panic!("send: {err}"),
                };
                if sent.fetch_add(1, Ordering::Relaxed) >= REQUESTS {
                    // Stored past the count: still read to its end.
                }
                let end = stream.collect(LOST_AFTER, Duration::from_millis(200)).await;
                ends.push((request.request_id, end));
                completed_tx.send_modify(|c| *c += 1);
            }
            ends
        });
    }

    within(
        "the completions before the kill",
        completed.wait_for(|&c| c >= KILL_AFTER),
    )
    .await
    .unwrap();
    cluster.nodes[victim].kill().await;
    within("the workers on the other nodes", async {
        while placement(&cluster).await.iter().sum::<usize>() < WORKERS {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    within(
        "the completions before the lame duck",
        completed.wait_for(|&c| c >= LAME_DUCK_AFTER),
    )
    .await
    .unwrap();
    let now = placement(&cluster).await;
    let duck = (0..3)
        .filter(|&n| n != victim)
        .max_by_key(|&n| now[n])
        .unwrap();
    let moved = now[duck];
    assert!(moved > 0);
    let pid = cluster.nodes[duck].pid().unwrap();
    let clock = SystemClock;
    let ducked_at = clock.now();
    send_signal(pid, "USR2");
    within("the workers off the node in lame duck mode", async {
        while workers_on(cluster.monitor_ports[duck]).await > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let left_after = clock.now().saturating_duration_since(ducked_at);
    assert!(
        left_after < LAME_DUCK_GRACE && cluster.nodes[duck].is_running(),
        "the workers left by themselves, before the node closed their connections \
         ({left_after:?})"
    );
    let after = placement(&cluster).await;

    let mut done = 0;
    let mut lost = 0;
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    let mut broken = Vec::new();
    while let Some(ends) = senders.join_next().await {
        for (id, end) in ends.unwrap() {
            match end {
                Ok(messages) => match messages.last() {
                    Some(StreamMessage::Done { .. }) => done += 1,
                    Some(StreamMessage::Error { code, .. }) => {
                        *errors.entry(code.clone()).or_default() += 1;
                    }
                    other => panic!("{id}: a stream that ended on {other:?}"),
                },
                Err(ClientError::TimedOut { .. }) => lost += 1,
                Err(err) => broken.push(format!("{id}: {err}")),
            }
        }
    }
    eprintln!(
        "cluster: workers by node {before:?}; node {victim} killed after {KILL_AFTER} \
         completions; node {duck} in lame duck mode after {LAME_DUCK_AFTER} with {moved} \
         workers, all moved off after {left_after:?} while it ran (then {after:?}); {done} done, {lost} without a \
         terminal, errors {errors:?}, {} publishes the stream did not store (sent again)",
        refused.load(Ordering::Relaxed)
    );
    assert!(broken.is_empty(), "{broken:?}");
    // A stream running through the node's death ends STREAM_INTERRUPTED (its tokens in the
    // outage may be gone) or, at worst, without a terminal; nothing else fails.
    let interrupted = errors.remove("STREAM_INTERRUPTED").unwrap_or(0);
    assert!(errors.is_empty(), "{errors:?}");
    assert!(
        lost + interrupted <= WORKERS * PER_WORKER,
        "{lost} lost and {interrupted} interrupted: more than ran on the workers when the node \
         died"
    );
    assert!(done + lost + interrupted >= REQUESTS);
}
