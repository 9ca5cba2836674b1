//! Fuzz harnesses for mlx-worker's untrusted inputs.
//!
//! One function per target. Each takes arbitrary bytes, must not panic whatever they are, and
//! checks what the code under test promises about its output. The `cargo fuzz` targets in
//! `fuzz_targets/` call these functions, and the stable test `tests/fuzz_corpus.rs` includes
//! this file as a module and replays every committed corpus and regression input through the
//! very same functions.

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use mlx_worker::config::{WorkerConfig, from_yaml};
use mlx_worker::engine::rpc::{LINE_CAP, Line, decode_line, read_line};
use mlx_worker::limits::{
    INFLIGHT_REQUESTS_MAX, MAX_TOKENS_MAX, MODEL_ID_BYTES_MAX, NATS_PAYLOAD_BYTES_MAX,
    PROMPT_BYTES_MAX, QUEUE_DEPTH_MAX, REQUEST_TIMEOUT_MAX, TAG_BYTES_MAX, TAGS_MAX,
};
use mlx_worker::protocol::Priority;
use mlx_worker::protocol::request::{RequestLimits, ValidRequest, decode_cancel, decode_request};
use mlx_worker::protocol::subject::check_token;

/// Limits far below the defaults, so that short inputs reach the size checks too.
const TIGHT_LIMITS: RequestLimits = RequestLimits {
    payload_bytes_max: 256,
    prompt_bytes_max: 16,
    max_tokens_max: 64,
    timeout_max: Duration::from_secs(1),
};

/// Largest cancel message `decode_cancel` accepts.
const CANCEL_BYTES_MAX: usize = 4096;

/// Target `request_decoder`: an inference request or a cancel message as it arrives from NATS.
///
/// Runs `decode_request` under the default and under tight limits, and `decode_cancel`. An
/// accepted request must satisfy every bound it was checked against, and must decode to itself
/// again once re-encoded; a rejection may only carry a request id that is a safe subject token.
pub fn request_decoder(data: &[u8]) {
    for limits in [RequestLimits::default(), TIGHT_LIMITS] {
        match decode_request(data, &limits) {
            Ok(request) => {
                assert!(
                    data.len() <= limits.payload_bytes_max,
                    "payload over the limit"
                );
                check_valid_request(&request, &limits);
                check_request_round_trip(&request, &limits);
            }
            Err(rejection) => {
                if let Some(id) = &rejection.request_id {
                    assert!(
                        check_token(id).is_ok(),
                        "rejection carries unsafe id {id:?}"
                    );
                }
                // The messages are sent back to the client: they must render.
                let _ = rejection.error.to_string();
                let _ = rejection.code();
            }
        }
    }
    match decode_cancel(data) {
        Ok(id) => {
            assert!(
                data.len() <= CANCEL_BYTES_MAX,
                "cancel payload over the limit"
            );
            assert!(check_token(&id).is_ok(), "cancel names unsafe id {id:?}");
        }
        Err(error) => {
            let _ = error.to_string();
        }
    }
}

fn check_valid_request(request: &ValidRequest, limits: &RequestLimits) {
    assert!(
        check_token(&request.request_id).is_ok(),
        "unsafe request id"
    );
    assert!(!request.model_id.is_empty(), "empty model id");
    assert!(
        request.model_id.len() <= MODEL_ID_BYTES_MAX,
        "model id too long"
    );
    assert!(
        request.prompt.len() <= limits.prompt_bytes_max,
        "prompt over the limit"
    );
    if let Some(n) = request.max_tokens {
        assert!(
            (1..=limits.max_tokens_max).contains(&n),
            "maxTokens {n} out of range"
        );
    }
    if let Some(t) = request.temperature {
        assert!((0.0..=2.0).contains(&t), "temperature {t} out of range");
    }
    if let Some(p) = request.top_p {
        assert!(p > 0.0 && p <= 1.0, "topP {p} out of range");
    }
    if let Some(session) = &request.session_id {
        assert!(check_token(session).is_ok(), "unsafe session id");
    }
    if let Some(timeout) = request.timeout {
        assert!(
            timeout >= Duration::from_millis(1) && timeout <= limits.timeout_max,
            "timeout {timeout:?} out of range"
        );
    }
}

/// Re-encodes an accepted request with every field explicit and checks it decodes the same.
fn check_request_round_trip(request: &ValidRequest, limits: &RequestLimits) {
    let priority = match request.priority {
        Priority::High => "high",
        Priority::Medium => "medium",
        Priority::Low => "low",
    };
    let timeout_ms = request
        .timeout
        .map(|t| u64::try_from(t.as_millis()).expect("an accepted timeout fits in u64 ms"));
    let encoded = serde_json::json!({
        "requestId": request.request_id,
        "modelId": request.model_id,
        "prompt": request.prompt,
        "maxTokens": request.max_tokens,
        "temperature": request.temperature,
        "topP": request.top_p,
        "sessionId": request.session_id,
        "priority": priority,
        "timeoutMs": timeout_ms,
    })
    .to_string();
    // The explicit form can be longer than the original message: lift only the payload bound.
    let roomy = RequestLimits {
        payload_bytes_max: NATS_PAYLOAD_BYTES_MAX,
        ..*limits
    };
    match decode_request(encoded.as_bytes(), &roomy) {
        Ok(again) => assert_eq!(&again, request, "re-encoded request decodes differently"),
        Err(rejection) => panic!("re-encoded request is rejected: {rejection:?}"),
    }
}

