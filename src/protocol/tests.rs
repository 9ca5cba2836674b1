// Goal: pin the wire format byte for byte and prove that bad input becomes a named error.
// Method: insta JSON snapshots of every outbound message (ids and timestamps redacted),
// proptest encode → decode round trips, decoding of the messages captured from the existing
// TypeScript worker, and a table of invalid requests with their errors.

use std::collections::BTreeMap;
use std::time::Duration;

use proptest::prelude::*;
use serde_json::{Value, json};

use super::request::{RequestError, RequestLimits, ValidRequest, decode_cancel, decode_request};
use super::subject::{self, TokenError, check_token};
use super::*;

fn registration() -> WorkerRegistration {
    WorkerRegistration {
        worker_id: "4892b71a-5c1e-4c1b-9a57-0a4f1f8f3a11".to_owned(),
        hostname: "studio-1".to_owned(),
        ip: "192.0.2.2".to_owned(),
        port: 8080,
        skills: ModelSkills {
            available_models: vec!["mlx-community/Llama-3.2-3B-Instruct-4bit".to_owned()],
            model_paths: BTreeMap::from([(
                "mlx-community/Llama-3.2-3B-Instruct-4bit".to_owned(),
                "model/mlx-community/Llama-3.2-3B-Instruct-4bit".to_owned(),
            )]),
            total_model_size: 1_800_000_000,
            last_scanned: 1_795_724_486_672,
        },
        hardware: HardwareProfile {
            chip_model: "M2-Max".to_owned(),
            chip_generation: 2,
            variant: "Max".to_owned(),
            gpu_cores: 38,
            cpu_cores: 12,
            performance_cores: 8,
            efficiency_cores: 4,
            unified_memory_gb: 64.0,
            metal_version: "Metal 3".to_owned(),
            os_version: "14.5".to_owned(),
            detected_at: 1_795_724_486_600,
        },
        capabilities: WorkerCapabilities {
            max_concurrent: 3,
            supported_model_tiers: vec!["30B+".to_owned(), "<3B".to_owned()],
            available_memory_gb: 51.2,
        },
        tags: vec!["production".to_owned()],
        priority: 50,
        status: WorkerStatus::Online,
        timestamp: 1_795_724_486_673,
    }
}

fn heartbeat() -> WorkerHeartbeat {
    WorkerHeartbeat {
        worker_id: "4892b71a-5c1e-4c1b-9a57-0a4f1f8f3a11".to_owned(),
        status: WorkerStatus::Online,
        metrics: WorkerMetrics {
            cpu_usage_percent: 47.0,
            memory_used_gb: 0.6297,
            gpu_utilization_percent: 0.0,
            active_requests: 2,
            total_requests_handled: 10,
            avg_latency_ms: 2290.5,
            models_loaded: vec!["mlx-community/Llama-3.2-3B-Instruct-4bit".to_owned()],
            queue_depth: 1,
            queue_capacity: 100,
            inflight_capacity: 8,
            tokens_per_second: 41.5,
            models: vec![ModelMetrics {
                model_id: "mlx-community/Llama-3.2-3B-Instruct-4bit".to_owned(),
                batch_size: 8,
                running: 2,
                queued: 1,
                batch_occupancy: 0.25,
                prompt_tokens_per_second: 120.5,
                generation_tokens_per_second: 41.5,
                avg_prefill_ms: 35.25,
                cached_prompt_share: 0.67,
                prefix_cache_bytes: 4_194_304,
                prefix_cache_evictions: 1,
            }],
        },
        timestamp: 1_795_724_487_676,
    }
}

fn to_value<T: Serialize>(message: &T) -> Value {
    serde_json::from_slice(&encode(message).unwrap()).unwrap()
}

macro_rules! snapshot {
    ($name:literal, $message:expr) => {
        insta::assert_json_snapshot!($name, to_value(&$message), {
            ".workerId" => "[worker-id]",
            ".requestId" => "[request-id]",
            ".timestamp" => "[timestamp]",
            ".skills.lastScanned" => "[timestamp]",
            ".hardware.detectedAt" => "[timestamp]",
        })
    };
}

