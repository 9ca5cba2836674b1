"""The compute thread's generation: one stepper per loaded model.

A batched model has one `mlx_lm.generate.BatchGenerator`, made and used
only on the compute thread: every running stream of the model advances one
token per `next()` call, and a prompt joins between steps, prefilled in
chunks of the model's prefill step size so running streams wait at most one
chunk for their next token. A model loaded with batch size 1 (or whose cache
cannot be batched) has a sequential stepper instead: one stream at a time,
one token per step, the rest waiting in arrival order.

A stream that finds its model idle runs alone, on a cache of its own as on
the sequential path (a batch of one gains nothing and its cache bookkeeping
costs), until a second stream of the model arrives: then it joins the
generator with its cache and its next token. Only these parts of
`BatchGenerator` are used: `insert_segments`, `next`,
`extract_cache`, `remove`, `close` and `prompt_cache_nbytes`.

Prefix cache: a model with one (see `prefix_cache`) looks a stream's prompt
up as it joins; a hit's copy of the cache goes into the batch with the
stream, and only the rest of the prompt is prefilled. The prompt is inserted
as two segments, all but its last token and that token, so that when the
first is prefilled the stream's cache is taken (a copy) and kept for the
prompt minus its last token: a next turn that extends the prompt finds it.

Sampling: streams with the same temperature and top-p share one sampler
object, so a batch samples in one call; a seeded stream has its own sampler
with its own random key, split once per token, so its tokens do not depend
on which other streams share its batch (the promise: the same seed, prompt,
parameters and model give the same tokens alone or in any batch, as far as
the model's logits for a row do not depend on the batch's shape; the tests
check it on the test model). A seeded stream makes its batch sample row by
row, which costs throughput while it runs.

Every stream handed to a stepper ends with exactly one final event: a
stream removed (cancelled) while waiting, prefilling or decoding; one whose
step raised (every stream of that generator ends with `error`, once, and
the generator is rebuilt; other models' streams go on); one that completed.
"""

import contextlib
import copy
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, generate_step, generation_stream, wired_limit
from mlx_lm.models.cache import make_prompt_cache

from . import limits
from .detokenize import TokenTexts
from .models import LoadedModel
from .prefix_cache import cache_nbytes
from .streams import Completion, Stream, StreamEvents, StreamRegistry

log = logging.getLogger(__name__)

Sampler = Callable[[mx.array], mx.array]


def nucleus(logprobs: mx.array, top_p: float) -> mx.array:
    """`logprobs` (normalised, a row per stream) with every token outside the nucleus at
    -inf: the nucleus is the most likely tokens whose probabilities reach `top_p`, the one
    that crosses it included (so never empty)."""
    descending = mx.sort(logprobs, axis=-1)[..., ::-1]
    probs = mx.exp(descending)
    # The mass of the tokens more likely than each.
    before = mx.cumsum(probs, axis=-1) - probs
    kept = (before < top_p).sum(axis=-1, keepdims=True)
    threshold = mx.take_along_axis(descending, kept - 1, axis=-1)
    return mx.where(logprobs < threshold, -mx.inf, logprobs)


class SharedSampler:
    """Samples at one temperature and nucleus from MLX's global random state; greedy at
    temperature 0.

    Not compiled: mlx-lm's compiled samplers take the temperature and nucleus as constants,
    so every value never used before on a host would compile a kernel of its own (about a
    second on the CPU) on the request that asks for it.
    """

    def __init__(self, temperature: float, top_p: float):
        self._temperature = temperature
        self._top_p = top_p

    def __call__(self, logprobs: mx.array) -> mx.array:
        if self._temperature <= 0:
            return mx.argmax(logprobs, axis=-1)
        if 0 < self._top_p < 1.0:
            logprobs = nucleus(logprobs, self._top_p)
        return mx.random.categorical(logprobs * (1 / self._temperature))


