//! Cost of one token on the worker's hot path: encoding the `token` message
//! (`protocol::TokenMessage`, bounded by `limits::NATS_PAYLOAD_BYTES_MAX`) and handing it to
//! the production transport (`NatsTransport::publish`, no flush), against a real nats-server
//! on loopback started by the bench, with a subscriber draining the subject.
//!
//! The heartbeat's probe sample (`benches/probe.rs`) is measured against this figure.

use std::hint::black_box;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use mlx_worker::config;
use mlx_worker::protocol::{TokenMessage, encode};
use mlx_worker::transport::Transport;
use mlx_worker::transport::nats::NatsTransport;

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

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn publish_token(c: &mut Criterion) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let _server = Server(
        Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server on PATH (run ci/setup.sh)"),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let url = format!("nats://127.0.0.1:{port}");
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
