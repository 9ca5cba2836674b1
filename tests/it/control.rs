// Goal: an operator runs a worker's models from outside, on its model control subject: lists
// them with their states, unloads, loads, pins and unpins them and has the directories
// rescanned, with `mlx-worker models <action> --worker <id>`; a model not on disk, an action
// on a model in use and a message that is no control request get coded refusals.
// Method: the worker binary serving the tiny model (preloaded) with the real runtime on a real
// nats-server; the CLI run as a user would, its JSON reply read; a raw message sent with the
// NATS client for the malformed case.

use bytes::Bytes;
use mlx_worker::protocol::control::{ControlReply, ModelState};
use serde_json::json;

use testkit::runtime::TINY;
use testkit::*;

/// Runs `mlx-worker models <args> --worker ctl`; its exit code and JSON reply.
async fn models(url: &str, args: &[&str]) -> (i32, ControlReply) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_mlx-worker"))
        .arg("models")
        .args(args)
        .args(["--worker", "ctl", "--nats-url", url])
        .output();
    let out = within("mlx-worker models", out).await.unwrap();
    let reply = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), reply)
}

fn state(reply: &ControlReply, model: &str) -> (ModelState, bool, bool) {
    let m = reply
        .models
        .iter()
        .find(|m| m.model_id == model)
        .unwrap_or_else(|| panic!("{model} listed: {reply:?}"));
    (m.state, m.preloaded, m.pinned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_lists_unloads_loads_and_pins_a_workers_models() {
    let server = NatsServer::start().await;
    let url = server.url();
    let client = Controller::connect(&url).await;
    let binary = WorkerProcess::serving_tiny(&worker_binary!(), &url, "ctl");
    client
        .heartbeat_where("ctl", |hb| {
            hb.metrics.models_loaded.contains(&TINY.to_owned())
        })
        .await;

    let (code, reply) = models(&url, &["list"]).await;
    assert!(code == 0 && reply.ok, "{reply:?}");
    assert_eq!(state(&reply, TINY), (ModelState::Loaded, true, false));

    let (code, reply) = models(&url, &["unload", TINY]).await;
    assert!(code == 0 && reply.ok, "{reply:?}");
    assert_eq!(state(&reply, TINY).0, ModelState::Available);
    let (code, reply) = models(&url, &["load", TINY]).await;
    assert!(code == 0 && reply.ok, "{reply:?}");
    assert_eq!(state(&reply, TINY).0, ModelState::Loaded);
    let (_, reply) = models(&url, &["pin", TINY]).await;
    assert_eq!(state(&reply, TINY), (ModelState::Loaded, true, true));
    let (_, reply) = models(&url, &["unpin", TINY]).await;
    assert!(!state(&reply, TINY).2, "{reply:?}");
    let (code, reply) = models(&url, &["rescan"]).await;
    assert!(
        code == 0 && reply.ok && reply.models.len() == 1,
        "{reply:?}"
    );

    // Refusals, each with its code and the models as they are.
    let (code, reply) = models(&url, &["load", "nobody/here"]).await;
    assert_eq!((code, reply.ok), (1, false));
    assert_eq!(reply.code.as_deref(), Some("MODEL_NOT_FOUND"));
    assert_eq!(state(&reply, TINY).0, ModelState::Loaded);
    let mut long = client.subscribe_response("ctl-long").await;
    let body = json!({"requestId": "ctl-long", "modelId": TINY, "prompt": "Hi", "maxTokens": 4000});
    client.send("ctl", &body).await;
    long.next(PATIENCE).await.unwrap();
    let (code, reply) = models(&url, &["unload", TINY]).await;
    assert_eq!((code, reply.code.as_deref()), (1, Some("INVALID_REQUEST")));
    assert!(
        reply
            .error
            .as_deref()
            .is_some_and(|e| e.contains("serves 1 request")),
        "{reply:?}"
    );
    client.cancel("ctl", "ctl-long").await;
    collect_stream(&mut long).await;
    let raw = within(
        "a reply to a malformed message",
        client.nats.request(
            "worker.ctl.models",
            Bytes::from_static(b"{\"op\":\"format\"}"),
        ),
    )
    .await
    .unwrap();
    let reply: ControlReply = serde_json::from_slice(&raw.payload).unwrap();
    assert_eq!(reply.code.as_deref(), Some("INVALID_REQUEST"));
    assert_eq!(binary.terminate().await, 0);
}
