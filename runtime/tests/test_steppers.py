"""The compute thread's steppers, driven in this process: failure isolation and the
sequential fallback, which need a fault or a model the subprocess tests cannot make.

Method: load the tiny model in-process, admit streams to a real registry, hand
them to `Steppers` and step until idle, recording every notification. A step
failure is injected by replacing one generator's `next` with one that raises.
"""

import mlx.nn as nn
import mlx_lm
import pytest

from mlx_runtime import limits
from mlx_runtime.batching import BatchedStepper, SequentialStepper, Steppers, stepper_for
from mlx_runtime.models import LoadedModel, cache_batchable
from mlx_runtime.streams import Stream, StreamEvents, StreamRegistry, encode_prompt


class Recorder:
    """A Writer stand-in keeping every notification."""

    def __init__(self):
        self.sent: list[tuple[str, dict]] = []

    def notify(self, method: str, params: dict) -> None:
        self.sent.append((method, params))

    def finals(self, stream_id: str) -> list[dict]:
        return [
            params
            for method, params in self.sent
            if method == "stream.event" and params["stream_id"] == stream_id
        ]

    def tokens(self, stream_id: str) -> int:
        count = 0
        for method, params in self.sent:
            if method == "stream.chunk" and params["stream_id"] == stream_id:
                count += 1
            elif method == "stream.step":
                count += sum(1 for e in params["chunks"] if e["stream_id"] == stream_id)
        return count


@pytest.fixture(scope="module")
def weights(tiny_model_dir):
    return mlx_lm.load(str(tiny_model_dir))


def loaded(
    weights, model_id: str, batch_size: int, prefill_step_size: int = 512, prefix_cache=None
) -> LoadedModel:
    model, tokenizer = weights
    return LoadedModel(
        model_id=model_id, model=model, tokenizer=tokenizer, info={}, batch_size=batch_size,
        prefill_step_size=prefill_step_size, prefix_cache=prefix_cache,
    )


class World:
    def __init__(self):
        self.recorder = Recorder()
        self.registry = StreamRegistry(limits.STREAMS_LIVE_MAX_DEFAULT)
        self.steppers = Steppers(self.registry, StreamEvents(self.recorder))

    def start(
        self, model: LoadedModel, stream_id: str, max_tokens: int, prompt: str | None = None
    ) -> Stream:
        stream = Stream(
            stream_id=stream_id,
            model=model,
            prompt_ids=encode_prompt(model, prompt or f"Prompt of {stream_id}"),
            max_tokens=max_tokens,
            temperature=0.0,
            top_p=1.0,
            seed=None,
        )
        self.registry.admit(stream)
        assert self.registry.start(stream)
        self.steppers.insert(stream)
        return stream

    def run(self, steps_max: int = 10_000) -> None:
        for _ in range(steps_max):
            if not self.steppers.busy():
                return
            self.steppers.step_all()
        raise AssertionError("still busy")


def test_a_step_that_raises_ends_each_stream_of_its_generator_once(weights):
    world = World()
    broken = loaded(weights, "broken", 4)
    healthy = loaded(weights, "healthy", 4)
    doomed = [world.start(broken, f"doomed-{n}", 50) for n in range(3)]
    spared = [world.start(healthy, f"spared-{n}", 20) for n in range(2)]
    world.steppers.step_all()
    world.steppers.step_all()
    stepper = world.steppers._steppers[id(broken)]
    assert isinstance(stepper, BatchedStepper)

    def fail():
        raise RuntimeError("simulated step failure")

    stepper._generator.next = fail
    world.run()
    for stream in doomed:
        assert world.recorder.finals(stream.stream_id) == [
            {
                "stream_id": stream.stream_id,
                "event": "error",
                "error": "simulated step failure",
                "is_final": True,
            }
        ]
    for stream in spared:
        finals = world.recorder.finals(stream.stream_id)
        assert [f["event"] for f in finals] == ["completed"]
        assert world.recorder.tokens(stream.stream_id) == 20
    assert len(world.registry) == 0

    # The broken model's next stream gets a new generator and completes.
    again = world.start(broken, "after-failure", 10)
    world.run()
    assert [f["event"] for f in world.recorder.finals(again.stream_id)] == ["completed"]
    assert world.recorder.tokens(again.stream_id) == 10


def test_a_cancel_during_a_failing_step_still_ends_the_stream_once(weights):
    world = World()
    model = loaded(weights, "cancel-fail", 4)
    stream = world.start(model, "cancel-then-fail", 50)
    # A second stream: the two decode in the generator (a stream alone runs outside it).
    company = world.start(model, "cancel-company", 50)
    world.steppers.step_all()
    stepper = world.steppers._steppers[id(model)]

    def fail():
        raise RuntimeError("boom")

    stepper._generator.next = fail
    was_live, queued, running = world.registry.cancel(stream.stream_id)
    assert was_live and queued is None and running is stream
    world.run()
    world.steppers.remove(stream)  # The removal arrives after the failure: a no-op.
    assert [f["event"] for f in world.recorder.finals(stream.stream_id)] == ["cancelled"]
    assert [f["event"] for f in world.recorder.finals(company.stream_id)] == ["error"]


def test_streams_of_two_models_advance_in_turns(weights):
    world = World()
    first = loaded(weights, "first", 4)
    second = loaded(weights, "second", 4)
    world.start(first, "turn-a", 15)
    world.start(second, "turn-b", 15)
    for _ in range(8):
        world.steppers.step_all()
    a, b = world.recorder.tokens("turn-a"), world.recorder.tokens("turn-b")
    assert a > 0 and b > 0 and abs(a - b) <= 1, (a, b)
    world.run()


