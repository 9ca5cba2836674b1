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


SHAPE = {
    "--hidden-size": 128,
    "--layers": 3,
    "--attention-heads": 8,
    "--kv-heads": 4,
    "--intermediate-size": 256,
}


def test_generator_shape_options_make_a_model_of_the_same_family(tiny_model_dir, tmp_path):
    out = tmp_path / "larger"
    options = [str(part) for option in SHAPE.items() for part in option]
    subprocess.run(
        [sys.executable, str(GENERATOR), "--out", str(out), *options],
        check=True,
        capture_output=True,
    )
    config = json.loads((out / "config.json").read_text())
    keys = [
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
    ]
    assert [config[key] for key in keys] == list(SHAPE.values())
    weights = load_file(str(out / "model.safetensors"))
    # Head size 128 / 8 = 16, so 4 key-value heads project to 64.
    assert weights["model.layers.2.self_attn.k_proj.weight"].shape == (64, 128)
    assert weights["model.layers.2.mlp.up_proj.weight"].shape == (256, 128)
    assert "model.layers.3.mlp.up_proj.weight" not in weights
    assert (out / "tokenizer.json").read_bytes() == (tiny_model_dir / "tokenizer.json").read_bytes()
    # The stamp names the shape: asked for the tiny model, the directory is rebuilt as it.
    assert "wrote" in build_tiny_model(out).stdout
    assert digests(out) == digests(tiny_model_dir)


def test_generator_refuses_a_shape_whose_heads_do_not_divide(tmp_path):
    out = tmp_path / "odd"
    result = subprocess.run(
        [sys.executable, str(GENERATOR), "--out", str(out), "--attention-heads", "3"],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "multiple of the attention heads" in result.stderr
    assert not out.exists()


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
