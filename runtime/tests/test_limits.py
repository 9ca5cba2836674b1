"""The live-stream limit: `runtime/info` reports the one the runtime enforces,
the default or the one MLX_RUNTIME_STREAMS_LIVE_MAX sets, and a value out of
range stops the runtime before it is ready.

Method: the shared runtime for the default; fresh runtimes started with the
variable set, filled up to the limit they report and asked for one more.
"""

import sys

import pytest

from runtime_client import READY_LINE, RuntimeClient
from tiny_model import MODEL_ID

INTERNAL_ERROR = -32099
EXIT_USAGE = 64
STREAMS_LIVE_MAX_DEFAULT = 64
ENV = "MLX_RUNTIME_STREAMS_LIVE_MAX"


def long_stream() -> dict:
    return {
        "model_id": MODEL_ID,
        "prompt": "A long story",
        "max_tokens": 4096,
        "temperature": 1.0,
        "seed": 3,
    }


def test_info_reports_the_default_live_stream_limit(runtime):
    assert runtime.call("runtime/info")["limits"]["streams_live_max"] == STREAMS_LIVE_MAX_DEFAULT


def test_the_limit_set_in_the_environment_is_reported_and_enforced(fresh_runtime, tiny_model_dir):
    client = fresh_runtime(env={ENV: "3"})
    limit = client.call("runtime/info")["limits"]["streams_live_max"]
    assert limit == 3
    client.call("load_model", {"model_id": MODEL_ID, "local_path": str(tiny_model_dir)})
    stream_ids = [f"live-{n}" for n in range(limit)]
    for stream_id in stream_ids:
        client.call("generate", {"stream_id": stream_id, **long_stream()})
    error = client.error("generate", {"stream_id": "one-too-many", **long_stream()})
    assert error["code"] == INTERNAL_ERROR
    assert error["data"] == {"type": "StreamLimit"}
    assert error["message"] == f"{limit} streams are live, limit {limit}"
    assert client.call("runtime/state")["active_streams"] == limit
    # A slot freed is a slot to take again.
    assert client.call("cancel", {"stream_id": stream_ids[-1]}) == {"cancelled": True}
    client.wait_terminal(stream_ids[-1])
    client.call("generate", {"stream_id": "after-cancel", **long_stream()})
    assert client.call("shutdown") == {"success": True}
    assert client.wait_exit() == 0


@pytest.mark.parametrize("value", ["0", "1025", "-1", "eight", "8.5", ""])
def test_a_limit_out_of_range_stops_the_runtime_before_it_is_ready(value):
    client = RuntimeClient(sys.executable, {ENV: value})
    try:
        status = client.wait_exit()
    finally:
        client.close()  # also waits until stderr is read to its end
    assert status == EXIT_USAGE
    assert READY_LINE not in client.stderr_lines
    assert f"{ENV} is {value!r}, must be a whole number from 1 to 1024" in client.stderr_text()


def test_the_batching_defaults_set_in_the_environment_apply_to_loads(
    fresh_runtime, tiny_model_dir
):
    client = fresh_runtime(
        env={"MLX_RUNTIME_BATCH_SIZE": "3", "MLX_RUNTIME_PREFILL_STEP_SIZE": "64", ENV: "5"}
    )
    limits = client.call("runtime/info")["limits"]
    assert (limits["batch_size_default"], limits["prefill_step_size_default"]) == (3, 64)
    info = client.call("load_model", {"model_id": MODEL_ID, "local_path": str(tiny_model_dir)})
    assert (info["batch_size"], info["batched"]) == (3, True)
    # A load may still ask for another batch size, up to the live-stream limit.
    error = client.error(
        "load_model", {"model_id": "b6", "local_path": str(tiny_model_dir), "batch_size": 6}
    )
    assert error["message"] == "batch_size is 6, must be in 1..5"
    assert client.call("shutdown") == {"success": True}
    assert client.wait_exit() == 0


def test_without_a_batch_size_set_the_default_is_bounded_by_the_live_stream_limit(
    fresh_runtime,
):
    client = fresh_runtime(env={ENV: "2"})
    assert client.call("runtime/info")["limits"]["batch_size_default"] == 2
    assert client.call("shutdown") == {"success": True}
    assert client.wait_exit() == 0


@pytest.mark.parametrize(
    ("name", "value", "bounds"),
    [
        ("MLX_RUNTIME_BATCH_SIZE", "0", "1 to 64"),
        ("MLX_RUNTIME_BATCH_SIZE", "65", "1 to 64"),
        ("MLX_RUNTIME_PREFILL_STEP_SIZE", "15", "16 to 8192"),
        ("MLX_RUNTIME_PREFILL_STEP_SIZE", "many", "16 to 8192"),
    ],
)
def test_a_batching_setting_out_of_range_stops_the_runtime_before_it_is_ready(
    name, value, bounds
):
    client = RuntimeClient(sys.executable, {name: value})
    try:
        status = client.wait_exit()
    finally:
        client.close()
    assert status == EXIT_USAGE
    assert READY_LINE not in client.stderr_lines
    assert f"{name} is {value!r}, must be a whole number from {bounds}" in client.stderr_text()
