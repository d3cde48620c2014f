"""The engine's eviction rule agrees with the reference's independent one, case by case."""

from __future__ import annotations

import random

from vllm_sink import geometry, reference


def test_engine_rule_matches_reference_rule():
    rng = random.Random(0)
    for _ in range(5000):
        bs = rng.choice([16, 32, 64])
        sink = rng.choice([0, 1, 4, 31, 32, 33, 70])
        window = rng.randint(1, 700)
        n = rng.randint(0, 5000)
        ws = geometry.first_window_token(n, sink, window, bs)
        assert ws == reference.first_window_token(n, sink, window, bs)
        kept = reference.kept_pages(n, sink, window, bs)
        freed = geometry.evicted_pages(n, sink, window, bs)
        assert not set(freed) & set(kept)
        # Freed pages are exactly those the contract frees: p >= sb and (p+1)*bs <= n - W.
        sb = geometry.sink_pages(sink, bs)
        assert list(freed) == [p for p in range(sb, n // bs + 1) if (p + 1) * bs <= n - window]
        assert geometry.evicted_tokens(n, sink, window, bs) == len(freed) * bs
