#!/usr/bin/env bash
# Installs what running and testing the worker needs, when it is missing:
#   - nats-server (Debian's package via apt, or Homebrew on macOS),
#   - a project-local Python venv (.venv) with the MLX runtime's packages from PyPI,
#   - the tiny test model, generated from a fixed seed (models/mlx-worker/tiny-llama).
# Idempotent: a second run only checks. Exits non-zero with a message saying what failed.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[setup] %s\n' "$*" >&2; }

install_nats_server() {
    if command -v nats-server >/dev/null 2>&1; then
        return
    fi
    say "nats-server not found; installing it"
    if command -v apt-get >/dev/null 2>&1; then
        local sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq nats-server >/dev/null
    elif command -v brew >/dev/null 2>&1; then
        brew install nats-server
    else
        say "cannot install nats-server: neither apt-get nor brew is available"
        exit 1
    fi
    # Debian installs it under /usr/sbin, which a non-root PATH may lack.
    command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || {
        say "nats-server is still missing after the install"
        exit 1
    }
}

setup_venv() {
    local stamp=.venv/.requirements.sha256
    local want
    want=$(sha256sum runtime/requirements.txt 2>/dev/null || shasum -a 256 runtime/requirements.txt)
    want=${want%% *}
    if [ -x .venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
        return
    fi
    say "creating .venv with the MLX runtime's packages"
    python3 -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -r runtime/requirements.txt
    echo "$want" >"$stamp"
}

build_tiny_model() {
    .venv/bin/python fixtures/tiny_model/make_tiny_model.py --out models/mlx-worker/tiny-llama
}

install_nats_server
setup_venv
build_tiny_model
say "ready: nats-server $(PATH="$PATH:/usr/sbin" nats-server --version 2>&1 | tr -d '\n'), $(.venv/bin/python --version)"
