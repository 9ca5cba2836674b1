//! Cost of one token on the worker's hot path: encoding the `token` message
//! (`protocol::TokenMessage`, bounded by `limits::NATS_PAYLOAD_BYTES_MAX`) and handing it to
//! the production transport (`NatsTransport::publish`, no flush), against a real nats-server
//! on loopback started by the bench, with a subscriber draining the subject.
//!
//! The heartbeat's probe sample (`benches/probe.rs`) is measured against this figure.

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use mlx_worker::config;
use mlx_worker::protocol::{TokenMessage, encode};
use mlx_worker::transport::Transport;
use mlx_worker::transport::nats::NatsTransport;
use testkit::NatsServer;

fn encode_token(c: &mut Criterion) {
    c.bench_function("encode token message", |b| {
        b.iter(|| {
            encode(black_box(&TokenMessage::new(
                "3f1c1d52-8a0b-4b8e-9d7e-2f5d0c1b6a90",
                " Hello",
                42,
            )))
        })
    });
}

fn publish_token(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let server = rt.block_on(NatsServer::start());
    let url = server.url();
    let yaml = format!("nats:\n  serverUrl: {url}\n");
    let nats = config::from_yaml(&yaml, std::path::Path::new("bench.yaml"))
        .expect("config")
        .nats;
    let transport = rt.block_on(async {
        let t = NatsTransport::connect(&nats).await.expect("connect");
        let mut conn = t.connection();
        tokio::time::timeout(Duration::from_secs(10), conn.wait_for(|c| c.connected))
            .await
            .expect("connected in time")
            .expect("connection state");
        t
    });
    // A subscriber drains the subject, as a controller would.
    let mut sub = rt
        .block_on(transport.subscribe("response.bench".into(), None))
        .expect("subscribe");
    rt.spawn(async move { while sub.next().await.is_some() {} });
    let payload = Bytes::from(
        encode(&TokenMessage::new(
            "3f1c1d52-8a0b-4b8e-9d7e-2f5d0c1b6a90",
            " Hello",
            42,
        ))
        .expect("encode"),
    );
    c.bench_function("publish token message (NatsTransport, no flush)", |b| {
        b.to_async(&rt).iter(|| async {
            transport
                .publish("response.bench".into(), payload.clone())
                .await
                .expect("publish")
        })
    });
}

criterion_group!(benches, encode_token, publish_token);
criterion_main!(benches);
