// Goal: the worker node keeps its promises over a real nats-server: registration, heartbeats,
// streaming, late subscribers, every refusal with its code, duplicates, cancel, reconnect and
// drain — every accepted request ends with exactly one terminal message.
// Method: a real nats-server per test on a free loopback port, the worker over the production
// NatsTransport, the simulated engine (scripted tokens, latency and faults), and a plain NATS
// client playing the controller. Waits are on events with a bound, never bare sleeps, except
// where a delay is the scenario itself (a controller that subscribes late).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use mlx_worker::protocol::{
    StreamMessage, WorkerDeregistration, WorkerHeartbeat, WorkerRegistration, WorkerStatus,
};
use mlx_worker::transport::Subscription;
use mlx_worker_sim::{Fault, SimEngine, SimEngineConfig};
use serde_json::json;

use testkit::*;

const MODEL: &str = "sim/tiny";

fn engine(token_latency_ms: u64) -> SimEngine {
    SimEngine::new(SimEngineConfig {
        token_latency: Duration::from_millis(token_latency_ms),
        ..SimEngineConfig::default()
    })
}

fn request(id: &str, max_tokens: u32) -> serde_json::Value {
    json!({"requestId": id, "modelId": MODEL, "prompt": "Hello", "maxTokens": max_tokens})
}

async fn next(sub: &mut Subscription) -> (String, Bytes) {
    let msg = within("a worker message", sub.next()).await.unwrap();
    (msg.subject.to_string(), msg.payload)
}

#[tokio::test]
async fn registers_heartbeats_and_deregisters() {
    let server = NatsServer::start().await;
    let client = Controller::connect(&server.url()).await;
    let mut announcements = client.subscribe("worker.>").await;
    let config = test_config(&server.url(), "");
    let mut worker =
        RunningWorker::start("w-lifecycle", &config, Arc::new(engine(0)), vec![]).await;
    worker.ready().await;

    let (subject, payload) = next(&mut announcements).await;
    assert_eq!(subject, "worker.register");
    let reg: WorkerRegistration = serde_json::from_slice(&payload).unwrap();
    assert_eq!(reg.worker_id, "w-lifecycle");
    assert_eq!(reg.skills.available_models, vec![MODEL.to_owned()]);
    assert_eq!(reg.hardware.chip_model, "M2-Max");
    assert_eq!(reg.status, WorkerStatus::Online);

    // The first heartbeat follows the registration at once, then one per interval.
    let mut beats: Vec<WorkerHeartbeat> = Vec::new();
    while beats.len() < 4 {
        let (subject, payload) = next(&mut announcements).await;
        if subject == "worker.heartbeat" {
            beats.push(serde_json::from_slice(&payload).unwrap());
        }
    }
    assert!(
        beats[0].timestamp - reg.timestamp < 150,
        "first heartbeat is immediate"
    );
    for pair in beats.windows(2).skip(1) {
        let gap = pair[1].timestamp - pair[0].timestamp;
        assert!(
            (100..=1000).contains(&gap),
            "heartbeat gap {gap} ms for a 200 ms interval"
        );
    }
    assert!(beats.iter().all(|b| b.status == WorkerStatus::Online));

    let report = worker.stop().await;
    assert_eq!(report.dispatch.abandoned, 0);
    loop {
        let (subject, payload) = next(&mut announcements).await;
        if subject == "worker.deregister" {
            let d: WorkerDeregistration = serde_json::from_slice(&payload).unwrap();
            assert_eq!(d.worker_id, "w-lifecycle");
            break;
        }
    }
}

