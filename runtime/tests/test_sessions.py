"""The prefix cache over the runtime's protocol: a conversation's next turn is
prefilled only past the previous prompt, and gives the tokens a cold run gives.

Method: conversations shaped as the existing controller sends them (every
user message so far joined with a newline), run turn by turn on a model with
a prefix cache and on the same weights loaded without one (cold), greedy,
comparing token ids and reading `cached_tokens` from `stream.stats`. Both the
batched and the sequential paths, and a model whose cache cannot be trimmed
(a tiny Mamba of random weights made here, with the tiny model's tokenizer).
"""

import json
import shutil

import pytest

from runtime_client import token_ids

TURNS = [
    "Tell me about the river and the old mill by the bridge.",
    "What did the miller do in the winter?",
    "And how did the town change after the railway came?",
    "Sum it up in one line.",
]


def controller_prompt(turns: list[str]) -> str:
    """The prompt the controller builds from a conversation's user messages."""
    return "\n".join(turns)


def stats_of(notifications: list[dict]) -> dict:
    (stats,) = [m["params"] for m in notifications if m["method"] == "stream.stats"]
    return stats


@pytest.fixture
def load_pair(runtime):
    """Loads weights twice, with a prefix cache and without; unloads both after."""
    loaded = []

    def load(name: str, path, **params) -> tuple[str, str]:
        warm, cold = f"test/{name}-warm", f"test/{name}-cold"
        runtime.call("load_model", {"model_id": warm, "local_path": str(path), **params})
        loaded.append(warm)
        runtime.call(
            "load_model",
            {"model_id": cold, "local_path": str(path), "prefix_cache_bytes": 0, **params},
        )
        loaded.append(cold)
        return warm, cold

    yield load
    for model_id in loaded:
        runtime.call("unload_model", {"model_id": model_id})


def converse(runtime, warm: str, cold: str, tag: str, session: str | None = None) -> list[dict]:
    """Each turn on `warm` then on `cold`; the warm turns' stats."""
    stats = []
    for k in range(1, len(TURNS) + 1):
        params = {"prompt": controller_prompt(TURNS[:k]), "max_tokens": 12, "temperature": 0}
        extra = {"session_id": session} if session else {}
        warm_run = runtime.generate(f"{tag}-w{k}", model_id=warm, **params, **extra)
        cold_run = runtime.generate(f"{tag}-c{k}", model_id=cold, **params)
        assert token_ids(warm_run) == token_ids(cold_run), f"turn {k}"
        assert stats_of(cold_run)["cached_tokens"] == 0
        stats.append(stats_of(warm_run))
    return stats


def check_reuse(stats: list[dict]) -> None:
    assert stats[0]["cached_tokens"] == 0
    for k, (before, now) in enumerate(zip(stats, stats[1:]), start=2):
        # The whole previous prompt but its last token, or more.
        assert now["cached_tokens"] >= before["prompt_tokens"] - 2, (k, before, now)
        assert 0 < now["cached_tokens"] < now["prompt_tokens"], (k, now)


@pytest.mark.parametrize("batch_size", [8, 1], ids=["batched", "sequential"])
def test_each_turn_reuses_the_previous_prompt_and_gives_the_cold_tokens(
    runtime, load_pair, tiny_model_dir, batch_size
):
    warm, cold = load_pair(f"turns-{batch_size}", tiny_model_dir, batch_size=batch_size)
    check_reuse(converse(runtime, warm, cold, f"t{batch_size}", session="conversation-1"))


def test_repeated_rounds_of_the_same_prompts_give_the_same_tokens(
    runtime, load_pair, tiny_model_dir
):
    warm, cold = load_pair("rounds", tiny_model_dir)
    prompts = [controller_prompt(TURNS[:k]) for k in (4, 2, 3, 1)]
    expected = [
        token_ids(runtime.generate(f"rc-{i}", model_id=cold, prompt=p, max_tokens=10, temperature=0))
        for i, p in enumerate(prompts)
    ]
    for round_ in range(3):
        for i, p in enumerate(prompts):
            run = runtime.generate(
                f"r{round_}-{i}", model_id=warm, prompt=p, max_tokens=10, temperature=0
            )
            assert token_ids(run) == expected[i], (round_, i)
            if round_ > 0:
                assert stats_of(run)["cached_tokens"] > 0


def test_the_model_state_shows_the_cache_and_a_model_without_one_shows_none(
    runtime, load_pair, tiny_model_dir
):
    warm, cold = load_pair("state", tiny_model_dir)
    runtime.generate("st-1", model_id=warm, prompt=controller_prompt(TURNS[:2]), max_tokens=2)
    runtime.generate("st-2", model_id=warm, prompt=controller_prompt(TURNS[:3]), max_tokens=2)
    entries = {e["model_id"]: e for e in runtime.call("runtime/state")["loaded_models"]}
    figures = entries[warm]["prefix_cache"]
    assert figures["lookups"] == 2 and figures["hits"] == 1
    assert figures["entries"] >= 1 and figures["bytes"] > 0
    assert figures["cached_tokens"] > 0 and figures["prompt_tokens"] > figures["cached_tokens"]
    assert entries[cold]["prefix_cache"] is None
    info = {m["model_id"]: m for m in runtime.call("runtime/info")["models"]}
    assert info[cold]["prefix_cache_bytes"] == 0 and info[warm]["prefix_cache_bytes"] > 0
    assert "prefix_cache" in runtime.call("runtime/info")["capabilities"]


def test_a_session_id_must_be_an_identifier(runtime):
    error = runtime.error(
        "generate",
        {"model_id": "mlx-worker/tiny-llama", "prompt": "x", "session_id": "a b"},
    )
    assert error["code"] == -32602 and "session_id" in error["message"]


@pytest.fixture(scope="module")
def tiny_mamba_dir(tiny_model_dir, tmp_path_factory):
    """A two-layer Mamba of random weights (a cache of arrays, which cannot be trimmed),
    with the tiny model's tokenizer."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import mamba

    config = {
        "model_type": "mamba",
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "state_size": 8,
        "num_hidden_layers": 2,
        "conv_kernel": 4,
        "use_bias": False,
        "use_conv_bias": True,
        "time_step_rank": 4,
        "tie_word_embeddings": True,
    }
    mx.random.seed(7)
    model = mamba.Model(mamba.ModelArgs.from_dict(config))
    out = tmp_path_factory.mktemp("mamba") / "tiny-mamba"
    out.mkdir()
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (out / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_model_dir / name).exists():
            shutil.copy(tiny_model_dir / name, out / name)
    return out


def test_a_cache_that_cannot_be_trimmed_is_reused_whole_and_gives_the_cold_tokens(
    runtime, load_pair, tiny_mamba_dir
):
    warm, cold = load_pair("mamba", tiny_mamba_dir)
    check_reuse(converse(runtime, warm, cold, "mamba"))
