"""The method table and the read loop.

The read loop (the main thread) parses each line, validates it and answers
at once, except for work handed to the compute thread: a `load_model`
answer follows when the load finishes, and a generation's notifications
follow its `generate` answer.
"""

import logging
import os
import resource
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, BinaryIO

import mlx.core as mx
import mlx_lm

from . import __version__, limits, validation
from .batching import Steppers
from .compute import ComputeQueue, Insert, Remove
from .jsonrpc import (
    GENERATION_ERROR,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    TOKENIZER_ERROR,
    OversizedLine,
    Request,
    RpcError,
    Writer,
    decode_message,
    internal_error,
    line_summary,
    oversized_request_id,
    parse_request,
    read_lines,
    request_id_of,
)
from .models import Batching, LoadJob, ModelRegistry, model_directory
from .streams import Stream, StreamEvents, StreamRegistry, encode_prompt
from .warmup import warm_up

log = logging.getLogger(__name__)

# "cancel": the `cancel` method exists. "compact_chunks": chunks carry no
# cumulative_text. "batching": a model's streams decode together, and
# `load_model` takes `batch_size` and `prefill_step_size`. "step_chunks":
# `generate` takes `step_chunks`, which sends the stream's tokens in
# `stream.step` lines, one per step for all such streams. "prefix_cache":
# a model keeps its prompts' KV caches (`load_model` takes
# `prefix_cache_bytes` and `session_ttl_seconds`), `generate` takes
# `session_id`, and `stream.stats` carries `cached_tokens`. "warm_up": a
# load runs a few generations before it answers (`load_model` takes
# `warm_up`, and its answer carries `warm_up_seconds`). Clients detect
# these here.
CAPABILITIES = [
    "generate",
    "stream",
    "tokenize",
    "load_model",
    "unload_model",
    "cancel",
    "compact_chunks",
    "batching",
    "step_chunks",
    "prefix_cache",
    "warm_up",
]


@dataclass(frozen=True)
class Accepted:
    """A result whose follow-up work may start only once the answer is written,
    so a stream's notifications never precede its `generate` answer."""

    result: Any
    start: Callable[[], None]


def memory_usage() -> dict[str, int]:
    """Resident and virtual size in bytes. Without /proc (macOS) `rss` is the
    peak resident size and `vms` is 0."""
    try:
        with open("/proc/self/statm") as statm:
            vms_pages, rss_pages = (int(field) for field in statm.read().split()[:2])
        page = os.sysconf("SC_PAGE_SIZE")
        return {"rss": rss_pages * page, "vms": vms_pages * page}
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # ru_maxrss is in bytes on macOS, KiB elsewhere.
        return {"rss": peak if sys.platform == "darwin" else peak * 1024, "vms": 0}