class SeededSampler:
    """Samples with a random key of its own, split for every token."""

    def __init__(self, seed: int, temperature: float, top_p: float):
        self._key = mx.random.key(seed)
        self._temperature = temperature
        self._top_p = top_p

    def __call__(self, logprobs: mx.array) -> mx.array:
        self._key, key = mx.random.split(self._key)
        if 0 < self._top_p < 1.0:
            logprobs = nucleus(logprobs, self._top_p)
        return mx.random.categorical(logprobs * (1 / self._temperature), key=key)


class Samplers:
    """One sampler per distinct (temperature, top_p), shared by the streams asking for it."""

    def __init__(self) -> None:
        self._shared: dict[tuple[float, float], Sampler] = {}

    def for_stream(self, stream: Stream) -> Sampler:
        if stream.seed is not None and stream.temperature > 0:
            return SeededSampler(stream.seed, stream.temperature, stream.top_p)
        key = (stream.temperature, stream.top_p)
        sampler = self._shared.get(key)
        if sampler is None:
            # Bounded by the distinct parameters of live streams: cleared when idle.
            sampler = self._shared[key] = SharedSampler(stream.temperature, stream.top_p)
        return sampler

    def clear(self) -> None:
        self._shared.clear()


@dataclass
class Run:
    """A stream's progress on the compute thread."""

    stream: Stream
    texts: TokenTexts
    # time.perf_counter() readings.
    started: float
    prefill_started: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    tokens_generated: int = 0
    # Prompt tokens the prefix cache gave it.
    cached_tokens: int = 0

    @classmethod
    def of(cls, stream: Stream) -> "Run":
        tokenizer = stream.model.tokenizer
        texts = TokenTexts(lambda ids: tokenizer.decode(ids, skip_special_tokens=False))
        return cls(stream=stream, texts=texts, started=time.perf_counter())

    def prefilling(self, at: float) -> None:
        if self.prefill_started is None:
            self.prefill_started = at

    def token(self, token_id: int, now: float) -> list[tuple[int, str]]:
        """Counts a generated (non-EOS) token; the chunks it makes ready."""
        self.tokens_generated += 1
        self.last_token_at = now
        return self.texts.add(token_id)

    def completion(self, finish_reason: str) -> Completion:
        finished = time.perf_counter()
        first = self.first_token_at or finished
        prefill_started = self.prefill_started or self.started
        return Completion(
            tokens_generated=self.tokens_generated,
            tokens_per_second=_decode_rate(
                self.tokens_generated, self.first_token_at, self.last_token_at,
                self.started, finished,
            ),
            time_to_first_token=first - self.started,
            total_time=finished - self.started,
            finish_reason=finish_reason,
            prompt_tokens=len(self.stream.prompt_ids),
            prompt_time=max(first - prefill_started, 0.0),
            queue_time=max(prefill_started - self.stream.admitted_at, 0.0),
            cached_tokens=self.cached_tokens,
        )


def _decode_rate(
    tokens: int, first: float | None, last: float | None, started: float, finished: float
) -> float:
    """Tokens per second after the first token; for one token, over the whole stream."""
    if tokens >= 2 and first is not None and last is not None and last > first:
        return (tokens - 1) / (last - first)
    if tokens == 1:
        return 1 / max(finished - started, 1e-9)
    return 0.0


