// Goal: the shipped least-privilege broker account is enough for a worker to do everything it
// does (register, heartbeat, stream with the listener check, answer discovery), and the server
// refuses a publish outside that grant.
// Method: nats-server with deploy/nats-worker-account.conf (passwords filled in); a worker with
// the `worker` credentials, a controller-side client with the `controller` ones, and a raw
// client with the worker's credentials that tries a subject outside the grant.

use std::sync::Arc;
use std::time::Duration;

use async_nats::service::PingResponse;
use bytes::Bytes;
use mlx_worker::config::{NatsAuth, Secret, WorkerConfig};
use mlx_worker::transport::nats::NatsTransport;
use mlx_worker_sim::{SimEngine, SimEngineConfig, SimProbe};
use serde_json::json;
use tokio::sync::mpsc;

use testkit::*;

/// A nats-server with the shipped account file, passwords `worker-pw` and `controller-pw`
/// filled in; the directory holds the filled-in file while the server runs.
pub(crate) async fn least_privilege_server() -> (NatsServer, tempfile::TempDir) {
    least_privilege_server_with(false).await
}

/// [`least_privilege_server`] with JetStream enabled (stored in the returned directory).
pub(crate) async fn least_privilege_server_with_jetstream() -> (NatsServer, tempfile::TempDir) {
    least_privilege_server_with(true).await
}

async fn least_privilege_server_with(jetstream: bool) -> (NatsServer, tempfile::TempDir) {
    let shipped = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/nats-worker-account.conf"),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("account.conf");
    std::fs::write(
        &conf,
        shipped
            .replace("$WORKER_PASSWORD", "worker-pw")
            .replace("$CONTROLLER_PASSWORD", "controller-pw"),
    )
    .unwrap();
    let mut options = NatsOptions::new().config_file(&conf);
    if jetstream {
        options = options.jetstream(&dir.path().join("store"));
    }
    let server = NatsServer::start_with(options).await;
    (server, dir)
}

/// The controller's side, with the `controller` credentials of [`least_privilege_server`].
pub(crate) async fn least_privilege_controller(server: &NatsServer) -> Controller {
    let mut config = test_config(&server.url(), "").nats;
    config.auth = NatsAuth::UserPassword {
        user: "controller".into(),
        password: Secret::new("controller-pw"),
    };
    Controller::connect_with(
        &config,
        async_nats::ConnectOptions::with_user_and_password(
            "controller".into(),
            "controller-pw".into(),
        ),
    )
    .await
}

/// A worker's test configuration with the `worker` credentials of [`least_privilege_server`].
pub(crate) fn least_privilege_worker_config(server: &NatsServer) -> WorkerConfig {
    let mut config = test_config(&server.url(), "");
    config.nats.auth = NatsAuth::UserPassword {
        user: "worker".into(),
        password: Secret::new("worker-pw"),
    };
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_runs_under_the_least_privilege_account_and_nothing_more() {
    let (server, _account) = least_privilege_server().await;

    let controller = least_privilege_controller(&server).await;
    let mut registrations = controller.subscribe("worker.register").await;
    let config = least_privilege_worker_config(&server);
    let transport = Arc::new(NatsTransport::connect(&config.nats).await.unwrap());
    let mut worker = RunningWorker::start_with(
        "w-priv",
        config.node.clone(),
        Arc::new(SimEngine::new(SimEngineConfig::default())),
        vec![],
        transport,
        Arc::new(SimProbe::new()),
    );
    worker.ready().await;
    // Its registration passed the grant (and, on one connection, its subscriptions before it).
    within("the registration", registrations.next())
        .await
        .unwrap();
    // The listener check needs the worker's inbox: a late subscriber still gets every token.
    controller
        .send(
            "w-priv",
            &json!({"requestId": "p-1", "modelId": "sim/tiny", "prompt": "x", "maxTokens": 4}),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    let mut sub = controller.subscribe_response("p-1").await;
    assert_complete(&collect_stream(&mut sub).await, 4);
    let ping = within(
        "a discovery answer",
        controller
            .nats
            .request("$SRV.PING.mlx-worker", Bytes::new()),
    )
    .await
    .unwrap();
    let ping: PingResponse = serde_json::from_slice(&ping.payload).unwrap();
    assert_eq!(ping.id, "w-priv");

    // Outside the grant: the server refuses and says so.
    let (errors_tx, mut errors) = mpsc::unbounded_channel();
    let rogue =
        async_nats::ConnectOptions::with_user_and_password("worker".into(), "worker-pw".into())
            .event_callback(move |event| {
                let errors_tx = errors_tx.clone();
                async move {
                    if let async_nats::Event::ServerError(e) = event {
                        let _ = errors_tx.send(e.to_string());
                    }
                }
            })
            .connect(server.url())
            .await
            .unwrap();
    let mut watched = controller.subscribe("worker.other.inference").await;
    rogue
        .publish("worker.other.inference", Bytes::from_static(b"{}"))
        .await
        .unwrap();
    rogue.flush().await.unwrap();
    let refusal = within("the server's refusal", errors.recv()).await.unwrap();
    assert!(
        refusal.to_lowercase().contains("permissions violation"),
        "{refusal}"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), watched.next())
            .await
            .is_err(),
        "the refused message was delivered"
    );
    worker.stop().await;
}
