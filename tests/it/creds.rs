// Goal: the worker authenticates with a `.creds` file (NATS decentralized JWT authentication):
// with its account's user it registers, heartbeats and serves; a user the server cannot trust
// (signed by an account it does not know, or a seed that is not the JWT's) stops start-up with
// exit 77, and the seed never reaches the logs, even at the most verbose level.
// Method: the test makes an operator, an account and users with `nkeys`, writes their JWTs
// itself (the nats-io JWT v2 layout: ed25519-nkey signatures over base64url header and claims),
// starts nats-server in operator mode with a memory resolver preloaded with the account, and
// writes the standard `.creds` files. The library's NatsTransport for the accepted case, with a
// controller connected as another user of the same account; the real binary for the refusals.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use data_encoding::{BASE32_NOPAD, BASE64URL_NOPAD};
use mlx_worker::clock::{Clock, SystemClock};
use mlx_worker::config::NatsAuth;
use mlx_worker::protocol::WorkerRegistration;
use mlx_worker::transport::nats::{ConnectError, NatsTransport};
use mlx_worker_sim::{SimEngine, SimEngineConfig, SimProbe};
use nkeys::KeyPair;
use serde_json::{Value, json};

use testkit::*;

/// Signs `claims` with `issuer` as a NATS JWT: `header.claims.signature`, each base64url
/// without padding, the signature an ed25519 one over `header.claims`.
fn jwt(issuer: &KeyPair, claims: &Value) -> String {
    let header = BASE64URL_NOPAD.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let body = BASE64URL_NOPAD.encode(claims.to_string().as_bytes());
    let signed = format!("{header}.{body}");
    let signature = issuer.sign(signed.as_bytes()).unwrap();
    format!("{signed}.{}", BASE64URL_NOPAD.encode(&signature))
}

/// The claims every NATS JWT carries, around its `nats` section.
fn claims(issuer: &KeyPair, subject: &str, name: &str, nats: Value) -> Value {
    json!({
        "jti": BASE32_NOPAD.encode(uuid::Uuid::new_v4().as_bytes()),
        "iat": SystemClock.unix_millis() / 1000,
        "iss": issuer.public_key(),
        "sub": subject,
        "name": name,
        "nats": nats,
    })
}

fn operator_jwt(operator: &KeyPair) -> String {
    let nats = json!({"type": "operator", "version": 2});
    jwt(
        operator,
        &claims(operator, &operator.public_key(), "test-operator", nats),
    )
}

fn account_jwt(operator: &KeyPair, account: &KeyPair, name: &str) -> String {
    let nats = json!({
        "type": "account",
        "version": 2,
        "limits": {
            "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
            "wildcards": true, "conn": -1, "leaf": -1,
        },
        "default_permissions": {"pub": {}, "sub": {}},
    });
    jwt(
        operator,
        &claims(operator, &account.public_key(), name, nats),
    )
}

fn user_jwt(account: &KeyPair, user_public_key: &str, name: &str) -> String {
    let nats = json!({
        "type": "user", "version": 2,
        "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
    });
    jwt(account, &claims(account, user_public_key, name, nats))
}

/// Writes a `.creds` file in the layout `nsc` generates.
fn write_creds(path: &Path, jwt: &str, seed: &str) {
    let text = format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n"
    );
    std::fs::write(path, text).unwrap();
}

/// A nats-server in operator mode that knows one account, and that account's key.
struct OperatorServer {
    server: NatsServer,
    account: KeyPair,
    dir: tempfile::TempDir,
}

impl OperatorServer {
    async fn start() -> OperatorServer {
        let operator = KeyPair::new_operator();
        let account = KeyPair::new_account();
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("operator.conf");
        std::fs::write(
            &conf,
            format!(
                "operator: {}\nresolver: MEMORY\nresolver_preload: {{\n  {}: {}\n}}\n",
                operator_jwt(&operator),
                account.public_key(),
                account_jwt(&operator, &account, "workers"),
            ),
        )
        .unwrap();
        let server = NatsServer::start_with(NatsOptions::new().config_file(&conf)).await;
        OperatorServer {
            server,
            account,
            dir,
        }
    }

    /// Writes a `.creds` file for a new user of the server's account; returns its path.
    fn user(&self, name: &str) -> PathBuf {
        let user = KeyPair::new_user();
        let seed = user.seed().unwrap();
        let path = self.dir.path().join(format!("{name}.creds"));
        write_creds(
            &path,
            &user_jwt(&self.account, &user.public_key(), name),
            &seed,
        );
        path
    }
}

