"""Worker side: an attention backend that presents each request's cache as [sinks | window].

It wraps the stock ``CPU_ATTN`` backend; the stock paged kernel does the attention. Per step:

- each block-table row and ``seq_lens`` arrive already compacted by the runner patch
  (:mod:`vllm_sink.patches.model_runner`), so the kernel sees ``sb*bs + (n - ws) + q`` tokens laid
  out as cache slots (the new tokens are still the last ``q``, so the causal mask is unchanged);
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

import functools
from copy import deepcopy
from dataclasses import dataclass, field

import torch
from vllm import _custom_ops as ops
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec

from vllm_sink import geometry
from vllm_sink.enable import step_tokens_per_request
from vllm_sink.kv_cache import SinkWindowSpec
from vllm_sink.settings import SinkSettings, settings_from_additional_config


@dataclass(frozen=True)
class SinkLayout:
    """What the worker needs to know to lay out caches (read once per process)."""

    settings: SinkSettings
    max_step_tokens: int


_layout: SinkLayout | None = None


def capture_layout() -> SinkLayout:
    """Read the settings of the engine whose model is being built (its config is current).

    Called for every model built, so a process that builds several engines one after the
    other (an in-process engine core) never serves one with another's settings.
    """
    global _layout
    config = get_current_vllm_config()
    settings = settings_from_additional_config(config.additional_config)
    if settings is None:
        raise RuntimeError("vllm_sink backend used without vllm_sink settings")
    _layout = SinkLayout(settings, step_tokens_per_request(config.scheduler_config))
    return _layout


def current_layout() -> SinkLayout:
    """The settings of the engine this worker serves (captured when its model was built)."""
    if _layout is None:
        return capture_layout()
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
        cos, sin = self.cos_sin[abs(offset)].chunk(2, dim=-1)
        if offset < 0:
            sin = -sin
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


def _check_rope_kind(rope: torch.nn.Module) -> None:
    """Only embeddings whose rotation at position ``p`` is a pure rotation by ``p`` times fixed
    frequencies are accepted (plain, linear and Llama-3 scaling; partial rotary and either
    pairing style come from the embedding itself). Anything else is refused by name: re-rotating
    its keys would compute something other than cache-slot positions."""
    from vllm.model_executor.layers.rotary_embedding import (
        LinearScalingRotaryEmbedding,
        Llama3RotaryEmbedding,
        RotaryEmbedding,
    )

    from vllm_sink.enable import UnsupportedConfigError

    kind = type(rope)
    if kind not in (RotaryEmbedding, LinearScalingRotaryEmbedding, Llama3RotaryEmbedding) or (
        kind is LinearScalingRotaryEmbedding and len(rope.scaling_factors) != 1
    ):
        raise UnsupportedConfigError(
            f"vllm_sink does not support the model's rotary embedding {kind.__name__}"
        )


def exact_cos_sin(rope: torch.nn.Module) -> torch.Tensor:
    """``rope``'s cos/sin table (float32, ``[rows, rotary_dim]``) with every angle computed in
    float64: the same frequencies (``rope._compute_inv_freq``, float32) and positions.

    vLLM, like transformers, multiplies position by frequency in float32, which rounds the angle
    by up to half an ulp of ``p * f``: ~1e-4 rad at position 2,000, ~5e-4 at 8,000. The engine's
    positions are shifted from the cache slots (RoPE only sees differences), so that rounding
    differs from the reference's token by token, and grows with how far positions climb before a
    rebase (measured: engine vs reference up to 9e-4 nats a token at the model's 8,192 positions,
    the same as the reference against itself shifted by 4,000). With exact angles only the last
    bit of each cos/sin remains, at any position: 4e-5 at most, as before any eviction.
    """
    from vllm.model_executor.layers.rotary_embedding import LinearScalingRotaryEmbedding

    _check_rope_kind(rope)
    inv_freq = rope._compute_inv_freq(rope.base).to(torch.float64)
    t = torch.arange(rope.cos_sin_cache.shape[0], dtype=torch.float64)
    if isinstance(rope, LinearScalingRotaryEmbedding):
        t = t / rope.scaling_factors[0]
    freqs = torch.outer(t, inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).float()


def exact_rope(rope: torch.nn.Module, table: torch.Tensor | None = None) -> torch.nn.Module:
    """A copy of ``rope`` whose table is :func:`exact_cos_sin` (in the table's own dtype);
    ``table``: that float32 table, where the caller has it already.

    A copy, because vLLM shares one embedding between every model built with the same rope
    settings in a process (``get_rope``'s cache): a vanilla engine built after a sink engine must
    keep vLLM's own table. Refuses a table that is not cos/sin of position times frequency (it
    must equal vLLM's own where float32 angles are still exact to 1e-5).
    """
    from vllm_sink.enable import UnsupportedConfigError

    table = exact_cos_sin(rope) if table is None else table
    own = rope.cos_sin_cache
    head = min(256, table.shape[0])  # angles below ~256 rad round by 1.5e-5 at most in float32
    # A bf16 or fp16 table holds each value to its own dtype's rounding.
    atol = 1e-4 + torch.finfo(own.dtype).eps
    if own.shape != table.shape or not torch.allclose(
        table[:head], own[:head].float(), atol=atol, rtol=0
    ):
        raise UnsupportedConfigError(
            f"vllm_sink does not support {type(rope).__name__}: its cos/sin table is not "
            "cos/sin of position times frequency"
        )
    copy = deepcopy(rope)  # rebinds the op's bound forward method to the copy
    copy.cos_sin_cache = table.to(dtype=own.dtype, device=own.device)
    return copy


def rotator_from_model_rope(rope: torch.nn.Module, head_size: int) -> SinkRotator:
    """A rotator that re-rotates keys exactly as the model's own rotary embedding rotates them,
    by the same float32 table with exact angles (:func:`exact_cos_sin`), whatever the model's
    dtype. Refuses an embedding whose table scales keys (YaRN's attention factor)."""
    from vllm_sink.enable import UnsupportedConfigError

    cos_sin = exact_cos_sin(rope)
    cos, sin = cos_sin.chunk(2, dim=-1)
    if not torch.allclose(cos * cos + sin * sin, torch.ones_like(cos), atol=1e-5):
        raise UnsupportedConfigError(
            f"vllm_sink does not support {type(rope).__name__}: its cos/sin table scales keys"
        )
    return SinkRotator(head_size, rope.rotary_dim, rope.is_neox_style, cos_sin)


def bind_model_ropes(model: torch.nn.Module) -> int:
    """Give every sink attention layer of ``model`` a rotary embedding with exact angles
    (:func:`exact_rope`, replacing its module's ``rotary_emb``, where vLLM's model code keeps
    it) and a rotator from the same table; returns layers bound."""
    from vllm_sink.enable import UnsupportedConfigError

    bound, unbound = 0, []
    # One exact copy and one cos/sin table per rotary embedding the model shares between layers.
    copies: dict[int, tuple[torch.nn.Module, SinkRotator]] = {}
    for name, module in model.named_modules():
        impl = getattr(getattr(module, "attn", None), "impl", None)
        if not isinstance(impl, SinkCPUAttentionBackendImpl):
            continue
        rope = getattr(module, "rotary_emb", None)
        if rope is None:
            unbound.append(name)
            continue
        if id(rope) not in copies:
            rotator = rotator_from_model_rope(rope, impl.head_size)
            copies[id(rope)] = (exact_rope(rope, rotator.cos_sin), rotator)
        module.rotary_emb, shared = copies[id(rope)]
        impl.rotator = SinkRotator(
            shared.head_size, shared.rotary_dim, shared.is_neox, shared.cos_sin
        )
        bound += 1
    if unbound or not bound:
        raise UnsupportedConfigError(
            "vllm_sink found no rotary embedding (rotary_emb) next to attention layer(s) "
            f"{', '.join(unbound) or '(none found)'}"
        )
    return bound


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


@dataclass(frozen=True)
class WindowRebase:
    slots: torch.Tensor  # cache slots of the window tokens cached before this step
    shift: int  # rotate their keys by this many positions (negative: back)


@dataclass
class SinkCPUAttentionMetadata(CPUAttentionMetadata):
    sink_captures: list[SinkCapture] = field(default_factory=list)
    sink_moves: list[SinkMove] = field(default_factory=list)
    window_rebases: list[WindowRebase] = field(default_factory=list)


@dataclass(frozen=True)
class StepPlan:
    """What the runner patch tells each metadata builder about one step, per batch row."""

    offsets: list[int]  # position offset of the step
    rebase: list[int]  # old offset whose window keys must be rotated back (0: none)


class SinkCPUAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec: AttentionSpec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        settings = settings_from_additional_config(vllm_config.additional_config)
        assert settings is not None
        self.settings = settings
        self.num_sink_pages = geometry.sink_pages(settings.sink_tokens, self.block_size)
        # First sink page -> offset the sinks were last rotated to.
        self.sink_offsets: dict[int, int] = {}
        # Set by the runner patch for each real step, consumed by the step's build; dummy and
        # profiling runs (no plan) build plain metadata.
        self.step_plan: StepPlan | None = None

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> SinkCPUAttentionMetadata:
        base = super().build(common_prefix_len, common_attn_metadata, fast_build)
        metadata = SinkCPUAttentionMetadata(**vars(base))
        plan, self.step_plan = self.step_plan, None
        if plan is not None:
            if common_attn_metadata.num_reqs < len(plan.offsets):
                raise RuntimeError(
                    f"vllm_sink: step plan for {len(plan.offsets)} requests, metadata for "
                    f"{common_attn_metadata.num_reqs}"
                )
            self._plan(plan, common_attn_metadata, metadata)
        return metadata

    def _plan(
        self, plan: StepPlan, common: CommonAttentionMetadata, metadata: SinkCPUAttentionMetadata
    ) -> None:
        """Sink captures and moves, and window rebases, for this step (compact rows)."""
        table = common.block_table_tensor
        bs = self.block_size
        sink_len = self.num_sink_pages * bs
        starts = common.query_start_loc_cpu.tolist()
        seq_lens = common.seq_lens.tolist()
        for row in range(len(plan.offsets)):
            offset, undo = plan.offsets[row], plan.rebase[row]
            q = starts[row + 1] - starts[row]
            n = seq_lens[row] - q  # compact tokens cached before this step
            if undo and n > sink_len:
                slots = _slots(table[row], sink_len, n, bs)
                metadata.window_rebases.append(WindowRebase(slots, -undo))
            if not sink_len:
                continue
            key = int(table[row, 0])
            if n < sink_len:
                count = min(q, sink_len - n)
                metadata.sink_captures.append(SinkCapture(key, starts[row], n, count, sink_len))
                if n == 0:
                    self.sink_offsets[key] = 0  # a new owner of this page
                continue
            if self.sink_offsets.get(key, 0) != offset:
                self.sink_offsets[key] = offset
                slots = _slots(table[row], 0, sink_len, bs)
                metadata.sink_moves.append(SinkMove(key, slots, offset))


def free_sink_state(builders: list, impls: list, keys: list[int]) -> None:
    """Forget the sink state (rotation offset, pristine copies) of streams that ended.

    Called by the runner patch before the step's metadata is built, so a new owner of a freed
    first page, which captures its own sinks in this step, starts clean.
    """
    for builder in builders:
        for key in keys:
            builder.sink_offsets.pop(key, None)
    for impl in impls:
        if impl.rotator is not None:
            for key in keys:
                impl.rotator.pristine.pop(key, None)


def rename_sink_state(builders: list, impls: list, renames: list[tuple[int, int]]) -> None:
    """Move streams' sink state to new keys (a swapped stream's first page changes)."""
    for old, new in renames:
        for builder in builders:
            if old in builder.sink_offsets:
                builder.sink_offsets[new] = builder.sink_offsets.pop(old)
        for impl in impls:
            if impl.rotator is not None and old in impl.rotator.pristine:
                impl.rotator.pristine[new] = impl.rotator.pristine.pop(old)


def _slots(row: torch.Tensor, start: int, stop: int, bs: int) -> torch.Tensor:
    """Cache slots of compact tokens ``[start, stop)`` of one block-table row."""
    tokens = torch.arange(start, stop)
    return row[tokens // bs].to(torch.long) * bs + tokens % bs


class SinkCPUAttentionBackendImpl(CPUAttentionBackendImpl):
    def __init__(self, num_heads: int, head_size: int, *args, **kwargs) -> None:
        super().__init__(num_heads, head_size, *args, **kwargs)
        capture_layout()  # the settings of the engine whose model is being built
        # The model's own rotary embedding, bound once the model is built (bind_model_ropes).
        self.rotator: SinkRotator | None = None

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kw):
        if isinstance(attn_metadata, SinkCPUAttentionMetadata):
            if attn_metadata.sink_captures:
                self.rotator.capture(attn_metadata.sink_captures, key, value)
            for move in attn_metadata.sink_moves:
                self._write(layer, kv_cache, move.slots, *self.rotator.moved(move))
            for rebase in attn_metadata.window_rebases:
                keys, values = self._read(layer, kv_cache, rebase.slots)
                keys = self.rotator.rotate(keys, rebase.shift)
                self._write(layer, kv_cache, rebase.slots, keys, values)
        return super().forward(
            layer, query, key, value, kv_cache, attn_metadata, output, *args, **kw
        )

    def _read(self, layer, kv_cache, slots) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V ``[tokens, kv_heads, head]`` at ``slots``, undoing the kernel's page layout."""
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

    def _write(self, layer, kv_cache, slots, keys, values) -> None:
        """Write K/V for ``slots`` with the backend's own writer (layout-agnostic)."""
        num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
        key_cache, value_cache = kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, -1).chunk(
            2, dim=2
        )
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
