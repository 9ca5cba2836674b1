#!/usr/bin/env bash
# Runs every Rust test of the workspace once, under line coverage, and prints the library's
# line coverage. Uses cargo-llvm-cov (installing it and rustup's llvm-tools when missing); where
# rustup cannot add llvm-tools, falls back to cargo-tarpaulin, which needs only crates.io.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:$HOME/.cargo/bin"

# Coverage counts the library (src/), not the simulators, tests or benches.
ignore='(^|/)(sim|tests|benches|fuzz)/|/\.cargo/|/rustc/'

have_llvm_cov() {
    cargo llvm-cov --version >/dev/null 2>&1 && rustup component list --installed 2>/dev/null | grep -q '^llvm-tools'
}

if ! have_llvm_cov; then
    if rustup component add llvm-tools-preview >/dev/null 2>&1; then
        cargo llvm-cov --version >/dev/null 2>&1 || cargo install cargo-llvm-cov --locked --quiet
    fi
fi

if have_llvm_cov; then
    cargo llvm-cov --workspace --locked --no-report
    summary=$(cargo llvm-cov report --summary-only --ignore-filename-regex "$ignore")
    printf '%s\n' "$summary" | tail -n 25
    total=$(printf '%s\n' "$summary" | awk '$1 == "TOTAL" { print $(NF-3) }')
else
    cargo tarpaulin --version >/dev/null 2>&1 || cargo install cargo-tarpaulin --locked --quiet
    out=$(cargo tarpaulin --workspace --locked --skip-clean --exclude-files 'sim/*' 'tests/*' 'benches/*' 2>&1 | tee /dev/stderr)
    total=$(printf '%s\n' "$out" | sed -n 's/^\([0-9.]*%\) coverage.*/\1/p' | tail -n 1)
fi
echo "library line coverage: ${total:-unknown}"
