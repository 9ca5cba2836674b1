// Goal: the work-queue mode's edges: a server without JetStream is a clear start-up error; the
// shipped least-privilege account grants what the mode needs; every message taken from the
// queue is settled once, whatever becomes of it (served, past its deadline: TIMEOUT, invalid
// with a readable id: INVALID_REQUEST, unreadable: counted) and is never delivered again; a
// request for a model waits in the stream until a worker is there.
// Method: real nats-server processes with and without JetStream; in-process workers with the
// simulated engine over real NATS connections; the library client publishing into the stream;
// the consumer's own figures (pending, waiting for an ack, redelivered) read with async-nats.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use mlx_worker::client::{Client, Target};
use mlx_worker::clock::SystemClock;
use mlx_worker::config::{NatsAuth, Secret, WorkerConfig};
use mlx_worker::protocol::StreamMessage;
use mlx_worker::protocol::subject::{model_inference, model_token};
use mlx_worker::transport::nats::NatsTransport;
use mlx_worker_sim::{SimEngine, SimEngineConfig, SimProbe};
use serde_json::json;

use testkit::*;

const MODEL: &str = "sim/tiny";

fn jetstream_config(url: &str) -> WorkerConfig {
    test_config(
        url,
        "modelSubjects:\n  mode: jetstream\n  ackWaitMs: 1000\n",
    )
}

async fn client(config: &WorkerConfig) -> Client {
    let transport = connected(&config.nats, "the client").await;
    Client::new(Arc::new(transport), Arc::new(SystemClock))
        .with_model_subjects(&config.node.model_subjects)
}

fn sim() -> Arc<SimEngine> {
    Arc::new(SimEngine::new(SimEngineConfig::default()))
}

/// The model's consumer, as the server counts it: (pending, waiting for an ack, redelivered).
async fn consumer_figures(url: &str) -> (u64, usize, usize) {
    let nats = async_nats::connect(url).await.unwrap();
    let js = async_nats::jetstream::new(nats);
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_consumer_from_stream(model_token(MODEL), "MLX_INFERENCE")
        .await
        .unwrap();
    let info = consumer.info().await.unwrap();
    (info.num_pending, info.num_ack_pending, info.num_redelivered)
}

