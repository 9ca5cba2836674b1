// Goal: what the runtime says about a model reaches clients without the host's absolute paths:
// the model directory becomes `<modelDir>` (the model's place below it stays, as the worker
// advertises it), any other absolute path becomes `<path>`, and the rest of the words stay.
// Method: the runtime's own messages (and made-up ones around the edges) with the model
// directory given as the worker knows it, resolved and as configured.

use std::path::PathBuf;

use super::*;

fn check(text: &str, roots: &[&str], expected: &str) {
    let roots: Vec<PathBuf> = roots.iter().map(PathBuf::from).collect();
    assert_eq!(without_paths(text, &roots), expected);
}

#[test]
fn the_model_directory_becomes_its_name() {
    check(
        "Failed to load model org/m: No safetensors found in /srv/models/org/m",
        &["/srv/models"],
        "Failed to load model org/m: No safetensors found in <modelDir>/org/m",
    );
    check(
        "Model path not found: /srv/models/org/gone",
        &["/srv/models"],
        "Model path not found: <modelDir>/org/gone",
    );
}

#[test]
fn every_spelling_of_the_model_directory_goes() {
    // Resolved through a symbolic link, and as configured.
    check(
        "cannot read /data/models/org/m and /srv/models/org/m",
        &["/data/models", "/srv/models"],
        "cannot read <modelDir>/org/m and <modelDir>/org/m",
    );
    // The longer of two nested spellings wins.
    check(
        "in /srv/models/deep/org/m",
        &["/srv/models", "/srv/models/deep"],
        "in <modelDir>/org/m",
    );
}

#[test]
fn each_model_directory_goes() {
    // A cache snapshot's files lead into its repository's blobs, below the same directory.
    check(
        "cannot read /srv/models/org/m or /home/u/hub/models--o--m/blobs/0a1b",
        &["/srv/models", "/home/u/hub"],
        "cannot read <modelDir>/org/m or <modelDir>/models--o--m/blobs/0a1b",
    );
}

#[test]
fn a_directory_that_only_starts_like_the_root_is_another_path() {
    check("see /srv/models-old/org/m", &["/srv/models"], "see <path>");
}

#[test]
fn other_absolute_paths_are_replaced() {
    check(
        "File \"/venv/lib/python3.12/site-packages/mlx_lm/utils.py\", line 3",
        &["/srv/models"],
        "File \"<path>\", line 3",
    );
    check(
        "cannot open (/etc/passwd), then /tmp/x.",
        &[],
        "cannot open (<path>), then <path>.",
    );
    check("/root", &[], "<path>");
}

#[test]
fn text_without_absolute_paths_stays() {
    for text in [
        "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
        "Model type nosuch not supported.",
        "org/m is 1/2 loaded and/or waiting",
        "relative models/org/m stays",
        "see http://example.com/docs and a lone / slash",
        "",
    ] {
        check(text, &["/srv/models"], text);
    }
}

#[test]
fn a_relative_model_directory_is_not_a_spelling_to_replace() {
    check(
        "No safetensors found in /abs/models/org/m (configured as models)",
        &["models", "/abs/models"],
        "No safetensors found in <modelDir>/org/m (configured as models)",
    );
}