class Output:
    """What one round of steps sends: `stream.step` lines, then the streams' ends.

    Tokens of streams that asked for step chunks are gathered into one line
    per step; other streams get a `stream.chunk` line per token at once. A
    stream's end is sent after the line carrying its last tokens.
    """

    def __init__(self, registry: StreamRegistry, events: StreamEvents):
        self._registry = registry
        self._events = events
        self._entries: list[dict] = []
        self._ends: list[tuple[Stream, Completion | str | None]] = []

    def tokens(self, stream: Stream, ready: list[tuple[int, str]]) -> None:
        if stream.step_chunks:
            sid = stream.stream_id
            self._entries.extend(
                {"stream_id": sid, "token": text, "token_id": token_id} for token_id, text in ready
            )
        else:
            for token_id, text in ready:
                self._events.chunk(stream.stream_id, token_id, text)

    def end(self, run: Run, outcome: Completion | str | None) -> None:
        """Ends `run`'s stream: completed (a Completion), failed (a message) or cancelled."""
        if isinstance(outcome, Completion):
            self.tokens(run.stream, run.texts.finish())
        self._ends.append((run.stream, outcome))

    def flush(self) -> None:
        """Sends the step's line, then every end; call once per step."""
        if self._entries:
            self._events.step(self._entries)
            self._entries = []
        ends, self._ends = self._ends, []
        for stream, outcome in ends:
            sid = stream.stream_id
            if self._registry.retire(stream) or outcome is None:
                self._events.cancelled(sid)
            elif isinstance(outcome, str):
                self._events.error(sid, outcome)
            else:
                self._events.stats(sid, outcome)
                self._events.completed(sid, outcome.finish_reason)


class Stepper(Protocol):
    """Generates the streams of one loaded model, a step at a time."""

    model: LoadedModel

    def __len__(self) -> int:
        """Streams handed to it and not ended."""

    def waiting(self) -> int:
        """Of those, the ones not yet taken into prefill or decoding."""

    def prefilling(self) -> int:
        """Of those, the ones taken into prefill that have no token yet."""

    def insert(self, stream: Stream, out: Output) -> None: ...

    def remove(self, stream: Stream, out: Output) -> None: ...

    def step(self, out: Output) -> None:
        """Advances every running stream by one token (call only when it has streams)."""

    def end_all(self, out: Output, reason: str | None) -> None:
        """Ends every stream: with error `reason`, or cancelled for None."""


def _take_token(run: Run, token: int, eos: set[int], out: Output) -> Completion | None:
    """Hands `token` of `run`'s stream to `out`; None while the stream goes on, else its
    completion: an EOS token (not sent) or the last token its `max_tokens` allows."""
    now = time.perf_counter()
    if run.first_token_at is None:
        run.first_token_at = now
    if token in eos:
        return run.completion("stop")
    out.tokens(run.stream, run.token(token, now))
    if run.tokens_generated >= run.stream.max_tokens:
        return run.completion("length")
    return None


def _prefill(model: LoadedModel, tokens: list[int], cache: list) -> None:
    """Runs `tokens` through the model into `cache`, a prefill chunk at a time."""
    step = model.prefill_step_size
    with mx.stream(generation_stream):
        for start in range(0, len(tokens), step):
            model.model(mx.array(tokens[start : start + step])[None], cache=cache)
            mx.eval([c.state for c in cache])


def _prompt_cache(model: LoadedModel, run: Run) -> tuple[list, int]:
    """The cache `run`'s stream starts from: a copy of what the model's prefix cache holds
    of its prompt (the tokens it covers recorded in `run`), else an empty one; and those
    tokens. The copy is live from here on: the entries are fitted beside it at once."""
    stream = run.stream
    if model.prefix_cache is not None:
        hit = model.prefix_cache.lookup(stream.prompt_ids, stream.session_id)
        if hit is not None:
            run.cached_tokens = hit.tokens
            model.prefix_cache.fit(hit.nbytes)
            return hit.cache, hit.tokens
    return make_prompt_cache(model.model), 0


def _keep_prompt(model: LoadedModel, stream: Stream, cache: list) -> None:
    """Keeps a copy of `cache`, the state after `stream`'s prompt but its last token, in the
    model's prefix cache (when it has one); the stream goes on with `cache` itself."""
    if model.prefix_cache is not None:
        kept = copy.deepcopy(cache)
        model.prefix_cache.store(
            stream.prompt_ids[:-1], kept, stream.session_id, cache_nbytes(cache)
        )


