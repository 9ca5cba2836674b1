"""Warm-up: a model's first generations, run as part of its load.

MLX compiles kernels the first time a computation runs (on the CPU, into a
cache under the temporary directory); a greedy and a sampled generation
need different ones, and so does a batch of two. Without a warm-up the first
request after a load pays that compilation: seconds with an empty kernel
cache. So a load runs, before it answers and before the model is
registered, a short greedy generation, a short sampled one, and (for a
batched model) both together, on the compute thread, through the same
steppers real streams take. Their tokens go nowhere and the model's prefix
cache is not used. A generation that fails fails the load, with its reason:
a model that cannot generate is not loaded.
"""

import dataclasses
import logging
import time

from . import limits
from .batching import Steppers
from .models import LoadedModel
from .streams import Stream, StreamEvents, StreamRegistry, encode_prompt

log = logging.getLogger(__name__)

PROMPT = "Hello, how are you?"
# The batch's second prompt is longer: rows of different lengths are padded, which takes
# kernels of its own.
LONGER_PROMPT = "Hello, how are you today? Tell me a story."
# Tokens each warm-up generation asks for: the first and a decoding step.
TOKENS = 2
# The sampled generation's temperature and nucleus mass (below 1, so the nucleus filter's
# kernels are compiled too).
TEMPERATURE = 0.7
TOP_P = 0.9


class WarmUpFailed(Exception):
    """A warm-up generation ended with an error; the message is the runtime's."""


class _Ends:
    """A Writer stand-in keeping only how each warm-up stream ended."""

    def __init__(self):
        self.errors: list[str] = []

    def notify(self, method: str, params: dict) -> None:
        if method == "stream.event" and params.get("event") == "error":
            self.errors.append(str(params.get("error")))


def warm_up(model: LoadedModel) -> float:
    """Runs the warm-up generations of `model`; the seconds they took.

    Raises WarmUpFailed when one ends with an error.
    """
    started = time.perf_counter()
    quiet = dataclasses.replace(model, prefix_cache=None)
    short, longer = encode_prompt(quiet, PROMPT), encode_prompt(quiet, LONGER_PROMPT)
    ends = _Ends()
    registry = StreamRegistry(limits.STREAMS_LIVE_MAX_DEFAULT)
    steppers = Steppers(registry, StreamEvents(ends))
    # Each round: its streams (temperature, nucleus mass, prompt), and the steps run before
    # each next one is inserted.
    rounds: list[tuple[list[tuple[float, float, list[int]]], int]] = [
        ([(0.0, 1.0, short)], 0),
        ([(TEMPERATURE, TOP_P, short)], 0),
    ]
    if model.batch_size > 1:
        # A stream joining one that decodes alone, then two prefilled together; the
        # sampled one of the pair without, then with the nucleus filter.
        rounds += [
            ([(0.0, 1.0, short), (TEMPERATURE, 1.0, longer)], 2),
            ([(0.0, 1.0, short), (TEMPERATURE, TOP_P, longer)], 0),
        ]
    for n, (streams, steps_between) in enumerate(rounds):
        for k, (temperature, top_p, prompt_ids) in enumerate(streams):
            stream = Stream(
                stream_id=f"warm-up-{n}-{k}",
                model=quiet,
                prompt_ids=list(prompt_ids),
                max_tokens=TOKENS + steps_between,
                temperature=temperature,
                top_p=top_p,
                seed=None,
            )
            registry.admit(stream)
            registry.start(stream)
            steppers.insert(stream)
            for _ in range(steps_between):
                steppers.step_all()
        while steppers.busy():
            steppers.step_all()
        if ends.errors:
            raise WarmUpFailed(ends.errors[0])
    seconds = time.perf_counter() - started
    log.info("warmed %s up in %.3f s", model.model_id, seconds)
    return seconds
