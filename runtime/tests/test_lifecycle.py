"""Process life cycle: shutdown and end of input, with and without live streams.

Method: each test starts a runtime of its own, since each ends it.
"""

from runtime_client import chunks
from tiny_model import MODEL_ID


def load_tiny_model(client, tiny_model_dir):
    client.call("load_model", {"model_id": MODEL_ID, "local_path": str(tiny_model_dir)})


def test_shutdown_answers_cancels_live_streams_and_exits_zero(fresh_runtime, tiny_model_dir):
    client = fresh_runtime()
    load_tiny_model(client, tiny_model_dir)
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


def test_end_of_input_exits_zero(fresh_runtime):
    client = fresh_runtime()
    assert client.call("runtime/state")["loaded_models"] == []
    client.process.stdin.close()
    assert client.wait_exit() == 0
