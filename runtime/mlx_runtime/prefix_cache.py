"""A model's prompt prefix cache: KV caches of earlier prompts, found by their tokens.

An entry holds the KV cache a prompt left after its prefill, for the
prompt's token ids but its last (the stepper keeps it at that point, so a
next turn that extends the prompt finds it whole, and a cache that cannot be
trimmed is still of use). A lookup takes the entry sharing the longest token
prefix with the new prompt: an entry whose tokens are all a prefix of the
prompt's is used as it is, a longer or diverging one only when its cache
can be trimmed back to the shared part, and only when it covers at least
`min_hit_tokens` (copying a cache costs more than prefilling a few tokens).
So only entries that share a prompt's first `min_hit_tokens` tokens can
serve it: entries are indexed by those tokens, and a lookup or a store
compares the prompt with that bucket alone, not with every entry (the
sessions bound allows hundreds). A hit never covers the prompt's last token, so at least one is left to prefill and the first token's logits
are the prompt's own. Since a hit needs identical tokens, it is correct
whatever a request's session says, and two prompts share no more than
their common token prefix.

Bounded: the entries' bytes, counted as allocated, stay within the budget
less the bytes the model's running streams hold (which the caller passes),
evicting the least recently used first; an entry larger than the budget is
not kept. A session keeps at most one entry, the newest, pinned for the
session time-to-live: other traffic evicts pinned entries only when the
unpinned ones are gone. Sessions are bounded in number; past the bound the
least recently used session loses its pin.

Looked up and filled on the compute thread; the read loop reads its
figures and clears it when the model is unloaded, so each call holds the
cache's lock.
"""

import copy
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

Cache = list[Any]


def cache_nbytes(cache: Cache) -> int:
    """The bytes a cache's arrays hold, as allocated (mlx-lm grows them in steps)."""
    return sum(int(layer.nbytes) for layer in cache)


@dataclass
class Hit:
    """A lookup's answer: a copy of an entry's cache, the stream's own to extend."""

    cache: Cache
    # Prompt tokens the copy covers.
    tokens: int
    # The copy's bytes.
    nbytes: int


@dataclass
class Figures:
    """What the cache did since the model was loaded, and holds now."""

    lookups: int = 0
    hits: int = 0
    # Prompt tokens asked for, and of those found in the cache.
    prompt_tokens: int = 0
    cached_tokens: int = 0
    entries: int = 0
    bytes: int = 0
    evictions: int = 0
    # Entries not kept: larger than the budget.
    too_large: int = 0
    sessions: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class _Entry:
    tokens: np.ndarray
    cache: Cache
    nbytes: int
    trimmable: bool
    session: str | None = None
    pinned_until: float = 0.0


@dataclass
class _Candidate:
    key: bytes
    usable: int
    trim: int = field(default=0)


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


