"""The prompt prefix cache on its own: what a lookup finds, what a copy holds, and
what the byte budget, the sessions and their pins keep.

Method: real mlx-lm caches (a trimmable `KVCache`, a non-trimmable
`ArraysCache`) filled with arrays whose values are the tokens' own ids, so
a hit's copy shows which tokens it holds; a clock the test moves by hand.
"""

import random

import mlx.core as mx
import pytest
from mlx_lm.models.cache import ArraysCache, KVCache

from mlx_runtime.prefix_cache import PrefixCache, cache_nbytes

HEADS, DIM = 2, 4


def kv(tokens: list[int]) -> list:
    """A one-layer KV cache after `tokens`: each position's keys and values are its token id."""
    cache = KVCache()
    if tokens:
        values = mx.broadcast_to(
            mx.array(tokens, dtype=mx.float32)[None, None, :, None], (1, HEADS, len(tokens), DIM)
        )
        cache.update_and_fetch(values, values)
    return [cache]


def held(cache: list) -> list[int]:
    """The token ids a `kv` cache holds, in order."""
    keys, _ = cache[0].keys_and_values()
    return [int(x) for x in keys[0, 0, :, 0].tolist()]


def state(tokens: list[int]) -> list:
    """A one-layer cache that cannot be trimmed, after `tokens`."""
    cache = ArraysCache(1)
    cache[0] = mx.array(tokens, dtype=mx.float32)[None, :]
    return [cache]


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(
    budget: int = 1 << 30, sessions: int = 4, ttl: float = 60.0, clock=None, min_hit: int = 1
) -> PrefixCache:
    return PrefixCache(budget, sessions, ttl, clock or Clock(), min_hit_tokens=min_hit)


def test_a_next_turn_finds_the_previous_prompt_whole_and_its_copy_is_its_own():
    c = make()
    turn1 = [5, 6, 7, 8]
    assert c.lookup(turn1) is None
    assert c.store(turn1[:-1], kv(turn1[:-1]))
    turn2 = turn1 + [9, 10]
    hit = c.lookup(turn2)
    assert hit is not None and hit.tokens == 3
    assert held(hit.cache) == [5, 6, 7]
    assert hit.nbytes == cache_nbytes(hit.cache) > 0
    # Extending the copy leaves the entry as it was.
    extra = mx.ones((1, HEADS, 2, DIM))
    hit.cache[0].update_and_fetch(extra, extra)
    again = c.lookup(turn2)
    assert again is not None and held(again.cache) == [5, 6, 7]
    f = c.figures
    assert (f.lookups, f.hits, f.prompt_tokens, f.cached_tokens) == (3, 2, 16, 6)


def test_a_hit_leaves_the_last_token_to_prefill():
    c = make()
    c.store([1, 2, 3], kv([1, 2, 3]))
    # The exact prompt: a trimmable entry is trimmed back by one.
    hit = c.lookup([1, 2, 3])
    assert hit is not None and hit.tokens == 2 and held(hit.cache) == [1, 2]
    # A cache that cannot be trimmed is of no use for a prompt it covers whole.
    d = make()
    d.store([1, 2, 3], state([1, 2, 3]))
    assert d.lookup([1, 2, 3]) is None
    hit = d.lookup([1, 2, 3, 4])
    assert hit is not None and hit.tokens == 3
    # A one-token prompt has nothing a hit could cover.
    assert c.lookup([1]) is None


def test_two_prompts_share_no_more_than_their_common_token_prefix():
    c = make()
    c.store([1, 2, 3, 4, 5], kv([1, 2, 3, 4, 5]))
    hit = c.lookup([1, 2, 9, 9, 9, 9])
    assert hit is not None and hit.tokens == 2 and held(hit.cache) == [1, 2]
    assert c.lookup([7, 1, 2, 3, 4, 5]) is None
    # Not trimmable: a diverging entry is not used at all.
    d = make()
    d.store([1, 2, 3, 4, 5], state([1, 2, 3, 4, 5]))
    assert d.lookup([1, 2, 9, 9, 9, 9]) is None


def test_the_longest_shared_prefix_wins():
    c = make()
    c.store([1, 2], kv([1, 2]))
    c.store([3, 4, 5, 6], kv([3, 4, 5, 6]))
    c.store([3, 4, 8], state([3, 4, 8]))
    hit = c.lookup([3, 4, 5, 6, 7])
    assert hit is not None and hit.tokens == 4
    assert c.lookup([1, 2, 3]).tokens == 2


def test_a_trimmable_entry_replaces_the_unpinned_entries_it_extends():
    c = make()
    c.store([1, 2], kv([1, 2]))
    c.store([1, 2, 3, 4], kv([1, 2, 3, 4]))
    assert len(c) == 1
    hit = c.lookup([1, 2, 7])
    assert hit is not None and held(hit.cache) == [1, 2]


def test_the_budget_evicts_the_least_recently_used_and_refuses_what_cannot_fit():
    one = cache_nbytes(kv([1]))  # Allocated in steps: every short entry is this size.
    c = make(budget=2 * one)
    c.store([1, 1], kv([1, 1]))
    c.store([2, 2], kv([2, 2]))
    assert c.lookup([1, 1, 0]) is not None  # [1, 1] is now the more recent.
    c.store([3, 3], kv([3, 3]))
    assert c.lookup([2, 2, 0]) is None
    assert c.lookup([1, 1, 0]) is not None and c.lookup([3, 3, 0]) is not None
    assert c.figures.evictions == 1 and c.nbytes == 2 * one
    # Bytes the running streams hold come off the budget.
    c.fit(live_bytes=one)
    assert len(c) == 1 and c.nbytes == one
    # An entry larger than the whole budget is not kept, and evicts nothing.
    small = make(budget=one - 1)
    assert not small.store([1, 1], kv([1, 1]))
    assert small.figures.too_large == 1 and len(small) == 0


