//! Replays the committed fuzz corpora on the stable toolchain.
//!
//! The `cargo fuzz` targets (`fuzz/`, nightly only) keep what they learn in `fuzz/corpus/<target>/`
//! and the inputs that once crashed them in `fuzz/regressions/<target>/`. This test feeds every
//! one of those files through the same harness functions the targets call (`fuzz/src/lib.rs`,
//! included here as a module), so CI checks them without nightly or libFuzzer: any panic or
//! broken property fails the test.

use std::path::{Path, PathBuf};

// Its functions are `pub` for the fuzz targets; in this test crate they are private.
#[allow(unreachable_pub)]
#[path = "../fuzz/src/lib.rs"]
mod harness;

/// The files of `dir`, sorted; none when it does not exist.
fn files_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.expect("a readable directory entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}

/// Runs `harness` over the corpus and regressions of `target` and returns how many files ran.
fn replay(target: &str, harness: fn(&[u8])) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let corpus = files_in(&root.join("corpus").join(target));
    let regressions = files_in(&root.join("regressions").join(target));
    assert!(
        !corpus.is_empty(),
        "no corpus for fuzz target {target} under {}",
        root.display()
    );
    for path in corpus.iter().chain(&regressions) {
        let data = std::fs::read(path).expect("a readable corpus file");
        let outcome = std::panic::catch_unwind(|| harness(&data));
        assert!(
            outcome.is_ok(),
            "fuzz target {target} fails on {}",
            path.display()
        );
    }
    let count = corpus.len() + regressions.len();
    eprintln!(
        "{target}: replayed {} corpus and {} regression files",
        corpus.len(),
        regressions.len()
    );
    count
}

#[test]
fn request_decoder_corpus_replays() {
    assert!(replay("request_decoder", harness::request_decoder) >= 10);
}

#[test]
fn rpc_line_corpus_replays() {
    assert!(replay("rpc_line", harness::rpc_line) >= 10);
}

#[test]
fn config_loader_corpus_replays() {
    assert!(replay("config_loader", harness::config_loader) >= 10);
}
