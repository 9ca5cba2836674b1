"""The tiny model generator: reproducible output, fast path, and a model mlx_lm can run.

Method: run the generator script as a subprocess, compare files byte for
byte, then load the result in-process with mlx_lm, offline.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
from safetensors.numpy import load_file

from tiny_model import GENERATOR, build_tiny_model


def digests(directory):
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.iterdir())
    }


def test_generator_output_is_byte_identical_across_runs(tiny_model_dir, tmp_path):
    other = tmp_path / "again"
    # A different hash seed, so set or dict ordering cannot leak into the output.
    subprocess.run(
        [sys.executable, str(GENERATOR), "--out", str(other)],
        check=True,
        capture_output=True,
        env=dict(os.environ, PYTHONHASHSEED="12345"),
    )
    assert digests(other) == digests(tiny_model_dir)
    assert set(digests(other)) == {
        ".stamp",
        "config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }


def test_generator_leaves_an_up_to_date_directory_alone(tiny_model_dir):
    before = {path.name: path.stat().st_mtime_ns for path in tiny_model_dir.iterdir()}
    result = build_tiny_model(tiny_model_dir)
    assert "up to date" in result.stdout
    assert {path.name: path.stat().st_mtime_ns for path in tiny_model_dir.iterdir()} == before


def test_generator_rebuilds_a_damaged_directory(tiny_model_dir, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_model_dir, damaged)
    (damaged / "config.json").write_text("{}")
    result = build_tiny_model(damaged)
    assert "wrote" in result.stdout
    assert digests(damaged) == digests(tiny_model_dir)


def test_generator_refuses_to_replace_a_directory_it_did_not_write(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    result = subprocess.run(
        [sys.executable, str(GENERATOR), "--out", str(foreign)], capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "refusing" in result.stderr
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_tiny_model_is_small_and_shaped_as_configured(tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["tie_word_embeddings"] is True
    weights = load_file(str(tiny_model_dir / "model.safetensors"))
    assert weights["model.embed_tokens.weight"].shape == (
        config["vocab_size"],
        config["hidden_size"],
    )
    assert all(array.dtype == np.float32 for array in weights.values())
    assert (tiny_model_dir / "model.safetensors").stat().st_size < 1_000_000


def test_tiny_model_loads_offline_and_generates(tiny_model_dir):
    # The runtime package sets the offline switches on import; do the same here.
    import mlx.core as mx
    from mlx_lm import load, stream_generate

    import mlx_runtime  # noqa: F401

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    try:
        model, tokenizer = load(str(tiny_model_dir))
        assert tokenizer.eos_token_ids == {1}
        assert tokenizer.encode("The worker")[0] == 0, "add_special_tokens prepends <s>"
        responses = list(stream_generate(model, tokenizer, "The worker", max_tokens=5))
    finally:
        # Release this thread's MLX streams now; MLX's own teardown at
        # interpreter exit can abort the process (see mlx_runtime.compute).
        mx.clear_streams()
    assert len(responses) == 5
    assert responses[-1].finish_reason == "length"
