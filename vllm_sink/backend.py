"""Worker side: an attention backend that presents each request's cache as [sinks | window].

It wraps the stock ``CPU_ATTN`` backend; the stock paged kernel does the attention. Per step:

- the builder drops the pages the scheduler freed from each block-table row and shortens
  ``seq_lens`` to match, so the kernel sees ``sb*bs + (n - ws) + q`` tokens laid out as cache
  slots (the new tokens are still the last ``q``, so the causal mask is unchanged);
- window tokens keep the position they were written with, and the queries keep theirs, so
  their query-to-key distances already equal those of cache-slot positions; only the sink keys
  must move, to sit just before the oldest window token. The impl re-rotates them once per freed
  page, always from a pristine copy taken before their first move, so rounding never
  accumulates (see ``SinkRotator``).

Backend-specific code is the three ``CPU*`` base classes; the rest is written against the
generic ``CommonAttentionMetadata`` so FLASH_ATTN / TRITON_ATTN / FLASHINFER can be wrapped the
same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from vllm import _custom_ops as ops
from vllm.config import get_current_vllm_config
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec

from vllm_sink import geometry
from vllm_sink.kv_cache import SinkWindowSpec
from vllm_sink.settings import SinkSettings, settings_from_additional_config


@dataclass(frozen=True)
class SinkLayout:
    """What the worker needs to know to lay out caches (read once per process)."""

    settings: SinkSettings
    max_step_tokens: int


_layout: SinkLayout | None = None


def current_layout() -> SinkLayout:
    """The settings of the engine this worker serves (set while the model is built)."""
    global _layout
    if _layout is None:
        config = get_current_vllm_config()
        settings = settings_from_additional_config(config.additional_config)
        if settings is None:
            raise RuntimeError("vllm_sink backend used without vllm_sink settings")
        _layout = SinkLayout(settings, config.scheduler_config.max_num_batched_tokens)
    return _layout


# ------------------------------------------------------------------------------------ rotation


class SinkRotator:
    """Keeps a pristine copy of one layer's sink keys/values and re-writes moved sinks.

    The copy is taken as the model writes the sink tokens (sink token ``i`` rotated at position
    ``i``). Moving the sinks to offset ``e`` (tokens evicted so far) rotates the pristine keys by
    ``e`` in float32 and writes them through the backend's own cache writer, so the kernel's
    page layout is never assumed: one rounding per move, never a rotation of a rotated value.
    Entries are keyed by the request's first sink page, unique among live requests; a new owner
    of that page overwrites the entry when it writes its own sink tokens.
    """

    def __init__(self, head_size: int, rotary_dim: int, is_neox: bool, cos_sin: torch.Tensor):
        self.head_size = head_size
        self.rotary_dim = rotary_dim
        self.is_neox = is_neox
        self.cos_sin = cos_sin  # float32 [max_position, rotary_dim]
        self.pristine: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def capture(self, jobs: list[SinkCapture], key: torch.Tensor, value: torch.Tensor) -> None:
        """Copy the step's sink tokens (``key``/``value``: ``[tokens, kv_heads, head]``)."""
        for job in jobs:
            if job.dst == 0 or job.key not in self.pristine:
                shape = (job.sink_len, *key.shape[1:])
                self.pristine[job.key] = (key.new_zeros(shape), value.new_zeros(shape))
            k, v = self.pristine[job.key]
            k[job.dst : job.dst + job.count] = key[job.src : job.src + job.count]
            v[job.dst : job.dst + job.count] = value[job.src : job.src + job.count]

    def moved(self, job: SinkMove) -> tuple[torch.Tensor, torch.Tensor]:
        """The sink keys rotated to ``job.offset`` and their values, for ``job.slots``."""
        k, v = self.pristine[job.key]
        return self.rotate(k, job.offset), v

    def rotate(self, keys: torch.Tensor, offset: int) -> torch.Tensor:
        """Rotate every key (last dim ``head_size``) by ``offset`` positions."""
        if offset == 0:
            return keys
        cos, sin = self.cos_sin[offset].chunk(2, dim=-1)
        x = keys.float()
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        if self.is_neox:
            x1, x2 = rot.chunk(2, dim=-1)
        else:
            x1, x2 = rot[..., ::2], rot[..., 1::2]
        o1 = x1 * cos - x2 * sin
        o2 = x2 * cos + x1 * sin
        if self.is_neox:
            rot = torch.cat((o1, o2), dim=-1)
        else:
            rot = torch.stack((o1, o2), dim=-1).flatten(-2)
        return torch.cat((rot, rest), dim=-1).to(keys.dtype)


def _make_rotator(head_size: int) -> SinkRotator:
    config = get_current_vllm_config()
    hf_config = config.model_config.hf_text_config
    rope = get_rope(
        head_size,
        max_position=hf_config.max_position_embeddings,
        rope_parameters=getattr(hf_config, "rope_parameters", None),
        is_neox_style=getattr(hf_config, "rope_is_neox_style", True),
        dtype=torch.float32,
    )
    cos_sin = rope._compute_cos_sin_cache().float()
    return SinkRotator(head_size, rope.rotary_dim, rope.is_neox_style, cos_sin)


# ------------------------------------------------------------------------------------ metadata


@dataclass(frozen=True)
class SinkCapture:
    key: int  # the request's first sink page: identifies its pristine copy
    src: int  # first batch token to copy
    dst: int  # its index among the sink tokens
    count: int
    sink_len: int  # tokens in the sink pages


@dataclass(frozen=True)
class SinkMove:
    key: int
    slots: torch.Tensor  # cache slots of the sink tokens, long [sink_len]
    offset: int  # tokens evicted so far: the sinks now sit at positions offset + i