#[test]
fn every_outbound_message_keeps_its_wire_shape() {
    snapshot!("registration", registration());
    snapshot!("heartbeat", heartbeat());
    snapshot!(
        "deregistration",
        WorkerDeregistration {
            worker_id: "w-1".to_owned(),
            timestamp: 1
        }
    );
    snapshot!("token", TokenMessage::new("r-1", " w45", 1));
    snapshot!("done", DoneMessage::new("r-1", 4, 2290));
    // With the prompt's figures: two extra fields, which the controller's schema lets through.
    snapshot!(
        "done_with_prompt_figures",
        DoneMessage::new("r-1", 4, 2290).with_usage(Some((120, 96)))
    );
    snapshot!(
        "error",
        ErrorMessage::new(
            "r-1",
            ErrorCode::QueueFull,
            "queue is full (100 waiting, limit 100)"
        )
    );
    snapshot!(
        "error_without_id",
        ErrorMessage::anonymous(ErrorCode::InvalidRequest, "message is not a JSON object")
    );
    snapshot!(
        "cancel",
        CancelRequest {
            request_id: "r-1".to_owned()
        }
    );
    snapshot!(
        "inference_request_minimal",
        InferenceRequest {
            request_id: "r-1".to_owned(),
            model_id: "m".to_owned(),
            prompt: "Hello".to_owned(),
            max_tokens: None,
            temperature: None,
            top_p: None,
            session_id: None,
            stream: None,
            priority: None,
            timeout_ms: None,
        }
    );
}

#[test]
fn outbound_field_order_matches_the_existing_worker() {
    // The existing worker emits these byte sequences.
    let token = String::from_utf8(encode(&TokenMessage::new("r", "w41", 0)).unwrap()).unwrap();
    assert_eq!(
        token,
        r#"{"requestId":"r","type":"token","token":"w41","index":0}"#
    );
    let done = String::from_utf8(encode(&DoneMessage::new("r", 4, 2290)).unwrap()).unwrap();
    assert_eq!(
        done,
        r#"{"requestId":"r","type":"done","totalTokens":4,"latencyMs":2290}"#
    );
    let dereg = WorkerDeregistration {
        worker_id: "w".to_owned(),
        timestamp: 1_795_724_509_176,
    };
    assert_eq!(
        String::from_utf8(encode(&dereg).unwrap()).unwrap(),
        r#"{"workerId":"w","timestamp":1795724509176}"#
    );
}

#[test]
fn every_error_code_has_its_documented_wire_string() {
    for code in ErrorCode::ALL {
        let wire = serde_json::to_value(code).unwrap();
        assert_eq!(wire, Value::String(code.as_str().to_owned()));
        assert_eq!(serde_json::from_value::<ErrorCode>(wire).unwrap(), code);
    }
    insta::assert_snapshot!(
        "error_codes",
        ErrorCode::ALL.map(ErrorCode::as_str).join("\n")
    );
}

#[test]
fn captured_reference_messages_decode() {
    // Captured from the existing TypeScript worker on Linux (ids shortened in the document,
    // full UUIDs here).
    let register = r#"{"workerId":"4892b71a-0000-4000-8000-000000000000","hostname":"vm","ip":"192.0.2.2","port":8080,"skills":{"availableModels":[],"modelPaths":{},"totalModelSize":0,"lastScanned":1795724486672},"status":"online","timestamp":1795724486673}"#;
    let heartbeat = r#"{"workerId":"4892b71a-0000-4000-8000-000000000000","status":"online","metrics":{"cpuUsagePercent":47,"memoryUsedGB":0.6297,"gpuUtilizationPercent":0,"activeRequests":0,"totalRequestsHandled":0,"avgLatencyMs":0,"modelsLoaded":[]},"timestamp":1795724487676}"#;
    let deregister =
        r#"{"workerId":"4892b71a-0000-4000-8000-000000000000","timestamp":1795724509176}"#;

    // The reference registration lacks our extensions; its common part must read the same.
    let reg: Value = serde_json::from_str(register).unwrap();
    let skills: ModelSkills = serde_json::from_value(reg["skills"].clone()).unwrap();
    assert_eq!(skills.last_scanned, 1_795_724_486_672);
    assert_eq!(
        serde_json::from_value::<WorkerStatus>(reg["status"].clone()).unwrap(),
        WorkerStatus::Online
    );
    let ours = to_value(&registration());
    for key in reg.as_object().unwrap().keys() {
        assert!(ours.get(key).is_some(), "our registration lacks {key}");
    }

    let hb: Value = serde_json::from_str(heartbeat).unwrap();
    let ours = to_value(&self::heartbeat());
    for key in hb["metrics"].as_object().unwrap().keys() {
        assert!(ours["metrics"].get(key).is_some(), "our metrics lack {key}");
    }
    for key in hb.as_object().unwrap().keys() {
        assert!(ours.get(key).is_some(), "our heartbeat lacks {key}");
    }

    let d: WorkerDeregistration = serde_json::from_str(deregister).unwrap();
    assert_eq!(d.timestamp, 1_795_724_509_176);

    let stream = [
        r#"{"requestId":"64a66b9b","type":"token","token":"w41","index":0}"#,
        r#"{"requestId":"64a66b9b","type":"token","token":" w45","index":1}"#,
        r#"{"requestId":"64a66b9b","type":"done","totalTokens":4,"latencyMs":2290}"#,
    ];
    let decoded: Vec<StreamMessage> = stream
        .iter()
        .map(|s| serde_json::from_str(s).unwrap())
        .collect();
    assert_eq!(
        decoded[1],
        StreamMessage::Token {
            request_id: "64a66b9b".to_owned(),
            token: " w45".to_owned(),
            index: 1
        }
    );
    assert!(decoded[2].is_terminal());
    // The existing worker's own error code decodes too: codes are open strings for clients.
    let err: StreamMessage = serde_json::from_str(
        r#"{"requestId":"x","type":"error","error":"boom","code":"WORKER_ERROR"}"#,
    )
    .unwrap();
    assert!(err.is_terminal());
}