/// Target `rpc_line`: the MLX runtime's stdout, read line by line and classified.
///
/// The first two bytes choose a line cap (0 to 63 bytes) and the reader's buffer size (1 to 16
/// bytes), so lines cross buffer boundaries and exceed the cap in every way; the rest is the
/// stream. `read_line` must return exactly what a plain split on `\n` gives (lines over the cap
/// as `TooLong` with their length), never a line over the cap, and then `Eof`. Every complete
/// line, and the whole input, then goes through `decode_line`. The stream is also read once
/// more with the production cap.
pub fn rpc_line(data: &[u8]) {
    let _ = decode_line(data);
    let (cap, capacity, stream) = match data {
        [a, b, rest @ ..] => (usize::from(a % 64), usize::from(b % 16) + 1, rest),
        _ => (LINE_CAP, 8, data),
    };
    let lines = read_all_lines(stream, capacity, cap);
    assert_eq!(
        lines,
        expected_lines(stream, cap),
        "cap {cap}, buffer {capacity}"
    );
    for line in &lines {
        if let Line::Complete(bytes) = line {
            assert!(
                bytes.len() <= cap,
                "line of {} bytes over cap {cap}",
                bytes.len()
            );
            if let Ok(inbound) = decode_line(bytes) {
                let _ = format!("{inbound:?}");
            }
        }
    }
    let lines = read_all_lines(stream, 8 * 1024, LINE_CAP);
    assert_eq!(lines, expected_lines(stream, LINE_CAP), "production cap");
}

/// One current-thread runtime for the whole process (building one per input is slow).
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime builds")
    })
}

/// Calls `read_line` until `Eof`, over an in-memory reader with a `capacity`-byte buffer.
fn read_all_lines(stream: &[u8], capacity: usize, cap: usize) -> Vec<Line> {
    runtime().block_on(async {
        let mut reader = tokio::io::BufReader::with_capacity(capacity, stream);
        let mut buf = Vec::new();
        let mut lines = Vec::new();
        // Every call but the last consumes at least one byte.
        for _ in 0..=stream.len() {
            let line = read_line(&mut reader, &mut buf, cap)
                .await
                .expect("reading from memory does not fail");
            assert!(
                buf.len() <= cap,
                "reader holds {} bytes over cap {cap}",
                buf.len()
            );
            let eof = line == Line::Eof;
            lines.push(line);
            if eof {
                return lines;
            }
        }
        panic!(
            "read_line did not reach Eof after {} calls",
            stream.len() + 1
        )
    })
}

/// What `read_line` should return on `stream`: a plain split on `\n`, where a final line needs
/// no newline and a line over `cap` is reported by its length.
fn expected_lines(stream: &[u8], cap: usize) -> Vec<Line> {
    let mut pieces: Vec<&[u8]> = stream.split(|&b| b == b'\n').collect();
    if pieces.last().is_some_and(|last| last.is_empty()) {
        pieces.pop();
    }
    pieces
        .into_iter()
        .map(|piece| {
            if piece.len() > cap {
                Line::TooLong { len: piece.len() }
            } else {
                Line::Complete(piece.to_vec())
            }
        })
        .chain([Line::Eof])
        .collect()
}

/// Target `config_loader`: a configuration file, as text (invalid UTF-8 replaced).
///
/// `from_yaml` must return a configuration or an error, and an accepted configuration must hold
/// every bound the worker relies on.
pub fn config_loader(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match from_yaml(&text, Path::new("fuzz.yaml")) {
        Ok(config) => check_config(&config),
        Err(error) => {
            let _ = error.to_string();
        }
    }
}

fn check_config(config: &WorkerConfig) {
    let node = &config.node;
    if let Some(id) = &node.worker_id {
        assert!(check_token(id).is_ok(), "unsafe worker id {id:?}");
    }
    assert!(node.tags.len() <= TAGS_MAX, "too many tags");
    assert!(
        node.tags
            .iter()
            .all(|t| !t.is_empty() && t.len() <= TAG_BYTES_MAX),
        "bad tag"
    );
    assert!(node.priority <= 100, "priority over 100");
    assert!(node.reregister_every >= 1, "reregister every 0 heartbeats");
    assert!(
        node.request_timeout <= REQUEST_TIMEOUT_MAX,
        "request timeout over the limit"
    );
    assert!(
        (1..=QUEUE_DEPTH_MAX).contains(&node.queue_depth_max),
        "queue depth out of range"
    );
    if let Some(n) = node.inflight_max {
        assert!(
            (1..=INFLIGHT_REQUESTS_MAX).contains(&n),
            "maxConcurrent out of range"
        );
    }
    for limit in node.tier_limits.values() {
        assert!((1..=INFLIGHT_REQUESTS_MAX).contains(&limit.max_concurrent));
        assert!(limit.queue_depth <= QUEUE_DEPTH_MAX);
    }
    let limits = &node.request_limits;
    assert!(limits.payload_bytes_max <= NATS_PAYLOAD_BYTES_MAX);
    assert!((1..=PROMPT_BYTES_MAX).contains(&limits.prompt_bytes_max));
    assert!((1..=MAX_TOKENS_MAX).contains(&limits.max_tokens_max));
    let defaults = &node.generation_defaults;
    assert!((1..=limits.max_tokens_max).contains(&defaults.max_tokens));
    assert!((0.0..=2.0).contains(&defaults.temperature));
    assert!(defaults.top_p > 0.0 && defaults.top_p <= 1.0);
    assert!(node.degraded_error_ratio > 0.0 && node.degraded_error_ratio <= 1.0);
    assert!(!config.nats.servers.is_empty(), "no NATS server");
    assert!(
        config
            .nats
            .servers
            .iter()
            .all(|s| !s.is_empty() && !s.chars().any(char::is_whitespace)),
        "bad NATS URL"
    );
    assert!(
        !config.engine.preload.iter().any(String::is_empty),
        "empty preload id"
    );
    assert!(!config.logging.level.trim().is_empty(), "empty log level");
}
