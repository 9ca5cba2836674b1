"""Warm-up: a load runs a few generations before it answers, so the first
requests after it compile nothing, whatever their sampling.

Method: MLX on the CPU compiles kernels into a cache under the temporary
directory, a file per kernel. A runtime of the test's own gets an empty
temporary directory; after a warm load, requests shaped as the worker's
defaults send them (greedy; temperature 0.7 and top-p 0.9; a second stream
joining a decoding one) and at other temperatures and nuclei must add no
kernel to the cache, while without the
warm-up the first request does. A model that cannot generate fails its load.
"""

import threading
from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest

from mlx_runtime.models import LoadedModel
from mlx_runtime.warmup import WarmUpFailed, warm_up

MODEL = "test/warm"


def kernels(tmp: Path) -> set[str]:
    return {str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()}


def first_requests(runtime) -> None:
    """What a worker with its defaults sends first: greedy, sampled, then two at once."""
    for n, params in enumerate(
        [
            {"temperature": 0.0},
            {"temperature": 0.7, "top_p": 0.9},
            {"temperature": 0.7},
            # Values no warm-up used: sampling takes them as values, not as constants
            # compiled in.
            {"temperature": 0.83, "top_p": 0.75},
            {"temperature": 1.3, "seed": 11},
        ]
    ):
        runtime.generate(f"first-{n}", model_id=MODEL, prompt="Hi there", max_tokens=4, **params)
    runtime.call(
        "generate",
        {"stream_id": "pair-a", "model_id": MODEL, "prompt": "one", "max_tokens": 8,
         "temperature": 0.0},
    )
    runtime.wait_chunks("pair-a", 2)
    runtime.call(
        "generate",
        {"stream_id": "pair-b", "model_id": MODEL, "prompt": "two two", "max_tokens": 8,
         "temperature": 0.7, "top_p": 0.9},
    )
    runtime.wait_terminal("pair-a")
    runtime.wait_terminal("pair-b")


@pytest.mark.parametrize("warm", [True, False], ids=["warm", "cold"])
def test_after_a_warm_load_the_first_requests_compile_no_kernel(
    fresh_runtime, tiny_model_dir, tmp_path, warm
):
    runtime = fresh_runtime(env={"TMPDIR": str(tmp_path)})
    result = runtime.call(
        "load_model", {"model_id": MODEL, "local_path": str(tiny_model_dir), "warm_up": warm}
    )
    assert ("warm_up_seconds" in result) == warm
    loaded = kernels(tmp_path)
    first_requests(runtime)
    added = kernels(tmp_path) - loaded
    if warm:
        assert loaded and not added, f"compiled after the load: {sorted(added)}"
    else:
        assert not loaded and added


def test_the_warm_up_leaves_no_stream_and_no_cache_entry(fresh_runtime, tiny_model_dir):
    runtime = fresh_runtime()
    result = runtime.call("load_model", {"model_id": MODEL, "local_path": str(tiny_model_dir)})
    assert result["warm_up_seconds"] > 0
    state = runtime.call("runtime/state")
    assert state["active_streams"] == 0
    (model,) = state["loaded_models"]
    assert model["prefix_cache"]["lookups"] == 0 and model["prefix_cache"]["entries"] == 0


class Broken:
    """A model whose forward pass fails."""

    def __init__(self, model):
        self.layers = model.layers
        self.model = model

    def __call__(self, *args, **kwargs):
        raise RuntimeError("the weights are corrupt")

    def __getattr__(self, name):
        return getattr(self.model, name)


@pytest.mark.parametrize("batch_size", [4, 1], ids=["batched", "sequential"])
def test_a_model_that_cannot_generate_fails_its_warm_up(tiny_model_dir, batch_size):
    raised: list[BaseException] = []

    def run() -> None:
        try:
            model, tokenizer = mlx_lm.load(str(tiny_model_dir))
            broken = LoadedModel(
                model_id="broken", model=Broken(model), tokenizer=tokenizer, info={},
                batch_size=batch_size, prefill_step_size=512,
            )
            warm_up(broken)
        except BaseException as exc:
            raised.append(exc)
        finally:
            mx.clear_streams()

    # On a thread of its own, as the runtime's compute thread runs it (earlier tests may
    # have released this thread's MLX streams).
    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    assert not thread.is_alive()
    assert len(raised) == 1 and isinstance(raised[0], WarmUpFailed), raised
    assert "the weights are corrupt" in str(raised[0])
