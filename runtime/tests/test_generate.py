"""Generation streams: shapes and order of notifications, stop conditions,
exact text, cancellation, queueing and limits.

Method: run generations on the shared runtime and inspect the notification
sequence per stream. The tiny model never picks EOS greedily (its EOS
embedding is zero), so greedy runs end by length; the EOS path uses a copy
of the model that declares another token as EOS.
"""

import json
import shutil
import uuid

import pytest
from tokenizers import Tokenizer

from mlx_runtime.limits import DETOKENIZE_TOKENS_HELD_MAX
from runtime_client import chunks, text_of, token_ids
from tiny_model import MODEL_ID, SERIAL_MODEL_ID

INVALID_PARAMS = -32602
MODEL_NOT_LOADED = -32005
INTERNAL_ERROR = -32099
STREAMS_LIVE_MAX = 64
LONG = 4096

CHUNK_KEYS = {"stream_id", "token", "token_id", "is_final"}
STATS_KEYS = {
    "cached_tokens",
    "prompt_tokens",
    "prompt_time",
    "queue_time",
    "stream_id",
    "tokens_generated",
    "tokens_per_second",
    "time_to_first_token",
    "total_time",
}


def greedy(prompt: str, max_tokens: int, model_id: str = MODEL_ID) -> dict:
    return {"model_id": model_id, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}


def long_stream(seed: int = 7, model_id: str = MODEL_ID) -> dict:
    return {
        "model_id": model_id,
        "prompt": "A long story",
        "max_tokens": LONG,
        "temperature": 1.0,
        "seed": seed,
    }


def completed(notifications, tokens: int, finish_reason: str) -> None:
    """Check the complete sequence: chunks, then one stats, then one completed event."""
    methods = [message["method"] for message in notifications]
    assert methods == ["stream.chunk"] * tokens + ["stream.stats", "stream.event"]
    for chunk in chunks(notifications):
        assert set(chunk) == CHUNK_KEYS, "single form, no cumulative_text"
        assert chunk["is_final"] is False
        assert isinstance(chunk["token"], str) and isinstance(chunk["token_id"], int)
    stats = notifications[-2]["params"]
    assert set(stats) == STATS_KEYS
    assert stats["tokens_generated"] == tokens
    assert 0 < stats["time_to_first_token"] <= stats["total_time"]
    assert stats["tokens_per_second"] > 0
    event = notifications[-1]["params"]
    assert event == {
        "stream_id": event["stream_id"],
        "event": "completed",
        "is_final": True,
        "finish_reason": finish_reason,
    }


def test_greedy_generation_ends_at_max_tokens(runtime):
    notifications = runtime.generate("greedy-length", **greedy("The worker", 12))
    completed(notifications, tokens=12, finish_reason="length")


def test_generate_answers_before_its_stream_starts(runtime):
    runtime.generate("order", **greedy("Hello", 3))
    answer = runtime.index_of(lambda m: m.get("result", {}).get("stream_id") == "order")
    first = runtime.index_of(lambda m: m.get("params", {}).get("stream_id") == "order")
    assert answer < first
    started_at = runtime.messages[answer]["result"]["started_at"]
    assert isinstance(started_at, float) and started_at > 1.6e9


def test_generate_without_stream_id_gets_a_uuid(runtime):
    result = runtime.call("generate", greedy("Hi", 2))
    assert uuid.UUID(result["stream_id"]).version == 4
    completed(runtime.wait_terminal(result["stream_id"]), tokens=2, finish_reason="length")


def test_greedy_and_seeded_generation_are_reproducible(runtime):
    first = runtime.generate("repeat-greedy-1", **greedy("The river", 16))
    second = runtime.generate("repeat-greedy-2", **greedy("The river", 16))
    assert token_ids(first) == token_ids(second)
    sampled = {
        "model_id": MODEL_ID,
        "prompt": "The river",
        "max_tokens": 16,
        "temperature": 1.0,
        "seed": 3,
    }
    one = runtime.generate("repeat-seed-1", **sampled)
    two = runtime.generate("repeat-seed-2", **sampled)
    assert token_ids(one) == token_ids(two)


def test_chunk_tokens_concatenate_to_the_decoded_ids(runtime, tiny_model_dir):
    reference = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    held_back = 0
    for seed in range(6):
        notifications = runtime.generate(
            f"text-{seed}",
            model_id=MODEL_ID,
            prompt="Rain fell on the harbour",
            max_tokens=48,
            temperature=1.0,
            top_p=0.95,
            seed=seed,
        )
        ids = token_ids(notifications)
        assert text_of(notifications) == reference.decode(ids, skip_special_tokens=False)
        held_back += sum(1 for chunk in chunks(notifications) if chunk["token"] == "")
    # The tiny model emits many byte tokens, so partial UTF-8 must have been held back.
    assert held_back > 0


