"""Continuous batching: what streams decoded together must keep.

Method: run streams of the batched tiny model together on the shared runtime
and compare each with the same request run alone on the sequential path
(SERIAL_MODEL_ID, batch size 1), token for token; drive cancellation in each
phase (waiting for room in the batch, prefilling, decoding); check the
`stream.step` line shape and that prefill in chunks lets decoding streams go
on. Models with other batch settings are loaded from the same weights under
ids of their own and unloaded afterwards.
"""

import json
import shutil
import time

import pytest

from runtime_client import WAIT_SECONDS, chunks, token_ids
from tiny_model import MODEL_ID, SERIAL_MODEL_ID

INVALID_PARAMS = -32602
STEP_ENTRY_KEYS = {"stream_id", "token", "token_id"}


def greedy(prompt: str, max_tokens: int, model_id: str = MODEL_ID, **extra) -> dict:
    return {
        "model_id": model_id,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        **extra,
    }


def reference(runtime, name: str, prompt: str, max_tokens: int) -> list[int]:
    """The greedy ids of `prompt` generated alone, on the sequential path."""
    return token_ids(runtime.generate(f"ref-{name}", **greedy(prompt, max_tokens, SERIAL_MODEL_ID)))


def final(notifications: list[dict]) -> dict:
    finals = [m["params"] for m in notifications if m["params"].get("is_final")]
    assert len(finals) == 1, f"exactly one final event, got {finals}"
    assert notifications[-1]["params"] is finals[0], "nothing follows the final event"
    return finals[0]


def first_index(runtime, stream_id: str, method: str) -> int:
    def matches(message: dict) -> bool:
        if message.get("method") == "stream.step":
            return method == "stream.chunk" and any(
                entry["stream_id"] == stream_id for entry in message["params"]["chunks"]
            )
        return message.get("method") == method and message["params"].get("stream_id") == stream_id

    return runtime.index_of(matches)


@pytest.fixture
def load_variant(runtime, tiny_model_dir):
    """Loads the tiny model under a new id with the given load params; unloads it after."""
    loaded = []

    def load(model_id: str, **params) -> dict:
        info = runtime.call(
            "load_model", {"model_id": model_id, "local_path": str(tiny_model_dir), **params}
        )
        loaded.append(model_id)
        return info

    yield load
    for model_id in loaded:
        runtime.call("unload_model", {"model_id": model_id})


def test_batched_greedy_output_equals_sequential_output_per_stream(runtime):
    cases = {
        "long": ("A long story about", 60),
        "repeat": ("Hello world " * 5, 17),
        "one": ("x " * 40, 1),
        "late": ("Late", 25),
    }
    expected = {name: reference(runtime, name, *case) for name, case in cases.items()}
    for name in ("long", "repeat", "one"):
        runtime.call("generate", {"stream_id": f"b-{name}", **greedy(*cases[name])})
    # Inserted while the first three are running.
    runtime.wait_chunks("b-long", 3)
    runtime.call("generate", {"stream_id": "b-late", **greedy(*cases["late"])})
    for name, (_, max_tokens) in cases.items():
        notifications = runtime.wait_terminal(f"b-{name}")
        assert token_ids(notifications) == expected[name], name
        assert final(notifications)["finish_reason"] == "length"
        stats = [m["params"] for m in notifications if m["method"] == "stream.stats"]
        assert stats[0]["tokens_generated"] == max_tokens
    # The late stream really ran beside the first: its first token came before the first's end.
    assert first_index(runtime, "b-late", "stream.chunk") < first_index(
        runtime, "b-long", "stream.event"
    )


@pytest.fixture
def first_token_eos_model(runtime, tiny_model_dir, tmp_path_factory):
    """A copy of the tiny model whose EOS is the first greedy token of PROMPT."""
    prompt = "Stop at once"
    first = reference(runtime, "eos-first", prompt, 1)[0]
    copy = tmp_path_factory.mktemp("eos-first") / "tiny-eos-first"
    shutil.copytree(tiny_model_dir, copy)
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, first]}))
    model_id = "test/tiny-eos-first"
    runtime.call("load_model", {"model_id": model_id, "local_path": str(copy)})
    yield model_id, prompt
    runtime.call("unload_model", {"model_id": model_id})


