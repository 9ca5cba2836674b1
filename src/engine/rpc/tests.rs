// Goal: every line shape of both runtimes (the existing mlx-serving one and ours) classifies
// correctly, every call the worker makes goes out as the same bytes, results are read
// field by field, requests never exceed what the runtime reads, and the line reader is bounded.
// Method: lines captured from the runtimes' documented wire format, insta snapshots of every
// frame the worker sends, results in both runtimes' shapes and in wrong ones, and the reader
// fed from in-memory buffers, including arbitrary bytes.

use proptest::prelude::*;
use serde_json::json;

use super::*;

#[test]
fn requests_encode_as_one_json_line() {
    let line = encode_request(3, "generate", &json!({"model_id": "m", "prompt": "a\nb"})).unwrap();
    insta::assert_snapshot!(String::from_utf8(line).unwrap(), @r#"{"jsonrpc":"2.0","method":"generate","params":{"model_id":"m","prompt":"a\nb"},"id":3}
"#);
    let big = json!({"prompt": "x".repeat(RPC_REQUEST_BYTES_MAX)});
    assert!(matches!(
        encode_request(1, "generate", &big),
        Err(EncodeError::TooLarge { .. })
    ));
}

/// The line a call goes out as: one JSON document and its newline.
fn frame<C: Call>(id: u64, call: &C) -> String {
    let line = String::from_utf8(encode_call(id, call).unwrap()).unwrap();
    assert_eq!(line.find('\n'), Some(line.len() - 1), "{line}");
    line
}

const MODEL: &str = "mlx-worker/tiny-llama";

#[test]
fn every_call_goes_out_as_its_pinned_frame() {
    insta::assert_snapshot!("runtime_info", frame(1, &GetInfo {}));
    insta::assert_snapshot!(
        "load_model",
        frame(
            2,
            &LoadModel {
                batch_size: Some(8),
                local_path: "/srv/models/mlx-worker/tiny-llama",
                model_id: MODEL,
                prefill_step_size: Some(512),
                prefix_cache_bytes: Some(1 << 30),
                session_ttl_seconds: Some(1800),
                warm_up: Some(false),
            }
        )
    );
    insta::assert_snapshot!(
        "load_model_with_runtime_defaults",
        frame(
            3,
            &LoadModel {
                batch_size: None,
                local_path: "/srv/models/mlx-worker/tiny-llama",
                model_id: MODEL,
                prefill_step_size: None,
                prefix_cache_bytes: None,
                session_ttl_seconds: None,
                warm_up: None,
            }
        )
    );
    insta::assert_snapshot!(
        "generate",
        frame(
            4,
            &Generate {
                max_tokens: 12,
                model_id: MODEL,
                prompt: "Hello world",
                step_chunks: false,
                session_id: None,
                stream_id: "s-3",
                streaming: true,
                temperature: 0.0,
                top_p: 1.0,
            }
        )
    );
    insta::assert_snapshot!(
        "generate_step_chunks",
        frame(
            5,
            &Generate {
                max_tokens: 12,
                model_id: MODEL,
                prompt: "Hello world",
                step_chunks: true,
                session_id: Some("9f1c2d3e-0000-4000-8000-00000000abcd"),
                stream_id: "s-4",
                streaming: true,
                temperature: 0.0,
                top_p: 1.0,
            }
        )
    );
    insta::assert_snapshot!(
        "generate_escaped_and_sampled",
        frame(
            6,
            &Generate {
                max_tokens: 4096,
                model_id: MODEL,
                prompt: "Say \"h\u{e9}llo\"\n\tthen\u{7} stop",
                step_chunks: false,
                session_id: None,
                stream_id: "s-5",
                streaming: true,
                temperature: 0.7,
                top_p: 0.95,
            }
        )
    );
    insta::assert_snapshot!("cancel", frame(7, &Cancel { stream_id: "s-5" }));
    insta::assert_snapshot!("runtime_state", frame(8, &GetState {}));
    insta::assert_snapshot!("unload_model", frame(9, &UnloadModel { model_id: MODEL }));
    insta::assert_snapshot!("shutdown", frame(10, &Shutdown {}));
}

#[test]
fn results_are_read_in_both_runtimes_shapes() {
    let ours: Info = decode_result(json!({
        "version": "0.1.0", "mlx_version": "0.32.4", "mlx_lm_version": "0.32.2",
        "protocol": "json-rpc-2.0", "capabilities": ["generate", "cancel"],
        "mlx_supported": true, "memory": {"rss": 1, "vms": 2},
        "limits": {"line_bytes_max": 1_048_576, "max_tokens_max": 4096,
                   "streams_live_max": 64, "models_loaded_max": 8}
    }));
    assert_eq!(
        ours,
        Info {
            version: Some("0.1.0".into()),
            mlx_version: Some("0.32.4".into()),
            mlx_supported: Some(true),
            capabilities: vec!["generate".into(), "cancel".into()],
            limits: Some(InfoLimits {
                streams_live_max: Some(64),
                ..InfoLimits::default()
            }),
            models: Vec::new(),
        }
    );
    assert!(ours.can_cancel());
    assert!(!ours.can_step_chunks());
    assert_eq!(ours.streams_live_max(), Some(64));
    let batched: Info = decode_result(json!({
        "version": "0.2.0", "capabilities": ["generate", "cancel", "batching", "step_chunks"],
        "mlx_supported": true,
        "limits": {"streams_live_max": 64, "batch_size_default": 8,
                   "prefill_step_size_default": 512, "models_loaded_max": 8},
        "models": [{"model_id": MODEL, "batch_size": 8, "batched": true},
                   {"model_id": "org/m", "batch_size": 1, "batched": false}]
    }));
    assert!(batched.can_step_chunks());
    assert_eq!(
        batched.limits,
        Some(InfoLimits {
            streams_live_max: Some(64),
            batch_size_default: Some(8),
            prefill_step_size_default: Some(512),
        })
    );
    assert_eq!(
        batched.models,
        [
            InfoModel {
                model_id: Some(MODEL.into()),
                batch_size: Some(8),
                batched: Some(true)
            },
            InfoModel {
                model_id: Some("org/m".into()),
                batch_size: Some(1),
                batched: Some(false)
            }
        ]
    );
    let existing: Info = decode_result(json!({
        "version": "0.1.0", "capabilities": [], "mlx_supported": false
    }));
    assert!(!existing.can_cancel());
    assert_eq!(existing.mlx_supported, Some(false));
    assert_eq!(existing.streams_live_max(), None);
    let loaded: ModelLoaded = decode_result(json!({
        "model_id": MODEL, "state": "ready", "context_length": 8192,
        "parameter_count": 0, "dtype": "unknown", "is_vision_model": false
    }));
    assert_eq!(
        loaded,
        ModelLoaded {
            context_length: Some(8192),
            parameter_count: Some(0),
            batch_size: None,
            batched: None,
            warm_up_seconds: None,
        }
    );
    let batched: ModelLoaded = decode_result(json!({
        "model_id": MODEL, "state": "ready", "context_length": 2048,
        "parameter_count": 1_000_000, "batch_size": 1, "batched": false,
        "warm_up_seconds": 0.25
    }));
    assert_eq!(
        (batched.batch_size, batched.batched, batched.warm_up_seconds),
        (Some(1), Some(false), Some(0.25))
    );
    let state: State = decode_result(json!({
        "loaded_models": [], "active_streams": 2, "restart_count": 0
    }));
    assert_eq!(state.active_streams, Some(2));
}

#[test]
fn result_fields_of_another_type_read_as_absent_one_by_one() {
    let info: Info = decode_result(json!({
        "version": 1, "mlx_version": "0.32.4", "mlx_supported": "no",
        "capabilities": ["cancel", 3, null], "limits": {"streams_live_max": -1},
        "models": [{"model_id": 3, "batch_size": "8", "batched": true}, "m", 4]
    }));
    assert_eq!(
        info,
        Info {
            version: None,
            mlx_version: Some("0.32.4".into()),
            mlx_supported: None,
            capabilities: vec!["cancel".into()],
            limits: Some(InfoLimits::default()),
            models: vec![InfoModel {
                batched: Some(true),
                ..InfoModel::default()
            }],
        }
    );
    let info: Info = decode_result(json!({
        "capabilities": "cancel", "limits": [64], "models": {"model_id": MODEL}
    }));
    assert!(!info.can_cancel());
    assert_eq!(info.limits, None);
    assert_eq!(info.models, []);
    let loaded: ModelLoaded = decode_result(json!({
        "context_length": 8192.0, "parameter_count": -1, "batch_size": -1, "batched": 1
    }));
    assert_eq!(loaded, ModelLoaded::default());
    let loaded: ModelLoaded = decode_result(json!({
        "context_length": null, "parameter_count": 1_000_000
    }));
    assert_eq!(loaded.parameter_count, Some(1_000_000));
    // A result that is no object reads as empty, whatever its items are.
    assert_eq!(decode_result::<State>(json!([3])), State::default());
    assert_eq!(
        decode_result::<Info>(json!(["0.1.0", "0.32.4", false])),
        Info::default()
    );
    assert_eq!(decode_result::<Info>(Value::Null), Info::default());
}

#[test]
fn responses_are_matched_by_id() {
    let ok = decode_line(
        br#"{"jsonrpc":"2.0","id":3,"result":{"stream_id":"s-1","started_at":1795723670.9284012}}"#,
    )
    .unwrap();
    assert_eq!(
        ok,
        Inbound::Response {
            id: Some(3),
            outcome: Ok(json!({"stream_id":"s-1","started_at":1795723670.9284012}))
        }
    );
    let err = decode_line(br#"{"jsonrpc":"2.0","id":4,"error":{"code":-32001,"message":"Failed to load model m: gone","data":{"model_id":"m"}}}"#).unwrap();
    let Inbound::Response {
        id: Some(4),
        outcome: Err(e),
    } = err
    else {
        panic!("{err:?}")
    };
    assert_eq!(e.code, code::MODEL_LOAD_ERROR);
    // A parse error answers with a null id.
    let parse = decode_line(
        br#"{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"parse error"}}"#,
    )
    .unwrap();
    assert!(matches!(
        parse,
        Inbound::Response {
            id: None,
            outcome: Err(_)
        }
    ));
}

#[test]
fn both_chunk_forms_give_tokens_in_order() {
    let single = decode_line(br#"{"jsonrpc":"2.0","method":"stream.chunk","params":{"stream_id":"s-1","token":" w45","token_id":7,"is_final":false}}"#).unwrap();
    assert_eq!(
        single,
        Inbound::Chunk {
            stream_id: "s-1".into(),
            tokens: vec![ChunkToken {
                text: " w45".into()
            }]
        }
    );
    let batch = decode_line(br#"{"jsonrpc":"2.0","method":"stream.chunk","params":{"stream_id":"s-1","tokens":[{"stream_id":"s-1","token":"w3","token_id":6,"is_final":false,"cumulative_text":"w3","logprob":-6.96},{"stream_id":"s-1","token":" w4","token_id":8,"is_final":false,"cumulative_text":"w3 w4"}],"batch_size":2,"is_batch":true}}"#).unwrap();
    let Inbound::Chunk { tokens, .. } = batch else {
        panic!()
    };
    assert_eq!(
        tokens.iter().map(|t| t.text.as_str()).collect::<Vec<_>>(),
        ["w3", " w4"]
    );
}

#[test]
fn a_step_gives_every_entry_with_its_stream_in_line_order() {
    let step = decode_line(br#"{"jsonrpc":"2.0","method":"stream.step","params":{"chunks":[{"stream_id":"s-1","token":" the","token_id":279},{"stream_id":"s-2","token":"","token_id":1234},{"stream_id":"s-1","token":" cat","token_id":8},{"stream_id":"s-2","token":"\u00e9","token_id":9}]}}"#).unwrap();
    let entry = |stream_id: &str, text: &str| StepChunk {
        stream_id: stream_id.into(),
        token: ChunkToken { text: text.into() },
    };
    assert_eq!(
        step,
        Inbound::Step {
            chunks: vec![
                entry("s-1", " the"),
                entry("s-2", ""),
                entry("s-1", " cat"),
                entry("s-2", "\u{e9}"),
            ]
        }
    );
    let empty = decode_line(br#"{"jsonrpc":"2.0","method":"stream.step","params":{"chunks":[]}}"#);
    assert_eq!(empty, Ok(Inbound::Step { chunks: vec![] }));
}

#[test]
fn stream_events_are_classified() {
    let stats = decode_line(br#"{"jsonrpc":"2.0","method":"stream.stats","params":{"stream_id":"s-1","tokens_generated":20,"tokens_per_second":2242.45,"time_to_first_token":0.0094,"total_time":0.0183}}"#).unwrap();
    assert_eq!(
        stats,
        Inbound::Stats {
            stream_id: "s-1".into(),
            stats: StreamStats {
                tokens_generated: Some(20),
                time_to_first_token: Some(0.0094),
                total_time: Some(0.0183),
                ..StreamStats::default()
            }
        }
    );
    // Ours adds the prompt and queue figures; one of another type reads as absent.
    let batched = decode_line(br#"{"jsonrpc":"2.0","method":"stream.stats","params":{"stream_id":"s-2","prompt_tokens":5,"prompt_time":0.004,"queue_time":0.25,"tokens_generated":12,"tokens_per_second":900.5,"time_to_first_token":0.005,"total_time":0.02,"cached_tokens":3,"extra":[1]}}"#).unwrap();
    assert_eq!(
        batched,
        Inbound::Stats {
            stream_id: "s-2".into(),
            stats: StreamStats {
                prompt_tokens: Some(5),
                prompt_time: Some(0.004),
                queue_time: Some(0.25),
                tokens_generated: Some(12),
                time_to_first_token: Some(0.005),
                total_time: Some(0.02),
                cached_tokens: Some(3),
            }
        }
    );
    let odd = decode_line(br#"{"method":"stream.stats","params":{"stream_id":"s-3","prompt_tokens":"5","total_time":1}}"#).unwrap();
    assert_eq!(
        odd,
        Inbound::Stats {
            stream_id: "s-3".into(),
            stats: StreamStats {
                total_time: Some(1.0),
                ..StreamStats::default()
            }
        }
    );
    let done = decode_line(br#"{"jsonrpc":"2.0","method":"stream.event","params":{"stream_id":"s-1","event":"completed","is_final":true,"finish_reason":"completed"}}"#).unwrap();
    assert_eq!(
        done,
        Inbound::End {
            stream_id: "s-1".into(),
            end: StreamEnd::Completed {
                finish_reason: "completed".into()
            }
        }
    );
    let failed = decode_line(br#"{"jsonrpc":"2.0","method":"stream.event","params":{"stream_id":"s-1","event":"error","error":"boom","is_final":true}}"#).unwrap();
    assert_eq!(
        failed,
        Inbound::End {
            stream_id: "s-1".into(),
            end: StreamEnd::Failed {
                error: "boom".into()
            }
        }
    );
    let cancelled = decode_line(br#"{"jsonrpc":"2.0","method":"stream.event","params":{"stream_id":"s-1","event":"cancelled","is_final":true}}"#).unwrap();
    assert_eq!(
        cancelled,
        Inbound::End {
            stream_id: "s-1".into(),
            end: StreamEnd::Cancelled
        }
    );
}

#[test]
fn malformed_lines_are_errors_not_panics() {
    assert!(matches!(
        decode_line(b"not json"),
        Err(DecodeError::NotJson(_))
    ));
    assert!(matches!(
        decode_line(b"[1]"),
        Err(DecodeError::Malformed(_))
    ));
    assert!(matches!(
        decode_line(br#"{"jsonrpc":"2.0"}"#),
        Err(DecodeError::Malformed(_))
    ));
    assert!(matches!(
        decode_line(br#"{"method":"stream.chunk","params":{"token":"x"}}"#),
        Err(DecodeError::Malformed(_))
    ));
    assert!(matches!(
        decode_line(br#"{"method":"stream.event","params":{"stream_id":"s","event":"exploded"}}"#),
        Err(DecodeError::Malformed(_))
    ));
    // A step without its list, or with one entry missing its stream or its text, is
    // malformed as a whole: none of its entries is routed.
    for line in [
        &br#"{"method":"stream.step","params":{}}"#[..],
        br#"{"method":"stream.step","params":{"chunks":{"stream_id":"s","token":"x"}}}"#,
        br#"{"method":"stream.step","params":{"chunks":[{"stream_id":"s","token":"x"},{"token":"y"}]}}"#,
        br#"{"method":"stream.step","params":{"chunks":[{"stream_id":"s","token":"x"},{"stream_id":"s","token":7}]}}"#,
        br#"{"method":"stream.step","params":{"chunks":[{"stream_id":"s","token":"x"},"s"]}}"#,
    ] {
        assert!(
            matches!(decode_line(line), Err(DecodeError::Malformed(_))),
            "{}",
            String::from_utf8_lossy(line)
        );
    }
}

async fn lines(input: &[u8], cap: usize) -> Vec<Line> {
    let mut reader = tokio::io::BufReader::with_capacity(7, input);
    let mut buf = Vec::new();
    let mut out = Vec::new();
    loop {
        let line = read_line(&mut reader, &mut buf, cap).await.unwrap();
        let eof = line == Line::Eof;
        out.push(line);
        if eof {
            return out;
        }
    }
}

#[tokio::test]
async fn the_line_reader_caps_lines_and_keeps_going() {
    let out = lines(b"short\nthis line is too long\nok\nlast", 10).await;
    assert_eq!(
        out,
        [
            Line::Complete(b"short".to_vec()),
            Line::TooLong { len: 21 },
            Line::Complete(b"ok".to_vec()),
            Line::Complete(b"last".to_vec()),
            Line::Eof
        ]
    );
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = decode_line(&bytes);
    }

    #[test]
    fn the_reader_returns_every_line_within_the_cap(
        lines_in in proptest::collection::vec("[a-z]{0,20}", 0..20), cap in 1usize..25,
    ) {
        let input = lines_in.iter().map(|l| format!("{l}\n")).collect::<String>();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let out = rt.block_on(lines(input.as_bytes(), cap));
        prop_assert_eq!(out.len(), lines_in.len() + 1);
        for (line, got) in lines_in.iter().zip(&out) {
            if line.len() <= cap {
                prop_assert_eq!(got, &Line::Complete(line.as_bytes().to_vec()));
            } else {
                prop_assert_eq!(got, &Line::TooLong { len: line.len() });
            }
        }
    }
}
