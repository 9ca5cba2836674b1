// Goal: a flood of 10,000 requests at once, mixed with garbage, gets every request an answer
// (a result or QUEUE_FULL), keeps the worker heartbeating within a memory bound, and leaves it
// serving normally afterwards.
// Method: the real binary with the real MLX runtime and the tiny model on a real nats-server;
// a client publishes the flood as fast as it can and reads every response stream to its end;
// the worker's peak resident memory comes from /proc (VmHWM).

use std::collections::BTreeMap;

use bytes::Bytes;
use mlx_worker::client::Target;
use mlx_worker::protocol::{StreamMessage, WorkerHeartbeat};
use serde_json::json;

use testkit::runtime::TINY;
use testkit::*;

const REQUESTS: usize = 10_000;
const GARBAGE: usize = 1_000;
/// The worker's peak resident memory must stay under this.
const RSS_LIMIT_KIB: u64 = 256 * 1024;

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_gets_every_request_answered_within_a_memory_bound() {
    let _ = crate::engine::engine_config(); // fails clearly when setup has not run
    let server = NatsServer::start().await;
    let client = Controller::connect(&server.url()).await;
    let mut registrations = client.subscribe("worker.register").await;
    let mut heartbeats = client.subscribe("worker.heartbeat").await;
    let mut responses = client.subscribe("response.>").await;
    let worker = WorkerProcess::serving_tiny(&worker_binary!(), &server.url(), "flood");
    let pid = worker.pid();
    within("the registration", registrations.next())
        .await
        .unwrap();

    let flood = Target::Worker("flood".to_owned());
    for n in 0..REQUESTS {
        let body =
            json!({"requestId": format!("f-{n}"), "modelId": TINY, "prompt": "Hi", "maxTokens": 2});
        client.publish(&flood, body.to_string().into()).await;
        if n % 10 == 0 {
            let junk: Vec<u8> = (0..64).map(|i| ((n * 31 + i * 7) % 251) as u8).collect();
            client.publish(&flood, Bytes::from(junk)).await;
        }
    }
    client.flush().await;
    assert_eq!(REQUESTS / 10, GARBAGE);

    let mut ends: BTreeMap<String, String> = BTreeMap::new();
    let mut streams = Streams::default();
    let mut beats_during = 0;
    within("every request's answer", async {
        while ends.len() < REQUESTS {
            tokio::select! {
                msg = responses.next() => {
                    let (id, m) = streams.push(&msg.unwrap());
                    match m {
                        StreamMessage::Done { .. } => {
                            assert!(ends.insert(id, "done".into()).is_none());
                        }
                        StreamMessage::Error { code, .. } => {
                            assert!(ends.insert(id, code).is_none());
                        }
                        StreamMessage::Token { .. } => {}
                    }
                }
                msg = heartbeats.next() => {
                    let hb: WorkerHeartbeat = serde_json::from_slice(&msg.unwrap().payload).unwrap();
                    assert_eq!(hb.worker_id, "flood");
                    beats_during += 1;
                }
            }
        }
    })
    .await;
    let mut by_outcome: BTreeMap<&str, usize> = BTreeMap::new();
    for outcome in ends.values() {
        *by_outcome.entry(outcome.as_str()).or_default() += 1;
    }
    let peak = peak_rss_kib(pid);
    eprintln!(
        "flood: {REQUESTS} requests + {GARBAGE} garbage messages answered {by_outcome:?}; \
         {beats_during} heartbeats during the flood; worker peak RSS {peak} KiB"
    );
    assert_eq!(ends.len(), REQUESTS);
    assert!(
        by_outcome
            .keys()
            .all(|k| ["done", "QUEUE_FULL"].contains(k)),
        "{by_outcome:?}"
    );
    assert!(by_outcome.get("done").is_some_and(|&n| n > 0));
    assert!(peak < RSS_LIMIT_KIB, "peak RSS {peak} KiB");
    // The flood takes seconds; heartbeats (every 200 ms here) kept coming through it.
    assert!(beats_during > 0, "no heartbeat during the flood");

    // Still serving, and heartbeating.
    let stream = client
        .infer(
            "flood",
            json!({"requestId": "after", "modelId": TINY, "prompt": "Hello", "maxTokens": 3}),
        )
        .await;
    assert_done(&stream);
    within("a heartbeat after the flood", heartbeats.next())
        .await
        .unwrap();
    assert_eq!(worker.terminate().await, 0);
}
