"""The JSON-RPC envelope: readiness, info and state, errors, and bad input.

Method: send lines to the shared runtime over its stdin and check the lines
it writes back; a bad line must cost one error answer and nothing more.
"""

import json

from tiny_model import MODEL_ID

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
LINE_BYTES_MAX = 1024 * 1024


def test_runtime_announces_readiness_on_stderr_and_keeps_stdout_for_json(runtime):
    assert "MLX Runtime ready" in runtime.stderr_lines
    first = runtime.messages[0]
    assert first["id"] == "readiness-probe", "nothing may reach stdout before the first answer"
    assert runtime.protocol_violations == []


def test_info_reports_versions_and_capabilities(runtime):
    info = runtime.call("runtime/info")
    assert info["protocol"] == "json-rpc-2.0"
    assert info["mlx_supported"] is True
    assert info["version"] and info["mlx_version"] and info["mlx_lm_version"]
    for capability in ("generate", "stream", "tokenize", "load_model", "cancel", "compact_chunks"):
        assert capability in info["capabilities"]
    assert info["memory"]["rss"] > 0
    assert info["limits"]["line_bytes_max"] == LINE_BYTES_MAX


def test_state_lists_loaded_models_and_live_streams(runtime):
    state = runtime.call("runtime/state")
    entries = {e["model_id"]: e for e in state["loaded_models"]}
    entry = dict(entries[MODEL_ID])
    cache = entry.pop("prefix_cache")
    assert entry == {
        "model_id": MODEL_ID,
        "state": "ready",
        "type": "text",
        "batch_size": 8,
        "running": 0,
        "prefilling": 0,
        "queued": 0,
    }
    assert set(cache) == {
        "lookups", "hits", "prompt_tokens", "cached_tokens", "entries", "bytes",
        "evictions", "too_large", "sessions",
    }
    assert state["active_streams"] == 0
    assert state["restart_count"] == 0


def test_unknown_method_is_method_not_found(runtime):
    error = runtime.error("no/such/method")
    assert error["code"] == METHOD_NOT_FOUND
    assert error["message"] == "Unknown method: no/such/method"


def test_malformed_line_gets_a_parse_error_and_the_next_request_is_answered(runtime):
    before = len(runtime.messages)
    runtime.send_line(b'{"jsonrpc": "2.0", "method": "runtime/info", "id": 1')
    answer = runtime.request("runtime/state")
    assert "result" in answer
    parse_error = runtime.messages[before]
    assert parse_error["id"] is None
    assert parse_error["error"]["code"] == PARSE_ERROR


def test_invalid_utf8_and_non_json_constants_are_parse_errors(runtime):
    for line in (
        b'{"jsonrpc":"2.0","method":"\xff","id":1}',
        b'{"jsonrpc":"2.0","method":"x","id":NaN}',
    ):
        before = len(runtime.messages)
        runtime.send_line(line)
        runtime.call("runtime/state")
        assert runtime.messages[before]["error"]["code"] == PARSE_ERROR


def check_invalid_request(runtime, line: bytes, expected_id, code=INVALID_REQUEST):
    before = len(runtime.messages)
    runtime.send_line(line)
    runtime.call("runtime/state")
    answer = runtime.messages[before]
    assert answer["id"] == expected_id
    assert answer["error"]["code"] == code


def test_requests_with_a_bad_envelope_are_invalid_requests(runtime):
    check_invalid_request(runtime, b"[1, 2]", None)
    check_invalid_request(runtime, b'"just a string"', None)
    check_invalid_request(runtime, b'{"jsonrpc":"1.0","method":"runtime/info","id":"v1"}', "v1")
    check_invalid_request(runtime, b'{"jsonrpc":"2.0","method":7,"id":"m"}', "m")
    check_invalid_request(runtime, b'{"jsonrpc":"2.0","method":"runtime/info","id":{"no":1}}', None)
    check_invalid_request(
        runtime,
        b'{"jsonrpc":"2.0","method":"runtime/info","params":[1],"id":"p"}',
        "p",
        INVALID_PARAMS,
    )


def test_ids_are_echoed_verbatim(runtime):
    for request_id in ("abc-1", 42, -7, 2.5, ""):
        assert runtime.request("runtime/state", request_id=request_id)["id"] == request_id


def test_notification_is_executed_without_an_answer(runtime):
    before = len(runtime.messages)
    runtime.send({"jsonrpc": "2.0", "method": "runtime/info"})
    runtime.send({"jsonrpc": "2.0", "method": "no/such/method"})
    answer = runtime.request("runtime/state")
    # Lines are handled in order, so any answer to the notifications would come first.
    assert runtime.messages[before] == answer


def test_oversized_line_is_rejected_with_its_id_and_serving_continues(runtime):
    padding = "x" * LINE_BYTES_MAX
    line = json.dumps(
        {"jsonrpc": "2.0", "method": "tokenize", "params": {"text": padding}, "id": "big"}
    )
    runtime.send_line(line.encode())
    error = runtime.response("big")["error"]
    assert error["code"] == INVALID_REQUEST
    assert error["message"] == f"request line is {len(line)} bytes, limit {LINE_BYTES_MAX}"
    assert "result" in runtime.request("runtime/info")


def test_line_at_the_size_limit_is_accepted(runtime):
    envelope = {"jsonrpc": "2.0", "method": "runtime/state", "params": {"pad": ""}, "id": "edge"}
    padding = LINE_BYTES_MAX - len(json.dumps(envelope, separators=(",", ":")))
    envelope["params"]["pad"] = "y" * padding
    line = json.dumps(envelope, separators=(",", ":")).encode()
    assert len(line) == LINE_BYTES_MAX
    runtime.send_line(line)
    assert "result" in runtime.response("edge")