class _Unbatchable:
    """A cache layer without `merge`, like the cache types mlx-lm cannot batch."""


class _Model(nn.Module):
    def make_cache(self):
        return [_Unbatchable()]


class _Mergeable:
    def merge(self, caches):
        return self


class _MergeableModel(nn.Module):
    def make_cache(self):
        return [_Mergeable(), _Mergeable()]


def test_a_model_whose_cache_cannot_merge_is_not_batchable():
    assert not cache_batchable(_Model())
    assert cache_batchable(_MergeableModel())


def test_batch_size_one_takes_the_sequential_path(weights):
    assert isinstance(stepper_for(loaded(weights, "serial", 1)), SequentialStepper)
    assert isinstance(stepper_for(loaded(weights, "batched", 2)), BatchedStepper)


def token_ids_of(recorder: Recorder, stream_id: str) -> list[int]:
    ids = []
    for method, params in recorder.sent:
        if method == "stream.chunk" and params["stream_id"] == stream_id:
            ids.append(params["token_id"])
        elif method == "stream.step":
            ids.extend(e["token_id"] for e in params["chunks"] if e["stream_id"] == stream_id)
    return ids


def alone(weights, prompt: str, max_tokens: int) -> list[int]:
    """The greedy ids of `prompt` on the sequential path."""
    world = World()
    stream = world.start(loaded(weights, "reference", 1), "ref", max_tokens, prompt)
    world.run()
    return token_ids_of(world.recorder, stream.stream_id)


LONG_PROMPT = " ".join(f"w{n % 97}" for n in range(300))


@pytest.mark.parametrize(
    "steps_alone, prefill_step_size",
    [(0, 512), (1, 512), (6, 512), (2, 16)],
    ids=["before-its-first-step", "at-its-first-token", "decoding", "prefilling"],
)
def test_a_stream_alone_joins_the_batch_when_another_arrives_and_keeps_its_tokens(
    weights, steps_alone, prefill_step_size
):
    first_prompt = LONG_PROMPT if prefill_step_size < 512 else "The first stream runs alone"
    expected_first = alone(weights, first_prompt, 30)
    expected_second = alone(weights, "Then another comes", 12)
    world = World()
    model = loaded(weights, f"join-{steps_alone}", 4, prefill_step_size)
    first = world.start(model, "first", 30, first_prompt)
    stepper = world.steppers._steppers[id(model)]
    for _ in range(steps_alone):
        world.steppers.step_all()
    assert stepper._generator is None, "a stream alone runs outside the generator"
    second = world.start(model, "second", 12, "Then another comes")
    assert stepper._lone is None and len(stepper) == 2
    world.run()
    assert token_ids_of(world.recorder, "first") == expected_first
    assert token_ids_of(world.recorder, "second") == expected_second
    for stream in (first, second):
        assert [f["event"] for f in world.recorder.finals(stream.stream_id)] == ["completed"]


def test_a_stream_alone_is_cancelled_once_and_the_model_serves_the_next(weights):
    world = World()
    model = loaded(weights, "lone-cancel", 4)
    stream = world.start(model, "lone", 50)
    world.steppers.step_all()
    world.steppers.step_all()
    world.steppers.remove(stream)
    world.steppers.remove(stream)
    assert [f["event"] for f in world.recorder.finals("lone")] == ["cancelled"]
    after = world.start(model, "after", 5)
    world.run()
    assert [f["event"] for f in world.recorder.finals(after.stream_id)] == ["completed"]
    assert world.recorder.tokens("after") == 5


def test_a_lone_streams_hit_copy_counts_against_the_budget_from_the_lookup_on(weights):
    """A stream's copy of a hit is live KV: the entries kept beside it fit the budget
    less that copy as soon as the stream has it, not only once its prompt is kept (a
    stream alone prefills its prompt in chunks, a step each)."""
    from mlx_runtime.prefix_cache import PrefixCache

    world = World()
    cache = PrefixCache(1 << 30, 4, 60.0, min_hit_tokens=16)
    model = loaded(weights, "budget", 4, 16, cache)
    first = " ".join(f"a{n}" for n in range(30))
    other = " ".join(f"b{n}" for n in range(30))
    for stream_id, prompt in (("first", first), ("other", other)):
        world.start(model, stream_id, 1, prompt)
        world.run()
    # Both entries are under 256 tokens, so each is allocated the same bytes.
    one = cache.nbytes // 2
    assert len(cache) == 2 and one > 0
    cache.budget_bytes = 2 * one
    # Extends `first` by more than a prefill chunk: it hits and prefills for some steps.
    world.start(model, "next", 1, first + " " + " ".join(f"c{n}" for n in range(60)))
    world.steppers.step_all()
    assert cache.figures.hits == 1
    assert cache.nbytes <= cache.budget_bytes - one, "the copy was not counted"
    assert cache.figures.evictions == 1
    world.run()
    assert [f["event"] for f in world.recorder.finals("next")] == ["completed"]


@pytest.mark.parametrize(
    "top_p, kept",
    [(0.5, [0]), (0.7, [0, 1]), (0.8, [0, 1]), (0.81, [0, 1, 2]), (1.0, [0, 1, 2, 3])],
)
def test_the_nucleus_keeps_the_most_likely_tokens_up_to_top_p_and_the_one_crossing_it(
    top_p, kept
):
    import mlx.core as mx

    from mlx_runtime.batching import nucleus

    # Two rows, the second the first's tokens in another order.
    probs = mx.array([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]])
    filtered = nucleus(mx.log(probs), top_p)
    finite = [[i for i, v in enumerate(row) if v > -float("inf")] for row in filtered.tolist()]
    assert finite == [kept, sorted(3 - i for i in kept)]
