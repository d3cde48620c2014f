"""Scheduler side: a KV-cache spec and manager that keep sink pages plus a sliding window.

The spec is chosen by the attention backend (``customize_spec``), travels from the workers to
the engine core, and selects :class:`SinkWindowManager` through vLLM's spec registry. The
manager frees every page between the sink pages and the window back to the block pool before
each step (``remove_skipped_blocks``), exactly when the contract says.

Pages are never shared through vLLM's prefix cache: the worker re-rotates sink keys in place,
so a page's content is not a function of its tokens alone. With vLLM's prefix caching switched
on (its default), a finished request's pages are parked instead (:mod:`vllm_sink.parked`) and a
later request that extends its tokens continues the stream on them.

From a request's first eviction its block list is a :class:`~vllm_sink.block_list.BlockList`:
the run of freed pages is a count, so the list stays bounded however long the stream runs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from vllm_sink import geometry
from vllm_sink.block_list import BlockList
from vllm_sink.parked import ParkedStream, ParkedStreams


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
        # vLLM's prefix-caching switch turns on resumed streams (never prefix-cache hits).
        self.parked = ParkedStreams(self.block_size) if self.enable_caching else None
        # Admission reserves a request's whole prompt when it must fit (vLLM's default
        # scheduler_reserve_full_isl); like sliding-window specs, a request here never holds
        # more than its bounded page count, so that is all it reserves. Without the cap a
        # prompt longer than the pool would wait forever.
        self.max_admission_blocks_per_request = kv_cache_spec.max_pages_per_request()
        # Pages freed by eviction since start (exported as ``vllm_sink:pages_freed``).
        self.pages_freed = 0
        # Per request: pages freed by eviction (null entries in its block list), so the pages
        # held are counted in O(1) however long the stream has run.
        self._evicted: dict[str, int] = {}

    @property
    def has_positionally_stable_blocks(self) -> bool:
        # Sink pages are rewritten (re-rotated) in place: not positionally stable content.
        return False

    def remove_skipped_blocks(
        self,
        request_id: str,
        processed_computed_tokens: int,
        num_prompt_tokens: int | None = None,
    ) -> None:
        spec = self.kv_cache_spec
        freed = geometry.evicted_pages(
            processed_computed_tokens, spec.sink_tokens, spec.window_tokens, self.block_size
        )
        # Frees back to front and stops at the first null block: pages freed earlier stay
        # null, so each step only walks the pages newly left behind by the window.
        blocks = self.req_to_blocks.get(request_id)
        if blocks is not None and not isinstance(blocks, BlockList) and freed:
            # The freed run is kept as a count from now on (bounded host memory per stream).
            self.req_to_blocks[request_id] = BlockList(
                blocks, spec.num_sink_pages, self._null_block
            )
        free_before = self.block_pool.get_num_free_blocks()
        self._remove_blocks_in_range(request_id, freed.start, freed.stop)
        newly_freed = self.block_pool.get_num_free_blocks() - free_before
        if newly_freed:
            self.pages_freed += newly_freed
            self._evicted[request_id] = self._evicted.get(request_id, 0) + newly_freed

    def pop_blocks_for_free(self, request_id: str) -> list:
        # Every way out of the manager (finish, abort, preemption) goes through here.
        self._evicted.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)

    # -- no prefix-cache hits: a sink page's keys depend on how far its window has slid --------

    @classmethod
    def find_longest_cache_hit(cls, block_hashes, max_length, kv_cache_group_ids, *args, **kw):
        return tuple([] for _ in kv_cache_group_ids), 0

    def cache_blocks(self, *args: Any, **kwargs: Any) -> None:
        # No page is ever registered under its hash, so no other request can hit it.
        return

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
        stream = ParkedStream(
            blocks=blocks,
            num_computed=request.num_computed_tokens,
            num_evicted_pages=self._evicted.pop(request.request_id, 0),
            key=key,
        )
        self.block_pool.unpin_blocks(self.parked.add(stream), self.parked.on_reuse)
        return True

    def resume(self, request: Any) -> int:
        """Give ``request`` the pages of the parked stream it extends; tokens resumed (or 0)."""
        if self.parked is None or not request.block_hashes:
            return 0
        stream = self.parked.find(request.block_hashes, request.all_token_ids, request.num_tokens)
        if stream is None:
            return 0
        self.parked.take(stream)
        self.block_pool.touch([b for b in stream.blocks if not b.is_null])
        self.req_to_blocks[request.request_id] = stream.blocks
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
        if num_evicted_pages:
            self._evicted[request_id] = num_evicted_pages

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
