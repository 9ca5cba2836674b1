#!/usr/bin/env bash
# The whole test suite: what CI runs and what a developer runs.
#   1. installs what the tests need (ci/setup.sh): nats-server, the runtime's venv, the tiny model;
#   2. formatting and lints: cargo fmt --check, cargo clippy -D warnings, and the API docs built
#      with rustdoc's warnings (broken links among them) as errors;
#   3. the Python runtime's own tests (pytest);
#   4. every Rust test of the workspace, once, under line coverage (cargo-llvm-cov), with CI set
#      so insta refuses new snapshots; prints the test counts and the library's line coverage;
#   5. every bench, once, at a tiny size (`cargo bench -- --test`), so none of them can rot.
set -euo pipefail
cd "$(dirname "$0")/.."
export CI="${CI:-true}"
export PATH="$PATH:/usr/sbin:$HOME/.cargo/bin"

step() { printf '\n== %s\n' "$*"; }

step "setup"
bash ci/setup.sh

step "format"
cargo fmt --all -- --check

step "lints"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "docs"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked

step "python runtime tests"
.venv/bin/python -m pytest -q runtime/tests

step "rust tests under coverage"
bash ci/coverage.sh

step "benches, once each at a tiny size"
cargo bench --locked --benches -- --test
