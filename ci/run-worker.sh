#!/usr/bin/env bash
# Sets up what is missing (ci/setup.sh) and runs one worker on an embedded default: a local
# nats-server on 127.0.0.1:4222 that the worker starts itself, and the real MLX runtime serving
# the tiny model. Extra arguments go to `mlx-worker run` (e.g. --worker-id, --log-format json).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin:$HOME/.cargo/bin"
bash ci/setup.sh
exec cargo run --release --locked --bin mlx-worker -- run \
    --model-dir models --preload mlx-worker/tiny-llama "$@"
