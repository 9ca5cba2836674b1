"""Every bound the runtime enforces, in one place.

Validation limits mirror the existing runtime's so
both accept the same requests.
"""

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
STREAMS_LIVE_MAX = 64
# Jobs (generations and loads) waiting for the compute thread.
COMPUTE_JOBS_QUEUED_MAX = STREAMS_LIVE_MAX + 8
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

assert COMPUTE_JOBS_QUEUED_MAX > STREAMS_LIVE_MAX, "loads must fit beside a full stream queue"
assert PROMPT_CHARS_MAX <= RPC_LINE_BYTES_MAX
