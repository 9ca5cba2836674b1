// Goal: model-addressed requests (`inference.{model}`) through the JetStream work queue lose
// nothing but what ran on a worker killed mid-run: with three workers, twice the fleet's
// capacity in flight, one worker SIGKILLed and another SIGTERMed, every other request ends with
// exactly one terminal, none of them QUEUE_FULL or WORKER_SHUTDOWN; the same run through the
// queue groups, for comparison, is printed beside it.
// Method: a real nats-server with JetStream (store in a temporary directory), three real worker
// binaries with the real MLX runtime and the tiny model, the library client (which publishes
// into the stream and reads the stream's acknowledgement), closed-loop senders keeping twice the
// fleet's run slots busy; the kill and the stop come after given numbers of completed requests.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use mlx_worker::client::{Client, ClientError, Target};
use mlx_worker::clock::SystemClock;
use mlx_worker::protocol::{InferenceRequest, StreamMessage, WorkerHeartbeat};
use tokio::sync::watch;

use testkit::runtime::TINY;
use testkit::*;

const REQUESTS: usize = 300;
const WORKERS: usize = 3;
/// Requests each worker runs at once (`--max-concurrent`), and may hold waiting
/// (`--queue-depth`).
const PER_WORKER: usize = 4;
/// Requests in flight: twice the fleet's run slots.
const IN_FLIGHT: usize = 2 * WORKERS * PER_WORKER;
/// Completed requests before the first worker is SIGKILLed, and before the second is sent
/// SIGTERM.
const KILL_AFTER: usize = 60;
const TERM_AFTER: usize = 120;
/// How long a request waits for its terminal before it counts as lost.
const LOST_AFTER: Duration = Duration::from_secs(30);

/// How each request ended.
#[derive(Debug, Default)]
struct Tally {
    done: usize,
    /// Error terminals by code.
    errors: BTreeMap<String, usize>,
    /// No terminal within [`LOST_AFTER`].
    lost: usize,
    /// Streams that broke the stream's rules (a second terminal, a token after the end, a gap).
    broken: Vec<String>,
    /// The stream refused the request (full, or not there).
    not_queued: usize,
}