@dataclass
class SinkCPUAttentionMetadata(CPUAttentionMetadata):
    sink_captures: list[SinkCapture] = field(default_factory=list)
    sink_moves: list[SinkMove] = field(default_factory=list)


def compact_metadata(
    common: CommonAttentionMetadata, settings: SinkSettings, block_size: int
) -> tuple[CommonAttentionMetadata, torch.Tensor]:
    """Drop evicted pages from each block-table row and evicted tokens from ``seq_lens``.

    Returns the compacted metadata and the tokens evicted per request (before this step).
    """
    num_reqs = common.num_reqs
    starts = common.query_start_loc_cpu
    query_lens = starts[1 : num_reqs + 1] - starts[:num_reqs]
    seq_lens = common.seq_lens[:num_reqs].cpu()
    computed = seq_lens - query_lens  # n: tokens cached before this step
    sb = geometry.sink_pages(settings.sink_tokens, block_size)
    window_start = torch.clamp((computed - settings.window_tokens) // block_size, min=sb)
    evicted = (window_start - sb) * block_size
    if not bool((evicted > 0).any()):
        return common, evicted

    table = common.block_table_tensor
    width = table.shape[1]
    cols = torch.arange(width).expand(num_reqs, width)
    shift = (evicted // block_size)[:, None]
    src = torch.where(cols < sb, cols, torch.clamp(cols + shift, max=width - 1))
    compact = table.clone()
    compact[:num_reqs] = torch.gather(table[:num_reqs], 1, src.to(table.device))
    new_seq_lens = common.seq_lens.clone()
    new_seq_lens[:num_reqs] -= evicted.to(new_seq_lens.device, new_seq_lens.dtype)
    kwargs = {
        "seq_lens": new_seq_lens,
        "block_table_tensor": compact,
        "max_seq_len": int(new_seq_lens[:num_reqs].max()),
        "_num_computed_tokens_cache": None,
    }
    if common.seq_lens_cpu_upper_bound is not None:
        upper = common.seq_lens_cpu_upper_bound.clone()
        upper[:num_reqs] -= evicted.to(upper.dtype)
        kwargs["seq_lens_cpu_upper_bound"] = upper
    return common.replace(**kwargs), evicted


class SinkCPUAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec: AttentionSpec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        settings = settings_from_additional_config(vllm_config.additional_config)
        assert settings is not None
        self.settings = settings
        self.num_sink_pages = geometry.sink_pages(settings.sink_tokens, self.block_size)
        # First sink page -> offset the sinks were last rotated to.
        self.sink_offsets: dict[int, int] = {}

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> SinkCPUAttentionMetadata:
        common, evicted = compact_metadata(common_attn_metadata, self.settings, self.block_size)
        base = super().build(common_prefix_len, common, fast_build)
        metadata = SinkCPUAttentionMetadata(**vars(base))
        if self.num_sink_pages:
            self._plan_sink_moves(common, evicted, metadata)
        return metadata

    def _plan_sink_moves(
        self,
        common: CommonAttentionMetadata,
        evicted: torch.Tensor,
        metadata: SinkCPUAttentionMetadata,
    ) -> None:
        table = common.block_table_tensor
        bs = self.block_size
        sink_len = self.num_sink_pages * bs
        starts = common.query_start_loc_cpu.tolist()
        seq_lens = common.seq_lens.tolist()
        for row, offset in enumerate(evicted.tolist()):
            key = int(table[row, 0])
            q = starts[row + 1] - starts[row]
            n = seq_lens[row] + offset - q  # seq_lens are compacted: add the evicted back
            if n < sink_len:
                count = min(q, sink_len - n)
                metadata.sink_captures.append(SinkCapture(key, starts[row], n, count, sink_len))
            if offset == 0:
                self.sink_offsets.pop(key, None)
                continue
            if self.sink_offsets.get(key) == offset:
                continue
            self.sink_offsets[key] = offset
            pages = table[row, : self.num_sink_pages].to(torch.long)
            slots = (pages[:, None] * bs + torch.arange(bs)).flatten()
            metadata.sink_moves.append(SinkMove(key, slots, offset))


class SinkCPUAttentionBackendImpl(CPUAttentionBackendImpl):
    def __init__(self, num_heads: int, head_size: int, *args, **kwargs) -> None:
        super().__init__(num_heads, head_size, *args, **kwargs)
        current_layout()  # capture the settings while the model is being built
        self.rotator = _make_rotator(head_size)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kw):
        if isinstance(attn_metadata, SinkCPUAttentionMetadata):
            if attn_metadata.sink_captures:
                self.rotator.capture(attn_metadata.sink_captures, key, value)
            for move in attn_metadata.sink_moves:
                self._write(layer, kv_cache, move.slots, *self.rotator.moved(move))
        return super().forward(
            layer, query, key, value, kv_cache, attn_metadata, output, *args, **kw
        )

    def _write(self, layer, kv_cache, slots, keys, values) -> None:
        """Write K/V for ``slots`` with the backend's own writer (layout-agnostic)."""
        num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
        key_cache, value_cache = kv_cache.view(
            num_blocks, num_kv_heads, 2 * block_size, -1
        ).chunk(2, dim=2)
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
        spec = super().customize_spec(spec)
        if type(spec) is not FullAttentionSpec:
            raise ValueError(
                f"vllm_sink supports plain full-attention layers only, got {type(spec).__name__}"
            )
        layout = current_layout()
        return SinkWindowSpec(
            **{f: getattr(spec, f) for f in spec.__dataclass_fields__},
            sink_tokens=layout.settings.sink_tokens,
            window_tokens=layout.settings.window_tokens,
            max_step_tokens=layout.max_step_tokens,
        )
