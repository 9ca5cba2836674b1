"""Every bound the runtime enforces, in one place.

Validation limits mirror the existing runtime's so
both accept the same requests.
"""

import re
from collections.abc import Mapping
from dataclasses import dataclass

# A request line longer than this (excluding the newline) is rejected with
# -32600 and skipped without being buffered.
RPC_LINE_BYTES_MAX = 1024 * 1024

MODEL_ID_CHARS_MAX = 512
LOCAL_PATH_CHARS_MAX = 4096
STREAM_ID_CHARS_MAX = 256
PROMPT_CHARS_MAX = 1024 * 1024
TOKENIZE_TEXT_CHARS_MAX = 1024 * 1024

MAX_TOKENS_MAX = 4096
MAX_TOKENS_DEFAULT = 512
TEMPERATURE_MAX = 2.0
TEMPERATURE_DEFAULT = 0.7
TOP_P_DEFAULT = 1.0
SEED_MAX = 2**32 - 1

# Streams that are queued or generating. Beyond this, generate fails at once.
# The environment variable named here sets another limit, from 1 to
# STREAMS_LIVE_MAX_CEILING; `runtime/info` reports the one in force.
STREAMS_LIVE_MAX_DEFAULT = 64
STREAMS_LIVE_MAX_CEILING = 1024
STREAMS_LIVE_MAX_ENV = "MLX_RUNTIME_STREAMS_LIVE_MAX"
# Jobs (generations and loads) waiting for the compute thread, besides one per
# live stream: loads must fit beside a full stream queue.
COMPUTE_JOBS_BESIDE_STREAMS = 8
MODELS_LOADED_MAX = 8

# Tokens whose text the streaming detokenizer may hold back while it does not
# yet form valid UTF-8, and the most chunks of a stream that wait for their
# text. A character is at most 4 bytes, so one spread over byte tokens keeps
# at most 3 tokens waiting for the token that completes it; text still
# unfinished after that is emitted as it stands (invalid bytes as U+FFFD),
# except for the at most 3 bytes that may yet begin a character.
DETOKENIZE_TOKENS_HELD_MAX = 3

# How long shutdown waits for the compute thread to finish its current job.
# Below the 5 s after which the existing TypeScript client kills the process.
SHUTDOWN_GRACE_SECONDS = 4.0

# Used when a model's config names no context length (as the existing runtime does).
CONTEXT_LENGTH_DEFAULT = 8192

assert 1 <= STREAMS_LIVE_MAX_DEFAULT <= STREAMS_LIVE_MAX_CEILING
assert COMPUTE_JOBS_BESIDE_STREAMS > 0, "loads must fit beside a full stream queue"
assert PROMPT_CHARS_MAX <= RPC_LINE_BYTES_MAX


# Streams of one model decoded together in one step (a `load_model` may ask for
# another figure, 1 to the live-stream limit; 1 is the sequential path), and
# the prompt tokens prefilled per step: a long prompt is prefilled in chunks
# of this size between decode steps, so running streams wait at most one
# chunk for their next token. The environment variables named here set the
# defaults.
BATCH_SIZE_DEFAULT = 8
BATCH_SIZE_ENV = "MLX_RUNTIME_BATCH_SIZE"
PREFILL_STEP_SIZE_DEFAULT = 512
PREFILL_STEP_SIZE_MIN = 16
PREFILL_STEP_SIZE_MAX = 8192
PREFILL_STEP_SIZE_ENV = "MLX_RUNTIME_PREFILL_STEP_SIZE"
# Prompts of one model prefilled together in one step, at most (fewer when the
# batch is smaller).
PREFILL_BATCH_MAX = 8

assert PREFILL_STEP_SIZE_MIN <= PREFILL_STEP_SIZE_DEFAULT <= PREFILL_STEP_SIZE_MAX

# The prompt prefix cache of each model: the bytes its entries may hold (0
# turns it off; a `load_model` may ask for another figure), how long a
# session's entry is pinned, and the sessions pinned at once per model.
PREFIX_CACHE_BYTES_DEFAULT = 512 * 1024 * 1024
PREFIX_CACHE_BYTES_MAX = 1 << 50
PREFIX_CACHE_BYTES_ENV = "MLX_RUNTIME_PREFIX_CACHE_BYTES"
SESSION_TTL_SECONDS_DEFAULT = 30 * 60
SESSION_TTL_SECONDS_MAX = 7 * 24 * 3600
SESSION_TTL_SECONDS_ENV = "MLX_RUNTIME_SESSION_TTL_SECONDS"
SESSIONS_MAX = 256
# A prompt shares fewer tokens than this with every entry: it is prefilled
# whole (a copy of the cache costs more than prefilling a few tokens).
PREFIX_CACHE_MIN_HIT_TOKENS = 16
SESSION_ID_CHARS_MAX = 256
assert BATCH_SIZE_DEFAULT <= STREAMS_LIVE_MAX_DEFAULT


@dataclass(frozen=True)
class Settings:
    """What the environment sets: the live-stream limit and the batching defaults."""

    streams_live_max: int = STREAMS_LIVE_MAX_DEFAULT
    batch_size: int = BATCH_SIZE_DEFAULT
    prefill_step_size: int = PREFILL_STEP_SIZE_DEFAULT
    prefix_cache_bytes: int = PREFIX_CACHE_BYTES_DEFAULT
    session_ttl_seconds: int = SESSION_TTL_SECONDS_DEFAULT


def _whole_number(environ: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    text = environ.get(name)
    if text is None:
        return default
    digits = text.strip()
    value = int(digits) if re.fullmatch(r"[0-9]{1,16}", digits) else None
    if value is None or not low <= value <= high:
        raise ValueError(f"{name} is {text!r}, must be a whole number from {low} to {high}")
    return value


def streams_live_max(environ: Mapping[str, str]) -> int:
    """The live-stream limit `environ` sets, else the default.

    Raises ValueError, with a message naming the variable, for a value that is
    not a whole number from 1 to STREAMS_LIVE_MAX_CEILING.
    """
    return _whole_number(
        environ, STREAMS_LIVE_MAX_ENV, STREAMS_LIVE_MAX_DEFAULT, 1, STREAMS_LIVE_MAX_CEILING
    )


def settings(environ: Mapping[str, str]) -> Settings:
    """Every setting `environ` makes; ValueError (naming the variable) for one out of range.

    The default batch size is bounded by the live-stream limit: without
    MLX_RUNTIME_BATCH_SIZE it is the smaller of the two.
    """
    streams = streams_live_max(environ)
    batch = _whole_number(
        environ, BATCH_SIZE_ENV, min(BATCH_SIZE_DEFAULT, streams), 1, streams
    )
    prefill = _whole_number(
        environ,
        PREFILL_STEP_SIZE_ENV,
        PREFILL_STEP_SIZE_DEFAULT,
        PREFILL_STEP_SIZE_MIN,
        PREFILL_STEP_SIZE_MAX,
    )
    prefix_cache_bytes = _whole_number(
        environ, PREFIX_CACHE_BYTES_ENV, PREFIX_CACHE_BYTES_DEFAULT, 0, PREFIX_CACHE_BYTES_MAX
    )
    session_ttl = _whole_number(
        environ, SESSION_TTL_SECONDS_ENV, SESSION_TTL_SECONDS_DEFAULT, 0, SESSION_TTL_SECONDS_MAX
    )
    return Settings(
        streams_live_max=streams,
        batch_size=batch,
        prefill_step_size=prefill,
        prefix_cache_bytes=prefix_cache_bytes,
        session_ttl_seconds=session_ttl,
    )