class PrefixCache:
    """One model's entries, least recently used first."""

    def __init__(
        self,
        budget_bytes: int,
        sessions_max: int,
        session_ttl: float,
        clock: Callable[[], float] = time.monotonic,
        min_hit_tokens: int = 1,
    ):
        self.budget_bytes = max(int(budget_bytes), 0)
        # A shorter shared prefix is prefilled rather than copied.
        self.min_hit_tokens = max(int(min_hit_tokens), 1)
        self.sessions_max = max(int(sessions_max), 0)
        self.session_ttl = max(float(session_ttl), 0.0)
        self._clock = clock
        # Token bytes → entry, least recently used first.
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        # The bytes of an entry's first `min_hit_tokens` tokens → the keys of the entries
        # that start with them (a dict as an ordered set).
        self._by_head: dict[bytes, dict[bytes, None]] = {}
        # Session → the key of its entry, least recently used first.
        self._sessions: OrderedDict[str, bytes] = OrderedDict()
        self._figures = Figures()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._figures.bytes

    @property
    def figures(self) -> Figures:
        """A copy of the figures, with the entries and sessions held now."""
        with self._lock:
            figures = Figures(**self._figures.as_dict())
            figures.entries = len(self._entries)
            figures.sessions = len(self._sessions)
            return figures

    def lookup(self, prompt: list[int], session: str | None = None) -> Hit | None:
        """The longest usable prefix of `prompt` held, copied; None on a miss."""
        with self._lock:
            return self._lookup(prompt, session)

    def _lookup(self, prompt: list[int], session: str | None) -> Hit | None:
        self._figures.lookups += 1
        self._figures.prompt_tokens += len(prompt)
        self._touch_session(session)
        tokens = np.asarray(prompt, dtype=np.int64)
        # At least the last token is left to prefill.
        most = len(tokens) - 1
        if most < self.min_hit_tokens:
            return None
        best: _Candidate | None = None
        for key in self._by_head.get(self._head(tokens), ()):
            entry = self._entries[key]
            shared = min(_common_prefix(entry.tokens, tokens), most)
            if shared <= 0:
                continue
            if shared == len(entry.tokens):
                candidate = _Candidate(key, shared)
            elif entry.trimmable:
                candidate = _Candidate(key, shared, trim=len(entry.tokens) - shared)
            else:
                continue
            # The longest; of equal ones, the one needing no trim.
            if best is None or (candidate.usable, -candidate.trim) > (best.usable, -best.trim):
                best = candidate
        if best is None or best.usable < self.min_hit_tokens:
            return None
        entry = self._entries[best.key]
        self._entries.move_to_end(best.key)
        cache = copy.deepcopy(entry.cache)
        if best.trim:
            trim_prompt_cache(cache, best.trim)
        self._figures.hits += 1
        self._figures.cached_tokens += best.usable
        return Hit(cache=cache, tokens=best.usable, nbytes=cache_nbytes(cache))

    def store(
        self, tokens: list[int], cache: Cache, session: str | None = None, live_bytes: int = 0
    ) -> bool:
        """Keeps `cache`, the state after `tokens`; whether it was kept.

        The caller hands the cache over: it must not be extended afterwards.
        `live_bytes` are the bytes the model's running streams hold now.
        """
        with self._lock:
            return self._store(tokens, cache, session, live_bytes)

    def _store(self, tokens: list[int], cache: Cache, session: str | None, live_bytes: int) -> bool:
        if len(tokens) < self.min_hit_tokens:
            # No prompt could find it: a hit covers at least `min_hit_tokens`.
            return False
        nbytes = cache_nbytes(cache)
        if nbytes > self.budget_bytes:
            self._figures.too_large += 1
            return False
        key = np.asarray(tokens, dtype=np.int64)
        raw = key.tobytes()
        now = self._clock()
        if session is not None and self.sessions_max > 0:
            previous = self._sessions.pop(session, None)
            if previous is not None and previous != raw:
                self._drop(previous)
            self._sessions[session] = raw
            while len(self._sessions) > self.sessions_max:
                _, unpinned = self._sessions.popitem(last=False)
                if unpinned in self._entries:
                    self._unpin(unpinned, self._entries[unpinned])
        else:
            session = None
        self._drop(raw)
        head = self._head(key)
        trimmable = can_trim_prompt_cache(cache)
        if trimmable:
            # A trimmable entry serves every prefix of its tokens: unpinned entries it
            # extends hold nothing more.
            for other_key in list(self._by_head.get(head, ())):
                other = self._entries[other_key]
                if (
                    other.session is None
                    and len(other.tokens) < len(key)
                    and _common_prefix(other.tokens, key) == len(other.tokens)
                ):
                    self._drop(other_key)
        self._entries[raw] = _Entry(
            tokens=key,
            cache=cache,
            nbytes=nbytes,
            trimmable=trimmable,
            session=session,
            pinned_until=now + self.session_ttl if session is not None else 0.0,
        )
        self._by_head.setdefault(head, {})[raw] = None
        self._figures.bytes += nbytes
        self._fit(live_bytes)
        return raw in self._entries

    def fit(self, live_bytes: int = 0) -> None:
        """Evicts until the entries fit the budget less `live_bytes`: unpinned entries
        least recently used first, then pinned ones in the same order."""
        with self._lock:
            self._fit(live_bytes)

    def _fit(self, live_bytes: int) -> None:
        limit = self.budget_bytes - max(live_bytes, 0)
        now = self._clock()
        for key, entry in self._entries.items():
            if entry.session is not None and entry.pinned_until <= now:
                self._unpin(key, entry)
        while self._figures.bytes > limit and self._entries:
            victim = next(
                (k for k, e in self._entries.items() if e.session is None),
                next(iter(self._entries)),
            )
            self._drop(victim)
            self._figures.evictions += 1

    def clear(self) -> None:
        """Drops every entry (the model is unloaded)."""
        with self._lock:
            self._entries.clear()
            self._by_head.clear()
            self._sessions.clear()
            self._figures.bytes = 0

    def _head(self, tokens: np.ndarray) -> bytes:
        return tokens[: self.min_hit_tokens].tobytes()

    def _touch_session(self, session: str | None) -> None:
        if session is not None and session in self._sessions:
            self._sessions.move_to_end(session)

    def _unpin(self, key: bytes, entry: _Entry) -> None:
        if entry.session is not None and self._sessions.get(entry.session) == key:
            del self._sessions[entry.session]
        entry.session = None
        entry.pinned_until = 0.0

    def _drop(self, key: bytes) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        head = self._head(entry.tokens)
        bucket = self._by_head[head]
        del bucket[key]
        if not bucket:
            del self._by_head[head]
        if entry.session is not None and self._sessions.get(entry.session) == key:
            del self._sessions[entry.session]
        self._figures.bytes -= entry.nbytes
