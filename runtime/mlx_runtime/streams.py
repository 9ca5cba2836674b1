"""Generation streams: admission, cancellation, notifications.

A stream is admitted on the read loop (`StreamRegistry.admit`), handed to
the compute thread (an insert command, see `compute`), generated there by
its model's stepper (`batching`), and retired when it ends. Every admitted
stream ends with exactly one `stream.event` whose `is_final` is true, and
nothing for that stream follows it:

- completed: `stream.chunk`* -> `stream.stats` -> `stream.event` completed
- failed:    `stream.chunk`* -> `stream.event` error (no stats)
- cancelled: `stream.chunk`* -> `stream.event` cancelled (no stats)

Exactly-once is kept by the registry lock: whoever removes a stream from the
registry sends its terminal event (`cancel` for a stream not yet handed to
its stepper, the compute thread otherwise), and `cancel` answers true only
for a stream that will end with "cancelled".
"""

import logging
import threading
import time
from dataclasses import dataclass, field

from .jsonrpc import Writer, internal_error, invalid_params
from .models import LoadedModel

log = logging.getLogger(__name__)


@dataclass
class Stream:
    """One `generate` call. `running` is guarded by the registry lock."""

    stream_id: str
    model: LoadedModel
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    # Whether its tokens go in `stream.step` lines rather than `stream.chunk` ones.
    step_chunks: bool = False
    # The conversation it continues: its prefix cache entry is kept pinned.
    session_id: str | None = None
    # When `generate` admitted it (time.perf_counter()).
    admitted_at: float = field(default_factory=time.perf_counter)
    # Set by `cancel` (or shutdown); the compute thread then removes it.
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    running: bool = False


class StreamRegistry:
    """Live streams (queued or running) by id, at most `streams_max` of them."""

    def __init__(self, streams_max: int):
        self._streams_max = streams_max
        self._lock = threading.Lock()
        self._streams: dict[str, Stream] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._streams)

    def check_admissible(self, stream_id: str) -> None:
        """Raise the error `admit` would raise, before any work is done."""
        with self._lock:
            self._check_admissible(stream_id)

    def _check_admissible(self, stream_id: str) -> None:
        if stream_id in self._streams:
            raise invalid_params(f"Stream ID '{stream_id}' is already in use")
        if len(self._streams) >= self._streams_max:
            raise internal_error(
                f"{len(self._streams)} streams are live, limit {self._streams_max}", "StreamLimit"
            )

    def admit(self, stream: Stream) -> None:
        with self._lock:
            self._check_admissible(stream.stream_id)
            self._streams[stream.stream_id] = stream

    def start(self, stream: Stream) -> bool:
        """Mark a queued stream running; False if it was cancelled while queued."""
        with self._lock:
            if self._streams.get(stream.stream_id) is not stream:
                return False
            stream.running = True
            return True

    def cancel(self, stream_id: str) -> tuple[bool, Stream | None, Stream | None]:
        """Request cancellation.

        Returns (was live, the stream if it was still queued, the stream if it
        is running and this is the first cancel asking). A queued stream is
        removed at once and the caller sends its terminal event; a running one
        is flagged, and the caller has the compute thread remove it (once:
        repeated cancels ask nothing more).
        """
        with self._lock:
            stream = self._streams.get(stream_id)
            if stream is None:
                return False, None, None
            first = not stream.cancel_requested.is_set()
            stream.cancel_requested.set()
            if stream.running:
                return True, None, stream if first else None
            del self._streams[stream_id]
            return True, stream, None

    def cancel_all(self) -> list[Stream]:
        """Cancel every live stream; returns the queued ones, now removed."""
        with self._lock:
            queued = [stream for stream in self._streams.values() if not stream.running]
            for stream in self._streams.values():
                stream.cancel_requested.set()
            for stream in queued:
                del self._streams[stream.stream_id]
            return queued

    def retire(self, stream: Stream) -> bool:
        """Remove a running stream that has ended; True if it was cancelled meanwhile."""
        with self._lock:
            assert self._streams.get(stream.stream_id) is stream, "only running streams retire"
            del self._streams[stream.stream_id]
            return stream.cancel_requested.is_set()


class StreamEvents:
    """The notifications of a stream, in the shapes the existing client parses."""

    def __init__(self, writer: Writer):
        self._writer = writer

    def chunk(self, stream_id: str, token_id: int, text: str) -> None:
        # No cumulative_text: repeating the text so far in every chunk made
        # the existing runtime's output grow quadratically.
        self._writer.notify(
            "stream.chunk",
            {"stream_id": stream_id, "token": text, "token_id": token_id, "is_final": False},
        )

    def step(self, chunks: list[dict]) -> None:
        """`stream.step`: the tokens of every opted-in stream of one step, in one line."""
        self._writer.notify("stream.step", {"chunks": chunks})

    def stats(self, stream_id: str, stats: "Completion") -> None:
        """`stream.stats`, sent only for a stream that completed."""
        self._writer.notify(
            "stream.stats",
            {
                "stream_id": stream_id,
                "tokens_generated": stats.tokens_generated,
                "tokens_per_second": stats.tokens_per_second,
                "time_to_first_token": stats.time_to_first_token,
                "total_time": stats.total_time,
                "prompt_tokens": stats.prompt_tokens,
                "prompt_time": stats.prompt_time,
                "queue_time": stats.queue_time,
                "cached_tokens": stats.cached_tokens,
            },
        )

    def completed(self, stream_id: str, finish_reason: str) -> None:
        self._writer.notify(
            "stream.event",
            {
                "stream_id": stream_id,
                "event": "completed",
                "is_final": True,
                "finish_reason": finish_reason,
            },
        )

    def error(self, stream_id: str, message: str) -> None:
        self._writer.notify(
            "stream.event",
            {"stream_id": stream_id, "event": "error", "error": message, "is_final": True},
        )

    def cancelled(self, stream_id: str) -> None:
        self._writer.notify(
            "stream.event", {"stream_id": stream_id, "event": "cancelled", "is_final": True}
        )


@dataclass(frozen=True)
class Completion:
    """How a generation that ran to its end went: its stats and why it stopped."""

    tokens_generated: int
    # Tokens after the first, per second of decoding after the first token.
    tokens_per_second: float
    # Seconds from the compute thread starting the stream (queue wait excluded).
    time_to_first_token: float
    total_time: float
    finish_reason: str
    prompt_tokens: int
    # Seconds from the stream being taken into prefill to its first token.
    prompt_time: float
    # Seconds from `generate` admitting it to it being taken into prefill.
    queue_time: float
    # Of the prompt tokens, those found in the prefix cache (not prefilled).
    cached_tokens: int = 0


def encode_prompt(model: LoadedModel, prompt: str) -> list[int]:
    """Prompt ids, with the BOS token added unless the prompt already starts with it."""
    tokenizer = model.tokenizer
    bos = tokenizer.bos_token
    add_special_tokens = bos is None or not prompt.startswith(bos)
    ids = tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
    if not ids:
        raise invalid_params("prompt encodes to no tokens")
    return ids
