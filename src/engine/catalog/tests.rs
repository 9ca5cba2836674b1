// Goal: the scan finds exactly the directories that are models, names them as clients do, sums
// their sizes, and estimates parameters from a Llama-style configuration.
// Method: model trees built in a temporary directory; a published model's dimensions.

use serde_json::json;

use super::*;

fn touch(path: &Path, bytes: usize) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, vec![b'x'; bytes]).unwrap();
}

#[test]
fn models_are_found_and_named_by_their_last_two_components() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("model");
    touch(&root.join("org/a/config.json"), 10);
    touch(&root.join("org/a/model.safetensors"), 100);
    touch(&root.join("org/b/config.json"), 10);
    touch(&root.join("org/b/model-00001-of-00002.safetensors"), 5);
    touch(&root.join("flat/config.json"), 1);
    touch(&root.join("flat/pytorch_model.bin"), 1);
    // Not models: no weights, or weights without config.
    touch(&root.join("org/c/config.json"), 1);
    touch(&root.join("org/d/weights.safetensors"), 1);
    // A nested directory inside a model is not a second model.
    touch(&root.join("org/a/sub/config.json"), 1);
    touch(&root.join("org/a/sub/model.safetensors"), 1);
    let catalog = scan(&root).unwrap();
    let ids: Vec<&str> = catalog.models.keys().map(String::as_str).collect();
    assert_eq!(ids, ["model/flat", "org/a", "org/b"]);
    assert_eq!(catalog.models["org/a"].size_bytes, 112);
    assert_eq!(catalog.total_size_bytes(), 112 + 15 + 2);
}

#[test]
fn a_missing_root_is_an_empty_catalog() {
    assert!(
        scan(Path::new("/nonexistent/models"))
            .unwrap()
            .models
            .is_empty()
    );
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
