"""A test client for the runtime: a real subprocess driven over its pipes.

It talks to the runtime exactly as the Rust worker does (newline-delimited
JSON-RPC on stdin/stdout, readiness line on stderr) and records every stdout
line, so tests can assert on order as well as content. Waiting is always for
an event with a deadline, never a fixed sleep.
"""

import itertools
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RUNTIME_DIR = Path(__file__).resolve().parents[1]
READY_LINE = "MLX Runtime ready"
# Generous: a bound on a hang, not an expected duration.
WAIT_SECONDS = 30.0


class RuntimeClient:
    def __init__(self, python: str, env: dict[str, str] | None = None):
        """Start the runtime with `env` added to this process's environment."""
        env = dict(os.environ, **(env or {}), PYTHONPATH=str(RUNTIME_DIR))
        self.process = subprocess.Popen(
            [python, "-m", "mlx_runtime"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        self._changed = threading.Condition()
        # Every stdout message in arrival order, and stdout lines that were not JSON.
        self.messages: list[dict] = []
        self.protocol_violations: list[bytes] = []
        self.stderr_lines: list[str] = []
        self._stdout_done = False
        self._stderr_done = False
        self._ids = itertools.count(1)
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    # Readers

    def _read_stdout(self) -> None:
        for line in self.process.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                message = None
            with self._changed:
                if isinstance(message, dict):
                    self.messages.append(message)
                else:
                    self.protocol_violations.append(line)
                self._changed.notify_all()
        with self._changed:
            self._stdout_done = True
            self._changed.notify_all()

    def _read_stderr(self) -> None:
        for raw in self.process.stderr:
            with self._changed:
                self.stderr_lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._stderr_done = True
            self._changed.notify_all()

    def stderr_text(self) -> str:
        # The condition's lock is reentrant, so this also works while waiting.
        with self._changed:
            return "\n".join(self.stderr_lines)

    def wait_until(
        self, predicate: Callable[[], Any], what: str, timeout: float = WAIT_SECONDS
    ) -> Any:
        """Wait until `predicate()` (called under the lock) is truthy; return its value."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                value = predicate()
                if value:
                    return value
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"timed out waiting for {what}; stderr:\n{self.stderr_text()}"
                    )
                self._changed.wait(remaining)

    def wait_ready(self) -> None:
        def ready_or_exited():
            return READY_LINE in self.stderr_lines or self.process.poll() is not None

        self.wait_until(ready_or_exited, "the readiness line")
        if READY_LINE not in self.stderr_lines:
            self.process.wait()
            status = self.process.returncode
            raise AssertionError(
                f"runtime exited with {status} before it was ready:\n{self.stderr_text()}"
            )

    # Writing

    def send_line(self, line: bytes) -> None:
        self.process.stdin.write(line + b"\n")
        self.process.stdin.flush()

    def send(self, message: dict) -> None:
        self.send_line(json.dumps(message).encode("utf-8"))

    def new_id(self) -> int:
        return next(self._ids)

    # Requests and responses

    def response(self, request_id: Any, timeout: float = WAIT_SECONDS) -> dict:
        def find():
            for message in self.messages:
                if "method" not in message and message.get("id") == request_id:
                    return message
            return None

        return self.wait_until(find, f"the response to {request_id!r}", timeout)

    def request(self, method: str, params: dict | None = None, request_id: Any = None) -> dict:
        """Send a request and return its whole response (result or error)."""
        request_id = self.new_id() if request_id is None else request_id
        message = {"jsonrpc": "2.0", "method": method, "id": request_id}
        if params is not None:
            message["params"] = params
        self.send(message)
        return self.response(request_id)

    def call(self, method: str, params: dict | None = None) -> Any:
        """Send a request that must succeed; return its result."""
        response = self.request(method, params)
        assert "error" not in response, f"{method} failed: {response['error']}"
        return response["result"]

    def error(self, method: str, params: dict | None = None) -> dict:
        """Send a request that must fail; return its error object."""
        response = self.request(method, params)
        assert "error" in response, f"{method} unexpectedly succeeded: {response['result']}"
        return response["error"]

    # Streams

    def notifications(self, stream_id: str) -> list[dict]:
        """The stream's notifications in order; its entries of `stream.step` lines are
        given as `stream.chunk` notifications (marked `"step": True`)."""
        with self._changed:
            return [
                message
                for message in _per_stream(self.messages)
                if message.get("method", "").startswith("stream.")
                and message["params"].get("stream_id") == stream_id
            ]

    def wait_terminal(self, stream_id: str, timeout: float = WAIT_SECONDS) -> list[dict]:
        """All notifications of a stream once its final event has arrived."""

        def ended():
            return any(
                message.get("method") == "stream.event"
                and message["params"].get("stream_id") == stream_id
                and message["params"].get("is_final")
                for message in self.messages
            )

        self.wait_until(ended, f"the end of stream {stream_id}", timeout)
        return self.notifications(stream_id)

    def wait_chunks(self, stream_id: str, count: int) -> None:
        def enough():
            return (
                sum(
                    1
                    for message in _per_stream(self.messages)
                    if message.get("method") == "stream.chunk"
                    and message["params"]["stream_id"] == stream_id
                )
                >= count
            )

        self.wait_until(enough, f"{count} chunks of stream {stream_id}")

    def generate(self, stream_id: str, **params: Any) -> list[dict]:
        """Run a generation to its end; return its notifications."""
        self.call("generate", {"stream_id": stream_id, **params})
        return self.wait_terminal(stream_id)

    def index_of(self, predicate: Callable[[dict], bool]) -> int:
        with self._changed:
            for index, message in enumerate(self.messages):
                if predicate(message):
                    return index
        raise AssertionError("no such message")

    # Ending

    def wait_exit(self, timeout: float = WAIT_SECONDS) -> int:
        returncode = self.process.wait(timeout)
        self.wait_until(lambda: self._stdout_done, "stdout to close")
        return returncode

    def close(self) -> None:
        """Stop the process if it still runs (tests that end it check the exit code)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.wait_until(
            lambda: self._stdout_done and self._stderr_done, "the output pipes to close"
        )
        try:
            self.process.stdin.close()
        except BrokenPipeError:
            pass  # Unflushed input to a process that is gone.
        self.process.stdout.close()
        self.process.stderr.close()


def _per_stream(messages: list[dict]):
    """`messages` with each `stream.step` line split into one chunk per entry."""
    for message in messages:
        if message.get("method") == "stream.step":
            for entry in message["params"]["chunks"]:
                params = {**entry, "is_final": False}
                yield {"jsonrpc": "2.0", "method": "stream.chunk", "params": params, "step": True}
        else:
            yield message


def chunks(notifications: list[dict]) -> list[dict[str, Any]]:
    return [message["params"] for message in notifications if message["method"] == "stream.chunk"]


def token_ids(notifications: list[dict]) -> list[int]:
    return [chunk["token_id"] for chunk in chunks(notifications)]


def text_of(notifications: list[dict]) -> str:
    return "".join(chunk["token"] for chunk in chunks(notifications))
