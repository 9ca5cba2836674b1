// Goal: the HTTP port tells operators the truth: /readyz is not ready before registration or
// during a drain, /healthz follows the process, and /metrics is valid Prometheus text whose
// counters move with traffic.
// Method: a worker (simulated engine) on a real nats-server, its observer served by the
// library's HTTP server on a free loopback port, and a plain TCP client.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use mlx_worker::transport::nats::NatsTransport;
use mlx_worker_sim::{SimEngine, SimEngineConfig, SimProbe};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use testkit::*;

/// GET `path`; returns the status code and the body.
async fn get(port: u16, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    within("an HTTP response", stream.read_to_string(&mut response))
        .await
        .unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap();
    (status, body)
}

/// Checks the Prometheus text format and returns every sample by its full name with labels.
fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    let mut typed = std::collections::BTreeSet::new();
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let name = parts.next().unwrap();
            let kind = parts.next().unwrap();
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            typed.insert(name.to_owned());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad name in {line:?}"
        );
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
            .unwrap_or(name);
        assert!(typed.contains(family), "sample before its TYPE: {line:?}");
        if let Some(labels) = series.strip_prefix(name) {
            assert!(
                labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')),
                "{line}"
            );
        }
        samples.insert(series.to_owned(), value);
    }
    samples
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics_follow_the_worker() {
    let server = NatsServer::start().await;
    let client = Controller::connect(&server.url()).await;
    let mut registrations = client.subscribe("worker.register").await;
    let config = test_config(&server.url(), "  drainTimeoutMs: 5000\n");
    let transport = Arc::new(NatsTransport::connect(&config.nats).await.unwrap());
    let engine = Arc::new(SimEngine::new(SimEngineConfig {
        token_latency: Duration::from_millis(20),
        ..SimEngineConfig::default()
    }));
    let worker = Arc::new(testkit::worker::build(
        "w-http",
        config.node.clone(),
        engine,
        vec![],
        transport,
        Arc::new(SimProbe::new()),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop_http = CancellationToken::new();
    let http = tokio::spawn(mlx_worker::http::serve(
        listener,
        worker.observer(),
        stop_http.clone(),
    ));

    assert_eq!(
        get(port, "/readyz").await.0,
        503,
        "not ready before it runs"
    );
    assert_eq!(get(port, "/healthz").await.0, 200);
    assert_eq!(get(port, "/nope").await.0, 404);

    let running = RunningWorker::spawn(worker.clone());
    within("the registration", registrations.next())
        .await
        .unwrap();
    let mut lifecycle = worker.lifecycle();
    within(
        "ready",
        lifecycle.wait_for(|s| *s == mlx_worker::lifecycle::Lifecycle::Ready),
    )
    .await
    .unwrap();
    assert_eq!(get(port, "/readyz").await, (200, "ready\n".to_owned()));

    let before = parse_prometheus(&get(port, "/metrics").await.1);
    let stream = client
        .infer(
            "w-http",
            json!({"requestId": "h-1", "modelId": "sim/tiny", "prompt": "x", "maxTokens": 5}),
        )
        .await;
    assert_complete(&stream, 5);
    let (status, text) = get(port, "/metrics").await;
    assert_eq!(status, 200);
    let after = parse_prometheus(&text);
    let ok = r#"mlx_worker_requests_total{model="sim/tiny",outcome="success"}"#;
    assert_eq!(before.get(ok), None);
    assert_eq!(after[ok], 1.0);
    assert_eq!(after["mlx_worker_tokens_generated_total"], 5.0);
    assert_eq!(after["mlx_worker_request_duration_seconds_count"], 1.0);
    assert_eq!(after["mlx_worker_inter_token_seconds_count"], 4.0);
    assert!(after["mlx_worker_heartbeats_sent_total"] >= 1.0);
    assert_eq!(after["mlx_worker_ready"], 1.0);

    // During a drain the worker is not ready.
    let mut slow = client.subscribe_response("h-slow").await;
    client
        .send(
            "w-http",
            &json!({"requestId": "h-slow", "modelId": "sim/tiny", "prompt": "x", "maxTokens": 100}),
        )
        .await;
    slow.next(PATIENCE).await.unwrap();
    let stopping = tokio::spawn(running.stop());
    within(
        "draining",
        lifecycle.wait_for(|s| *s == mlx_worker::lifecycle::Lifecycle::Draining),
    )
    .await
    .unwrap();
    assert_eq!(
        get(port, "/readyz").await.0,
        503,
        "not ready while draining"
    );
    within("the worker to stop", stopping).await.unwrap();
    assert_eq!(get(port, "/healthz").await.0, 503, "stopped");
    stop_http.cancel();
    http.await.unwrap();
}
