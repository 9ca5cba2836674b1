// Goal: a request whose id can be read gets exactly one terminal on `response.{id}` even when
// its body does not parse, and a prompt that cuts an emoji in half is served.
// Method: the worker binary serving the tiny model on a real nats-server; each body goes out
// without a reply subject, as the controller sends it, to a client already subscribed to its
// response subject; after the last terminal, each subject must stay quiet.

use std::time::Duration;

use bytes::Bytes;
use mlx_worker::protocol::StreamMessage;

use testkit::runtime::TINY;
use testkit::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_body_with_a_readable_id_ends_with_one_terminal() {
    let _ = crate::engine::engine_config(); // fails clearly when setup has not run
    let server = NatsServer::start().await;
    let client = Controller::connect(&server.url()).await;
    let mut registrations = client.subscribe("worker.register").await;
    let _worker = WorkerProcess::serving_tiny(&worker_binary!(), &server.url(), "bodies");
    within("the registration", registrations.next())
        .await
        .unwrap();

    let body = |id: &str, prompt: &str, extra: &str| {
        format!(
            r#"{{"requestId":"{id}","modelId":"{TINY}","prompt":"{prompt}","maxTokens":3{extra}}}"#
        )
        .into_bytes()
    };
    // `JSON.stringify` of a string cut after the first half of an emoji.
    let surrogate = body("b-surrogate", r"hi \ud83d", "");
    let mut utf8 = body("b-utf8", "hi ", "");
    let bad_byte = utf8.len() - r#"","maxTokens":3}"#.len();
    utf8.insert(bad_byte, 0xFF);
    let deep = body(
        "b-deep",
        "hi",
        &format!(r#","x":{}{}"#, "[".repeat(33), "]".repeat(33)),
    );
    let utf8_error = format!("invalid UTF-8 in the body at byte {bad_byte}");
    let cases = [
        ("b-surrogate", surrogate, None),
        ("b-utf8", utf8, Some(utf8_error.as_str())),
        ("b-deep", deep, Some("message nests deeper than 32 levels")),
    ];

    let mut quiet = Vec::new();
    for (id, payload, refusal) in cases {
        let mut sub = client.subscribe_response(id).await;
        client.send_raw("bodies", Bytes::from(payload)).await;
        let stream = collect_stream(&mut sub).await;
        match refusal {
            None => {
                assert_done(&stream);
                assert!(stream.len() > 1, "{id}: the model generated: {stream:?}");
            }
            Some(expected) => match stream.as_slice() {
                [
                    StreamMessage::Error {
                        request_id,
                        error,
                        code,
                    },
                ] => {
                    assert_eq!(request_id.as_deref(), Some(id));
                    assert_eq!(code, "INVALID_REQUEST", "{id}");
                    assert_eq!(error, expected, "{id}");
                }
                other => panic!("{id}: expected one INVALID_REQUEST, got {other:?}"),
            },
        }
        quiet.push((id, sub));
    }
    // A second terminal would follow the first at once; nothing comes.
    for (id, mut sub) in quiet {
        if let Err(late) = sub.confirm_quiet(Duration::from_millis(300)).await {
            panic!("{id}: a message after the terminal: {late}");
        }
    }
}
