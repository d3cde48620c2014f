"""The contract's eviction and position rules as pure functions of the stream position.

Both the scheduler's KV manager and the worker's attention backend derive everything from the
number of tokens already computed (``n``), so they agree on which pages are alive without any
extra channel between the processes. The reference (:mod:`vllm_sink.reference`) implements the
same rules on its own, on purpose: it is the oracle the engine is tested against.
"""

from __future__ import annotations

import math


def sink_pages(sink_tokens: int, block_size: int) -> int:
    """``sb = ceil(sink_tokens / bs)``: whole pages pinned as sinks (0 for window only)."""
    return math.ceil(sink_tokens / block_size)


def max_pages(sink_tokens: int, window_tokens: int, block_size: int) -> int:
    """The contract's bound on the pages one request holds, at any stream length:
    ``sb + ceil(W / bs) + 1``.

    The sink pages, plus the pages the window straddles: a page is freed only once all its
    tokens are older than the window, so ``W`` recent tokens can span ``ceil(W / bs) + 1``
    pages. The pages of a step's tokens in flight come on top.
    """
    return sink_pages(sink_tokens, block_size) + math.ceil(window_tokens / block_size) + 1


def first_window_token(n: int, sink_tokens: int, window_tokens: int, block_size: int) -> int:
    """First surviving non-sink token before a step at ``n``: ``max(sb, (n - W) // bs) * bs``.

    Page ``p >= sb`` is freed once ``(p + 1) * bs <= n - W``, so the first page kept is the
    smallest ``p >= sb`` with ``p >= floor((n - W) / bs)``.
    """
    sb = sink_pages(sink_tokens, block_size)
    return max(sb, (n - window_tokens) // block_size) * block_size


def evicted_tokens(n: int, sink_tokens: int, window_tokens: int, block_size: int) -> int:
    """Tokens freed between the sink pages and the window before a step at ``n``."""
    sb = sink_pages(sink_tokens, block_size)
    return first_window_token(n, sink_tokens, window_tokens, block_size) - sb * block_size


def evicted_pages(n: int, sink_tokens: int, window_tokens: int, block_size: int) -> range:
    """Logical page indices freed for good before a step at ``n``."""
    sb = sink_pages(sink_tokens, block_size)
    return range(sb, first_window_token(n, sink_tokens, window_tokens, block_size) // block_size)


def first_eviction(sink_tokens: int, window_tokens: int, block_size: int) -> int:
    """Smallest ``n`` with a page freed before a step at ``n``: every step that starts earlier
    attends to the whole stream, so the pages it computes are those vanilla vLLM computes."""
    sb = sink_pages(sink_tokens, block_size)
    return window_tokens + (sb + 1) * block_size
