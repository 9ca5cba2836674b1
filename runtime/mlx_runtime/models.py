"""Loaded models: loading from local directories, lookup by id, unloading.

Models are loaded on the compute thread (`LoadJob`); lookups and unloads
happen on the read loop. A stream holds its own reference to the model it
was admitted with, so unloading never pulls a model out from under a
running or queued generation: the memory is freed when the last one ends.

Each model is loaded with a batch size: the streams of it decoded together
in one step. A model whose cache cannot be merged across streams (mlx-lm
gives such cache types no `merge`) gets batch size 1, the sequential path,
whatever was asked. And with a prompt prefix cache of a byte budget (0: none),
cleared when the model is unloaded.
"""

import logging
import threading
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import get_total_parameters

from . import limits
from .prefix_cache import PrefixCache
from .jsonrpc import MODEL_LOAD_ERROR, MODEL_NOT_LOADED, RpcError, internal_error

log = logging.getLogger(__name__)

_CONTEXT_LENGTH_KEYS = ("max_position_embeddings", "n_ctx", "max_sequence_length", "seq_length")


@dataclass(frozen=True)
class LoadedModel:
    model_id: str
    model: nn.Module
    tokenizer: TokenizerWrapper
    # The `load_model` result, returned again for repeated loads.
    info: dict[str, Any]
    # Streams decoded together in one step; 1 is the sequential path.
    batch_size: int = 1
    # Prompt tokens prefilled per step.
    prefill_step_size: int = limits.PREFILL_STEP_SIZE_DEFAULT
    # Earlier prompts' KV caches, when the model has a cache budget.
    prefix_cache: PrefixCache | None = None

    @property
    def batched(self) -> bool:
        return self.batch_size > 1


def load_error(model_id: str, reason: str) -> RpcError:
    return RpcError(
        MODEL_LOAD_ERROR, f"Failed to load model {model_id}: {reason}", {"model_id": model_id}
    )


def not_loaded(model_id: str) -> RpcError:
    return RpcError(MODEL_NOT_LOADED, f"Model not loaded: {model_id}", {"model_id": model_id})


def model_directory(model_id: str, local_path: str | None) -> Path:
    """The directory to load from: `local_path`, else the model id as a path.

    Never a Hugging Face repository: nothing is downloaded.
    """
    path = Path(local_path if local_path is not None else model_id).resolve()
    if not path.is_dir():
        raise load_error(model_id, f"Model path not found: {path}")
    return path


def _context_length(config: dict) -> int:
    for key in _CONTEXT_LENGTH_KEYS:
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return limits.CONTEXT_LENGTH_DEFAULT


def _dtype_name(model: nn.Module, config: dict) -> str:
    """Quantized models as "q4" etc., else the float dtype holding most weights."""
    quantization = config.get("quantization")
    if isinstance(quantization, dict) and "bits" in quantization:
        return f"q{quantization['bits']}"
    elements: Counter = Counter()
    for _, array in tree_flatten(model.parameters()):
        if mx.issubdtype(array.dtype, mx.floating):
            elements[array.dtype] += array.size
    if not elements:
        return "unknown"
    dtype = elements.most_common(1)[0][0]
    # str(mx.float16) is "mlx.core.float16".
    return str(dtype).rsplit(".", 1)[-1]


