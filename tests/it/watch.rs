// Goal: the worker watches its runtime: a runtime that stops answering (SIGSTOP) is reported
// (`degraded`) and replaced within 15 s, and the worker serves again; a runtime that keeps
// failing until its restart budget is spent makes the worker deregister and exit 70, so that
// its own supervisor restarts it.
// Method: the worker binary serving the tiny model on a real nats-server with the real
// runtime; the runtime process found among the worker's children and signalled; heartbeats,
// the deregistration and the exit status awaited.

use std::path::Path;
use std::time::Duration;

use mlx_worker::clock::{Clock, SystemClock};
use mlx_worker::protocol::{WorkerHeartbeat, WorkerStatus};
use serde_json::json;

use crate::engine::runtime_child_pid;
use testkit::runtime::TINY;
use testkit::*;

/// The longest a stopped runtime may go unreported (the acceptance figure; by design the
/// worker finds it within 8 s).
const HUNG_REPORTED_WITHIN: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_runtime_is_reported_and_replaced_and_the_worker_serves_again() {
    let server = NatsServer::start().await;
    let client = Controller::connect(&server.url()).await;
    let binary = WorkerProcess::serving_tiny(&worker_binary!(), &server.url(), "watched");
    client
        .heartbeat_where("watched", |hb| {
            hb.status == WorkerStatus::Online && hb.metrics.models_loaded.contains(&TINY.to_owned())
        })
        .await;
    let stopped = runtime_child_pid(binary.pid());
    let mut heartbeats = client.subscribe("worker.heartbeat").await;
    send_signal(stopped, "STOP");
    let clock = SystemClock;
    let at = clock.now();
    tokio::time::timeout(HUNG_REPORTED_WITHIN, async {
        while let Some(msg) = heartbeats.next().await {
            let hb: WorkerHeartbeat = serde_json::from_slice(&msg.payload).unwrap();
            if hb.worker_id == "watched" && hb.status == WorkerStatus::Degraded {
                return;
            }
        }
    })
    .await
    .expect("the stopped runtime is reported in time");
    let reported = clock.now().saturating_duration_since(at);
    client
        .heartbeat_where("watched", |hb| hb.status == WorkerStatus::Online)
        .await;
    let back = clock.now().saturating_duration_since(at);
    eprintln!(
        "stopped runtime reported after {reported:?}, the worker online again after {back:?}"
    );
    let replacement = runtime_child_pid(binary.pid());
    assert_ne!(replacement, stopped);
    assert!(
        !Path::new(&format!("/proc/{stopped}")).exists(),
        "the stopped runtime {stopped} was left behind"
    );
    let after = client
        .infer(
            "watched",
            json!({"requestId": "after-stop", "modelId": TINY, "prompt": "Hello", "maxTokens": 4}),
        )
        .await;
    assert_done(&after);
    assert_eq!(binary.terminate().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_restart_budget_deregisters_the_worker_and_exits_70() {
    let server = NatsServer::start().await;
    let client = Controller::connect(&server.url()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("worker.yaml");
    // No restart allowed: the first crash spends the budget.
    std::fs::write(&config, "runtime:\n  maxRestarts: 0\n").unwrap();
    let config = config.display().to_string();
    let url = server.url();
    let args = [
        &[
            "--config",
            config.as_str(),
            "--nats-url",
            url.as_str(),
            "--worker-id",
            "spent",
        ][..],
        &SERVING_TINY,
    ]
    .concat();
    let mut binary = WorkerProcess::spawn(&worker_binary!(), &args);
    client
        .heartbeat_where("spent", |hb| {
            hb.metrics.models_loaded.contains(&TINY.to_owned())
        })
        .await;
    let mut goodbye = client.subscribe("worker.deregister").await;
    send_signal(runtime_child_pid(binary.pid()), "KILL");
    let msg = within("the deregistration", goodbye.next()).await.unwrap();
    let said: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(said["workerId"], "spent", "{said}");
    let status = within("the worker to exit", binary.child.wait())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(70));
}

/// The runtime's pid among the worker's children, other than `not`, once there is one.
async fn new_runtime_pid(worker: u32, not: u32) -> u32 {
    within("a new runtime process", async {
        loop {
            if let Some(pid) = crate::engine::child_pids(worker).into_iter().find(|pid| {
                *pid != not
                    && std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                        .is_ok_and(|cmd| cmd.contains("mlx_runtime"))
            }) {
                return pid;
            }
            // A process start has no event to wait for: look again shortly.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_killed_during_its_start_up_is_started_again_within_two_seconds() {
    let server = NatsServer::start().await;
    let client = Controller::connect(&server.url()).await;
    let binary = WorkerProcess::serving_tiny(&worker_binary!(), &server.url(), "restarting");
    client
        .heartbeat_where("restarting", |hb| {
            hb.metrics.models_loaded.contains(&TINY.to_owned())
        })
        .await;
    let first = runtime_child_pid(binary.pid());
    send_signal(first, "KILL");
    // Its replacement, killed as soon as it exists: while it imports MLX, before it is ready.
    let second = new_runtime_pid(binary.pid(), first).await;
    send_signal(second, "KILL");
    let clock = SystemClock;
    let killed = clock.now();
    let third = new_runtime_pid(binary.pid(), second).await;
    let after = clock.now().saturating_duration_since(killed);
    eprintln!("the runtime killed during its start-up was started again after {after:?}");
    assert!(
        after < Duration::from_secs(2),
        "started again after {after:?}"
    );
    assert_ne!(third, first);
    client
        .heartbeat_where("restarting", |hb| hb.status == WorkerStatus::Online)
        .await;
    let after = client
        .infer(
            "restarting",
            json!({"requestId": "after-restarts", "modelId": TINY, "prompt": "Hello", "maxTokens": 4}),
        )
        .await;
    assert_done(&after);
    assert_eq!(binary.terminate().await, 0);
}
