"""Generation streams: admission, cancellation, the generation loop, notifications.

A stream is admitted on the read loop (`StreamRegistry.admit`), queued on
the compute thread as a `GenerationJob`, and retired when it ends. Every
admitted stream ends with exactly one `stream.event` whose `is_final` is
true, and nothing for that stream follows it:

- completed: `stream.chunk`* -> `stream.stats` -> `stream.event` completed
- failed:    `stream.chunk`* -> `stream.event` error (no stats)
- cancelled: `stream.chunk`* -> `stream.event` cancelled (no stats)

Exactly-once is kept by the registry lock: whoever removes a stream from the
registry sends its terminal event (`cancel` for a stream still queued, the
compute thread otherwise), and `cancel` answers true only for a stream that
will end with "cancelled".
"""

import logging
import threading
import time
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.generate import generate_step, generation_stream, wired_limit
from mlx_lm.sample_utils import make_sampler

from .detokenize import TokenTexts
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
    # Set by `cancel` (or shutdown); the generation loop checks it between tokens.
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

    def cancel(self, stream_id: str) -> tuple[bool, Stream | None]:
        """Request cancellation. Returns (was live, the stream if it was still queued).

        A queued stream is removed at once and the caller sends its terminal
        event; a running one is flagged and ends at its next token.
        """
        with self._lock:
            stream = self._streams.get(stream_id)
            if stream is None:
                return False, None
            stream.cancel_requested.set()
            if stream.running:
                return True, None
            del self._streams[stream_id]
            return True, stream

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


class Cancelled(Exception):
    """The stream's cancel flag was seen between tokens."""


@dataclass
class GenerationJob:
    """Runs one admitted stream on the compute thread and sends its notifications."""

    stream: Stream
    registry: StreamRegistry
    events: StreamEvents

    def run(self) -> None:
        stream = self.stream
        if not self.registry.start(stream):
            return  # Cancelled while queued; `cancel` sent the terminal event.
        completion: Completion | None = None
        failure: str | None = None
        try:
            completion = self._generate()
        except Cancelled:
            pass
        except Exception as exc:
            log.exception("stream %s failed", stream.stream_id)
            failure = str(exc) or type(exc).__name__
        if self.registry.retire(stream):
            self.events.cancelled(stream.stream_id)
        elif failure is not None:
            self.events.error(stream.stream_id, failure)
        else:
            assert completion is not None
            self.events.stats(stream.stream_id, completion)
            self.events.completed(stream.stream_id, completion.finish_reason)

    def abandon(self) -> None:
        # Shutdown cancels every queued stream (and sends its event) before
        # abandoning jobs, so there is nothing left to report.
        assert self.stream.cancel_requested.is_set()

    def _generate(self) -> Completion:
        stream = self.stream
        model = stream.model
        tokenizer = model.tokenizer
        eos_ids = tokenizer.eos_token_ids
        # One chunk per token; chunks whose text is not final yet wait in here.
        texts = TokenTexts(lambda ids: tokenizer.decode(ids, skip_special_tokens=False))
        if stream.seed is not None:
            mx.random.seed(stream.seed)
        sampler = make_sampler(stream.temperature, stream.top_p)
        started = time.perf_counter()
        first_token_at = last_token_at = None
        tokens_generated = 0
        finish_reason = "length"
        with wired_limit(model.model, [generation_stream]):
            steps = generate_step(
                mx.array(stream.prompt_ids),
                model.model,
                max_tokens=stream.max_tokens,
                sampler=sampler,
            )
            for token_id, _logprobs in steps:
                now = time.perf_counter()
                if first_token_at is None:
                    first_token_at = now
                if stream.cancel_requested.is_set():
                    raise Cancelled()
                if token_id in eos_ids:
                    finish_reason = "stop"
                    break
                tokens_generated += 1
                last_token_at = now
                self._send(texts.add(token_id))
        self._send(texts.finish())
        finished = time.perf_counter()
        return Completion(
            tokens_generated=tokens_generated,
            tokens_per_second=_decode_rate(
                tokens_generated, first_token_at, last_token_at, started, finished
            ),
            time_to_first_token=(first_token_at or finished) - started,
            total_time=finished - started,
            finish_reason=finish_reason,
        )

    def _send(self, ready: list[tuple[int, str]]) -> None:
        for token_id, text in ready:
            self.events.chunk(self.stream.stream_id, token_id, text)


def _decode_rate(
    tokens: int, first: float | None, last: float | None, started: float, finished: float
) -> float:
    """Tokens per second after the first token; for one token, over the whole stream."""
    if tokens >= 2 and last > first:
        return (tokens - 1) / (last - first)
    if tokens == 1:
        return 1 / max(finished - started, 1e-9)
    return 0.0


def encode_prompt(model: LoadedModel, prompt: str) -> list[int]:
    """Prompt ids, with the BOS token added unless the prompt already starts with it."""
    tokenizer = model.tokenizer
    bos = tokenizer.bos_token
    add_special_tokens = bos is None or not prompt.startswith(bos)
    ids = tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
    if not ids:
        raise invalid_params("prompt encodes to no tokens")
    return ids
