"""One write of every layer's moved sinks, on the real CPU kernel's writer.

A sink move rewrites the sink pages of every layer. The CPU kernel's writer costs ~20 us a call
whatever it writes, so the moves of a step go through one call over all layers' caches, seen as
one cache (:func:`vllm_sink.attention.sink.stacked_cache`); where the caches do not stack, each
layer is written on its own. Both must leave every layer's cache exactly as writing it alone
does. (The engine tests check the result against the reference, in vLLM's own layout.)
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

from vllm_sink.attention.cpu import SinkCPUAttentionBackendImpl
from vllm_sink.attention.rope import SinkBank, SinkRotator
from vllm_sink.attention.sink import SinkCapture, SinkMove, SinkStep, stacked_cache

LAYERS, BLOCKS, HEADS, BS, HEAD, SINK_LEN = 4, 6, 3, 32, 64, 32
DTYPE = torch.bfloat16


def caches(layout: str) -> list[torch.Tensor]:
    """Each layer's ``[blocks, kv_heads, block_size, 2 * head]`` CPU cache, placed as vLLM's
    ``allocate_kv_cache`` places them: one allocation, layer-outermost (with a gap between
    layers) or block-outermost; or one allocation per layer."""
    shape = (BLOCKS, HEADS, BS, 2 * HEAD)
    page = HEADS * BS * 2 * HEAD
    if layout == "separate":
        return [torch.zeros(shape, dtype=DTYPE) for _ in range(LAYERS)]
    raw = torch.zeros(LAYERS * (BLOCKS + 1) * page, dtype=DTYPE)
    if layout == "layer-outermost":
        layer_stride, block_stride = (BLOCKS + 1) * page, page
    else:
        layer_stride, block_stride = page, LAYERS * page
    stride = (block_stride, BS * 2 * HEAD, 2 * HEAD, 1)
    return [raw.as_strided(shape, stride, i * layer_stride) for i in range(LAYERS)]


def impl_with_layers(kv: list[torch.Tensor], scales: list[float]):
    """The CPU sink impl's write path over ``kv``, and each layer's rotator (the impl's
    constructor needs an engine's config; the write uses only the cache dtype, its rotator and
    each layer's ISA, scales and cache)."""
    bank = SinkBank()
    table = torch.zeros(4096, HEAD)
    table[:, : HEAD // 2] = 1.0  # cos 1, sin 0: a move leaves the keys as captured
    layers, rotators = [], []
    for cache, scale in zip(kv, scales, strict=True):
        layer = SimpleNamespace(
            kv_cache=cache,
            isa=_get_attn_isa(DTYPE, BS, HEAD),
            _k_scale_float=scale,
            _v_scale_float=scale,
        )
        layers.append(layer)
        rotators.append(SinkRotator(HEAD, HEAD, True, table, bank, layer))
    impl = SinkCPUAttentionBackendImpl.__new__(SinkCPUAttentionBackendImpl)
    impl.kv_cache_dtype, impl.head_size, impl.rotator = "auto", HEAD, rotators[0]
    return impl, layers, rotators


@pytest.mark.parametrize("layout", ["layer-outermost", "block-outermost", "separate"])
@pytest.mark.parametrize("mixed_scales", [False, True], ids=["same-scales", "mixed-scales"])
def test_moves_write_every_layer_as_its_own_write_does(layout: str, mixed_scales: bool) -> None:
    torch.manual_seed(0)
    kv = caches(layout)
    impl, layers, rotators = impl_with_layers(
        kv, [1.0, 1.0, 1.0, 2.0] if mixed_scales else [1.0] * 4
    )
    # One call where the caches stack (vLLM's default layout), each layer's own otherwise.
    assert (stacked_cache(layers, kv) is not None) == (
        layout == "layer-outermost" and not mixed_scales
    )
    for cache in kv:
        cache.copy_(torch.randn(cache.shape).to(DTYPE))  # every page holds something
    keys = torch.randn(LAYERS, 2, SINK_LEN, HEADS, HEAD).to(DTYPE)
    values = torch.randn(LAYERS, 2, SINK_LEN, HEADS, HEAD).to(DTYPE)
    pages = {7: 4, 9: 1}  # two moving streams: the bank's key (first sink page) -> sink page
    capture = SinkStep()
    for i, rotator in enumerate(rotators):
        for j, key in enumerate(pages):
            job = SinkCapture(key=key, src=0, dst=0, count=SINK_LEN, sink_len=SINK_LEN)
            rotator.capture(capture, [job], keys[i, j], values[i, j])
    moves = [SinkMove(key, page * BS + torch.arange(SINK_LEN), 64) for key, page in pages.items()]
    before = [cache.clone() for cache in kv]
    impl.write_moved_sinks(SinkStep(moves=moves).to(torch.device("cpu")))
    for i, layer in enumerate(layers):
        alone = before[i].clone()
        for j, move in enumerate(moves):
            impl.write_kv(layer, alone, move.slots, keys[i, j], values[i, j])
        assert not torch.equal(alone, before[i])
        assert torch.equal(kv[i], alone), f"layer {i}"