def test_a_pinned_session_survives_churn_until_its_ttl_then_goes():
    clock = Clock()
    one = cache_nbytes(kv([1]))
    c = make(budget=2 * one, ttl=30.0, clock=clock)
    c.store([9, 9], kv([9, 9]), session="s")
    for t in range(10, 20):
        clock.now += 1
        c.store([t, t], kv([t, t]))
    assert c.lookup([9, 9, 0], session="s") is not None
    clock.now += 30
    c.store([50, 50], kv([50, 50]))
    c.store([51, 51], kv([51, 51]))
    assert c.lookup([9, 9, 0]) is None
    assert c.figures.sessions == 0


def test_pinned_entries_go_when_nothing_else_is_left_to_evict():
    one = cache_nbytes(kv([1]))
    c = make(budget=2 * one)
    c.store([1, 1], kv([1, 1]), session="a")
    c.store([2, 2], kv([2, 2]), session="b")
    c.store([3, 3], kv([3, 3]), session="c")
    assert c.lookup([1, 1, 0]) is None
    assert c.lookup([2, 2, 0]) is not None and c.lookup([3, 3, 0]) is not None


def test_a_session_keeps_one_entry_and_sessions_are_bounded():
    c = make(sessions=2)
    c.store([1, 2], kv([1, 2]), session="a")
    c.store([1, 2, 3, 4], kv([1, 2, 3, 4]), session="a")
    assert len(c) == 1 and c.figures.sessions == 1
    c.store([5, 6], kv([5, 6]), session="b")
    c.store([7, 8], kv([7, 8]), session="c")
    # "a" was the least recently used session: its entry stays, unpinned.
    assert c.figures.sessions == 2 and len(c) == 3
    # A stored state of a session that diverged replaces its entry.
    c.store([5, 9], state([5, 9]), session="b")
    assert c.lookup([5, 6, 0]) is None and c.lookup([5, 9, 0]) is not None


def test_clear_drops_everything():
    c = make()
    c.store([1, 2], kv([1, 2]), session="a")
    c.store([3, 4], kv([3, 4]))
    c.clear()
    assert len(c) == 0 and c.nbytes == 0 and c.figures.sessions == 0
    assert c.lookup([1, 2, 3]) is None


def test_a_hit_shorter_than_the_minimum_is_a_miss():
    c = make(min_hit=4)
    c.store([1, 2, 3], kv([1, 2, 3]))
    c.store([5, 6, 7, 8, 9], kv([5, 6, 7, 8, 9]))
    assert c.lookup([1, 2, 3, 4, 5]) is None
    hit = c.lookup([5, 6, 7, 8, 0])
    assert hit is not None and hit.tokens == 4
    assert c.figures.hits == 1 and c.figures.lookups == 2


@pytest.mark.parametrize("tokens", [[], [1]])
def test_nothing_is_kept_for_no_tokens(tokens):
    c = make()
    assert c.store(tokens, kv(tokens)) == bool(tokens)


def test_entries_shorter_than_the_minimum_hit_are_not_kept():
    c = make(min_hit=4)
    assert not c.store([1, 2, 3], kv([1, 2, 3]))
    assert c.store([1, 2, 3, 4], kv([1, 2, 3, 4]))
    assert len(c) == 1


def test_lookups_among_many_entries_find_the_longest_held_prefix():
    """Entries are compared only with prompts that share their first tokens: after
    random stores (trimmable and not), replacements and evictions, every lookup still
    finds the longest prefix any held entry offers (checked against every entry held),
    and a trimmable copy holds exactly those tokens of the prompt."""
    rng = random.Random(7)
    min_hit = 3
    # Room for about 40 entries of 12 tokens, so later stores evict.
    c = make(budget=40 * cache_nbytes(kv(list(range(12)))), sessions=8, min_hit=min_hit)

    def tokens(n: int) -> list[int]:
        # A small alphabet, so prompts share heads and longer prefixes often.
        return [rng.randrange(3) for _ in range(n)]

    def best_held(prompt: list[int]) -> int:
        best = 0
        for entry in c._entries.values():
            held_tokens = [int(t) for t in entry.tokens]
            shared = 0
            while shared < min(len(held_tokens), len(prompt) - 1):
                if held_tokens[shared] != prompt[shared]:
                    break
                shared += 1
            if shared == len(held_tokens) or entry.trimmable:
                best = max(best, shared)
        return best if best >= min_hit else 0

    hits = 0
    for step in range(400):
        stored = tokens(rng.randrange(1, 14))
        session = f"s{rng.randrange(12)}" if rng.random() < 0.5 else None
        trimmable = rng.random() < 0.7
        c.store(stored, kv(stored) if trimmable else state(stored), session=session)
        prompt = tokens(rng.randrange(2, 16))
        expected = best_held(prompt)
        hit = c.lookup(prompt)
        if expected == 0:
            assert hit is None, (step, prompt)
        else:
            assert hit is not None and hit.tokens == expected, (step, prompt)
            if isinstance(hit.cache[0], KVCache):
                assert held(hit.cache) == prompt[:expected]
            hits += 1
    assert hits > 100 and c.figures.evictions > 0