def test_eos_on_the_first_token_ends_a_batched_stream_with_no_tokens(
    runtime, first_token_eos_model
):
    model_id, prompt = first_token_eos_model
    runtime.call("generate", {"stream_id": "eos-company", **greedy("Other words", 30, model_id)})
    runtime.call("generate", {"stream_id": "eos-first", **greedy(prompt, 30, model_id)})
    notifications = runtime.wait_terminal("eos-first")
    assert chunks(notifications) == []
    assert final(notifications)["finish_reason"] == "stop"
    stats = [m["params"] for m in notifications if m["method"] == "stream.stats"]
    assert stats[0]["tokens_generated"] == 0
    final(runtime.wait_terminal("eos-company"))


def wait_counts(runtime, model_id: str, **expected: int) -> None:
    """Asks `runtime/state` again as soon as it answers, until its entry for `model_id`
    shows the `expected` counts (running, prefilling, queued)."""
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        entries = runtime.call("runtime/state")["loaded_models"]
        counts = [{k: e[k] for k in expected} for e in entries if e["model_id"] == model_id]
        if counts == [expected]:
            return
    raise AssertionError(f"{model_id} never showed {expected}: {counts}")


def long_greedy(prompt: str, model_id: str) -> dict:
    return greedy(prompt, 4096, model_id)


def test_a_stream_waiting_for_room_in_the_batch_is_cancelled_without_tokens(
    runtime, load_variant
):
    assert load_variant("test/tiny-b2", batch_size=2)["batch_size"] == 2
    for n in range(2):
        fill = long_greedy(f"Fill {n}", "test/tiny-b2")
        runtime.call("generate", {"stream_id": f"full-{n}", **fill})
    runtime.call("generate", {"stream_id": "no-room", **greedy("Wait", 5, "test/tiny-b2")})
    wait_counts(runtime, "test/tiny-b2", running=2, queued=1)
    assert runtime.call("cancel", {"stream_id": "no-room"}) == {"cancelled": True}
    notifications = runtime.wait_terminal("no-room")
    assert chunks(notifications) == []
    assert final(notifications)["event"] == "cancelled"
    # The batch goes on.
    count = len(chunks(runtime.notifications("full-0")))
    runtime.wait_chunks("full-0", count + 2)
    for n in range(2):
        assert runtime.call("cancel", {"stream_id": f"full-{n}"}) == {"cancelled": True}
        assert final(runtime.wait_terminal(f"full-{n}"))["event"] == "cancelled"


def long_prompt(runtime, words: int) -> tuple[str, int]:
    prompt = " ".join(f"w{n % 97}" for n in range(words))
    tokens = runtime.call("tokenize", {"model_id": MODEL_ID, "text": prompt})["tokens"]
    return prompt, len(tokens)


def test_a_stream_cancelled_while_prefilling_ends_once_without_tokens(runtime, load_variant):
    load_variant("test/tiny-p16", prefill_step_size=16)
    prompt, _ = long_prompt(runtime, 1500)
    runtime.call("generate", {"stream_id": "prefilling", **greedy(prompt, 5, "test/tiny-p16")})
    wait_counts(runtime, "test/tiny-p16", prefilling=1)
    assert chunks(runtime.notifications("prefilling")) == [], "still prefilling"
    assert runtime.call("cancel", {"stream_id": "prefilling"}) == {"cancelled": True}
    notifications = runtime.wait_terminal("prefilling")
    assert chunks(notifications) == []
    assert final(notifications)["event"] == "cancelled"


