// Goal: the HTTP port tells operators the truth: /readyz is not ready before registration or
// during a drain, /healthz follows the process, and /metrics is valid Prometheus text whose
// counters move with traffic.
// Method: a worker (simulated engine) on a real nats-server, its observer served by the
// library's HTTP server on a free loopback port, and a plain TCP client; /metrics is read
// with a Prometheus text-format parser (prometheus-parse), not the project's own code.

use std::sync::Arc;
use std::time::Duration;

use mlx_worker::transport::nats::NatsTransport;
use mlx_worker_sim::{SimEngine, SimEngineConfig, SimProbe};
use prometheus_parse::{LineInfo, SampleType, Scrape, Value};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use testkit::*;

/// GET `path` from the worker's HTTP port on the loopback address; the status and the body.
async fn get(port: u16, path: &str) -> (u16, String) {
    get_from(("127.0.0.1", port), path).await.unwrap()
}

/// GET `path` from `addr` in HTTP/1.0, so the server sends the body whole and closes; the
/// status and the body, or why the connection failed.
pub(crate) async fn get_from(
    addr: impl tokio::net::ToSocketAddrs,
    path: &str,
) -> std::io::Result<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    within("an HTTP response", stream.read_to_string(&mut response)).await?;
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap();
    Ok((status, body))
}

/// Parses `/metrics` with a Prometheus text-format parser, and checks that it understood
/// every line: each is a help line, a type line of a known kind, or a sample whose value parses;
/// the only untyped samples are the `_sum` and `_count` of a histogram.
pub(crate) fn parse_prometheus(text: &str) -> Scrape {
    for line in text.lines() {
        match LineInfo::parse(line) {
            LineInfo::Doc { .. } => {}
            LineInfo::Type { sample_type, .. } => assert!(
                matches!(
                    sample_type,
                    SampleType::Counter | SampleType::Gauge | SampleType::Histogram
                ),
                "{line}"
            ),
            LineInfo::Sample { value, .. } => {
                assert!(value.parse::<f64>().is_ok(), "bad value in {line:?}")
            }
            LineInfo::Empty | LineInfo::Ignored => panic!("not Prometheus text: {line:?}"),
        }
    }
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    let histograms: Vec<&str> = scrape
        .samples
        .iter()
        .filter(|s| matches!(s.value, Value::Histogram(_)))
        .map(|s| s.metric.as_str())
        .collect();
    for sample in &scrape.samples {
        if let Value::Untyped(_) = sample.value {
            let family = ["_sum", "_count"]
                .iter()
                .find_map(|suffix| sample.metric.strip_suffix(suffix));
            assert!(
                family.is_some_and(|f| histograms.contains(&f)),
                "sample without a type: {}",
                sample.metric
            );
        }
    }
    scrape
}

/// The value of the sample `name` with exactly `labels`, if the scrape has it.
pub(crate) fn sample(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let found = scrape.samples.iter().find(|s| {
        s.metric == name
            && s.labels.len() == labels.len()
            && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
    })?;
    match found.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(v),
        Value::Histogram(_) | Value::Summary(_) => panic!("{name} is not a single number"),
    }
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
    let ok = [("model", "sim/tiny"), ("outcome", "success")];
    assert_eq!(sample(&before, "mlx_worker_requests_total", &ok), None);
    assert_eq!(sample(&after, "mlx_worker_requests_total", &ok), Some(1.0));
    let value = |name: &str| {
        sample(&after, name, &[]).unwrap_or_else(|| panic!("no sample {name} in {text}"))
    };
    assert_eq!(value("mlx_worker_tokens_generated_total"), 5.0);
    assert_eq!(value("mlx_worker_request_duration_seconds_count"), 1.0);
    assert_eq!(value("mlx_worker_inter_token_seconds_count"), 4.0);
    assert!(value("mlx_worker_heartbeats_sent_total") >= 1.0);
    assert_eq!(value("mlx_worker_ready"), 1.0);

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
