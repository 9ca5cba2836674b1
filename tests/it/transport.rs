// Goal: the production transport's listener check is exact: it reports a subject nobody
// listens on without delivering anything, and delivers exactly once where somebody listens;
// several messages published in one call arrive in order, and the call stops at the first one
// refused, saying how many went before it.
// Method: a real nats-server, the NatsTransport, and a plain client as the listener.

use std::time::Duration;

use bytes::Bytes;
use mlx_worker::config;
use mlx_worker::limits::NATS_PAYLOAD_BYTES_MAX;
use mlx_worker::transport::{Transport, TransportError};

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

#[tokio::test]
async fn messages_published_in_one_call_arrive_in_order_up_to_the_first_refused() {
    let server = NatsServer::start().await;
    let config = test_config(&server.url(), "");
    let transport = connected(&config.nats, "connected").await;
    let client = Controller::connect(&server.url()).await;
    let mut sub = client.subscribe("response.many").await;

    let payloads = (0..5).map(|i| Bytes::from(format!("m{i}"))).collect();
    transport
        .publish_all("response.many", payloads)
        .await
        .unwrap();
    for i in 0..5 {
        let msg = within("the next message", sub.next()).await.unwrap();
        assert_eq!(&msg.payload[..], format!("m{i}").as_bytes());
    }

    let too_large = Bytes::from(vec![b'x'; NATS_PAYLOAD_BYTES_MAX + 1]);
    let stopped = transport
        .publish_all("response.many", vec!["a".into(), too_large, "b".into()])
        .await
        .unwrap_err();
    assert_eq!(stopped.sent, 1);
    assert!(
        matches!(stopped.error, TransportError::PayloadTooLarge { .. }),
        "{stopped}"
    );
    let msg = within("the message before the refused one", sub.next())
        .await
        .unwrap();
    assert_eq!(&msg.payload[..], b"a");
    transport.flush().await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(200), sub.next())
            .await
            .is_err(),
        "nothing after the refused message"
    );
}