def test_cancelling_one_decoding_stream_leaves_its_batch_company_intact(runtime):
    expected = reference(runtime, "company", "Keep going", 40)
    runtime.call("generate", {"stream_id": "cancelled-mid", **long_greedy("Stop me", MODEL_ID)})
    runtime.call("generate", {"stream_id": "company", **greedy("Keep going", 40)})
    runtime.wait_chunks("cancelled-mid", 3)
    assert runtime.call("cancel", {"stream_id": "cancelled-mid"}) == {"cancelled": True}
    assert final(runtime.wait_terminal("cancelled-mid"))["event"] == "cancelled"
    notifications = runtime.wait_terminal("company")
    assert token_ids(notifications) == expected
    assert final(notifications)["finish_reason"] == "length"


def test_two_models_decode_in_turns(runtime, load_variant):
    load_variant("test/tiny-second")
    expected = reference(runtime, "models", "Two models", 40)
    runtime.call("generate", {"stream_id": "model-a", **greedy("Two models", 40)})
    runtime.call(
        "generate", {"stream_id": "model-b", **greedy("Two models", 40, "test/tiny-second")}
    )
    for stream_id in ("model-a", "model-b"):
        notifications = runtime.wait_terminal(stream_id)
        assert token_ids(notifications) == expected, stream_id
    # Neither model waited for the other to finish.
    assert first_index(runtime, "model-b", "stream.chunk") < first_index(
        runtime, "model-a", "stream.event"
    )
    assert first_index(runtime, "model-a", "stream.chunk") < first_index(
        runtime, "model-b", "stream.event"
    )


def test_mixed_temperatures_share_a_batch_and_greedy_rows_stay_exact(runtime):
    expected = reference(runtime, "mixed", "Mixed company", 30)
    warm = {"model_id": MODEL_ID, "prompt": "Warm", "max_tokens": 30}
    runtime.call("generate", {"stream_id": "hot", **warm, "temperature": 1.5, "top_p": 0.9})
    runtime.call("generate", {"stream_id": "mild", **warm, "temperature": 0.7})
    runtime.call("generate", {"stream_id": "cold", **greedy("Mixed company", 30)})
    assert token_ids(runtime.wait_terminal("cold")) == expected
    for stream_id in ("hot", "mild"):
        notifications = runtime.wait_terminal(stream_id)
        assert len(chunks(notifications)) == 30
        assert final(notifications)["finish_reason"] == "length"


def seeded(seed: int) -> dict:
    return {"model_id": MODEL_ID, "prompt": "Seeded", "max_tokens": 40, "temperature": 1.0,
            "top_p": 0.95, "seed": seed}


def test_a_seeded_stream_gives_the_same_tokens_alone_and_in_a_batch(runtime):
    alone = token_ids(runtime.generate("seeded-alone", **seeded(42)))
    company = {"model_id": MODEL_ID, "prompt": "Company", "max_tokens": 40}
    runtime.call("generate", {"stream_id": "c-warm", **company, "temperature": 0.8})
    runtime.call("generate", {"stream_id": "c-greedy", **company, "temperature": 0})
    runtime.call("generate", {"stream_id": "c-seeded", **seeded(7)})
    runtime.call("generate", {"stream_id": "seeded-batched", **seeded(42)})
    assert token_ids(runtime.wait_terminal("seeded-batched")) == alone
    other = token_ids(runtime.wait_terminal("c-seeded"))
    assert other != alone, "another seed gives other tokens"
    for stream_id in ("c-warm", "c-greedy"):
        final(runtime.wait_terminal(stream_id))