/// Waits until the consumer holds nothing: nothing pending, nothing waiting for an ack.
async fn settled(url: &str) -> usize {
    within("every message settled", async {
        loop {
            let (pending, ack_pending, redelivered) = consumer_figures(url).await;
            if pending == 0 && ack_pending == 0 {
                return redelivered;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_jetstream_is_a_clear_start_up_error() {
    let server = NatsServer::start().await;
    let config = jetstream_config(&server.url());
    let transport = Arc::new(NatsTransport::connect(&config.nats).await.unwrap());
    let worker = testkit::worker::build(
        "w-nojs",
        config.node,
        sim(),
        vec![],
        transport,
        Arc::new(SimProbe::new()),
    );
    let err = within("the run to fail", worker.run(std::future::pending()))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("MLX_INFERENCE") && err.contains("JetStream is not available"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_taken_message_is_settled_once_whatever_becomes_of_it() {
    let store = tempfile::tempdir().unwrap();
    let server = NatsServer::start_with(NatsOptions::new().jetstream(store.path())).await;
    let url = server.url();
    let config = jetstream_config(&url);
    let worker = RunningWorker::start("w-js", &config, sim(), vec![]).await;
    let client = client(&config).await;
    let target = Target::Model(MODEL.to_owned());

    // Served.
    let request = json!({"requestId": "js-1", "modelId": MODEL, "prompt": "x", "maxTokens": 3});
    let mut stream = client
        .send_payload(&target, "js-1", Bytes::from(request.to_string()))
        .await
        .unwrap();
    let messages = stream.collect(PATIENCE, QUIET).await.unwrap();
    assert!(matches!(
        messages.last(),
        Some(StreamMessage::Done {
            total_tokens: 3,
            ..
        })
    ));

    // Invalid, with a readable id: INVALID_REQUEST on its subject.
    let bad = json!({"requestId": "js-bad", "modelId": MODEL, "prompt": "x", "maxTokens": -4});
    let mut stream = client
        .send_payload(&target, "js-bad", Bytes::from(bad.to_string()))
        .await
        .unwrap();
    let messages = stream.collect(PATIENCE, QUIET).await.unwrap();
    match messages.last() {
        Some(StreamMessage::Error { code, .. }) => assert_eq!(code, "INVALID_REQUEST"),
        other => panic!("expected INVALID_REQUEST, got {other:?}"),
    }

    // Unreadable: no subject to answer on; counted, and settled all the same.
    client
        .publish(&target, Bytes::from_static(b"\xff not json"))
        .await
        .unwrap();
    // The queue delivers in order and the worker takes its messages in order: once the next
    // request has its answer, the unreadable one has been handled.
    let next = json!({"requestId": "js-2", "modelId": MODEL, "prompt": "x", "maxTokens": 1});
    let mut stream = client
        .send_payload(&target, "js-2", Bytes::from(next.to_string()))
        .await
        .unwrap();
    stream.collect(PATIENCE, QUIET).await.unwrap();
    assert_eq!(worker.observer.metrics().unreadable, 1);
    assert_eq!(settled(&url).await, 0, "nothing was delivered twice");

    // Waiting in the stream while no worker serves: past its deadline, TIMEOUT at once when
    // a worker takes it, and settled.
    worker.stop().await;
    let late = json!({"requestId": "js-late", "modelId": MODEL, "prompt": "x", "timeoutMs": 300});
    let mut late_stream = client
        .send_payload(&target, "js-late", Bytes::from(late.to_string()))
        .await
        .unwrap();
    let waiting = json!({"requestId": "js-wait", "modelId": MODEL, "prompt": "x", "maxTokens": 2});
    let mut waiting_stream = client
        .send_payload(&target, "js-wait", Bytes::from(waiting.to_string()))
        .await
        .unwrap();
    // The late one's deadline passes while no worker is there.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let worker = RunningWorker::start("w-js", &config, sim(), vec![]).await;
    let messages = late_stream.collect(PATIENCE, QUIET).await.unwrap();
    match messages.as_slice() {
        [StreamMessage::Error { code, error, .. }] => {
            assert_eq!(code, "TIMEOUT");
            assert!(error.contains("work queue"), "{error}");
        }
        other => panic!("expected one TIMEOUT, got {other:?}"),
    }
    let messages = waiting_stream.collect(PATIENCE, QUIET).await.unwrap();
    assert!(
        matches!(
            messages.last(),
            Some(StreamMessage::Done {
                total_tokens: 2,
                ..
            })
        ),
        "a request waits in the stream for a worker: {messages:?}"
    );
    assert_eq!(settled(&url).await, 0);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_least_privilege_account_grants_what_the_work_queue_needs() {
    let (server, _account) = crate::privilege::least_privilege_server_with_jetstream().await;
    let mut config = jetstream_config(&server.url());
    config.nats.auth = NatsAuth::UserPassword {
        user: "worker".into(),
        password: Secret::new("worker-pw"),
    };
    let worker = RunningWorker::start_with(
        "w-js-priv",
        config.node.clone(),
        sim(),
        vec![],
        Arc::new(NatsTransport::connect(&config.nats).await.unwrap()),
        Arc::new(SimProbe::new()),
    );
    let mut worker = worker;
    worker.ready().await;
    let mut client_config = jetstream_config(&server.url());
    client_config.nats.auth = NatsAuth::UserPassword {
        user: "controller".into(),
        password: Secret::new("controller-pw"),
    };
    let client = client(&client_config).await;
    let target = Target::Model(MODEL.to_owned());
    // The stream exists once the worker has started: the client's publish is stored.
    let request = json!({"requestId": "jsp-1", "modelId": MODEL, "prompt": "x", "maxTokens": 3});
    let mut stream = within("the stream to exist", async {
        loop {
            match client
                .send_payload(&target, "jsp-1", Bytes::from(request.to_string()))
                .await
            {
                Ok(stream) => return stream,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await;
    let messages = stream.collect(PATIENCE, QUIET).await.unwrap();
    assert!(
        matches!(
            messages.last(),
            Some(StreamMessage::Done {
                total_tokens: 3,
                ..
            })
        ),
        "{messages:?} on {}",
        model_inference(MODEL)
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pulled_request_whose_slot_was_taken_goes_back_to_the_queue_rather_than_wait() {
    let store = tempfile::tempdir().unwrap();
    let server = NatsServer::start_with(NatsOptions::new().jetstream(store.path())).await;
    let url = server.url();
    let config = test_config(
        &url,
        "  maxConcurrent: 1\nmodelSubjects:\n  mode: jetstream\n  ackWaitMs: 1000\n",
    );
    // A request of 40 tokens at 25 ms each holds the one slot past the ack wait.
    let engine = Arc::new(SimEngine::new(SimEngineConfig {
        token_latency: Duration::from_millis(25),
        ..SimEngineConfig::default()
    }));
    let mut worker = RunningWorker::start("w-js-slot", &config, engine, vec![]).await;
    worker.ready().await;
    let client = client(&config).await;
    // The idle worker has a pull open for its one slot: the worker's own subject takes the
    // slot, then a model-addressed request arrives on that pull.
    let own = json!({"requestId": "own", "modelId": MODEL, "prompt": "x", "maxTokens": 40});
    let mut own_stream = client
        .send_payload(
            &Target::Worker("w-js-slot".into()),
            "own",
            Bytes::from(own.to_string()),
        )
        .await
        .unwrap();
    own_stream.next(PATIENCE).await.unwrap();
    let queued = json!({"requestId": "pulled", "modelId": MODEL, "prompt": "x", "maxTokens": 2});
    let mut pulled_stream = client
        .send_payload(
            &Target::Model(MODEL.to_owned()),
            "pulled",
            Bytes::from(queued.to_string()),
        )
        .await
        .unwrap();
    // Delivered, and handed back at once, not queued on the worker.
    within("the pulled request handed back", async {
        while worker.observer.metrics().handed_back == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(worker.observer.metrics().queued, 0);
    // ...while the slot was still taken: what has arrived of the first stream holds no end.
    let mut own = Vec::new();
    while let Ok(arrival) = own_stream.next(Duration::ZERO).await {
        own.push(arrival.message);
    }
    assert!(
        !own.iter()
            .any(|m| matches!(m, StreamMessage::Done { .. } | StreamMessage::Error { .. })),
        "the first request had ended: {own:?}"
    );
    // Each runs once: the pulled one once the slot is free.
    let own = own_stream.collect(PATIENCE, QUIET).await.unwrap();
    assert!(matches!(own.last(), Some(StreamMessage::Done { .. })));
    let pulled = pulled_stream.collect(PATIENCE, QUIET).await.unwrap();
    assert!(
        matches!(
            pulled.last(),
            Some(StreamMessage::Done {
                total_tokens: 2,
                ..
            })
        ),
        "{pulled:?}"
    );
    settled(&url).await;
    worker.stop().await;
}
