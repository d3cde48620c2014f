"""The eviction rule of the engine (``vllm_sink.geometry``) and of the reference
(``vllm_sink.reference``) against the contract's own words, simulated here token by token.

Both modules write the rule as a closed formula (``max(sb, (n - W) // bs) * bs``); checking one
against the other would only show that the formula was copied twice. The simulation below uses
no such formula: it walks a stream one token at a time, keeps the set of pages alive and frees a
page once every token on it is older than the window, unless it holds a sink token. Its answers
are what both modules must give, and a few cases are worked out by hand as literal numbers.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

import pytest

from vllm_sink import geometry, reference


@dataclass
class Before:
    """What the cache holds before a step that starts at token ``n``."""

    n: int
    freed: list[int]  # pages freed for good, ascending
    kept_pages: list[int]  # pages holding cached tokens, ascending
    kept_tokens: list[int]  # cached tokens, ascending (= slot order: sink pages come first)
    first_live: int  # first token of the first non-sink page not freed (started or not)


@dataclass
class Stream:
    """One stream, token by token, with the contract's rules and nothing else."""

    sink_tokens: int
    window_tokens: int
    block_size: int
    n: int = 0
    alive: set[int] = field(default_factory=set)  # pages holding computed tokens
    freed: set[int] = field(default_factory=set)

    def is_sink(self, page: int) -> bool:
        """A sink page holds at least one of the first ``sink_tokens`` tokens."""
        bs = self.block_size
        return any(t < self.sink_tokens for t in range(page * bs, (page + 1) * bs))

    def older_than_window(self, token: int) -> bool:
        """Before a step at ``n`` the window is the last ``W`` tokens, ``[n - W, n)``."""
        return token < self.n - self.window_tokens

    def evict(self) -> Before:
        """The eviction that precedes a step at ``self.n``; what the cache then holds."""
        bs = self.block_size
        for page in sorted(self.alive):
            tokens = range(page * bs, (page + 1) * bs)
            if not self.is_sink(page) and all(self.older_than_window(t) for t in tokens):
                self.alive.remove(page)
                self.freed.add(page)
        kept = [t for p in sorted(self.alive) for t in range(p * bs, min((p + 1) * bs, self.n))]
        first_live = next(
            p for p in itertools.count() if not self.is_sink(p) and p not in self.freed
        )
        return Before(self.n, sorted(self.freed), sorted(self.alive), kept, first_live * bs)

    def compute(self, token_count: int) -> None:
        """The step: its tokens are written to their pages (a freed page never comes back)."""
        for t in range(self.n, self.n + token_count):
            assert t // self.block_size not in self.freed
            self.alive.add(t // self.block_size)
        self.n += token_count


def _check(before: Before, sink: int, window: int, bs: int) -> None:
    n = before.n
    args = (n, sink, window, bs)
    assert list(geometry.evicted_pages(*args)) == before.freed, args
    assert geometry.evicted_tokens(*args) == len(before.freed) * bs, args
    assert geometry.first_window_token(*args) == before.first_live, args
    assert reference.first_window_token(*args) == before.first_live, args
    assert reference.kept_tokens(*args) == before.kept_tokens, args
    assert reference.kept_pages(*args) == before.kept_pages, args
    assert not set(geometry.evicted_pages(*args)) & set(reference.kept_pages(*args)), args


CASES = [(bs, sink, window) for bs in (16, 32) for sink in (0, 1, 4, 16, 31, 32, 33, 70)
         for window in (1, 5, 16, 31, 32, 33, 100, 300)]  # fmt: skip


@pytest.mark.parametrize(("bs", "sink", "window"), CASES)
def test_rules_match_a_token_by_token_simulation(bs, sink, window):
    """Every stream position of a stream of ~3 windows past its sinks, one token per step."""
    length = 3 * (window + bs) + 2 * sink + 3 * bs
    sim = Stream(sink, window, bs)
    sb = len({t // bs for t in range(sink)})  # pages holding a sink token
    assert geometry.sink_pages(sink, bs) == reference.sink_pages(sink, bs) == sb
    bound = geometry.max_pages(sink, window, bs)
    peak = 0
    for _ in range(length):
        before = sim.evict()
        _check(before, sink, window, bs)
        # A decode step at n: the pages held while it writes token n.
        held = len(set(before.kept_pages) | {before.n // bs})
        peak = max(peak, held)
        sim.compute(1)
    # The bound holds at every position and is reached: it is the bound, not just a bound.
    assert peak == bound, (peak, bound)


@pytest.mark.parametrize("seed", range(6))
def test_rules_match_the_simulation_over_random_steps(seed):
    """Random step sizes (prefill chunks, decodes) over random settings; the contract's
    guarantees to a step's tokens hold at each step."""
    rng = random.Random(seed)
    for _ in range(12):
        bs = rng.choice([16, 32, 64])
        sink = rng.choice([0, 1, 4, 31, 32, 33, 70])
        window = rng.randint(1, 400)
        sim = Stream(sink, window, bs)
        sb = geometry.sink_pages(sink, bs)
        while sim.n < 5 * window + 4 * bs:
            q = rng.choice([1, 1, 1, rng.randint(1, 3 * bs)])
            before = sim.evict()
            _check(before, sink, window, bs)
            n = before.n
            cached = set(before.kept_tokens)
            positions = reference.slot_positions(n, q, sink, window, bs)
            assert positions == list(range(len(cached), len(cached) + q))
            assert positions[-1] <= sb * bs + window + bs + q
            for i in sorted({0, q // 2, q - 1}):  # the step's token n + i, causal in the step
                seen = cached | set(range(n, n + i + 1))
                assert set(range(min(n + i, sink))) <= seen  # every sink token
                assert set(range(max(0, n + i - window), n + i)) <= seen  # the last W tokens
                assert len(seen - set(range(sb * bs))) < window + bs + q
            sim.compute(q)


@pytest.mark.parametrize(
    ("n", "sink", "window", "bs", "freed", "first", "kept", "pages"),
    [
        # Sink 4 on 32-token pages, window 300, before the step at 1000: the window starts at
        # 700, pages 1..20 end by then ((20+1)*32 = 672 <= 700), page 21 (672..703) stays.
        (1000, 4, 300, 32, list(range(1, 21)), 672, [*range(32), *range(672, 1000)],
         [0, *range(21, 32)]),
        # No sinks, window 16 on 16-token pages, before the step at 40: window from 24; page 0
        # (0..15) is older, page 1 (16..31) holds 24..31 and stays.
        (40, 0, 16, 16, [0], 16, list(range(16, 40)), [1, 2]),
        # 33 sink tokens pin two 32-token pages (0..63). Before the step at 100 the window
        # starts at 90: page 2 (64..95) still holds 90..95.
        (100, 33, 10, 32, [], 64, list(range(100)), [0, 1, 2, 3]),
        # ... before the step at 200 it starts at 190: pages 2, 3, 4 (64..159) are older.
        (200, 33, 10, 32, [2, 3, 4], 160, [*range(64), *range(160, 200)], [0, 1, 5, 6]),
        # The sink page is not full yet: nothing freed, the first window page not started.
        (3, 4, 8, 32, [], 32, [0, 1, 2], [0]),
        # The window starts exactly on a page boundary (96 - 32 = 64): page 1 goes, page 2
        # (64..95) is the window.
        (96, 4, 32, 32, [1], 64, [*range(32), *range(64, 96)], [0, 2]),
    ],
)  # fmt: skip
def test_hand_worked_cases(n, sink, window, bs, freed, first, kept, pages):
    args = (n, sink, window, bs)
    assert list(geometry.evicted_pages(*args)) == freed
    assert geometry.evicted_tokens(*args) == len(freed) * bs
    assert geometry.first_window_token(*args) == reference.first_window_token(*args) == first
    assert reference.kept_tokens(*args) == kept
    assert reference.kept_pages(*args) == pages
    assert reference.slot_positions(n, 3, sink, window, bs) == [len(kept) + i for i in range(3)]
    sim = Stream(sink, window, bs)
    sim.compute(n)
    before = sim.evict()
    assert (before.freed, before.first_live, before.kept_tokens) == (freed, first, kept)


def test_hand_worked_bounds():
    # sb + ceil(W / bs) + 1
    assert geometry.max_pages(4, 300, 32) == 1 + 10 + 1 == 12
    assert geometry.max_pages(0, 16, 16) == 0 + 1 + 1 == 2
    assert geometry.max_pages(33, 10, 32) == 2 + 1 + 1 == 4
    assert geometry.max_pages(4, 128, 32) == 1 + 4 + 1 == 6
    assert geometry.max_pages(4, 1, 32) == 1 + 1 + 1 == 3
    assert geometry.sink_pages(0, 32) == reference.sink_pages(0, 32) == 0
    assert geometry.sink_pages(32, 32) == reference.sink_pages(32, 32) == 1
    assert geometry.sink_pages(33, 32) == reference.sink_pages(33, 32) == 2