def _failure(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


class _Lone:
    """A model's only stream, decoded on its own cache outside the generator.

    One stream gains nothing from a batch, and a batch cache's bookkeeping costs
    a single row about a tenth of its tokens per second; so a stream that
    finds its model idle runs alone, as the sequential path runs a stream, until
    a second stream of the model arrives. Then it joins the generator with its
    cache and the token it is about to feed, and goes on there.

    Its tokens are pipelined as `generate_step` pipelines them: while a token
    is sent, the next one is being computed.
    """

    def __init__(self, run: Run, sampler: Sampler):
        self.run = run
        self.sampler = sampler
        self.cache: list | None = None
        # Tokens fed to the model: the prompt's, then the generated ones.
        self.fed: list[int] = []
        # The next token, sampled (lazily) and not yet sent or fed; None while prefilling.
        self.pending: mx.array | None = None

    @property
    def started(self) -> bool:
        return self.cache is not None


class BatchedStepper:
    """A model's `BatchGenerator`: its streams decode together, one token each per step;
    a stream alone runs outside it (`_Lone`) until another joins."""

    def __init__(self, model: LoadedModel):
        self.model = model
        self._generator: BatchGenerator | None = None
        self._runs: dict[int, Run] = {}
        self._uids: dict[str, int] = {}
        self._lone: _Lone | None = None
        self._samplers = Samplers()
        self._stop_tokens = [[token] for token in sorted(model.tokenizer.eos_token_ids)]
        self._eos = model.tokenizer.eos_token_ids

    def __len__(self) -> int:
        return len(self._runs) + (self._lone is not None)

    def waiting(self) -> int:
        # A snapshot: `runtime/state` asks from the read loop.
        return sum(1 for run in self._all_runs() if run.prefill_started is None)

    def prefilling(self) -> int:
        return sum(
            1
            for run in self._all_runs()
            if run.prefill_started is not None and run.first_token_at is None
        )

    def _all_runs(self) -> list[Run]:
        runs = list(self._runs.values())
        lone = self._lone
        if lone is not None:
            runs.append(lone.run)
        return runs

    def _make_generator(self) -> BatchGenerator:
        batch = self.model.batch_size
        return BatchGenerator(
            self.model.model,
            stop_tokens=self._stop_tokens,
            completion_batch_size=batch,
            prefill_batch_size=min(batch, limits.PREFILL_BATCH_MAX),
            prefill_step_size=self.model.prefill_step_size,
        )

    def insert(self, stream: Stream, out: Output) -> None:
        run = Run.of(stream)
        if self._generator is None and not self._runs and self._lone is None:
            self._lone = _Lone(run, self._samplers.for_stream(stream))
            return
        if self._lone is not None:
            self._join(out)
        self._insert(run, out)

    def _insert(self, run: Run, out: Output) -> None:
        """Hands `run`'s stream to the generator, with what the prefix cache holds of it."""
        stream = run.stream
        prompt = stream.prompt_ids
        prefix_cache = self.model.prefix_cache
        try:
            if self._generator is None:
                self._generator = self._make_generator()
            cache, cached = _prompt_cache(self.model, run)
            (uid,) = self._generator.insert_segments(
                [[prompt[cached:-1], prompt[-1:]]],
                max_tokens=[stream.max_tokens],
                caches=[cache],
                all_tokens=[prompt[:cached]],
                samplers=[self._samplers.for_stream(stream)],
            )
            if prefix_cache is not None:
                # The hit's copy is live now: what is kept fits beside it.
                prefix_cache.fit(self._generator.prompt_cache_nbytes)
        except Exception as exc:
            log.exception("stream %s could not join its batch", stream.stream_id)
            out.end(run, _failure(exc))
            return
        self._runs[uid] = run
        self._uids[stream.stream_id] = uid

    def remove(self, stream: Stream, out: Output) -> None:
        lone = self._lone
        if lone is not None and lone.run.stream is stream:
            self._lone = None
            out.end(lone.run, None)
            return
        uid = self._uids.get(stream.stream_id)
        if uid is None or self._runs[uid].stream is not stream:
            return  # It ended already (its id may be another stream's now).
        del self._uids[stream.stream_id]
        run = self._runs.pop(uid)
        if self._generator is not None:
            self._generator.remove([uid])
        out.end(run, None)
        self._idle_check()

    def step(self, out: Output) -> None:
        if self._lone is not None:
            self._step_lone(out)
            return
        assert self._generator is not None and self._runs
        started = time.perf_counter()
        try:
            prompt_responses, generation_responses = self._generator.next()
        except Exception as exc:
            log.exception(
                "a step of %s failed; ending its %d streams", self.model.model_id, len(self)
            )
            self.end_all(out, _failure(exc))
            return
        now = time.perf_counter()
        prefilled = []
        for response in prompt_responses:
            run = self._runs.get(response.uid)
            if run is not None:
                run.prefilling(started)
                if response.end_of_segment and not response.end_of_prompt:
                    prefilled.append(response.uid)
        if prefilled and self.model.prefix_cache is not None:
            self._keep_prompts(prefilled)
        for response in generation_responses:
            self._deliver(response, now, out)
        self._idle_check()

    def _lone_next(self, lone: _Lone, token: mx.array) -> mx.array:
        """Feeds `token` to the lone stream's model; its next token, sampled, evaluating."""
        with mx.stream(generation_stream):
            logits = self.model.model(token[None], cache=lone.cache)[:, -1, :]
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            sampled = lone.sampler(logprobs)
        mx.async_eval(sampled)
        return sampled

    def _start_lone(self, lone: _Lone) -> None:
        """Takes what the prefix cache holds of the lone stream's prompt."""
        run = lone.run
        run.prefilling(time.perf_counter())
        lone.cache, cached = _prompt_cache(self.model, run)
        lone.fed = list(run.stream.prompt_ids[:cached])

    def _prefill_lone(self, lone: _Lone) -> None:
        """One prefill chunk of the lone stream's prompt but its last token; after the last
        chunk, the prompt is kept in the prefix cache and the first token started."""
        stream = lone.run.stream
        prompt = stream.prompt_ids
        assert lone.cache is not None
        done = len(lone.fed)
        chunk = prompt[done : min(done + self.model.prefill_step_size, len(prompt) - 1)]
        if chunk:
            _prefill(self.model, chunk, lone.cache)
            lone.fed.extend(chunk)
            if len(lone.fed) < len(prompt) - 1:
                return
            _keep_prompt(self.model, stream, lone.cache)
        lone.fed.append(prompt[-1])
        lone.pending = self._lone_next(lone, mx.array(prompt[-1:]))

    def _step_lone(self, out: Output) -> None:
        """One step of the lone stream: a prefill chunk, or a token: the pending one is sent
        (the next is being computed meanwhile), unless it ends the stream."""
        lone = self._lone
        assert lone is not None
        run = lone.run
        try:
            if not lone.started:
                self._start_lone(lone)
            if lone.pending is None:
                self._prefill_lone(lone)
                return
            current = lone.pending
            lone.pending = None
            if run.tokens_generated + 1 < run.stream.max_tokens:
                lone.pending = self._lone_next(lone, current)
            token = int(current.item())
        except Exception as exc:
            log.exception("stream %s failed", run.stream.stream_id)
            self._lone = None
            out.end(run, _failure(exc))
            return
        completion = _take_token(run, token, self._eos, out)
        if completion is not None:
            self._lone = None
            out.end(run, completion)
            return
        lone.fed.append(token)

    def _join(self, out: Output) -> None:
        """The lone stream joins the generator, with its cache: while prefilling, with the
        rest of its prompt; decoding, with its next token, once that token is sent; not
        started yet, as any stream joins."""
        lone, self._lone = self._lone, None
        assert lone is not None
        run = lone.run
        if not lone.started:
            self._insert(run, out)
            return
        try:
            assert lone.cache is not None
            prompt = run.stream.prompt_ids
            if lone.pending is None:
                # Prefilling: the rest of the prompt goes in as a prefix cache hit's would.
                segments = [prompt[len(lone.fed) : -1], prompt[-1:]]
                max_tokens = run.stream.max_tokens
            else:
                # The pending token was sampled from what was fed; it is the stream's next.
                token = int(lone.pending.item())
                completion = _take_token(run, token, self._eos, out)
                if completion is not None:
                    out.end(run, completion)
                    return
                segments = [[token]]
                max_tokens = run.stream.max_tokens - run.tokens_generated
            if self._generator is None:
                self._generator = self._make_generator()
            (uid,) = self._generator.insert_segments(
                [segments],
                max_tokens=[max_tokens],
                caches=[lone.cache],
                all_tokens=[lone.fed],
                samplers=[lone.sampler],
            )
        except Exception as exc:
            log.exception("stream %s could not join its batch", run.stream.stream_id)
            out.end(run, _failure(exc))
            return
        self._runs[uid] = run
        self._uids[run.stream.stream_id] = uid

    def _keep_prompts(self, uids: list[int]) -> None:
        """Keeps the caches of streams whose prompt but its last token is prefilled."""
        prefix_cache = self.model.prefix_cache
        assert prefix_cache is not None and self._generator is not None
        try:
            taken = self._generator.extract_cache(uids)
            for uid, (cache, tokens) in taken.items():
                run = self._runs.get(uid)
                session = run.stream.session_id if run is not None else None
                prefix_cache.store(
                    list(tokens), cache, session, self._generator.prompt_cache_nbytes
                )
        except Exception:
            # The cache is an optimisation: the streams go on without it.
            log.exception("keeping the prompt caches of %s failed", self.model.model_id)

    def _deliver(self, response, now: float, out: Output) -> None:
        run = self._runs.get(response.uid)
        if run is None:
            return
        if run.first_token_at is None:
            run.first_token_at = now
        if response.finish_reason != "stop":
            out.tokens(run.stream, run.token(response.token, now))
        if response.finish_reason is not None:
            del self._runs[response.uid]
            del self._uids[run.stream.stream_id]
            out.end(run, run.completion(response.finish_reason))

    def end_all(self, out: Output, reason: str | None) -> None:
        runs = self._all_runs()
        self._lone = None
        self._runs.clear()
        self._uids.clear()
        for run in runs:
            out.end(run, reason)
        self._close()

    def _idle_check(self) -> None:
        """An idle generator is dropped, so its caches and samplers go with it."""
        if not self._runs:
            self._close()

    def _close(self) -> None:
        generator, self._generator = self._generator, None
        self._samplers.clear()
        if generator is not None:
            try:
                generator.close()
            except Exception:
                log.exception("closing the generator of %s failed", self.model.model_id)


@dataclass
class _Active:
    run: Run
    steps: object  # generate_step's iterator
    limit: contextlib.ExitStack


class SequentialStepper:
    """One stream of a model at a time, one token per step; the rest wait in order."""

    def __init__(self, model: LoadedModel):
        self.model = model
        self._waiting: deque[Run] = deque()
        self._active: _Active | None = None
        self._eos = model.tokenizer.eos_token_ids

    def __len__(self) -> int:
        return len(self._waiting) + (self._active is not None)

    def waiting(self) -> int:
        return len(self._waiting)

    def prefilling(self) -> int:
        active = self._active
        return int(active is not None and active.run.first_token_at is None)

    def insert(self, stream: Stream, out: Output) -> None:
        self._waiting.append(Run.of(stream))

    def remove(self, stream: Stream, out: Output) -> None:
        if self._active is not None and self._active.run.stream is stream:
            self._finish(out, None)
            return
        for run in self._waiting:
            if run.stream is stream:
                self._waiting.remove(run)
                out.end(run, None)
                return

    def _start(self) -> _Active:
        run = self._waiting.popleft()
        stream = run.stream
        run.prefilling(time.perf_counter())
        if stream.seed is not None:
            mx.random.seed(stream.seed)
        limit = contextlib.ExitStack()
        limit.enter_context(wired_limit(self.model.model, [generation_stream]))
        steps = self._generate(run)
        return _Active(run=run, steps=steps, limit=limit)

    def _generate(self, run: Run) -> Iterator[tuple[int, mx.array]]:
        """The stream's tokens; with a prefix cache, the prompt but its last token is
        prefilled first and its cache kept, then generation goes on from it."""
        stream, model = run.stream, self.model
        cache, cached = _prompt_cache(model, run)
        rest = stream.prompt_ids[cached:]
        if model.prefix_cache is not None and len(rest) > 1:
            _prefill(model, rest[:-1], cache)
            _keep_prompt(model, stream, cache)
            rest = rest[-1:]
        yield from generate_step(
            mx.array(rest),
            model.model,
            prompt_cache=cache,
            max_tokens=stream.max_tokens,
            sampler=SharedSampler(stream.temperature, stream.top_p),
            prefill_step_size=model.prefill_step_size,
        )

    def step(self, out: Output) -> None:
        if self._active is None:
            self._active = self._start()
        active = self._active
        try:
            token_id, _logprobs = next(active.steps)
        except StopIteration:
            self._finish(out, active.run.completion("length"))
            return
        except Exception as exc:
            log.exception("stream %s failed", active.run.stream.stream_id)
            self._finish(out, _failure(exc))
            return
        completion = _take_token(active.run, token_id, self._eos, out)
        if completion is not None:
            self._finish(out, completion)

    def _finish(self, out: Output, outcome: Completion | str | None) -> None:
        active, self._active = self._active, None
        assert active is not None
        try:
            active.limit.close()
        finally:
            out.end(active.run, outcome)

    def end_all(self, out: Output, reason: str | None) -> None:
        if self._active is not None:
            self._finish(out, reason)
        while self._waiting:
            out.end(self._waiting.popleft(), reason)


def stepper_for(model: LoadedModel) -> Stepper:
    return BatchedStepper(model) if model.batched else SequentialStepper(model)


@dataclass
class ModelCounts:
    """Streams of one model on the compute thread, for `runtime/state`."""

    batch_size: int
    # Prefilling or decoding; of those, `prefilling` have no token yet.
    running: int = 0
    prefilling: int = 0
    queued: int = 0


@dataclass
class Steppers:
    """Every model's stepper; the compute loop steps them in turn."""

    registry: StreamRegistry
    events: StreamEvents
    # Keyed by the LoadedModel's identity: a model reloaded under the same id
    # gets a stepper of its own while the old one's streams finish.
    _steppers: dict[int, Stepper] = field(default_factory=dict)

    def busy(self) -> bool:
        return any(len(stepper) for stepper in self._steppers.values())

    def output(self) -> Output:
        return Output(self.registry, self.events)

    def insert(self, stream: Stream) -> None:
        key = id(stream.model)
        stepper = self._steppers.get(key)
        if stepper is None:
            stepper = self._steppers[key] = stepper_for(stream.model)
        out = self.output()
        stepper.insert(stream, out)
        out.flush()

    def remove(self, stream: Stream) -> None:
        stepper = self._steppers.get(id(stream.model))
        if stepper is not None:
            out = self.output()
            stepper.remove(stream, out)
            out.flush()

    def step_all(self) -> None:
        """One step of every model with streams, each flushed before the next model steps."""
        for key, stepper in list(self._steppers.items()):
            if len(stepper):
                out = self.output()
                stepper.step(out)
                out.flush()
            if not len(stepper):
                del self._steppers[key]

    def end_all(self, reason: str | None) -> None:
        for stepper in self._steppers.values():
            out = self.output()
            stepper.end_all(out, reason)
            out.flush()
        self._steppers.clear()

    def counts(self) -> dict[str, ModelCounts]:
        """Running and queued streams by model id (read from any thread; approximate)."""
        counts: dict[str, ModelCounts] = {}
        for stepper in list(self._steppers.values()):
            entry = counts.setdefault(
                stepper.model.model_id, ModelCounts(batch_size=stepper.model.batch_size)
            )
            waiting = stepper.waiting()
            entry.queued += waiting
            entry.prefilling += stepper.prefilling()
            entry.running += len(stepper) - waiting
        return counts