class ModelRegistry:
    """Models by id. `_models` is shared by the read loop and the compute thread."""

    def __init__(self, models_max: int):
        self._models_max = models_max
        self._lock = threading.Lock()
        self._models: dict[str, LoadedModel] = {}

    def get(self, model_id: str) -> LoadedModel:
        with self._lock:
            loaded = self._models.get(model_id)
        if loaded is None:
            raise not_loaded(model_id)
        return loaded

    def find(self, model_id: str) -> LoadedModel | None:
        with self._lock:
            return self._models.get(model_id)

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._models)

    def all(self) -> list[LoadedModel]:
        with self._lock:
            return list(self._models.values())

    def unload(self, model_id: str) -> bool:
        with self._lock:
            loaded = self._models.pop(model_id, None)
        if loaded is None:
            return False
        if loaded.prefix_cache is not None:
            loaded.prefix_cache.clear()
        return True

    def load(
        self,
        model_id: str,
        path: Path,
        batching: "Batching",
        prepare: Callable[[LoadedModel], dict] | None = None,
    ) -> LoadedModel:
        """Load from `path` (compute thread only). A loaded id is returned as is.

        `prepare` (the warm-up) runs on the model before it is registered; what it returns
        is added to the model's info, and an exception from it fails the load.
        """
        existing = self.find(model_id)
        if existing is not None:
            return existing
        if len(self.ids()) >= self._models_max:
            raise load_error(
                model_id, f"{self._models_max} models are loaded, limit {self._models_max}"
            )
        try:
            model, tokenizer, config = mlx_lm.load(str(path), return_config=True)
        except Exception as exc:
            log.exception("loading %s from %s failed", model_id, path)
            raise load_error(model_id, str(exc) or type(exc).__name__) from None
        batch_size = batching.batch_size
        if batch_size > 1 and not cache_batchable(model):
            log.info("%s: its cache cannot be batched; generating one stream at a time", model_id)
            batch_size = 1
        info = {
            "model_id": model_id,
            "state": "ready",
            "context_length": _context_length(config),
            "parameter_count": int(get_total_parameters(model)),
            "dtype": _dtype_name(model, config),
            "is_vision_model": False,
            "cached_path": str(path),
            "batch_size": batch_size,
            "batched": batch_size > 1,
            "prefix_cache_bytes": batching.prefix_cache_bytes,
        }
        prefix_cache = None
        if batching.prefix_cache_bytes > 0:
            prefix_cache = PrefixCache(
                batching.prefix_cache_bytes,
                limits.SESSIONS_MAX,
                batching.session_ttl_seconds,
                min_hit_tokens=limits.PREFIX_CACHE_MIN_HIT_TOKENS,
            )
        loaded = LoadedModel(
            model_id=model_id,
            model=model,
            tokenizer=tokenizer,
            info=info,
            batch_size=batch_size,
            prefill_step_size=batching.prefill_step_size,
            prefix_cache=prefix_cache,
        )
        if prepare is not None:
            try:
                info.update(prepare(loaded))
            except Exception as exc:
                log.exception("preparing %s failed", model_id)
                raise load_error(model_id, str(exc) or type(exc).__name__) from None
        with self._lock:
            self._models[model_id] = loaded
        log.info("loaded %s from %s (%d parameters)", model_id, path, info["parameter_count"])
        return loaded


@dataclass(frozen=True)
class Batching:
    """How a model is to be generated: its batch size, prefill chunk and prefix cache."""

    batch_size: int
    prefill_step_size: int
    prefix_cache_bytes: int = 0
    session_ttl_seconds: int = limits.SESSION_TTL_SECONDS_DEFAULT


def cache_batchable(model: nn.Module) -> bool:
    """Whether every layer's cache of `model` can be merged across streams."""
    return all(hasattr(layer, "merge") for layer in make_prompt_cache(model))


@dataclass
class LoadJob:
    """A `load_model` call waiting for the compute thread; `future` carries the reply."""

    registry: ModelRegistry
    model_id: str
    path: Path
    batching: Batching
    future: Future
    prepare: Callable[[LoadedModel], dict] | None = None

    def run(self) -> None:
        try:
            self.future.set_result(
                self.registry.load(self.model_id, self.path, self.batching, self.prepare).info
            )
        except RpcError as exc:
            self.future.set_exception(exc)
        except Exception as exc:
            log.exception("loading %s failed unexpectedly", self.model_id)
            self.future.set_exception(load_error(self.model_id, str(exc) or type(exc).__name__))

    def abandon(self) -> None:
        self.future.set_exception(internal_error("runtime is shutting down", "ShuttingDown"))
