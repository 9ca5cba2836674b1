// Goal: the scan finds exactly the directories that are models, names them as clients do, and
// sums their sizes.
// Method: model trees built in a temporary directory.

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