#[test]
fn a_request_as_the_controller_sends_it_is_accepted() {
    let payload = json!({
        "requestId": "3f1c1d52-8a0b-4b8e-9d7e-2f5d0c1b6a90",
        "modelId": "mlx-community/Llama-3.2-3B-Instruct-4bit",
        "prompt": "Hello\nHow are you?",
        "maxTokens": 10,
        "temperature": 0.7
    });
    let req = decode_request(payload.to_string().as_bytes(), &RequestLimits::default()).unwrap();
    assert_eq!(
        req,
        ValidRequest {
            request_id: "3f1c1d52-8a0b-4b8e-9d7e-2f5d0c1b6a90".to_owned(),
            model_id: "mlx-community/Llama-3.2-3B-Instruct-4bit".to_owned(),
            prompt: "Hello\nHow are you?".to_owned(),
            max_tokens: Some(10),
            temperature: Some(0.7),
            top_p: None,
            session_id: None,
            priority: Priority::Medium,
            timeout: None,
        }
    );
}

#[test]
fn optional_fields_and_priority_defaults_are_read() {
    let limits = RequestLimits::default();
    let decode = |v: Value| decode_request(v.to_string().as_bytes(), &limits).unwrap();
    let base = || json!({"requestId": "test-rr-0", "modelId": "m", "prompt": ""});

    let mut v = base();
    v["stream"] = json!(false);
    assert_eq!(decode(v).priority, Priority::High);

    let mut v = base();
    v["priority"] = json!("low");
    v["stream"] = json!(false);
    assert_eq!(decode(v).priority, Priority::Low);

    let mut v = base();
    v["timeoutMs"] = json!(1500);
    v["topP"] = json!(1);
    v["sessionId"] = json!("s-1");
    v["maxTokens"] = json!(10.0);
    v["unknownFutureField"] = json!({"a": 1});
    let r = decode(v);
    assert_eq!(r.timeout, Some(Duration::from_millis(1500)));
    assert_eq!(r.top_p, Some(1.0));
    assert_eq!(r.session_id.as_deref(), Some("s-1"));
    assert_eq!(r.max_tokens, Some(10));

    // `null` reads as absent, as JavaScript callers sometimes send it.
    let mut v = base();
    v["maxTokens"] = Value::Null;
    assert_eq!(decode(v).max_tokens, None);
}

/// One invalid request: its payload, whether its id is readable, the code and the message.
pub(super) fn check(
    payload: &[u8],
    limits: &RequestLimits,
    id: Option<&str>,
    code: ErrorCode,
    message: &str,
) {
    let rejection = decode_request(payload, limits).expect_err("must be rejected");
    assert_eq!(rejection.request_id.as_deref(), id, "{message}");
    assert_eq!(rejection.code(), code, "{message}");
    assert_eq!(rejection.error.to_string(), message);
}

