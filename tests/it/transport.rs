// Goal: the production transport's listener check is exact: it reports a subject nobody
// listens on without delivering anything, and delivers exactly once where somebody listens.
// Method: a real nats-server, the NatsTransport, and a plain client as the listener.

use std::time::Duration;

use mlx_worker::config;
use mlx_worker::transport::Transport;

use testkit::*;

#[tokio::test]
async fn the_listener_check_tells_an_empty_subject_from_a_listened_one() {
    let server = NatsServer::start().await;
    let config = test_config(&server.url(), "");
    let transport = connected(&config.nats, "connected").await;

    let heard = transport
        .publish_if_listened("response.nobody".into(), "x".into())
        .await
        .unwrap();
    assert!(!heard, "nobody listens on response.nobody");

    let client = Controller::connect(&server.url()).await;
    let mut sub = client.subscribe("response.somebody").await;
    let heard = transport
        .publish_if_listened("response.somebody".into(), "hello".into())
        .await
        .unwrap();
    assert!(heard);
    let msg = within("the message", sub.next()).await.unwrap();
    assert_eq!(&msg.payload[..], b"hello");
    assert!(
        tokio::time::timeout(Duration::from_millis(200), sub.next())
            .await
            .is_err(),
        "delivered exactly once"
    );
    let _ = config::DEFAULT_PORT;
}