def test_a_run_of_invalid_bytes_streams_without_holding_chunks_back(runtime, tiny_model_dir):
    # Greedy decoding of this prompt ends in one byte token, repeated, that
    # is not UTF-8 on its own: a run of U+FFFD that no later token completes.
    reference = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    notifications = runtime.generate("invalid-run", **greedy("Hello world", 300))
    ids = token_ids(notifications)
    run_id = ids[-1]
    run_start = next(i for i in range(len(ids), 0, -1) if ids[i - 1] != run_id)
    assert len(ids) - run_start >= 100 and reference.decode([run_id] * 2) == "\ufffd" * 2, (
        f"precondition: pick a prompt whose output ends in a long invalid run, not {ids[-20:]}"
    )
    assert text_of(notifications) == reference.decode(ids, skip_special_tokens=False)
    texts = [chunk["token"] for chunk in chunks(notifications)]
    silent = longest = 0
    for text in texts:
        silent = 0 if text else silent + 1
        longest = max(longest, silent)
    assert longest <= DETOKENIZE_TOKENS_HELD_MAX, (
        f"{longest} chunks in a row carried no text, bound {DETOKENIZE_TOKENS_HELD_MAX}"
    )
    longest_text = max(len(text) for text in texts[run_start:])
    assert longest_text <= DETOKENIZE_TOKENS_HELD_MAX + 1, (
        f"a chunk of the run carried {longest_text} characters"
    )


def test_a_leading_space_of_the_first_token_is_kept(runtime, tiny_model_dir):
    # Greedy decoding of this prompt starts with " be" in the tiny model.
    reference = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    [chunk] = chunks(runtime.generate("space", **greedy("Rain fell", 1)))
    expected = reference.decode([chunk["token_id"]])
    assert expected.startswith(" "), (
        f"precondition: pick a prompt whose first token has a space, not {expected!r}"
    )
    assert chunk["token"] == expected


@pytest.fixture(scope="module")
def eos_model(runtime, tiny_model_dir, tmp_path_factory):
    """The tiny model, loaded again with a later greedy token of a prompt declared EOS.

    Returns (model id, prompt, the greedy ids of the plain model, the index of
    the first token that is now EOS).
    """
    prompt = "Hello world"
    ids = token_ids(runtime.generate("eos-probe", **greedy(prompt, 12)))
    index = next((i for i in range(1, len(ids)) if ids[i] not in ids[:i]), None)
    assert index is not None, f"greedy output {ids} repeats too much to pick a stop token"
    copy = tmp_path_factory.mktemp("eos") / "tiny-eos"
    shutil.copytree(tiny_model_dir, copy)
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, ids[index]]}))
    model_id = "test/tiny-eos"
    runtime.call("load_model", {"model_id": model_id, "local_path": str(copy)})
    yield model_id, prompt, ids, index
    runtime.call("unload_model", {"model_id": model_id})


def test_generation_ends_with_stop_at_eos(runtime, eos_model, tiny_model_dir):
    model_id, prompt, plain_ids, index = eos_model
    notifications = runtime.generate(
        "eos", model_id=model_id, prompt=prompt, max_tokens=12, temperature=0
    )
    completed(notifications, tokens=index, finish_reason="stop")
    assert token_ids(notifications) == plain_ids[:index], "EOS itself is not sent as a chunk"
    reference = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    assert text_of(notifications) == reference.decode(plain_ids[:index], skip_special_tokens=False)


def test_cancel_stops_a_running_stream(runtime):
    runtime.call("generate", {"stream_id": "cancel-me", **long_stream()})
    runtime.wait_chunks("cancel-me", 3)
    assert runtime.call("cancel", {"stream_id": "cancel-me"}) == {"cancelled": True}
    notifications = runtime.wait_terminal("cancel-me")
    assert notifications[-1]["params"] == {
        "stream_id": "cancel-me",
        "event": "cancelled",
        "is_final": True,
    }
    assert [m["method"] for m in notifications[:-1]] == ["stream.chunk"] * (len(notifications) - 1)
    assert len(notifications) - 1 < LONG
    # A later round trip shows nothing more arrived for the stream.
    assert runtime.call("runtime/state")["active_streams"] == 0
    assert runtime.notifications("cancel-me") == notifications


def test_cancel_of_an_unknown_stream_is_false(runtime):
    assert runtime.call("cancel", {"stream_id": "never-started"}) == {"cancelled": False}


def test_cancel_of_a_queued_stream_ends_it_without_chunks(runtime):
    # On the sequential path, so "waiting" stays queued behind "busy".
    runtime.call("generate", {"stream_id": "busy", **long_stream(model_id=SERIAL_MODEL_ID)})
    runtime.call("generate", {"stream_id": "waiting", **greedy("queued", 5, SERIAL_MODEL_ID)})
    assert runtime.call("cancel", {"stream_id": "waiting"}) == {"cancelled": True}
    assert runtime.wait_terminal("waiting") == [
        {
            "jsonrpc": "2.0",
            "method": "stream.event",
            "params": {"stream_id": "waiting", "event": "cancelled", "is_final": True},
        }
    ]
    assert runtime.call("cancel", {"stream_id": "busy"}) == {"cancelled": True}
    assert runtime.wait_terminal("busy")[-1]["params"]["event"] == "cancelled"


