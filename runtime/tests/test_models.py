"""Model methods: load_model, unload_model, tokenize.

Method: drive the shared runtime; compare its answers with what the model
files say when read directly (safetensors for the parameter count, the
`tokenizers` library for token ids).
"""

import pytest
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from tiny_model import MODEL_ID

INVALID_PARAMS = -32602
MODEL_LOAD_ERROR = -32001
MODEL_NOT_LOADED = -32005


def test_load_model_reports_metadata_from_the_weights(runtime, tiny_model_dir):
    result = runtime.call("load_model", {"model_id": MODEL_ID, "local_path": str(tiny_model_dir)})
    weights = load_file(str(tiny_model_dir / "model.safetensors"))
    assert result.pop("warm_up_seconds") > 0
    assert result == {
        "model_id": MODEL_ID,
        "state": "ready",
        "context_length": 512,
        "parameter_count": sum(array.size for array in weights.values()),
        "dtype": "float32",
        "is_vision_model": False,
        "cached_path": str(tiny_model_dir.resolve()),
        "batch_size": 8,
        "batched": True,
        "prefix_cache_bytes": 512 * 1024 * 1024,
    }


def test_unloading_a_model_drops_its_prefix_cache(tiny_model_dir):
    from mlx_runtime.models import Batching, ModelRegistry

    registry = ModelRegistry(2)
    loaded = registry.load("m", tiny_model_dir, Batching(1, 512, prefix_cache_bytes=1 << 20))
    cache = loaded.prefix_cache
    assert cache is not None
    from mlx_lm.models.cache import make_prompt_cache

    assert cache.store(list(range(1, 40)), make_prompt_cache(loaded.model))
    assert len(cache) == 1
    assert registry.unload("m")
    assert len(cache) == 0 and cache.nbytes == 0
    off = registry.load("n", tiny_model_dir, Batching(1, 512, prefix_cache_bytes=0))
    assert off.prefix_cache is None


def test_loading_a_loaded_model_again_returns_the_same_result(runtime, tiny_model_dir):
    params = {"model_id": MODEL_ID, "local_path": str(tiny_model_dir)}
    assert runtime.call("load_model", params) == runtime.call("load_model", params)


def test_load_model_with_a_missing_path_is_a_load_error(runtime, tmp_path):
    missing = tmp_path / "absent"
    error = runtime.error("load_model", {"model_id": "test/absent", "local_path": str(missing)})
    assert error["code"] == MODEL_LOAD_ERROR
    assert error["message"] == f"Failed to load model test/absent: Model path not found: {missing}"
    assert error["data"] == {"model_id": "test/absent"}


def test_load_model_with_a_directory_that_is_no_model_is_a_load_error(runtime, tmp_path):
    error = runtime.error("load_model", {"model_id": "test/empty", "local_path": str(tmp_path)})
    assert error["code"] == MODEL_LOAD_ERROR
    assert error["message"].startswith("Failed to load model test/empty: ")
    assert "test/empty" not in [
        entry["model_id"] for entry in runtime.call("runtime/state")["loaded_models"]
    ]


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"model_id": 7},
        {"model_id": "has space"},
        {"model_id": "a/../b"},
        {"model_id": "m" * 513},
        {"model_id": "ok/id", "local_path": "/tmp/../etc"},
        {"model_id": "ok/id", "local_path": "~/models"},
    ],
)
def test_load_model_validates_its_params(runtime, params):
    error = runtime.error("load_model", params)
    assert error["code"] == INVALID_PARAMS
    assert error["data"] == {"type": "ValidationError"}


def test_unloaded_model_can_no_longer_generate(runtime, tiny_model_dir):
    model_id = "test/unload-me"
    runtime.call("load_model", {"model_id": model_id, "local_path": str(tiny_model_dir)})
    assert runtime.call("unload_model", {"model_id": model_id}) == {"success": True}
    loaded = [entry["model_id"] for entry in runtime.call("runtime/state")["loaded_models"]]
    assert model_id not in loaded
    error = runtime.error("generate", {"model_id": model_id, "prompt": "hi"})
    assert error["code"] == MODEL_NOT_LOADED
    assert error["message"] == f"Model not loaded: {model_id}"
    # Unloading what is not loaded is not an error.
    assert runtime.call("unload_model", {"model_id": model_id}) == {"success": True}


@pytest.mark.parametrize("text", ["The worker wakes.", " leading space", "naïve café 日本 🙂", ""])
def test_tokenize_matches_the_tokenizer(runtime, tiny_model_dir, text):
    reference = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    with_bos = runtime.call("tokenize", {"model_id": MODEL_ID, "text": text})
    expected = reference.encode(text)
    assert with_bos == {"tokens": expected.ids, "token_strings": expected.tokens}
    assert with_bos["tokens"][0] == 0
    without = runtime.call(
        "tokenize", {"model_id": MODEL_ID, "text": text, "add_special_tokens": False}
    )
    assert without["tokens"] == reference.encode(text, add_special_tokens=False).ids


def test_tokenize_needs_a_loaded_model(runtime):
    error = runtime.error("tokenize", {"model_id": "test/not-loaded", "text": "hi"})
    assert error["code"] == MODEL_NOT_LOADED


def test_tokenize_validates_its_params(runtime):
    assert runtime.error("tokenize", {"model_id": MODEL_ID})["code"] == INVALID_PARAMS
    error = runtime.error(
        "tokenize", {"model_id": MODEL_ID, "text": "x", "add_special_tokens": "yes"}
    )
    assert error["code"] == INVALID_PARAMS