#[tokio::test]
async fn streams_every_token_in_order_then_done() {
    let server = NatsServer::start().await;
    let client = Controller::connect(&server.url()).await;
    let config = test_config(&server.url(), "");
    let mut worker = RunningWorker::start("w-stream", &config, Arc::new(engine(0)), vec![]).await;
    worker.ready().await;
    let stream = client.infer("w-stream", request("r-1", 25)).await;
    assert_complete(&stream, 25);
    let texts: Vec<&str> = stream
        .iter()
        .filter_map(|m| match m {
            StreamMessage::Token { token, .. } => Some(token.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(texts[0], "tok0");
    assert_eq!(texts[24], " tok24");
    worker.stop().await;
}

#[tokio::test]
async fn a_client_that_subscribes_after_sending_still_gets_every_token() {
    let server = NatsServer::start().await;
    let client = Controller::connect(&server.url()).await;
    let config = test_config(&server.url(), "");
    let mut worker = RunningWorker::start("w-late", &config, Arc::new(engine(0)), vec![]).await;
    worker.ready().await;
    for n in 0..3 {
        let id = format!("late-{n}");
        // The existing controller's order: publish, flush, and only then subscribe.
        client.send("w-late", &request(&id, 5)).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
        let mut sub = client.subscribe_response(&id).await;
        let stream = collect_stream(&mut sub).await;
        assert_complete(&stream, 5);
    }
    // Refusals are protected the same way.
    client
        .send(
            "w-late",
            &json!({"requestId": "late-bad", "modelId": "nope", "prompt": ""}),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    let mut sub = client.subscribe_response("late-bad").await;
    assert_eq!(
        error_code(&collect_stream(&mut sub).await),
        "MODEL_NOT_FOUND"
    );
    worker.stop().await;
}

#[tokio::test]
async fn bad_requests_get_their_documented_codes_and_the_worker_keeps_serving() {
    let server = NatsServer::start().await;
    let client = Controller::connect(&server.url()).await;
    let config = test_config(
        &server.url(),
        "  maxConcurrent: 1\n  requestQueue:\n    maxDepth: 1\n",
    );
    let sim = engine(20);
    let mut worker = RunningWorker::start("w-bad", &config, Arc::new(sim.clone()), vec![]).await;
    worker.ready().await;

    // Unreadable: answered on the reply subject only.
    let reply = client
        .send_with_reply("w-bad", Bytes::from_static(b"{not json"))
        .await;
    assert_eq!(reply["code"], "INVALID_REQUEST");
    assert_eq!(reply["type"], "error");

    let check = |id: &str, body: serde_json::Value, code: &'static str| {
        let client = &client;
        let id = id.to_owned();
        async move {
            let mut sub = client.subscribe_response(&id).await;
            client.send("w-bad", &body).await;
            let stream = collect_stream(&mut sub).await;
            assert_eq!(stream.len(), 1, "{stream:?}");
            assert_eq!(error_code(&stream), code, "{id}");
        }
    };
    check(
        "missing",
        json!({"requestId": "missing", "modelId": MODEL}),
        "INVALID_REQUEST",
    )
    .await;
    check(
        "range",
        json!({"requestId": "range", "modelId": MODEL, "prompt": "", "topP": 0}),
        "INVALID_REQUEST",
    )
    .await;
    check(
        "model",
        json!({"requestId": "model", "modelId": "other/model", "prompt": ""}),
        "MODEL_NOT_FOUND",
    )
    .await;

    // A full queue: one runs, one waits, the third is refused at once.
    let mut running = client.subscribe_response("q-run").await;
    let mut waiting = client.subscribe_response("q-wait").await;
    client.send("w-bad", &request("q-run", 20)).await;
    client.send("w-bad", &request("q-wait", 2)).await;
    check("q-full", request("q-full", 2), "QUEUE_FULL").await;

    // Cancel the running one mid-stream; the waiting one then runs.
    let first = running.next(PATIENCE).await.unwrap();
    assert!(matches!(
        first.message,
        StreamMessage::Token { index: 0, .. }
    ));
    client.cancel("w-bad", "q-run").await;
    let rest = collect_stream(&mut running).await;
    assert_eq!(error_code(&rest), "CANCELLED");
    assert!(rest.len() < 20, "the cancel stopped the generation");
    assert_complete(&collect_stream(&mut waiting).await, 2);

    // A cancel that arrives before its request is honoured when the request comes.
    client.cancel("w-bad", "pre-cancelled").await;
    check("pre-cancelled", request("pre-cancelled", 2), "CANCELLED").await;

    // A duplicate of a request in flight leaves the first stream intact.
    let mut first = client.subscribe_response("dup").await;
    client.send("w-bad", &request("dup", 10)).await;
    let reply = client
        .send_with_reply("w-bad", Bytes::from(request("dup", 10).to_string()))
        .await;
    assert_eq!(reply["code"], "DUPLICATE_REQUEST");
    let stream = collect_stream(&mut first).await;
    assert_complete(&stream, 10);
    // Nothing follows the terminal, not even while the next stream runs.
    let mut next = client.subscribe_response("after-dup").await;
    client.send("w-bad", &request("after-dup", 1)).await;
    assert_complete(&collect_stream(&mut next).await, 1);
    first
        .confirm_quiet(Duration::from_millis(300))
        .await
        .expect("no message after the terminal");

    // Still serving, and idle again.
    assert_complete(&client.infer("w-bad", request("after", 3)).await, 3);
    let hb = client
        .heartbeat_where("w-bad", |hb| hb.metrics.active_requests == 0)
        .await;
    assert_eq!(hb.status, WorkerStatus::Online);
    assert!(hb.metrics.total_requests_handled >= 8);
    let report = worker.stop().await;
    assert_eq!(report.dispatch.intake.unreadable, 1);
    assert_eq!(report.dispatch.intake.duplicates, 1);
}

#[tokio::test]
async fn engine_failures_and_timeouts_end_with_one_error() {
    let server = NatsServer::start().await;
    let client = Controller::connect(&server.url()).await;
    let config = test_config(&server.url(), "  requestTimeoutMs: 500\n");
    let sim = engine(0);
    let mut worker = RunningWorker::start("w-fault", &config, Arc::new(sim.clone()), vec![]).await;
    worker.ready().await;

    sim.inject(Fault::FailAfter(3));
    let stream = client.infer("w-fault", request("fail", 10)).await;
    assert_eq!(stream.len(), 4);
    assert_eq!(error_code(&stream), "ENGINE_ERROR");

    sim.inject(Fault::HangAfter(2));
    let stream = client.infer("w-fault", request("hang", 10)).await;
    assert_eq!(error_code(&stream), "TIMEOUT");

    // A request may ask for less time than the worker allows.
    sim.inject(Fault::HangAfter(0));
    let mut body = request("short", 10);
    body["timeoutMs"] = json!(100);
    assert_eq!(error_code(&client.infer("w-fault", body).await), "TIMEOUT");

    sim.inject(Fault::LoadFails);
    // The model is already loaded, so a load failure only shows after an unload.
    use mlx_worker::engine::Engine as _;
    sim.unload(MODEL).await.unwrap();
    assert_eq!(
        error_code(&client.infer("w-fault", request("load", 3)).await),
        "MODEL_LOAD_FAILED"
    );
    // The model is withdrawn until its retry: the next request is refused at once, saying so.
    let refused = client.infer("w-fault", request("withdrawn", 3)).await;
    assert_eq!(error_code(&refused), "MODEL_LOAD_FAILED");
    assert!(format!("{refused:?}").contains("withdrawn after 1 failed load"));
    worker.stop().await;
}

#[tokio::test]
async fn reconnects_and_re_registers_after_the_server_restarts() {
    let mut server = NatsServer::start().await;
    let config = test_config(&server.url(), "");
    let mut worker =
        RunningWorker::start("w-reconnect", &config, Arc::new(engine(50)), vec![]).await;
    worker.ready().await;
    let client = Controller::connect(&server.url()).await;
    let mut interrupted = client.subscribe_response("cut").await;
    client.send("w-reconnect", &request("cut", 200)).await;
    interrupted.next(PATIENCE).await.unwrap();

    server.restart().await;
    // A fresh client (the old one reconnects on its own schedule) watches for the worker.
    let client = Controller::connect(&server.url()).await;
    let mut registrations = client.subscribe("worker.register").await;
    let msg = within("a re-registration", registrations.next())
        .await
        .unwrap();
    let reg: WorkerRegistration = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(reg.worker_id, "w-reconnect");
    worker.ready().await;
    assert_complete(&client.infer("w-reconnect", request("after", 3)).await, 3);

    // The interrupted request ends: its terminal reached the new server or it is counted failed.
    let report = worker.stop().await;
    assert_eq!(report.dispatch.abandoned, 0);
    let m = &report.dispatch.metrics;
    assert_eq!(m.total, 2, "{m:?}");
}

#[tokio::test]
async fn stop_lets_running_work_finish_within_the_drain() {
    let server = NatsServer::start().await;
    let client = Controller::connect(&server.url()).await;
    let config = test_config(&server.url(), "  maxConcurrent: 2\n");
    let mut worker = RunningWorker::start("w-drain", &config, Arc::new(engine(10)), vec![]).await;
    worker.ready().await;
    let mut subs = Vec::new();
    for i in 0..4 {
        let id = format!("d-{i}");
        subs.push(client.subscribe_response(&id).await);
        client.send("w-drain", &request(&id, 20)).await;
    }
    subs[0].next(PATIENCE).await.unwrap();
    let stopping = tokio::spawn(worker.stop());
    for (i, sub) in subs.iter_mut().enumerate() {
        let stream = collect_stream(sub).await;
        // The first one already gave its first token to this test.
        let expected = if i == 0 { 20 } else { 21 };
        assert_eq!(stream.len(), expected, "d-{i}: {stream:?}");
        assert_done(&stream);
    }
    let report = stopping.await.unwrap();
    assert_eq!(report.dispatch.metrics.successes, 4);
    assert_eq!(report.dispatch.abandoned, 0);
}

#[tokio::test]
async fn what_the_drain_deadline_cuts_ends_with_worker_shutdown() {
    let server = NatsServer::start().await;
    let client = Controller::connect(&server.url()).await;
    let config = test_config(&server.url(), "  maxConcurrent: 1\n  drainTimeoutMs: 200\n");
    let mut worker = RunningWorker::start("w-cut", &config, Arc::new(engine(50)), vec![]).await;
    worker.ready().await;
    let mut running = client.subscribe_response("cut-run").await;
    let mut queued = client.subscribe_response("cut-queued").await;
    client.send("w-cut", &request("cut-run", 1000)).await;
    client.send("w-cut", &request("cut-queued", 10)).await;
    running.next(PATIENCE).await.unwrap();
    let report = worker.stop().await;
    assert_eq!(
        error_code(&collect_stream(&mut running).await),
        "WORKER_SHUTDOWN"
    );
    assert_eq!(
        error_code(&collect_stream(&mut queued).await),
        "WORKER_SHUTDOWN"
    );
    assert_eq!(report.dispatch.abandoned, 0);
    assert_eq!(
        report.dispatch.metrics.errors_by_code[&mlx_worker::protocol::ErrorCode::WorkerShutdown],
        2
    );
}