#[test]
fn invalid_requests_are_rejected_with_a_named_field_value_and_limit() {
    let limits = RequestLimits {
        payload_bytes_max: 2048,
        prompt_bytes_max: 16,
        max_tokens_max: 100,
        timeout_max: Duration::from_secs(60),
    };
    let with = |field: &str, value: Value| {
        let mut v = json!({"requestId": "r-1", "modelId": "m", "prompt": "hi"});
        v[field] = value;
        v.to_string().into_bytes()
    };
    let without = |field: &str| {
        let mut v = json!({"requestId": "r-1", "modelId": "m", "prompt": "hi"});
        v.as_object_mut().unwrap().remove(field);
        v.to_string().into_bytes()
    };
    use ErrorCode::{InvalidRequest as Invalid, PayloadTooLarge as TooLarge};
    let r = Some("r-1");

    check(
        b"not json",
        &limits,
        None,
        Invalid,
        "message is not valid JSON: expected ident at line 1 column 2",
    );
    check(
        b"[1,2]",
        &limits,
        None,
        Invalid,
        "message is not a JSON object",
    );
    check(
        b"",
        &limits,
        None,
        Invalid,
        "message is not valid JSON: EOF while parsing a value at line 1 column 0",
    );
    check(
        &[b'['; 40],
        &limits,
        None,
        Invalid,
        "message nests deeper than 32 levels",
    );
    check(
        &without("requestId"),
        &limits,
        None,
        Invalid,
        "field \"requestId\" is missing",
    );
    check(
        &without("modelId"),
        &limits,
        r,
        Invalid,
        "field \"modelId\" is missing",
    );
    check(
        &without("prompt"),
        &limits,
        r,
        Invalid,
        "field \"prompt\" is missing",
    );
    check(
        &with("requestId", json!(7)),
        &limits,
        None,
        Invalid,
        "field \"requestId\" is a number (7), expected a string",
    );
    check(
        &with("requestId", json!("")),
        &limits,
        None,
        Invalid,
        "field \"requestId\" is empty",
    );
    check(
        &with("requestId", json!("a.b")),
        &limits,
        None,
        Invalid,
        "field \"requestId\" contains '.', which cannot appear in a NATS subject token",
    );
    check(
        &with("requestId", json!("a>")),
        &limits,
        None,
        Invalid,
        "field \"requestId\" contains '>', which cannot appear in a NATS subject token",
    );
    check(
        &with("requestId", json!("a b")),
        &limits,
        None,
        Invalid,
        "field \"requestId\" contains ' ', which cannot appear in a NATS subject token",
    );
    check(
        &with("requestId", json!("x".repeat(129))),
        &limits,
        None,
        Invalid,
        "field \"requestId\" is 129 bytes, limit 128",
    );
    check(
        &with("modelId", json!("")),
        &limits,
        r,
        Invalid,
        "field \"modelId\" is empty",
    );
    check(
        &with("modelId", json!("a b")),
        &limits,
        r,
        Invalid,
        "field \"modelId\" contains ' '; allowed are letters, digits and _ - . / @ :",
    );
    check(
        &with("prompt", json!(["hi"])),
        &limits,
        r,
        Invalid,
        "field \"prompt\" is an array ([\"hi\"]), expected a string",
    );
    check(
        &with("prompt", json!("x".repeat(17))),
        &limits,
        r,
        TooLarge,
        "field \"prompt\" is 17 bytes, limit 16",
    );
    check(
        &with("maxTokens", json!(0)),
        &limits,
        r,
        Invalid,
        "field \"maxTokens\" is 0, must be between 1 and 100",
    );
    check(
        &with("maxTokens", json!(101)),
        &limits,
        r,
        Invalid,
        "field \"maxTokens\" is 101, must be between 1 and 100",
    );
    check(
        &with("maxTokens", json!(-5)),
        &limits,
        r,
        Invalid,
        "field \"maxTokens\" is -5, must be a non-negative integer",
    );
    check(
        &with("maxTokens", json!(2.5)),
        &limits,
        r,
        Invalid,
        "field \"maxTokens\" is a number (2.5), expected an integer",
    );
    check(
        &with("maxTokens", json!("10")),
        &limits,
        r,
        Invalid,
        "field \"maxTokens\" is a string (\"10\"), expected an integer",
    );
    check(
        &with("temperature", json!(2.5)),
        &limits,
        r,
        Invalid,
        "field \"temperature\" is 2.5, must be between 0 and 2",
    );
    check(
        &with("temperature", json!(-0.1)),
        &limits,
        r,
        Invalid,
        "field \"temperature\" is -0.1, must be between 0 and 2",
    );
    check(
        &with("topP", json!(0)),
        &limits,
        r,
        Invalid,
        "field \"topP\" is 0, must be greater than 0 and at most 1",
    );
    check(
        &with("topP", json!(1.5)),
        &limits,
        r,
        Invalid,
        "field \"topP\" is 1.5, must be greater than 0 and at most 1",
    );
    check(
        &with("stream", json!("yes")),
        &limits,
        r,
        Invalid,
        "field \"stream\" is a string (\"yes\"), expected a boolean",
    );
    check(
        &with("priority", json!("urgent")),
        &limits,
        r,
        Invalid,
        "field \"priority\" is \"urgent\", expected \"high\", \"medium\" or \"low\"",
    );
    check(
        &with("sessionId", json!("s.1")),
        &limits,
        r,
        Invalid,
        "field \"sessionId\" contains '.', which cannot appear in a NATS subject token",
    );
    check(
        &with("timeoutMs", json!(0)),
        &limits,
        r,
        Invalid,
        "field \"timeoutMs\" is 0, must be between 1 and 60000",
    );
    check(
        &with("timeoutMs", json!(60001)),
        &limits,
        r,
        Invalid,
        "field \"timeoutMs\" is 60001, must be between 1 and 60000",
    );
    let big = with("prompt", json!("x".repeat(3000)));
    check(
        &big,
        &limits,
        r,
        TooLarge,
        &format!("message is {} bytes, limit 2048", big.len()),
    );
}