def test_on_the_sequential_path_two_generations_complete_one_after_the_other(runtime):
    runtime.send(
        {
            "jsonrpc": "2.0",
            "method": "generate",
            "params": {"stream_id": "first", **greedy("One", 20, SERIAL_MODEL_ID)},
            "id": "g1",
        }
    )
    runtime.send(
        {
            "jsonrpc": "2.0",
            "method": "generate",
            "params": {"stream_id": "second", **greedy("Two", 20, SERIAL_MODEL_ID)},
            "id": "g2",
        }
    )
    assert "result" in runtime.response("g1") and "result" in runtime.response("g2")
    completed(runtime.wait_terminal("first"), tokens=20, finish_reason="length")
    completed(runtime.wait_terminal("second"), tokens=20, finish_reason="length")
    # One generation at a time: the second starts after the first has ended.
    first_end = runtime.index_of(
        lambda m: m.get("method") == "stream.event" and m["params"]["stream_id"] == "first"
    )
    second_start = runtime.index_of(
        lambda m: m.get("method") == "stream.chunk" and m["params"]["stream_id"] == "second"
    )
    assert first_end < second_start


def test_requests_are_answered_while_a_stream_runs(runtime):
    runtime.call("generate", {"stream_id": "background", **long_stream()})
    runtime.wait_chunks("background", 1)
    assert runtime.call("runtime/state")["active_streams"] == 1
    assert runtime.call("tokenize", {"model_id": MODEL_ID, "text": "still here"})["tokens"]
    assert runtime.call("cancel", {"stream_id": "background"}) == {"cancelled": True}
    runtime.wait_terminal("background")


def test_a_live_stream_id_cannot_be_reused_until_the_stream_ends(runtime):
    runtime.call("generate", {"stream_id": "dup", **long_stream()})
    error = runtime.error("generate", {"stream_id": "dup", **greedy("again", 2)})
    assert error == {
        "code": INVALID_PARAMS,
        "message": "Stream ID 'dup' is already in use",
        "data": {"type": "ValidationError"},
    }
    runtime.call("cancel", {"stream_id": "dup"})
    first_run = runtime.wait_terminal("dup")
    runtime.call("generate", {"stream_id": "dup", **greedy("again", 2)})

    def second_run_ended():
        return len([m for m in runtime.notifications("dup") if m["method"] == "stream.event"]) == 2

    runtime.wait_until(second_run_ended, "the second run of dup")
    assert runtime.notifications("dup")[-1]["params"]["event"] == "completed"
    assert first_run[-1]["params"]["event"] == "cancelled"


@pytest.mark.parametrize(
    "change",
    [
        {"top_p": 0},
        {"top_p": 1.5},
        {"max_tokens": 5000},
        {"max_tokens": 0},
        {"max_tokens": 2.5},
        {"temperature": 2.5},
        {"temperature": -0.1},
        {"temperature": "hot"},
        {"seed": -1},
        {"seed": True},
        {"prompt": None},
        {"prompt": 5},
        {"stream_id": "has space"},
        {"model_id": None},
    ],
)
def test_generate_rejects_invalid_params(runtime, change):
    params = {"model_id": MODEL_ID, "prompt": "Hello", "stream_id": "invalid", **change}
    params = {key: value for key, value in params.items() if value is not None}
    error = runtime.error("generate", params)
    assert error["code"] == INVALID_PARAMS
    assert error["data"] == {"type": "ValidationError"}
    assert runtime.notifications("invalid") == []


def test_generate_with_an_unloaded_model_is_model_not_loaded(runtime):
    error = runtime.error("generate", {"model_id": "test/not-loaded", "prompt": "Hello"})
    assert error == {
        "code": MODEL_NOT_LOADED,
        "message": "Model not loaded: test/not-loaded",
        "data": {"model_id": "test/not-loaded"},
    }


def test_live_streams_are_capped(runtime):
    # On the sequential path, so the short streams stay queued behind the long one.
    stream_ids = [f"cap-{n}" for n in range(STREAMS_LIVE_MAX)]
    runtime.call("generate", {"stream_id": stream_ids[0], **long_stream(model_id=SERIAL_MODEL_ID)})
    for stream_id in stream_ids[1:]:
        runtime.call("generate", {"stream_id": stream_id, **greedy("queued", 2, SERIAL_MODEL_ID)})
    error = runtime.error(
        "generate", {"stream_id": "one-too-many", **greedy("queued", 2, SERIAL_MODEL_ID)}
    )
    assert error["code"] == INTERNAL_ERROR
    assert error["data"] == {"type": "StreamLimit"}
    for stream_id in reversed(stream_ids):
        assert runtime.call("cancel", {"stream_id": stream_id}) == {"cancelled": True}
    for stream_id in stream_ids:
        events = [m for m in runtime.wait_terminal(stream_id) if m["method"] == "stream.event"]
        assert [event["params"]["event"] for event in events] == ["cancelled"]
    assert runtime.call("runtime/state")["active_streams"] == 0
