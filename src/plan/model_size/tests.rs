// Goal: a model's tier comes from its parameter count, else its name, else its size on disk;
// names are read as people write them (Hugging Face and MLX community ids, ollama tags), and no
// name makes a reader panic; a Llama-style configuration gives its parameter count.
// Method: table-driven checks of the name and precision readers and of `model_tier`; proptest
// over arbitrary and name-like strings; a published model's dimensions.

use proptest::prelude::*;
use serde_json::json;

use super::*;

const BILLION: u64 = 1_000_000_000;

#[test]
fn reads_parameter_counts_from_model_names() {
    let cases = [
        (
            "mlx-community/Llama-3.2-3B-Instruct-4bit",
            Some(3 * BILLION),
        ),
        ("Qwen2.5-0.5B-Instruct", Some(BILLION / 2)),
        ("Meta-Llama-3-70B-Instruct", Some(70 * BILLION)),
        ("mistral-7b", Some(7 * BILLION)),
        ("gemma-2-27b-it", Some(27 * BILLION)),
        ("DeepSeek-R1-Distill-Qwen-1.5B", Some(1_500_000_000)),
        ("llama3:8b", Some(8 * BILLION)),
        ("SmolLM-135M", Some(135_000_000)),
        ("Mixtral-8x7B-Instruct-v0.1", Some(56 * BILLION)),
        ("Mixtral-8x22B", Some(176 * BILLION)),
        // The active-parameter word A3B is not the size.
        ("Qwen3-30B-A3B", Some(30 * BILLION)),
        ("phi-3-mini-4k-instruct", None),
        ("some-model-4bit", None),
        ("", None),
    ];
    for (name, expected) in cases {
        assert_eq!(parameters_from_name(name), expected, "{name}");
    }
}

#[test]
fn reads_weight_precision_from_model_names() {
    let cases = [
        ("Llama-3.2-3B-Instruct-4bit", Some(4)),
        ("Mistral-7B-Instruct-v0.3-8bit", Some(8)),
        ("qwen2.5-7b-instruct-q4_k_m", Some(4)),
        ("Llama-3.1-8B-Instruct-bf16", Some(16)),
        ("gpt-oss-20b-MXFP4", Some(4)),
        ("model-int8", Some(8)),
        ("Llama-3.2-3B-Instruct", None),
        ("model-q0", None),
    ];
    for (name, expected) in cases {
        assert_eq!(weight_bits_from_name(name), expected, "{name}");
    }
}

#[test]
fn estimates_parameters_from_disk_size() {
    assert_eq!(parameters_from_disk_size(14 * BILLION, 16), 7 * BILLION);
    assert_eq!(parameters_from_disk_size(2 * BILLION, 4), 4 * BILLION);
    assert_eq!(parameters_from_disk_size(u64::MAX, 1), u64::MAX);
}

#[test]
fn prefers_the_stated_parameter_count() {
    let model = ModelFacts {
        parameter_count: Some(70 * BILLION),
        name: "tiny-1b",
        disk_bytes: Some(1_000),
    };
    assert_eq!(model_tier(&model), Some(ModelTier::Huge));
}

#[test]
fn prefers_the_name_over_the_disk_size() {
    let model = ModelFacts {
        parameter_count: None,
        name: "Llama-3.2-3B-Instruct-4bit",
        disk_bytes: Some(100 * BILLION),
    };
    assert_eq!(model_tier(&model), Some(ModelTier::Small));
}

#[test]
fn falls_back_to_the_disk_size_at_fp16() {
    let model = ModelFacts {
        parameter_count: None,
        name: "my-finetune",
        disk_bytes: Some(28 * BILLION),
    };
    assert_eq!(model_tier(&model), Some(ModelTier::Large));
}

#[test]
fn sizes_a_quantized_directory_at_its_precision() {
    // 4.5 GB at 4 bits is ~9 B parameters; at fp16 it would read as 2.25 B.
    let model = ModelFacts {
        parameter_count: None,
        name: "my-finetune-4bit",
        disk_bytes: Some(4_500_000_000),
    };
    assert_eq!(model_tier(&model), Some(ModelTier::Medium));
}

#[test]
fn has_no_tier_when_nothing_is_known() {
    let model = ModelFacts {
        parameter_count: None,
        name: "my-finetune",
        disk_bytes: None,
    };
    assert_eq!(model_tier(&model), None);
}

#[test]
fn parameter_counts_follow_the_llama_layout() {
    // Llama-3.2-1B's published dimensions: about 1.24 billion parameters.
    let llama_1b = json!({
        "hidden_size": 2048, "num_hidden_layers": 16, "vocab_size": 128256,
        "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 64, "tie_word_embeddings": true
    });
    let n = parameters_from_config(&llama_1b).unwrap();
    assert!((1_200_000_000..1_300_000_000).contains(&n), "{n}");
    assert_eq!(parameters_from_config(&json!({"hidden_size": 1})), None);
}

proptest! {
    #[test]
    fn the_name_readers_never_panic(text in any::<String>()) {
        let _ = parameters_from_name(&text);
        let _ = weight_bits_from_name(&text);
    }

    #[test]
    fn the_name_readers_never_panic_on_name_like_text(text in r"[a-zA-Z0-9 .:_/x-]{0,40}") {
        let _ = parameters_from_name(&text);
        let _ = weight_bits_from_name(&text);
    }
}