/// Runs the fleet in one mode and counts the ends.
async fn run_fleet(work_queue: bool) -> Tally {
    let _ = crate::engine::engine_config(); // fails clearly when setup has not run
    let store = tempfile::tempdir().unwrap();
    let server = NatsServer::start_with(NatsOptions::new().jetstream(store.path())).await;
    let url = server.url();
    let controller = Controller::connect(&url).await;
    let mut registrations = controller.subscribe("worker.register").await;
    let binary = worker_binary!();
    let mode = if work_queue {
        "jetstream"
    } else {
        "queue-group"
    };
    let per_worker = PER_WORKER.to_string();
    let mut workers: Vec<Option<WorkerProcess>> = (0..WORKERS)
        .map(|n| {
            let id = format!("fleet-{mode}-{n}");
            let args = [
                &["--nats-url", &url, "--worker-id", &id][..],
                &SERVING_TINY,
                &[
                    "--max-concurrent",
                    &per_worker,
                    "--queue-depth",
                    &per_worker,
                ],
                &["--model-subjects", mode],
            ]
            .concat();
            // A request taken by the killed worker and not started goes to another after 2 s
            // (a work-queue setting, refused in the other mode).
            let envs: &[(&str, &str)] = if work_queue {
                &[("MLX_WORKER_MODEL_SUBJECTS_ACK_WAIT_MS", "2000")]
            } else {
                &[]
            };
            Some(WorkerProcess::spawn_with_env(&binary, &args, envs))
        })
        .collect();
    let mut registered = std::collections::BTreeSet::new();
    while registered.len() < WORKERS {
        let msg = within_for(
            "the fleet's registrations",
            FLEET_START_PATIENCE,
            registrations.next(),
        )
        .await
        .unwrap();
        let value: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
        registered.insert(value["workerId"].as_str().unwrap().to_owned());
    }
    // The latest heartbeat of each worker.
    let mut heartbeats = controller.subscribe("worker.heartbeat").await;
    let (beats_tx, mut beats) = watch::channel(BTreeMap::<String, WorkerHeartbeat>::new());
    let _beats = tokio::spawn(async move {
        while let Some(msg) = heartbeats.next().await {
            let beat: WorkerHeartbeat = serde_json::from_slice(&msg.payload).unwrap();
            beats_tx.send_modify(|b| {
                b.insert(beat.worker_id.clone(), beat);
            });
        }
    });
    let ids: Vec<String> = registered.into_iter().collect();
    within_for(
        "every worker's model loaded",
        FLEET_START_PATIENCE,
        beats.wait_for(|b| {
            ids.iter().all(|id| {
                b.get(id)
                    .is_some_and(|hb| hb.metrics.models_loaded.iter().any(|m| m == TINY))
            })
        }),
    )
    .await
    .unwrap();

    let config = test_config(&url, &format!("modelSubjects:\n  mode: {mode}\n"));
    let transport = connected(&config.nats, "the fleet's client").await;
    let client = Client::new(Arc::new(transport), Arc::new(SystemClock))
        .with_model_subjects(&config.node.model_subjects);
    let sent = Arc::new(AtomicUsize::new(0));
    let (completed_tx, mut completed) = watch::channel(0usize);
    let completed_tx = Arc::new(completed_tx);
    let mut senders = tokio::task::JoinSet::new();
    for _ in 0..IN_FLIGHT {
        let (client, sent, completed_tx) = (client.clone(), sent.clone(), completed_tx.clone());
        senders.spawn(async move {
            let mut ends = Vec::new();
            loop {
                let n = sent.fetch_add(1, Ordering::Relaxed);
                if n >= REQUESTS {
                    return ends;
                }
                let request = InferenceRequest {
                    request_id: format!("fleet-{n}"),
                    model_id: TINY.to_owned(),
                    prompt: format!("Request {n}"),
                    max_tokens: Some(16),
                    temperature: Some(0.0),
                    top_p: None,
                    session_id: None,
                    stream: Some(true),
                    priority: None,
                    timeout_ms: None,
                };
                let end = match client.send(&Target::Model(TINY.to_owned()), &request).await {
                    Ok(mut stream) => stream.collect(LOST_AFTER, Duration::from_millis(200)).await,
                    Err(err) => Err(err),
                };
                ends.push((request.request_id, end));
                completed_tx.send_modify(|c| *c += 1);
            }
        });
    }

    // The faults, after given numbers of completed requests, the kill while the worker runs
    // requests.
    within(
        "the completions before the kill",
        completed.wait_for(|&c| c >= KILL_AFTER),
    )
    .await
    .unwrap();
    let victim = &ids[0];
    within(
        "the worker to kill busy",
        beats.wait_for(|b| {
            b.get(victim)
                .is_some_and(|hb| hb.metrics.active_requests as usize >= PER_WORKER)
        }),
    )
    .await
    .unwrap();
    let killed = workers[0].take().unwrap();
    send_signal(killed.pid(), "KILL");
    let served_by_killed = beats.borrow()[victim].metrics.total_requests_handled;
    within(
        "the completions before the stop",
        completed.wait_for(|&c| c >= TERM_AFTER),
    )
    .await
    .unwrap();
    let stopped = workers[1].take().unwrap();
    let stopped_exit = tokio::spawn(stopped.terminate());

    let mut tally = Tally::default();
    while let Some(ends) = senders.join_next().await {
        for (id, end) in ends.unwrap() {
            match end {
                Ok(messages) => match messages.last() {
                    Some(StreamMessage::Done { .. }) => tally.done += 1,
                    Some(StreamMessage::Error { code, .. }) => {
                        *tally.errors.entry(code.clone()).or_default() += 1;
                    }
                    other => panic!("{id}: a stream that ended on {other:?}"),
                },
                Err(ClientError::TimedOut { .. }) => tally.lost += 1,
                Err(ClientError::NotQueued { .. }) => tally.not_queued += 1,
                Err(err) => tally.broken.push(format!("{id}: {err}")),
            }
        }
    }
    assert_eq!(
        within("the stopped worker's exit", stopped_exit)
            .await
            .unwrap(),
        0,
        "a worker sent SIGTERM drains and exits 0"
    );
    eprintln!(
        "fleet ({mode}): {REQUESTS} requests, {IN_FLIGHT} in flight over {WORKERS} workers of \
         {PER_WORKER}; one SIGKILLed after {KILL_AFTER} completions (it had finished \
         {served_by_killed}), one SIGTERMed after {TERM_AFTER}: {tally:?}"
    );
    drop(workers);
    assert!(
        served_by_killed > 0,
        "the killed worker had served requests"
    );
    tally
}

/// One run in each mode, one after the other (two fleets at once would starve each other).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_work_queue_fleet_loses_only_what_ran_on_a_killed_worker_unlike_the_queue_groups() {
    let tally = run_fleet(true).await;
    assert!(tally.broken.is_empty(), "{:?}", tally.broken);
    assert_eq!(tally.not_queued, 0);
    assert!(
        tally.errors.is_empty(),
        "no request ends QUEUE_FULL, WORKER_SHUTDOWN or with any other error: {:?}",
        tally.errors
    );
    assert!(
        tally.lost <= PER_WORKER,
        "lost {} requests; the killed worker ran at most {PER_WORKER}",
        tally.lost
    );
    assert_eq!(tally.done + tally.lost, REQUESTS);

    // The same run through the queue groups: what they cost (QUEUE_FULL, requests lost with a
    // killed worker's queue) is printed; what holds in either mode is checked.
    let tally = run_fleet(false).await;
    assert!(tally.broken.is_empty(), "{:?}", tally.broken);
    assert_eq!(
        tally.done + tally.lost + tally.errors.values().sum::<usize>(),
        REQUESTS
    );
}
