"""MLX runtime: runs MLX language models for mlx-worker over JSON-RPC on stdio.

Layout, in reading order:

- `__main__`   process entry: claims stdout for protocol lines, logging, start-up
- `limits`     every bound the runtime enforces
- `jsonrpc`    framing, envelopes, error codes, the stdout writer
- `validation` request parameter checks
- `compute`    the single thread that runs all MLX work, in order
- `models`     loading and holding models
- `detokenize` token ids to text pieces, incrementally
- `streams`    generation streams: admission, cancellation, notifications
- `server`     the method table and the read loop

Importing this package forbids network access for Hugging Face libraries:
models come from local directories only.
"""

import os

__version__ = "0.1.0"

# Must happen before mlx_lm, transformers or huggingface_hub are imported,
# since they read these once at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
