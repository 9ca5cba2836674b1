// Goal: workers are discoverable with the NATS services protocol, as `nats micro` does it:
// PING and INFO answer with the worker's id and endpoint, STATS with its figures.
// Method: a worker (simulated engine) on a real nats-server; a client sends requests to the
// $SRV subjects and decodes the answers with async-nats' own service types, not the project's.

use std::sync::Arc;

use async_nats::service::{Info, PingResponse, Stats};
use bytes::Bytes;
use mlx_worker_sim::{SimEngine, SimEngineConfig};
use serde_json::json;

use testkit::*;

#[tokio::test]
async fn ping_info_and_stats_describe_the_worker() {
    let server = NatsServer::start().await;
    let client = Controller::connect(&server.url()).await;
    let config = test_config(&server.url(), "");
    let engine = Arc::new(SimEngine::new(SimEngineConfig::default()));
    let worker = RunningWorker::start("w-srv", &config, engine, vec![]).await;

    let ask = |subject: &'static str| {
        let nats = client.nats.clone();
        async move {
            let msg = within(subject, nats.request(subject, Bytes::new()))
                .await
                .unwrap();
            msg.payload
        }
    };
    let ping: PingResponse = serde_json::from_slice(&ask("$SRV.PING.mlx-worker").await).unwrap();
    assert_eq!(ping.kind, "io.nats.micro.v1.ping_response");
    assert_eq!(
        (ping.name.as_str(), ping.id.as_str()),
        ("mlx-worker", "w-srv")
    );
    let info: Info = serde_json::from_slice(&ask("$SRV.INFO").await).unwrap();
    assert_eq!(info.kind, "io.nats.micro.v1.info_response");
    assert_eq!(info.id, "w-srv");
    assert_eq!(info.endpoints[0].subject, "worker.w-srv.inference");

    assert_complete(
        &client
            .infer(
                "w-srv",
                json!({"requestId": "s-1", "modelId": "sim/tiny", "prompt": "x", "maxTokens": 3}),
            )
            .await,
        3,
    );
    let stats: Stats = serde_json::from_slice(&ask("$SRV.STATS.mlx-worker.w-srv").await).unwrap();
    assert_eq!(stats.kind, "io.nats.micro.v1.stats_response");
    assert_eq!(stats.id, "w-srv");
    let endpoint = &stats.endpoints[0];
    assert_eq!(endpoint.requests, 1);
    assert_eq!(endpoint.errors, 0);
    assert!(endpoint.last_error.is_none());
    assert!(endpoint.processing_time > std::time::Duration::ZERO);
    let data = endpoint.data.as_ref().expect("the worker's figures");
    assert_eq!(data["tokensGenerated"], 3);
    assert_eq!(data["activeRequests"], 0);
    worker.stop().await;
}
