"""Scheduler side: finished streams whose pages stay readable until the block pool needs them.

When a request finishes, its pages (sink pages and window) are released to the block pool the
way vLLM's prefix cache keeps freed blocks: they count as free and are reused last, least
recently freed first (``BlockPool.unpin_blocks``). Until one of them is handed out again, a new
request whose tokens extend the finished stream's tokens continues the stream from where it
stopped (see the contract in README.md, "Conversations"): it holds the pages and copies them
before its first step writes (copy on write, :mod:`vllm_sink.kv_cache`), so the stream stays
parked and any number of requests may continue it.

A stream is identified by its whole token history: the block hash of its last full computed
page (vLLM's hashes chain over every earlier token, evicted middle included) plus the computed
tokens after that page. Sink pages alone never identify a stream: many conversations share
their first page while their sink pages hold different rotations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class ParkedStream:
    """A finished stream's pages, as its request held them (null entries for freed pages)."""

    blocks: list[Any]  # KVCacheBlock per logical page; null blocks where pages were freed
    num_computed: int  # tokens whose K/V the pages hold
    num_evicted_pages: int  # null entries among ``blocks``
    key: tuple[Any, tuple[int, ...]]  # (hash of last full page, tokens after it)


class ParkedStreams:
    """Streams by their history; one lives until one of its pages is handed out again."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        # Last-full-page hash -> tokens after it -> stream.
        self._by_hash: dict[Any, dict[tuple[int, ...], ParkedStream]] = {}
        # Page -> the streams holding it (streams that never evicted share their first pages).
        self._by_block: dict[int, list[ParkedStream]] = {}
        self._count = 0  # parked streams (read every step by the metrics)
        # Counters (exported as vllm_sink:* metrics).
        self.parked = 0
        self.resumed = 0
        self.resumed_tokens = 0
        self.reclaimed = 0

    def __len__(self) -> int:
        return self._count

    def num_pages(self) -> int:
        return len(self._by_block)

    def key_of(self, block_hashes: list[Any], token_ids: list[int], num_computed: int):
        """The identity of a stream of ``num_computed`` tokens (None if under one page)."""
        full = num_computed // self.block_size
        if full == 0 or len(block_hashes) < full:
            return None
        tail = tuple(token_ids[full * self.block_size : num_computed])
        return block_hashes[full - 1], tail

    def add(self, stream: ParkedStream) -> list[Any]:
        """Park ``stream``; returns the real pages to release to the pool."""
        block_hash, tail = stream.key
        old = self._by_hash.get(block_hash, {}).get(tail)
        if old is not None:  # the same history finished twice: keep the newer pages
            self._forget(old)
        self._by_hash.setdefault(block_hash, {})[tail] = stream
        self._count += 1
        real = [b for b in stream.blocks if not b.is_null]
        for block in real:
            self._by_block.setdefault(block.block_id, []).append(stream)
        self.parked += 1
        return real

    def find(self, block_hashes: list[Any], token_ids: list[int], num_tokens: int):
        """The longest parked stream that ``token_ids`` extends by at least one token."""
        bs = self.block_size
        for full in range(min(len(block_hashes), (num_tokens - 1) // bs), 0, -1):
            for tail, stream in self._by_hash.get(block_hashes[full - 1], {}).items():
                c = stream.num_computed
                if c < num_tokens and tuple(token_ids[full * bs : c]) == tail:
                    return stream
        return None

    def fork(self, stream: ParkedStream) -> None:
        """A new request continues the stream on copies of its pages: the stream stays parked
        for any other request that continues it."""
        self.resumed += 1
        self.resumed_tokens += stream.num_computed

    def owns(self, block: Any) -> bool:
        return block.block_id in self._by_block

    def forget_owner(self, block: Any) -> int:
        """A page changes hands or content: the streams holding it cannot be continued."""
        streams = list(self._by_block.get(block.block_id, []))
        for stream in streams:
            self._forget(stream)
        return len(streams)

    def on_reuse(self, block: Any) -> None:
        """The pool handed one of a parked stream's pages to someone else: the stream is gone."""
        self.reclaimed += self.forget_owner(block)

    def _forget(self, stream: ParkedStream) -> None:
        block_hash, tail = stream.key
        tails = self._by_hash.get(block_hash, {})
        if tails.get(tail) is stream:
            del tails[tail]
            self._count -= 1
            if not tails:
                del self._by_hash[block_hash]
        for block in stream.blocks:
            owners = [] if block.is_null else self._by_block.get(block.block_id, [])
            if any(s is stream for s in owners):
                owners[:] = [s for s in owners if s is not stream]
                if not owners:
                    del self._by_block[block.block_id]
