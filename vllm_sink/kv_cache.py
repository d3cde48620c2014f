"""Scheduler side: a KV-cache spec and manager that keep sink pages plus a sliding window.

The spec is chosen by the attention backend (``customize_spec``), travels from the workers to
the engine core, and selects :class:`SinkWindowManager` through vLLM's spec registry. The
manager frees every page between the sink pages and the window back to the block pool before
each step (``remove_skipped_blocks``), exactly when the contract says.

Shared pages. A page computed before its stream first evicted anything holds what vanilla vLLM
would hold (full attention, positions equal to token indices, sinks where they were written),
so it is a prefix-cache page like vLLM's: hashed, reference-counted, a hit for any request
that starts with its tokens. A stream changes its pages in place only from its first eviction
on (sinks re-rotated, window keys rotated back on a rebase), so at that step it first swaps
every page it shares (held by another request, or in the prefix cache, or by a parked stream)
for a private copy: vLLM's copy-on-write copies run on the worker before the step's forward,
and the worker is told which of the request's pages were swapped
(``SchedulerOutput.sink_page_swaps``).

With vLLM's prefix caching switched on (its default), a finished request's pages are also
parked (:mod:`vllm_sink.parked`): a later request that extends its tokens continues the stream
on copies of them, so several requests may continue one stream.

From a request's first eviction its block list is a :class:`~vllm_sink.block_list.BlockList`:
the run of freed pages is a count, so the list stays bounded however long the stream runs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import (
    FullAttentionManager,
    SingleTypeKVCacheManager,
)
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from vllm_sink import geometry
from vllm_sink.block_list import BlockList, stored_pages
from vllm_sink.parked import ParkedStream, ParkedStreams
from vllm_sink.tail import TailList


@dataclass(frozen=True, kw_only=True)
class SinkWindowSpec(FullAttentionSpec):
    """Full attention over ``[sink pages | window pages]``; pages in between are freed."""

    sink_tokens: int
    window_tokens: int
    # Largest number of tokens one request may process in one step (its prefill chunk).
    max_step_tokens: int

    @property
    def num_sink_pages(self) -> int:
        return geometry.sink_pages(self.sink_tokens, self.block_size)

    def max_pages_per_request(self) -> int:
        """Pages one request can hold at once: the contract's bound plus one step's tokens."""
        bound = geometry.max_pages(self.sink_tokens, self.window_tokens, self.block_size)
        return bound + cdiv(self.max_step_tokens, self.block_size)

    def max_memory_usage_bytes(self, vllm_config) -> int:
        full = super().max_memory_usage_bytes(vllm_config)
        return min(full, self.max_pages_per_request() * self.page_size_bytes)

    @classmethod
    def merge(cls, specs: list[SinkWindowSpec]) -> SinkWindowSpec:
        settings = {(s.sink_tokens, s.window_tokens, s.max_step_tokens) for s in specs}
        if len(settings) != 1 or not all(isinstance(s, SinkWindowSpec) for s in specs):
            raise ValueError(f"all layers of a KV cache group need one sink setting: {settings}")
        base = FullAttentionSpec.merge(specs)  # type: ignore[arg-type]
        common = {f.name: getattr(base, f.name) for f in fields(FullAttentionSpec)}
        sink_tokens, window_tokens, max_step_tokens = settings.pop()
        return cls(
            **common,
            sink_tokens=sink_tokens,
            window_tokens=window_tokens,
            max_step_tokens=max_step_tokens,
        )


class SinkWindowManager(FullAttentionManager):
    """Pins the first ``sb`` pages of each request and frees the pages behind the window."""

    kv_cache_spec: SinkWindowSpec

    def __init__(self, kv_cache_spec: SinkWindowSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self._num_sink_pages = kv_cache_spec.num_sink_pages
        self._window = kv_cache_spec.window_tokens
        # vLLM's prefix-caching switch turns on shared pages and resumed streams.
        self.parked = ParkedStreams(self.block_size) if self.enable_caching else None
        # Admission reserves a request's whole prompt when it must fit (vLLM's default
        # scheduler_reserve_full_isl); like sliding-window specs, a request here never holds
        # more than its bounded page count, so that is all it reserves. Without the cap a
        # prompt longer than the pool would wait forever.
        self.max_admission_blocks_per_request = kv_cache_spec.max_pages_per_request()
        # Pages evicted from requests since start (exported as ``vllm_sink:pages_freed``).
        self.pages_freed = 0
        # Per request: pages freed by eviction (null entries in its block list), so the pages
        # held are counted in O(1) however long the stream has run.
        self._evicted: dict[str, int] = {}
        # Per request: the first page its window keeps (the end of its freed run), as of its
        # last eviction, so a step that leaves no new page behind costs one lookup.
        self._kept_from: dict[str, int] = {}
        # Requests that hold private pages only (copied what they shared at first eviction).
        self._private: set[str] = set()
        # Requests on a parked stream's pages, copied at their first step.
        self._forks: dict[str, ParkedStream] = {}
        # This step's (shared page, private copy) pairs per request, sent to the worker.
        self.page_swaps: dict[str, list[tuple[int, int]]] = {}
        self.pages_copied = 0  # copy-on-write copies since start
        # Sink pages registered in the prefix cache during the step being scheduled (the
        # class-level cache lookup sees the pool only).
        self.block_pool.sink_pages_cached_this_step = set()

    @property
    def has_positionally_stable_blocks(self) -> bool:
        # Sink pages are rewritten (re-rotated) in place once a stream evicts.
        return False

    def remove_skipped_blocks(
        self,
        request_id: str,
        processed_computed_tokens: int,
        num_prompt_tokens: int | None = None,
    ) -> None:
        # geometry.evicted_pages, inlined: called for every request and step, and in the
        # steady state (no new page behind the window) this lookup is all it does.
        bs = self.block_size
        first_kept = max(self._num_sink_pages, (processed_computed_tokens - self._window) // bs)
        if self._kept_from.get(request_id) == first_kept:
            return
        spec = self.kv_cache_spec
        freed = geometry.evicted_pages(
            processed_computed_tokens, spec.sink_tokens, spec.window_tokens, bs
        )
        # Frees back to front and stops at the first null block: pages freed earlier stay
        # null, so each step only walks the pages newly left behind by the window.
        blocks = self.req_to_blocks.get(request_id)
        if blocks is not None and not isinstance(blocks, BlockList) and freed:
            # The freed run is kept as a count from now on (bounded host memory per stream).
            blocks = self.req_to_blocks[request_id] = BlockList(
                blocks, spec.num_sink_pages, self._null_block
            )
        # Pages this step's eviction takes from the request: they join the freed run after the
        # sinks (a page the request shares stays with the others: count the list, not the pool).
        before = blocks.nulls if isinstance(blocks, BlockList) else 0
        self._remove_blocks_in_range(request_id, freed.start, freed.stop)
        newly_freed = blocks.nulls - before if isinstance(blocks, BlockList) else 0
        if newly_freed:
            self.pages_freed += newly_freed
            self._evicted[request_id] = self._evicted.get(request_id, 0) + newly_freed
        if blocks is not None:
            self._kept_from[request_id] = freed.stop

    def pop_blocks_for_free(self, request_id: str) -> list:
        # Every way out of the manager (finish, abort, preemption) goes through here.
        self._evicted.pop(request_id, None)
        self._kept_from.pop(request_id, None)
        self._private.discard(request_id)
        self._forks.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)

    # -- shared pages: prefix-cache hits and copy on write -----------------------------------

    # Whole pages only: a hit inside a page would be written in place by its new owner.
    supports_fine_grained_hash_lookup = False

    @classmethod
    def find_longest_cache_hit(
        cls, block_hashes, max_length, kv_cache_group_ids, block_pool, kv_cache_spec, *args, **kw
    ):
        # A hit ends before the first eviction: the request's first step then evicts nothing,
        # as for a fresh stream, and its pages are swapped for copies when it first evicts.
        spec = kv_cache_spec
        limit = geometry.first_eviction(spec.sink_tokens, spec.window_tokens, spec.block_size) - 1
        hit, length = super().find_longest_cache_hit(
            block_hashes,
            min(max_length, limit),
            kv_cache_group_ids,
            block_pool,
            kv_cache_spec,
            *args,
            **kw,
        )
        # The worker reads a hit's sink tokens from the cache before the step's K/V are
        # written: sink pages registered this step (computed in this step's forward) are no hit.
        fresh = getattr(block_pool, "sink_pages_cached_this_step", ())
        sinks = hit[0][: spec.num_sink_pages]
        if any(block.block_id in fresh for block in sinks):
            return tuple([] for _ in kv_cache_group_ids), 0
        return hit, length

    def cache_blocks(self, request: Any, num_tokens: int, *args: Any, **kwargs: Any) -> None:
        # Only pages computed before the stream's first eviction hold what vanilla vLLM holds.
        spec = self.kv_cache_spec
        if request.num_computed_tokens >= geometry.first_eviction(
            spec.sink_tokens, spec.window_tokens, self.block_size
        ):
            return
        hashes = request.block_hashes
        if isinstance(hashes, TailList) and hashes.start > self.num_cached_block.get(
            request.request_id, 0
        ):
            return  # a streamed request no longer holds those pages' hashes
        # The base class's, without the partial-page entries a fine-grained lookup would read.
        before = self.num_cached_block.get(request.request_id, 0)
        SingleTypeKVCacheManager.cache_blocks(self, request, num_tokens, *args, **kwargs)
        if before < self.kv_cache_spec.num_sink_pages:
            blocks = self.req_to_blocks[request.request_id]
            self.block_pool.sink_pages_cached_this_step.update(
                b.block_id for b in blocks[before : self.kv_cache_spec.num_sink_pages]
            )

    def _is_shared(self, block: Any) -> bool:
        """Whether anyone else may read ``block``: another request, the prefix cache, a
        parked stream (which a later request may continue)."""
        return (
            block.ref_cnt > 1
            or block.block_hash is not None
            or (self.parked is not None and self.parked.owns(block))
        )

    def _shared_pages(self, request_id: str) -> list[tuple[int, Any]]:
        """(logical index, page) of the shared pages a request must copy before this step: at
        its first eviction, or first step on a parked stream's pages; empty otherwise."""
        blocks = self.req_to_blocks.get(request_id)
        if not blocks or request_id in self._private:
            return []
        if not (isinstance(blocks, BlockList) or request_id in self._forks):
            return []
        return [(i, b) for i, b in stored_pages(blocks) if not b.is_null and self._is_shared(b)]

    def get_num_blocks_to_allocate(self, request_id: str, *args: Any, **kwargs: Any) -> int:
        need = super().get_num_blocks_to_allocate(request_id, *args, **kwargs)
        if request_id in self._private:
            return need  # nothing shared left to copy (the steady state of a long stream)
        # Pages only this request and the prefix cache (or a parked stream) hold can leave
        # the cache instead of being copied when the pool is short.
        copies = [b for _, b in self._shared_pages(request_id) if b.ref_cnt > 1]
        return need + len(copies)

    def allocate_new_blocks(self, request_id: str, num_tokens: int, *args: Any, **kwargs: Any):
        if request_id in self._private:
            return super().allocate_new_blocks(request_id, num_tokens, *args, **kwargs)
        pages = self._shared_pages(request_id)
        if request_id in self.req_to_blocks and (
            pages or isinstance(self.req_to_blocks[request_id], BlockList)
        ):
            new = max(cdiv(num_tokens, self.block_size) - len(self.req_to_blocks[request_id]), 0)
            self._copy_on_write(request_id, pages, self.block_pool.get_num_free_blocks() - new)
        return super().allocate_new_blocks(request_id, num_tokens, *args, **kwargs)

    def _copy_on_write(self, request_id: str, pages: list[tuple[int, Any]], budget: int) -> None:
        """Give the request private copies of its shared pages (copied on the worker before
        the step's forward); where the pool is short, a page only the request holds leaves the
        prefix cache (or its parked stream) instead."""
        self._forks.pop(request_id, None)
        for i, block in pages:
            if budget <= 0 and block.ref_cnt == 1:
                # This request continues the stream alone, changing the page in place.
                if self.parked is not None:
                    self.parked.forget_owner(block)
                self.block_pool._maybe_evict_cached_block(block)
                continue
            (copy,) = self.block_pool.get_new_blocks(1)
            budget -= 1
            # vLLM's copy-on-write: both pages stay held until the copy has run.
            self._apply_cow(request_id, i, block, copy)
            self.page_swaps.setdefault(request_id, []).append((block.block_id, copy.block_id))
            self.pages_copied += 1
        if isinstance(self.req_to_blocks[request_id], BlockList):
            # Past its first eviction a stream registers no page: it holds private pages only.
            self._private.add(request_id)

    def take_page_swaps(self) -> dict[str, list[tuple[int, int]]]:
        """This step's (shared page, private copy) pairs per request, for the worker; the
        step is scheduled."""
        swaps, self.page_swaps = self.page_swaps, {}
        self.block_pool.sink_pages_cached_this_step.clear()
        return swaps

    def requeue_parked(self, blocks: list) -> None:
        """Parked pages freed after a copy go back to the end of the free queue (reused last),
        not to its front, so the stream stays there for the next request that continues it."""
        if self.parked is None:
            return
        queue = self.block_pool.free_block_queue
        for block in blocks:
            if block.ref_cnt == 0 and self.parked.owns(block):
                queue.remove(block)
                queue.append(block)

    # -- resumed streams ----------------------------------------------------------------------

    def park(self, request: Any) -> bool:
        """Keep a finished request's pages readable until reused; False if not parkable."""
        if self.parked is None or request.request_id not in self.req_to_blocks:
            return False
        key = self.parked.key_of(
            request.block_hashes, request.all_token_ids, request.num_computed_tokens
        )
        if key is None:
            return False
        blocks = self.req_to_blocks.pop(request.request_id)
        self.num_cached_block.pop(request.request_id, None)
        self._kept_from.pop(request.request_id, None)
        self._private.discard(request.request_id)
        self._forks.pop(request.request_id, None)
        stream = ParkedStream(
            blocks=blocks,
            num_computed=request.num_computed_tokens,
            num_evicted_pages=self._evicted.pop(request.request_id, 0),
            key=key,
        )
        self.block_pool.unpin_blocks(self.parked.add(stream), self.parked.on_reuse)
        return True

    def resume(self, request: Any) -> int:
        """Continue the parked stream ``request`` extends on its pages (copied before the
        request's first step writes, so the stream stays for others); tokens resumed (or 0)."""
        if self.parked is None or not request.block_hashes:
            return 0
        stream = self.parked.find(request.block_hashes, request.all_token_ids, request.num_tokens)
        if stream is None:
            return 0
        self.parked.fork(stream)
        self.block_pool.touch([b for b in stream.blocks if not b.is_null])
        blocks = stream.blocks
        self.req_to_blocks[request.request_id] = (
            blocks.copy() if isinstance(blocks, BlockList) else list(blocks)
        )
        self._forks[request.request_id] = stream
        self._kept_from.pop(request.request_id, None)
        if stream.num_evicted_pages:
            self._evicted[request.request_id] = stream.num_evicted_pages
        return stream.num_computed

    # -- swapped (preempted) streams ----------------------------------------------------------

    def num_evicted_pages(self, request_id: str) -> int:
        return self._evicted.get(request_id, 0)

    def restore(
        self, request_id: str, head: list, skipped: int, tail: list, num_evicted_pages: int
    ) -> None:
        """Give a swapped-out request its block list back: fresh pages where its stream keeps
        pages, null entries (``None`` here, and ``skipped`` between head and tail) where
        eviction freed them."""
        null = self._null_block
        num_sink_pages = self.kv_cache_spec.num_sink_pages
        # The freed run follows the sink pages: ``head`` is exactly them when there is one.
        assert not skipped or len(head) == num_sink_pages, (len(head), skipped)
        blocks = BlockList(
            [null if b is None else b for b in (*head, *tail)], num_sink_pages, null, skipped
        )
        self.req_to_blocks[request_id] = blocks
        self._kept_from.pop(request_id, None)
        if num_evicted_pages:
            self._evicted[request_id] = num_evicted_pages

    def num_distinct_pages_held(self, request_ids) -> int:
        """Pages the requests hold between them, a page shared by several counted once."""
        held = set()
        for rid in request_ids:
            blocks = self.req_to_blocks.get(rid)
            if blocks:
                held.update(b.block_id for _, b in stored_pages(blocks) if not b.is_null)
        return len(held)

    def num_pages_held(self, request_id: str) -> int:
        """Real (non-null) pages the request holds now."""
        blocks = self.req_to_blocks.get(request_id)
        return len(blocks) - self._evicted.get(request_id, 0) if blocks else 0


def register_spec() -> None:
    """Add the spec to vLLM's registry (built-ins first: the registry skips them otherwise)."""
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(
        SinkWindowSpec, SinkWindowManager, uniform_type_base_spec=FullAttentionSpec
    )


register_spec()
