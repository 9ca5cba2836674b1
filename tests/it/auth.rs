// Goal: the worker authenticates to the broker with a user and password or a token, a wrong
// credential stops start-up with a clear message and exit 77, and no secret reaches the logs or
// the printed configuration.
// Method: nats-server started with `--user/--pass` or `--auth`; the library's NatsTransport for
// the accepted and refused cases; the real binary for the exit code and its stderr.

use std::sync::Arc;

use mlx_worker::config::{NatsAuth, Secret};
use mlx_worker::transport::nats::{ConnectError, NatsTransport};
use mlx_worker_sim::{SimEngine, SimEngineConfig};

use testkit::*;

const PASSWORD: &str = "correct-horse-battery-staple";

#[tokio::test]
async fn user_password_and_token_are_accepted_and_wrong_ones_refused() {
    let server = NatsServer::start_with(NatsOptions::new().user_password("worker", PASSWORD)).await;
    let mut config = test_config(&server.url(), "");
    config.nats.auth = NatsAuth::UserPassword {
        user: "worker".into(),
        password: Secret::new(PASSWORD),
    };
    let transport = Arc::new(connected(&config.nats, "connected with a password").await);
    // A worker runs over it: it registers and stops cleanly.
    let engine = Arc::new(SimEngine::new(SimEngineConfig::default()));
    let mut worker = RunningWorker::start_with(
        "w-auth",
        config.node.clone(),
        engine,
        vec![],
        transport,
        Arc::new(mlx_worker_sim::SimProbe::new()),
    );
    worker.ready().await;
    assert_eq!(worker.stop().await.dispatch.abandoned, 0);

    config.nats.auth = NatsAuth::UserPassword {
        user: "worker".into(),
        password: Secret::new("wrong"),
    };
    match NatsTransport::connect(&config.nats).await {
        Err(ConnectError::Rejected { .. }) => {}
        Err(other) => panic!("expected a rejection, got {other}"),
        Ok(_) => panic!("a wrong password was accepted"),
    }

    let server = NatsServer::start_with(NatsOptions::new().token(PASSWORD)).await;
    let mut config = test_config(&server.url(), "");
    config.nats.auth = NatsAuth::Token(Secret::new(PASSWORD));
    let _token_link = connected(&config.nats, "connected with a token").await;
    config.nats.auth = NatsAuth::Token(Secret::new("not-it"));
    assert!(matches!(
        NatsTransport::connect(&config.nats).await,
        Err(ConnectError::Rejected { .. })
    ));
}

#[tokio::test]
async fn a_refused_credential_exits_77_and_never_prints_the_secret() {
    let server =
        NatsServer::start_with(NatsOptions::new().user_password("worker", "the-real-one")).await;
    let Exited { code, stderr, .. } = run_until_exit(
        &worker_binary!(),
        "refused credentials",
        &["--nats-url", &server.url(), "--worker-id", "w-bad-auth"],
        &[
            ("MLX_WORKER_NATS_USER", "worker"),
            ("MLX_WORKER_NATS_PASSWORD", PASSWORD),
            ("RUST_LOG", "trace"),
        ],
    )
    .await;
    assert_eq!(code, Some(77), "{stderr}");
    assert!(stderr.contains("rejected the credentials"), "{stderr}");
    assert!(!stderr.contains(PASSWORD), "the password leaked: {stderr}");

    let check = tokio::process::Command::new(env!("CARGO_BIN_EXE_mlx-worker"))
        .args(["config", "check"])
        .env("MLX_WORKER_NATS_URL", server.url())
        .env("MLX_WORKER_NATS_USER", "worker")
        .env("MLX_WORKER_NATS_PASSWORD", PASSWORD)
        .output()
        .await
        .unwrap();
    let printed = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(0));
    assert!(
        printed.contains("<redacted>") && !printed.contains(PASSWORD),
        "{printed}"
    );
}