def test_step_chunks_put_the_tokens_of_one_step_in_one_line(runtime):
    expected = {n: reference(runtime, f"step-{n}", f"Step {n}", 12) for n in range(3)}
    before = len(runtime.messages)
    for n in range(3):
        runtime.call(
            "generate", {"stream_id": f"step-{n}", **greedy(f"Step {n}", 12, step_chunks=True)}
        )
    for n in range(3):
        notifications = runtime.wait_terminal(f"step-{n}")
        assert token_ids(notifications) == expected[n]
        assert all(m.get("step") for m in notifications if m["method"] == "stream.chunk")
        assert final(notifications)["finish_reason"] == "length"
    mine = {f"step-{n}" for n in range(3)}
    lines = [
        m["params"]["chunks"]
        for m in runtime.messages[before:]
        if m.get("method") == "stream.step"
        and {e["stream_id"] for e in m["params"]["chunks"]} & mine
    ]
    assert all(set(entry) == STEP_ENTRY_KEYS for line in lines for entry in line)
    assert any(len({e["stream_id"] for e in line} & mine) == 3 for line in lines), (
        "the three streams were stepped together"
    )
    chunk_lines = [
        m for m in runtime.messages[before:]
        if m.get("method") == "stream.chunk" and m["params"]["stream_id"] in mine
    ]
    assert chunk_lines == [], "opted-in streams get no stream.chunk lines"


def tokens_of_between(runtime, stream_id: str, start: int, end: int) -> int:
    count = 0
    for message in runtime.messages[start:end]:
        if message.get("method") == "stream.chunk" and message["params"]["stream_id"] == stream_id:
            count += 1
        elif message.get("method") == "stream.step":
            count += sum(1 for e in message["params"]["chunks"] if e["stream_id"] == stream_id)
    return count


@pytest.mark.parametrize("step_size", [16, 8192])
def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(
    runtime, load_variant, step_size
):
    model_id = f"test/tiny-prefill-{step_size}"
    load_variant(model_id, prefill_step_size=step_size)
    prompt, prompt_tokens = long_prompt(runtime, 600)
    runtime.call("generate", {"stream_id": f"decoding-{step_size}", **long_greedy("Run", model_id)})
    runtime.wait_chunks(f"decoding-{step_size}", 2)
    start = len(runtime.messages)
    runtime.call("generate", {"stream_id": f"prompt-{step_size}", **greedy(prompt, 1, model_id)})
    runtime.wait_terminal(f"prompt-{step_size}")
    end = first_index(runtime, f"prompt-{step_size}", "stream.chunk")
    between = tokens_of_between(runtime, f"decoding-{step_size}", start, end)
    chunks_of_prompt = -(-prompt_tokens // step_size)
    if step_size == 16:
        # One decode step beside every prefill chunk.
        assert between >= chunks_of_prompt - 2, (between, chunks_of_prompt)
    else:
        assert between <= 8, between
    assert runtime.call("cancel", {"stream_id": f"decoding-{step_size}"}) == {"cancelled": True}
    final(runtime.wait_terminal(f"decoding-{step_size}"))


def test_runtime_info_reports_batching_and_each_models_batch_size(runtime, load_variant):
    load_variant("test/tiny-b3", batch_size=3)
    info = runtime.call("runtime/info")
    assert {"batching", "step_chunks"} <= set(info["capabilities"])
    assert info["limits"]["batch_size_default"] == 8
    assert info["limits"]["prefill_step_size_default"] == 512
    models = {m["model_id"]: m for m in info["models"]}
    default_cache = info["limits"]["prefix_cache_bytes_default"]
    assert models["test/tiny-b3"] == {
        "model_id": "test/tiny-b3", "batch_size": 3, "batched": True,
        "prefix_cache_bytes": default_cache,
    }
    assert models[SERIAL_MODEL_ID] == {
        "model_id": SERIAL_MODEL_ID, "batch_size": 1, "batched": False,
        "prefix_cache_bytes": default_cache,
    }


@pytest.mark.parametrize(
    "params",
    [{"batch_size": 0}, {"batch_size": 65}, {"batch_size": "8"}, {"prefill_step_size": 8},
     {"prefill_step_size": 8193}],
)
def test_load_model_refuses_batch_settings_out_of_range(runtime, tiny_model_dir, params):
    error = runtime.error(
        "load_model", {"model_id": "test/bad", "local_path": str(tiny_model_dir), **params}
    )
    assert error["code"] == INVALID_PARAMS
    assert next(iter(params)) in error["message"]
