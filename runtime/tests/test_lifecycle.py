"""Process life cycle: shutdown and end of input, with and without live streams.

Method: each test starts a runtime of its own, since each ends it.
"""

from runtime_client import chunks
from tiny_model import MODEL_ID


def load_tiny_model(client, tiny_model_dir, batch_size: int | None = None):
    params = {"model_id": MODEL_ID, "local_path": str(tiny_model_dir)}
    if batch_size is not None:
        params["batch_size"] = batch_size
    client.call("load_model", params)


def test_shutdown_answers_cancels_live_streams_and_exits_zero(fresh_runtime, tiny_model_dir):
    # Batch size 1, so the second stream is still queued at shutdown.
    client = fresh_runtime()
    load_tiny_model(client, tiny_model_dir, batch_size=1)
    long = {
        "model_id": MODEL_ID,
        "prompt": "Go on",
        "max_tokens": 4096,
        "temperature": 1.0,
        "seed": 1,
    }
    client.call("generate", {"stream_id": "running", **long})
    client.call("generate", {"stream_id": "queued", **long})
    client.wait_chunks("running", 1)
    assert client.call("shutdown") == {"success": True}
    assert client.wait_exit() == 0
    for stream_id in ("running", "queued"):
        final = client.notifications(stream_id)[-1]["params"]
        assert final == {"stream_id": stream_id, "event": "cancelled", "is_final": True}
    assert chunks(client.notifications("queued")) == []
    assert client.protocol_violations == []


def test_shutdown_cancels_every_stream_of_a_batch_once(fresh_runtime, tiny_model_dir):
    client = fresh_runtime()
    load_tiny_model(client, tiny_model_dir)
    long = {"model_id": MODEL_ID, "prompt": "Go on", "max_tokens": 4096, "temperature": 1.0}
    stream_ids = [f"batched-{n}" for n in range(4)]
    for stream_id in stream_ids:
        client.call("generate", {"stream_id": stream_id, **long})
    for stream_id in stream_ids:
        client.wait_chunks(stream_id, 1)
    assert client.call("shutdown") == {"success": True}
    assert client.wait_exit() == 0
    for stream_id in stream_ids:
        finals = [m for m in client.notifications(stream_id) if m["params"].get("is_final")]
        assert [m["params"] for m in finals] == [
            {"stream_id": stream_id, "event": "cancelled", "is_final": True}
        ]
    assert client.protocol_violations == []


def test_end_of_input_exits_zero(fresh_runtime):
    client = fresh_runtime()
    assert client.call("runtime/state")["loaded_models"] == []
    client.process.stdin.close()
    assert client.wait_exit() == 0
