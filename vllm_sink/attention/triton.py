"""The sink wrapper over ``TRITON_ATTN`` (vLLM's portable GPU backend): builder, impl, K/V at slots.

The Triton cache is ``[blocks, kv_heads, block_size, 2 * head_size]`` (keys, then values, per
token and head); reads index it as the kernel does, writes go through the backend's own cache
update (``triton_reshape_and_cache_flash``). On a CPU engine these kernels run interpreted
(:mod:`vllm_sink.attention.triton_on_cpu`), which must be installed before this module is
imported.
"""

from __future__ import annotations

import torch
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadataBuilder,
)
from vllm.v1.kv_cache_interface import AttentionSpec

from vllm_sink.attention.sink import SinkAttentionImpl, SinkMetadataBuilder, sink_spec


class SinkTritonAttentionMetadataBuilder(SinkMetadataBuilder, TritonAttentionMetadataBuilder):
    pass


class SinkTritonAttentionImpl(SinkAttentionImpl, TritonAttentionImpl):
    def read_kv(self, layer, kv_cache, slots) -> tuple[torch.Tensor, torch.Tensor]:
        block_size = kv_cache.shape[2]
        # [blocks, kv_heads, bs, 2*hs] -> keys and values [blocks, bs, kv_heads, hs]
        key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
        blocks, offsets = slots // block_size, slots % block_size
        return key_cache[blocks, offsets], value_cache[blocks, offsets]

    def write_kv(self, layer, kv_cache, slots, keys, values) -> None:
        self.do_kv_cache_update(layer, keys, values, kv_cache, slots)


class SinkTritonAttentionBackend(TritonAttentionBackend):
    """``TRITON_ATTN`` with sink-page eviction and cache-slot positions."""

    @staticmethod
    def get_name() -> str:
        return "TRITON_ATTN"

    @staticmethod
    def get_impl_cls() -> type[SinkTritonAttentionImpl]:
        return SinkTritonAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[SinkTritonAttentionMetadataBuilder]:
        return SinkTritonAttentionMetadataBuilder

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        return sink_spec(super().customize_spec(spec))