class Server:
    """Owns the registries and the compute thread; `serve` runs the read loop."""

    def __init__(self, writer: Writer, settings: limits.Settings = limits.Settings()):
        self._writer = writer
        self._settings = settings
        self._models = ModelRegistry(limits.MODELS_LOADED_MAX)
        self._streams_live_max = settings.streams_live_max
        self._streams = StreamRegistry(settings.streams_live_max)
        self._events = StreamEvents(writer)
        # Runs while `serve` does: started when it begins, stopped when it ends.
        self._compute_jobs_max = settings.streams_live_max + limits.COMPUTE_JOBS_BESIDE_STREAMS
        self._compute = ComputeQueue(
            self._compute_jobs_max, Steppers(self._streams, self._events), self._streams
        )
        self._methods: dict[str, Callable[[dict], Any]] = {
            "runtime/info": self._info,
            "runtime/state": self._state,
            "load_model": self._load_model,
            "unload_model": self._unload_model,
            "generate": self._generate,
            "tokenize": self._tokenize,
            "cancel": self._cancel,
            "shutdown": self._shutdown,
        }

    def serve(self, stdin: BinaryIO) -> bool:
        """Answer requests until `shutdown` or end of input, then stop.

        Returns False if the compute thread was still busy after the grace
        period (a long model load); the caller should then exit hard.
        """
        self._compute.start()
        try:
            for line in read_lines(stdin, limits.RPC_LINE_BYTES_MAX):
                if self._handle_line(line):
                    break
        finally:
            stopped = self._stop()
        return stopped

    def _stop(self) -> bool:
        for stream in self._streams.cancel_all():
            self._events.cancelled(stream.stream_id)
        stopped = self._compute.stop(limits.SHUTDOWN_GRACE_SECONDS)
        if not stopped:
            log.warning("compute thread still busy after %.1f s", limits.SHUTDOWN_GRACE_SECONDS)
        return stopped

    def _handle_line(self, line: bytes | OversizedLine) -> bool:
        """Handle one input line; True once `shutdown` has been answered."""
        if isinstance(line, OversizedLine):
            log.warning("request line of %d bytes rejected", line.length)
            message = f"request line is {line.length} bytes, limit {limits.RPC_LINE_BYTES_MAX}"
            self._writer.error(oversized_request_id(line), RpcError(INVALID_REQUEST, message))
            return False
        if not line.strip():
            return False
        try:
            message = decode_message(line)
        except RpcError as error:
            log.warning("unparseable line %r: %s", line_summary(line), error.message)
            self._writer.error(None, error)
            return False
        try:
            request = parse_request(message)
        except RpcError as error:
            log.warning("invalid request: %s", error.message)
            self._writer.error(request_id_of(message), error)
            return False
        return self._dispatch(request)

    def _dispatch(self, request: Request) -> bool:
        log.debug("request %s id=%r", request.method, request.id)
        handler = self._methods.get(request.method)
        try:
            if handler is None:
                raise RpcError(METHOD_NOT_FOUND, f"Unknown method: {request.method}")
            outcome = handler(request.params)
        except RpcError as error:
            self._answer_error(request, error)
            return False
        except Exception:
            log.exception("%s failed", request.method)
            self._answer_error(request, internal_error("An unexpected internal error occurred"))
            return False
        if isinstance(outcome, Future):
            outcome.add_done_callback(lambda future: self._answer_future(request, future))
        elif isinstance(outcome, Accepted):
            self._answer(request, outcome.result)
            outcome.start()
        else:
            self._answer(request, outcome)
        return request.method == "shutdown"

    def _answer(self, request: Request, result: Any) -> None:
        if request.has_id:
            self._writer.result(request.id, result)

    def _answer_error(self, request: Request, error: RpcError) -> None:
        if request.has_id:
            self._writer.error(request.id, error)
        else:
            log.warning("notification %s failed: %s", request.method, error.message)

    def _answer_future(self, request: Request, future: Future) -> None:
        error = future.exception()
        if error is None:
            self._answer(request, future.result())
        elif isinstance(error, RpcError):
            self._answer_error(request, error)
        else:
            log.error("%s failed: %r", request.method, error)
            self._answer_error(request, internal_error("An unexpected internal error occurred"))

    def _check_compute_room(self) -> None:
        if not self._compute.has_room():
            raise internal_error(
                f"compute queue is full ({self._compute_jobs_max} jobs waiting)",
                "QueueFull",
            )

    # Methods. Each validates its params first and raises RpcError to fail.

    def _info(self, _params: dict) -> dict:
        return {
            "version": __version__,
            "mlx_version": mx.__version__,
            "mlx_lm_version": mlx_lm.__version__,
            "protocol": "json-rpc-2.0",
            "capabilities": CAPABILITIES,
            # Always true: the runtime does not start without MLX.
            "mlx_supported": True,
            "memory": memory_usage(),
            "limits": {
                "line_bytes_max": limits.RPC_LINE_BYTES_MAX,
                "max_tokens_max": limits.MAX_TOKENS_MAX,
                "streams_live_max": self._streams_live_max,
                "models_loaded_max": limits.MODELS_LOADED_MAX,
                "batch_size_default": self._settings.batch_size,
                "prefill_step_size_default": self._settings.prefill_step_size,
                "prefix_cache_bytes_default": self._settings.prefix_cache_bytes,
                "session_ttl_seconds_default": self._settings.session_ttl_seconds,
                "sessions_max": limits.SESSIONS_MAX,
            },
            "models": [
                {
                    "model_id": model.model_id,
                    "batch_size": model.batch_size,
                    "batched": model.batched,
                    "prefix_cache_bytes": model.info.get("prefix_cache_bytes", 0),
                }
                for model in self._models.all()
            ],
        }

    def _state(self, _params: dict) -> dict:
        counts = self._compute.steppers.counts()
        loaded = []
        for model in self._models.all():
            entry = counts.get(model.model_id)
            loaded.append(
                {
                    "model_id": model.model_id,
                    "state": "ready",
                    "type": "text",
                    "batch_size": model.batch_size,
                    "running": entry.running if entry else 0,
                    "prefilling": entry.prefilling if entry else 0,
                    "queued": entry.queued if entry else 0,
                    "prefix_cache": (
                        model.prefix_cache.figures.as_dict()
                        if model.prefix_cache is not None
                        else None
                    ),
                }
            )
        return {
            "loaded_models": loaded,
            "active_streams": len(self._streams),
            # The runtime never restarts itself; its supervisor counts restarts.
            "restart_count": 0,
        }

    def _load_model(self, params: dict) -> Any:
        model_id = validation.model_id(params)
        local_path = validation.local_path(params)
        batching = Batching(
            batch_size=validation.integer(
                params, "batch_size", self._settings.batch_size, 1, self._streams_live_max
            ),
            prefill_step_size=validation.integer(
                params,
                "prefill_step_size",
                self._settings.prefill_step_size,
                limits.PREFILL_STEP_SIZE_MIN,
                limits.PREFILL_STEP_SIZE_MAX,
            ),
            prefix_cache_bytes=validation.integer(
                params,
                "prefix_cache_bytes",
                self._settings.prefix_cache_bytes,
                0,
                limits.PREFIX_CACHE_BYTES_MAX,
            ),
            session_ttl_seconds=validation.integer(
                params,
                "session_ttl_seconds",
                self._settings.session_ttl_seconds,
                0,
                limits.SESSION_TTL_SECONDS_MAX,
            ),
        )
        warm = validation.boolean(params, "warm_up", True)
        loaded = self._models.find(model_id)
        if loaded is not None:
            return loaded.info
        path = model_directory(model_id, local_path)
        self._check_compute_room()
        future: Future = Future()
        prepare = _warmed_up if warm else None
        self._compute.submit(LoadJob(self._models, model_id, path, batching, future, prepare))
        return future

    def _unload_model(self, params: dict) -> dict:
        model_id = validation.model_id(params)
        if self._models.unload(model_id):
            log.info("unloaded %s", model_id)
        return {"success": True}

    def _generate(self, params: dict) -> Accepted:
        model_id = validation.model_id(params)
        prompt = validation.text(params, "prompt", limits.PROMPT_CHARS_MAX)
        stream_id = validation.identifier(
            params, "stream_id", limits.STREAM_ID_CHARS_MAX, required=False
        )
        max_tokens = validation.integer(
            params, "max_tokens", limits.MAX_TOKENS_DEFAULT, 1, limits.MAX_TOKENS_MAX
        )
        temperature = validation.temperature(params)
        top_p = validation.top_p(params)
        seed = validation.integer(params, "seed", None, 0, limits.SEED_MAX)
        step_chunks = validation.boolean(params, "step_chunks", False)
        session_id = validation.identifier(
            params, "session_id", limits.SESSION_ID_CHARS_MAX, required=False
        )
        stream_id = stream_id or str(uuid.uuid4())
        model = self._models.get(model_id)
        # Refuse before encoding, which can take a while for a long prompt.
        self._streams.check_admissible(stream_id)
        self._check_compute_room()
        try:
            prompt_ids = encode_prompt(model, prompt)
        except RpcError:
            raise
        except Exception as exc:
            raise RpcError(
                GENERATION_ERROR, f"cannot encode prompt: {exc}", {"model_id": model_id}
            ) from None
        stream = Stream(
            stream_id=stream_id,
            model=model,
            prompt_ids=prompt_ids,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            step_chunks=step_chunks,
            session_id=session_id,
        )
        self._streams.admit(stream)
        return Accepted(
            {"stream_id": stream_id, "started_at": time.time()},
            lambda: self._compute.submit(Insert(stream)),
        )

    def _tokenize(self, params: dict) -> dict:
        model_id = validation.model_id(params)
        text = validation.text(params, "text", limits.TOKENIZE_TEXT_CHARS_MAX)
        add_special_tokens = validation.boolean(params, "add_special_tokens", True)
        tokenizer = self._models.get(model_id).tokenizer
        try:
            tokens = tokenizer.encode(text, add_special_tokens=add_special_tokens)
            token_strings = tokenizer.convert_ids_to_tokens(tokens)
        except Exception as exc:
            raise RpcError(
                TOKENIZER_ERROR, f"cannot tokenize: {exc}", {"model_id": model_id}
            ) from None
        return {"tokens": tokens, "token_strings": token_strings}

    def _cancel(self, params: dict) -> dict:
        stream_id = validation.identifier(params, "stream_id", limits.STREAM_ID_CHARS_MAX)
        was_live, queued, running = self._streams.cancel(stream_id)
        if queued is not None:
            self._events.cancelled(stream_id)
        if running is not None:
            self._compute.submit(Remove(running))
        if was_live:
            log.info("stream %s cancelled", stream_id)
        return {"cancelled": was_live}

    def _shutdown(self, _params: dict) -> dict:
        log.info("shutdown requested")
        return {"success": True}


def _warmed_up(model) -> dict:
    """Warms `model` up; what its load's answer says of it."""
    return {"warm_up_seconds": round(warm_up(model), 3)}