#[tokio::test]
async fn a_worker_with_its_creds_file_registers_heartbeats_and_serves() {
    let op = OperatorServer::start().await;
    let url = op.server.url();
    // The server admits no anonymous client.
    assert!(async_nats::connect(&url).await.is_err());

    // The controller: another user of the same account.
    let controller_creds = op.user("controller");
    let mut controller_config = test_config(&url, "").nats;
    controller_config.auth = NatsAuth::CredsFile(controller_creds.clone());
    let controller = Controller::connect_with(
        &controller_config,
        async_nats::ConnectOptions::with_credentials_file(&controller_creds)
            .await
            .unwrap(),
    )
    .await;
    let mut registrations = controller.subscribe("worker.register").await;

    let creds = op.user("worker");
    let mut config = test_config(&url, "");
    config.nats.auth = NatsAuth::CredsFile(creds);
    let transport = connected(&config.nats, "connected with the creds file").await;
    let mut worker = RunningWorker::start_with(
        "w-creds",
        config.node.clone(),
        Arc::new(SimEngine::new(SimEngineConfig::default())),
        vec![],
        Arc::new(transport),
        Arc::new(SimProbe::new()),
    );
    worker.ready().await;

    let msg = within("the registration", registrations.next())
        .await
        .unwrap();
    let registration: WorkerRegistration = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(registration.worker_id, "w-creds");
    controller.heartbeat_where("w-creds", |_| true).await;
    let request =
        json!({"requestId": "r-creds", "modelId": "sim/tiny", "prompt": "Hello", "maxTokens": 3});
    let stream = controller.infer("w-creds", request).await;
    assert_complete(&stream, 3);
    assert_eq!(worker.stop().await.dispatch.abandoned, 0);
}

#[tokio::test]
async fn creds_the_server_cannot_trust_are_refused_and_the_seed_never_printed() {
    let op = OperatorServer::start().await;
    let url = op.server.url();
    let dir = tempfile::tempdir().unwrap();

    // A user signed by an account the server does not know.
    let stranger_account = KeyPair::new_account();
    let foreign = KeyPair::new_user();
    let foreign_seed = foreign.seed().unwrap();
    let foreign_creds = dir.path().join("foreign.creds");
    write_creds(
        &foreign_creds,
        &user_jwt(&stranger_account, &foreign.public_key(), "foreign"),
        &foreign_seed,
    );
    // A valid user JWT of the server's account, with the seed of another key.
    let genuine = op.user("genuine");
    let jwt = std::fs::read_to_string(&genuine)
        .unwrap()
        .lines()
        .nth(1)
        .unwrap()
        .to_owned();
    let impostor_seed = KeyPair::new_user().seed().unwrap();
    let mismatched_creds = dir.path().join("mismatched.creds");
    write_creds(&mismatched_creds, &jwt, &impostor_seed);

    for (case, creds, seed) in [
        ("foreign account", &foreign_creds, &foreign_seed),
        ("seed not the JWT's", &mismatched_creds, &impostor_seed),
    ] {
        // The library says the credentials were rejected, naming the server, not the seed.
        let mut config = test_config(&url, "");
        config.nats.auth = NatsAuth::CredsFile(creds.clone());
        let err = match within("a refusal", NatsTransport::connect(&config.nats)).await {
            Err(e @ ConnectError::Rejected { .. }) => e.to_string(),
            Err(other) => panic!("{case}: expected a rejection, got {other}"),
            Ok(_) => panic!("{case}: untrusted creds were accepted"),
        };
        assert!(err.contains(&url), "{case}: {err}");
        assert!(
            !err.contains(seed.as_str()),
            "{case}: the seed leaked: {err}"
        );

        // The binary stops at start-up with exit 77, the seed nowhere in its output.
        let creds = creds.to_str().unwrap();
        let Exited {
            code,
            stdout,
            stderr,
        } = run_until_exit(
            &worker_binary!(),
            case,
            &["--nats-url", &url, "--worker-id", "w-bad-creds"],
            &[("MLX_WORKER_NATS_CREDS_FILE", creds), ("RUST_LOG", "trace")],
        )
        .await;
        assert_eq!(code, Some(77), "{case}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "the message server at {url} rejected the credentials"
            )),
            "{case}: {stderr}"
        );
        // Logging at its most verbose (the client's own trace included), neither the seed
        // nor its body without the type prefix shows.
        assert!(
            stderr.contains("TRACE"),
            "{case}: not at trace level: {stderr}"
        );
        for printed in [&stdout, &stderr] {
            assert!(!printed.contains(seed.as_str()), "{case}: the seed leaked");
            assert!(!printed.contains(&seed[2..]), "{case}: the seed leaked");
        }
    }
}
