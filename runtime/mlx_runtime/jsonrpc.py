"""JSON-RPC 2.0 over newline-delimited JSON: framing, envelopes, errors, output.

Owns the wire format only; what a method does lives in `server` and below.
One JSON document per line in both directions. Input lines are read with a
length cap, so an oversized or malformed line costs one error response and
never poisons the lines after it.
"""

import json
import logging
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

# Error codes, as the existing runtime and its TypeScript client use them.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
MODEL_LOAD_ERROR = -32001
GENERATION_ERROR = -32002
TOKENIZER_ERROR = -32003
MODEL_NOT_LOADED = -32005
INTERNAL_ERROR = -32099


class RpcError(Exception):
    """An error answered to the caller as a JSON-RPC error object."""

    def __init__(self, code: int, message: str, data: Any = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def to_json(self) -> dict:
        error = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


def invalid_params(message: str) -> RpcError:
    return RpcError(INVALID_PARAMS, message, {"type": "ValidationError"})


def internal_error(message: str, kind: str = "InternalError") -> RpcError:
    return RpcError(INTERNAL_ERROR, message, {"type": kind})


@dataclass(frozen=True)
class Request:
    """A well-formed request or notification (`has_id` false: no response)."""

    method: str
    params: dict
    id: str | int | float | None
    has_id: bool


def _reject_constant(name: str) -> None:
    # Python's json accepts NaN and Infinity; JSON does not.
    raise ValueError(f"{name} is not valid JSON")


def decode_message(line: bytes) -> Any:
    """Parse one line. Raises RpcError(PARSE_ERROR) if it is not JSON."""
    try:
        return json.loads(line, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise RpcError(PARSE_ERROR, f"parse error: {exc}") from None


def _valid_id(value: Any) -> bool:
    return value is None or (isinstance(value, (str, int, float)) and not isinstance(value, bool))


def request_id_of(message: Any) -> str | int | float | None:
    """The id to answer an invalid request with: its own if usable, else null."""
    if isinstance(message, dict) and _valid_id(message.get("id")):
        return message.get("id")
    return None


def parse_request(message: Any) -> Request:
    """Check the envelope. Raises RpcError for anything but a usable request."""
    if isinstance(message, list):
        raise RpcError(INVALID_REQUEST, "batch requests are not supported")
    if not isinstance(message, dict):
        raise RpcError(INVALID_REQUEST, "a request must be a JSON object")
    if message.get("jsonrpc") != "2.0":
        raise RpcError(INVALID_REQUEST, 'jsonrpc must be "2.0"')
    if not _valid_id(message.get("id")):
        raise RpcError(INVALID_REQUEST, "id must be a string, a number or null")
    method = message.get("method")
    if not isinstance(method, str):
        raise RpcError(INVALID_REQUEST, "method must be a string")
    params = message.get("params")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise invalid_params("params must be an object")
    return Request(method=method, params=params, id=message.get("id"), has_id="id" in message)


@dataclass(frozen=True)
class OversizedLine:
    """A line over the cap: its first and last bytes, the middle discarded."""

    head: bytes
    tail: bytes
    length: int


# The id of an oversized request can still be found when it is the first or the
# last member of the object, which is how JSON-RPC clients usually write it.
_ID_VALUE = rb'(-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|"(?:[^"\\]|\\.)*")'
_ID_AT_HEAD = re.compile(rb'^\s*\{\s*(?:"jsonrpc"\s*:\s*"2\.0"\s*,\s*)?"id"\s*:\s*' + _ID_VALUE)
_ID_AT_TAIL = re.compile(rb'"id"\s*:\s*' + _ID_VALUE + rb"\s*\}\s*$")
_EDGE_BYTES = 4096


def oversized_request_id(line: OversizedLine) -> str | int | float | None:
    """Best-effort id of a request whose line was too long to parse."""
    match = _ID_AT_HEAD.search(line.head) or _ID_AT_TAIL.search(line.tail)
    if match is None:
        return None
    try:
        return json.loads(match.group(1))
    except ValueError:
        return None


def read_lines(stream: BinaryIO, line_bytes_max: int) -> Iterator[bytes | OversizedLine]:
    """Yield each line without its terminator, or an OversizedLine.

    Memory stays bounded by `line_bytes_max`: the rest of an oversized line is
    read in pieces and dropped, keeping only its last few bytes.
    """
    while True:
        line = stream.readline(line_bytes_max + 1)
        if not line:
            return
        if line.endswith(b"\n") or len(line) <= line_bytes_max:
            yield line.rstrip(b"\r\n")
            continue
        head, tail, length = line[:_EDGE_BYTES], line[-_EDGE_BYTES:], len(line)
        while not line.endswith(b"\n"):
            line = stream.readline(64 * 1024)
            if not line:
                break
            length += len(line)
            tail = (tail + line)[-_EDGE_BYTES:]
        if line.endswith(b"\n"):
            length -= 1  # The cap, like the length reported, excludes the newline.
        yield OversizedLine(head=head, tail=tail.rstrip(b"\r\n"), length=length)


class Writer:
    """Writes one JSON document per line to the protocol output.

    Responses come from the read loop and notifications from the compute
    thread; the lock keeps each line whole. Output is ASCII (non-ASCII is
    escaped), so it is valid UTF-8 whatever the strings contain. Once the
    reader has gone (broken pipe), further output is dropped.
    """

    def __init__(self, out: BinaryIO):
        self._out = out
        self._lock = threading.Lock()
        self._closed = False

    def send(self, message: dict) -> None:
        line = json.dumps(message, separators=(",", ":")).encode("ascii") + b"\n"
        with self._lock:
            if self._closed:
                return
            try:
                self._out.write(line)
                self._out.flush()
            except (BrokenPipeError, ValueError):
                # ValueError: the file was closed under us.
                self._closed = True
                log.warning("protocol output closed; dropping further messages")

    def result(self, request_id: Any, result: Any) -> None:
        self.send({"jsonrpc": "2.0", "id": request_id, "result": result})

    def error(self, request_id: Any, error: RpcError) -> None:
        self.send({"jsonrpc": "2.0", "id": request_id, "error": error.to_json()})

    def notify(self, method: str, params: dict) -> None:
        self.send({"jsonrpc": "2.0", "method": method, "params": params})


def line_summary(line: bytes | None) -> str:
    """A short, printable excerpt of a bad line for the log."""
    if line is None:
        return ""
    text = line[:120].decode("utf-8", "replace")
    return text + ("…" if len(line) > 120 else "")
