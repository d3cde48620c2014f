"""The sink wrapper over ``CPU_ATTN`` (vLLM's CPU platform): builder, impl, and K/V at slots.

The CPU kernel stores a page in an ISA-specific order, so reads undo it through
:func:`page_layout` (found once by writing probes with the kernel's own writer) and writes go
through that writer, ``cpu_attn_reshape_and_cache``.
"""

from __future__ import annotations

import functools

import torch
from vllm import _custom_ops as ops
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)
from vllm.v1.kv_cache_interface import AttentionSpec

from vllm_sink.attention.sink import SinkAttentionImpl, SinkMetadataBuilder, sink_spec


class SinkCPUAttentionMetadataBuilder(SinkMetadataBuilder, CPUAttentionMetadataBuilder):
    pass


class SinkCPUAttentionBackendImpl(SinkAttentionImpl, CPUAttentionBackendImpl):
    def read_kv(self, layer, kv_cache, slots) -> tuple[torch.Tensor, torch.Tensor]:
        num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
        layout = page_layout(layer.isa, kv_cache.dtype, block_size, self.head_size)
        pages = kv_cache.view(num_blocks, num_kv_heads, 2, block_size * self.head_size)
        # Gather each page once (a window spans a few pages, read for many tokens).
        blocks, where = torch.unique(slots // block_size, return_inverse=True)
        raw = pages[blocks]  # [pages, kv_heads, 2, bs*hs]
        offsets = slots % block_size
        out = []
        for i, perm in enumerate(layout):
            logical = raw[:, :, i, perm].view(len(blocks), num_kv_heads, block_size, -1)
            out.append(logical[where, :, offsets])
        return out[0], out[1]

    def write_kv(self, layer, kv_cache, slots, keys, values) -> None:
        # The K and V views of this layer's cache, made once (a layer keeps its cache tensor;
        # the views cost as much as the write of one step's moved sinks).
        views = getattr(layer, "_vllm_sink_kv_views", None)
        if views is None or views[0] is not kv_cache:
            num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
            paged = kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, -1)
            views = layer._vllm_sink_kv_views = (kv_cache, *paged.chunk(2, dim=2))
        _, key_cache, value_cache = views
        ops.cpu_attn_reshape_and_cache(
            keys,
            values,
            key_cache,
            value_cache,
            slots,
            layer.isa,
            k_scale=layer._k_scale_float,
            v_scale=layer._v_scale_float,
            kv_cache_dtype=self.kv_cache_dtype,
        )


class SinkCPUAttentionBackend(CPUAttentionBackend):
    """``CPU_ATTN`` with sink-page eviction and cache-slot positions."""

    @staticmethod
    def get_name() -> str:
        # Keep the stock name: vLLM keys platform checks and kernels on it.
        return "CPU_ATTN"

    @staticmethod
    def get_impl_cls() -> type[SinkCPUAttentionBackendImpl]:
        return SinkCPUAttentionBackendImpl

    @staticmethod
    def get_builder_cls() -> type[SinkCPUAttentionMetadataBuilder]:
        return SinkCPUAttentionMetadataBuilder

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        return sink_spec(super().customize_spec(spec))


@functools.cache
def page_layout(
    isa: str, dtype: torch.dtype, block_size: int, head_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the CPU kernel stores each element of a page, found by writing probes once.

    Returns, for K and V, the index into a (block, head) page's raw ``bs*hs`` elements of each
    logical element ``token*hs + dim``. Probes are small integers (exact in bf16), written as the
    low and high parts of each element's index.
    """
    numel = block_size * head_size
    idx = torch.arange(numel)
    found = []
    for part in (idx % 128, idx // 128):
        cache = torch.zeros(1, 1, 2 * block_size, head_size, dtype=dtype)
        key_cache, value_cache = cache.chunk(2, dim=2)
        probe = part.to(dtype).view(block_size, 1, head_size)
        ops.cpu_attn_reshape_and_cache(
            probe,
            probe,
            key_cache,
            value_cache,
            torch.arange(block_size),
            isa,
            k_scale=1.0,
            v_scale=1.0,
            kv_cache_dtype="auto",
        )
        found.append(cache.view(2, numel).to(torch.long))
    stored = found[0] + 128 * found[1]  # [2, numel]: logical index held at each raw slot
    perms = torch.empty_like(stored)
    perms.scatter_(1, stored, idx.expand(2, numel).contiguous())
    return perms[0], perms[1]