#[test]
fn cancel_messages_name_one_readable_request() {
    assert_eq!(decode_cancel(br#"{"requestId":"r-1"}"#).unwrap(), "r-1");
    assert_eq!(
        decode_cancel(br#"{"requestId":"r.1"}"#)
            .unwrap_err()
            .to_string(),
        "field \"requestId\" contains '.', which cannot appear in a NATS subject token"
    );
    assert_eq!(
        decode_cancel(b"{}").unwrap_err().to_string(),
        "field \"requestId\" is missing"
    );
}

#[test]
fn subjects_are_built_in_one_place() {
    assert_eq!(subject::REGISTER, "worker.register");
    assert_eq!(subject::HEARTBEAT, "worker.heartbeat");
    assert_eq!(subject::DEREGISTER, "worker.deregister");
    assert_eq!(subject::inference("w-1"), "worker.w-1.inference");
    assert_eq!(subject::cancel("w-1"), "worker.w-1.cancel");
    assert_eq!(subject::response("test-rr-0"), "response.test-rr-0");
    assert_eq!(
        check_token("*"),
        Err(TokenError::BadCharacter { found: '*' })
    );
    assert_eq!(
        check_token("a\u{7}"),
        Err(TokenError::BadCharacter { found: '\u{7}' })
    );
}

#[test]
fn model_ids_map_to_one_subject_token_and_back() {
    let check = |id: &str, token: &str| {
        assert_eq!(subject::model_token(id), token);
        assert_eq!(subject::model_id_from_token(token).as_deref(), Some(id));
        assert!(check_token(token).is_ok());
    };
    check("mlx-worker/tiny-llama", "mlx-worker_2Ftiny-llama");
    check(
        "mlx-community/Llama-3.2-1B",
        "mlx-community_2FLlama-3_2E2-1B",
    );
    check("a_b:c@d", "a_5Fb_3Ac_40d");
    assert_eq!(subject::model_inference("org/m"), "inference.org_2Fm");
    // Not the image of any id: lowercase hex, an escaped plain byte, a bare underscore.
    assert_eq!(subject::model_id_from_token("a_2f"), None);
    assert_eq!(subject::model_id_from_token("_41"), None);
    assert_eq!(subject::model_id_from_token("a_"), None);
}

proptest! {
    #[test]
    fn every_model_id_round_trips_through_its_token(id in any::<String>()) {
        let token = subject::model_token(&id);
        prop_assert!(token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        prop_assert_eq!(subject::model_id_from_token(&token), Some(id));
    }
}

fn arb_token() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_-]{1,40}"
}

fn arb_request() -> impl Strategy<Value = InferenceRequest> {
    (
        arb_token(),
        "[A-Za-z0-9_./@:-]{1,60}",
        any::<String>(),
        proptest::option::of(1u32..=MAX_TOKENS),
        proptest::option::of(0.0f64..=2.0),
        proptest::option::of(0.001f64..=1.0),
        proptest::option::of(arb_token()),
        proptest::option::of(any::<bool>()),
        proptest::option::of(proptest::sample::select(Priority::ALL.to_vec())),
        proptest::option::of(1u64..=3_600_000),
    )
        .prop_map(
            |(
                request_id,
                model_id,
                prompt,
                max_tokens,
                temperature,
                top_p,
                session_id,
                stream,
                priority,
                timeout_ms,
            )| {
                InferenceRequest {
                    request_id,
                    model_id,
                    prompt,
                    max_tokens,
                    temperature,
                    top_p,
                    session_id,
                    stream,
                    priority,
                    timeout_ms,
                }
            },
        )
}

const MAX_TOKENS: u32 = crate::limits::MAX_TOKENS_MAX;

proptest! {
    #[test]
    fn valid_requests_survive_encode_then_decode(req in arb_request()) {
        let bytes = encode(&req).unwrap();
        let got = decode_request(&bytes, &RequestLimits::default()).unwrap();
        prop_assert_eq!(&got.request_id, &req.request_id);
        prop_assert_eq!(&got.model_id, &req.model_id);
        prop_assert_eq!(&got.prompt, &req.prompt);
        prop_assert_eq!(got.max_tokens, req.max_tokens);
        prop_assert_eq!(got.temperature, req.temperature);
        prop_assert_eq!(got.top_p, req.top_p);
        prop_assert_eq!(&got.session_id, &req.session_id);
        prop_assert_eq!(got.timeout, req.timeout_ms.map(Duration::from_millis));
        let expected_priority = req.priority.unwrap_or(if req.stream == Some(false) {
            Priority::High
        } else {
            Priority::Medium
        });
        prop_assert_eq!(got.priority, expected_priority);
    }

    #[test]
    fn stream_messages_survive_encode_then_decode(
        id in arb_token(), token in any::<String>(), index in any::<u64>(),
        total in any::<u64>(), latency in any::<u64>(), text in any::<String>(),
        code in proptest::sample::select(ErrorCode::ALL.to_vec()),
    ) {
        let t: StreamMessage = serde_json::from_slice(&encode(&TokenMessage::new(&id, &token, index)).unwrap()).unwrap();
        prop_assert_eq!(t, StreamMessage::Token { request_id: id.clone(), token, index });
        let d: StreamMessage = serde_json::from_slice(&encode(&DoneMessage::new(&id, total, latency)).unwrap()).unwrap();
        prop_assert_eq!(d, StreamMessage::Done { request_id: id.clone(), total_tokens: total, latency_ms: latency, prompt_tokens: None, cached_tokens: None });
        let e: StreamMessage = serde_json::from_slice(&encode(&ErrorMessage::new(&id, code, &text)).unwrap()).unwrap();
        prop_assert_eq!(e, StreamMessage::Error { request_id: Some(id), error: text, code: code.as_str().to_owned() });
    }

    #[test]
    fn registrations_and_heartbeats_survive_encode_then_decode(
        models in proptest::collection::vec("[a-z/._-]{1,30}", 0..5),
        active in any::<u32>(), handled in any::<u64>(), ts in any::<u64>(),
    ) {
        let mut r = registration();
        r.skills.available_models = models.clone();
        r.timestamp = ts;
        let back: WorkerRegistration = serde_json::from_slice(&encode(&r).unwrap()).unwrap();
        prop_assert_eq!(back, r);
        let mut h = heartbeat();
        h.metrics.active_requests = active;
        h.metrics.total_requests_handled = handled;
        h.metrics.models_loaded = models;
        let back: WorkerHeartbeat = serde_json::from_slice(&encode(&h).unwrap()).unwrap();
        prop_assert_eq!(back, h);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_request(&bytes, &RequestLimits::default());
        let _ = decode_cancel(&bytes);
    }
}

#[test]
fn rejection_keeps_the_id_when_it_is_readable() {
    let e = decode_request(
        br#"{"requestId":"r-9","modelId":"m"}"#,
        &RequestLimits::default(),
    )
    .unwrap_err();
    assert_eq!(e.request_id.as_deref(), Some("r-9"));
    assert_eq!(e.error, RequestError::Missing { field: "prompt" });
}
