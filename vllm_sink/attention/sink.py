"""The sink wrapper: one implementation of the sink logic over any paged attention kernel.

The stock paged kernel does the attention. Per step:

- each block-table row and ``seq_lens`` arrive already compacted by the worker
  (:mod:`vllm_sink.worker.streams`), so the kernel sees ``sb*bs + (n - ws) + q`` tokens laid out
  as cache slots (the new tokens are still the last ``q``, so the causal mask is unchanged);
- window tokens keep the position they were written with, and the queries keep theirs, so
  their query-to-key distances already equal those of cache-slot positions; only the sink keys
  must move, to sit just before the oldest window token. They are re-rotated once per freed
  page, always from a pristine copy taken before their first move, so rounding never
  accumulates (:class:`vllm_sink.attention.rope.SinkRotator`); a position rebase rotates the
  window keys back once.

What to capture, move and rebase is decided on the host, once per step, by the worker
(:class:`SinkStep`, built from its own block table); each layer's impl applies it to its cache
before the kernel runs, except the sink moves, which the first layer writes for every layer in one
call (the moved sinks are no key a step computes, so they may be written early). A kernel
contributes three things only, kept side by side in :mod:`vllm_sink.attention.cpu` and
:mod:`vllm_sink.attention.triton`: its metadata builder and impl (the bases the mixins below wrap),
and how to read and write K/V at cache slots (its layout and its own cache writer).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import AttentionCGSupport, CommonAttentionMetadata
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec

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


# ------------------------------------------------------------------------------------ the step


@dataclass(frozen=True)
class SinkCapture:
    key: int  # the request's first sink page: identifies its pristine copy
    src: int  # first batch token to copy
    dst: int  # its index among the sink tokens
    count: int
    sink_len: int  # tokens in the sink pages


@dataclass(frozen=True)
class SinkLoad:
    key: int
    slots: torch.Tensor  # cache slots of the sink tokens computed before this step (unmoved)
    sink_len: int


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
class SinkStep:
    """The sink work of one step, for every layer: made by the worker on the host, its slot
    tensors moved to the device once (:meth:`to`), read by each layer's impl."""

    loads: list[SinkLoad] = field(default_factory=list)
    captures: list[SinkCapture] = field(default_factory=list)
    moves: list[SinkMove] = field(default_factory=list)
    rebases: list[WindowRebase] = field(default_factory=list)
    # Every move of the step at once (made by :meth:`to`): all layers write their moved sinks
    # in one rotation and one cache write, whatever the number of streams moving.
    move_slots: torch.Tensor | None = None  # long [sum of sink_len]
    move_offsets: torch.Tensor | None = None  # long [sum of sink_len]: each slot's offset
    # True where a moving stream also captures or loads sinks in this step (each layer must
    # then rotate after its own capture).
    moves_capture: bool = False
    _move_angles: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict
    )
    # Banks whose layers' moved sinks are written (by the step's first layer of each bank).
    moves_written: set[int] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.loads or self.captures or self.moves or self.rebases)

    def to(self, device: torch.device) -> SinkStep:
        """The same step with its slots on ``device`` (copied without waiting)."""

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=True)

        step = SinkStep(
            [SinkLoad(x.key, move(x.slots), x.sink_len) for x in self.loads],
            self.captures,
            [SinkMove(m.key, move(m.slots), m.offset) for m in self.moves],
            [WindowRebase(move(r.slots), r.shift) for r in self.rebases],
        )
        if self.moves:
            slots = [m.slots for m in self.moves]
            counts = torch.tensor([len(x) for x in slots])
            offsets = torch.tensor([m.offset for m in self.moves])
            step.move_slots = move(torch.cat(slots))
            step.move_offsets = move(torch.repeat_interleave(offsets, counts))
            written = {c.key for c in self.captures} | {x.key for x in self.loads}
            step.moves_capture = any(m.key in written for m in self.moves)
        return step

    def move_angles(
        self, cos_sin: torch.Tensor, kv_heads: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin ``[slots, kv_heads, rotary_dim / 2]`` of each moved slot's offset, from
        the rotator's table; gathered once per step, table and head count (layers share a table).

        Repeated over the heads in memory: broadcast over a size-1 head dimension they take a
        slow path of torch's CPU kernels (rotating the moved sinks of a 64-stream step, 30
        layers x 64 slots x 3 heads, on 2 AVX2 cores: float32 keys 260 -> 130 us, bf16 keys
        305-320 -> 175-185 us)."""
        made = (id(cos_sin), kv_heads)  # the angles' shape depends on both
        angles = self._move_angles.get(made)
        if angles is None:
            table = cos_sin[self.move_offsets].unsqueeze(1).expand(-1, kv_heads, -1)
            cos, sin = (half.contiguous() for half in table.chunk(2, dim=-1))
            angles = self._move_angles[made] = (cos, sin)
        return angles


# ------------------------------------------------------------------------------------ builder


class SinkMetadataBuilder:
    """Mixed in before a kernel's metadata builder: attaches the step's :class:`SinkStep` (set
    by the worker for each real step, consumed by that step's build) to the kernel's metadata.
    Dummy and profiling runs (no step) build the kernel's metadata unchanged.

    CUDA graphs: attention runs outside captured graphs (vLLM's piecewise mode), since the sink
    moves and the compacted rows change per step; full capture is not declared."""

    _cudagraph_support = AttentionCGSupport.NEVER

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sink_step: SinkStep | None = None

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ):
        metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)
        step, self.sink_step = self.sink_step, None
        if step:
            metadata.sink_step = step.to(common_attn_metadata.seq_lens.device)
        return metadata


# ------------------------------------------------------------------------------------ impl


class SinkAttentionImpl:
    """Mixed in before a kernel's impl: applies the step's captures, sink moves and window
    rebases to this layer's cache, then runs the kernel. A kernel module supplies
    :meth:`read_kv` and :meth:`write_kv` (its page layout and its own cache writer)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        capture_layout()  # the settings of the engine whose model is being built
        # The model's own rotary embedding, bound once the model is built (bind_model_ropes).
        self.rotator = None
        # The kernel's own forward, which layers run directly in steps without sink work
        # (:func:`route_layers`).
        self.kernel_forward = super().forward

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kw):
        step = getattr(attn_metadata, "sink_step", None)
        if step is not None:
            for load in step.loads:
                self.rotator.load(
                    step, load.key, *self.read_kv(layer, kv_cache, load.slots), load.sink_len
                )
            if step.captures:
                self.rotator.capture(step, step.captures, key, value)
            if step.moves_capture:
                keys, values = self.rotator.moved(step)
                self.write_kv(layer, kv_cache, step.move_slots, keys, values)
            elif step.moves and id(self.rotator.bank) not in step.moves_written:
                step.moves_written.add(id(self.rotator.bank))
                self.write_moved_sinks(step)
            for rebase in step.rebases:
                keys, values = self.read_kv(layer, kv_cache, rebase.slots)
                keys = self.rotator.rotate(keys, rebase.shift)
                self.write_kv(layer, kv_cache, rebase.slots, keys, values)
        return super().forward(
            layer, query, key, value, kv_cache, attn_metadata, output, *args, **kw
        )

    def write_moved_sinks(self, step: SinkStep) -> None:
        """Write the moved sinks of every layer of this layer's bank, rotated at once, in one
        call of the kernel's writer over all their caches (:func:`stacked_cache`): a call
        costs ~20 us whatever it writes (2 Zen 4 cores: 30 layers x one 32-token page, 700 us
        a layer at a time, 54 us at once). Each layer's own call where the caches do not
        stack."""
        keys, values = self.rotator.moved(step, every_layer=True)
        layers = self.rotator.bank.members
        caches = [layer.kv_cache for layer in layers]
        found = getattr(self, "_vllm_sink_stack", None)
        ptrs = tuple(c.data_ptr() for c in caches)
        if found is None or found[0] != ptrs:
            found = self._vllm_sink_stack = (ptrs, stacked_cache(layers, caches))
        stack = found[1]
        if stack is None:
            for layer, cache, k, v in zip(layers, caches, keys, values, strict=True):
                self.write_kv(layer, cache, step.move_slots, k, v)
            return
        cache, slot_starts = stack
        slots = (slot_starts + step.move_slots).flatten()
        self.write_kv(layers[0], cache, slots, keys.flatten(0, 1), values.flatten(0, 1))

    def read_kv(self, layer, kv_cache, slots) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V ``[tokens, kv_heads, head]`` at ``slots``."""
        raise NotImplementedError

    def write_kv(self, layer, kv_cache, slots, keys, values) -> None:
        """Write K/V ``[tokens, kv_heads, head]`` at ``slots`` with the kernel's own writer."""
        raise NotImplementedError


def route_layers(impls: list, sink_work: bool) -> None:
    """Send this step's attention calls through the sink wrapper only if the step has sink work
    (captures, moves, loads or rebases); otherwise each layer calls its kernel's own forward,
    bound on the impl (an instance attribute shadows the class's ``forward``).

    Most steps have none (a stream moves its sinks once per page it evicts), and the wrapper's
    call costs ~1 us a layer on an idle core (more between a step's kernels, whose work evicts
    the interpreter's from the CPU caches): 30 layers, every step. The runner routes the layers
    before the step's metadata is built; its builder attaches the work under the same test.
    Layers are always routed together, so the first tells where they all are."""
    if not impls or ("forward" not in impls[0].__dict__) == sink_work:
        return  # already routed so (most steps)
    for impl in impls:
        if sink_work:
            impl.__dict__.pop("forward", None)
        else:
            impl.forward = impl.kernel_forward


def stacked_cache(
    layers: list, caches: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``caches`` (one per layer of ``layers``) as one cache of the same layout whose blocks
    cover them all, and each layer's first slot in it (``[layers, 1]``), so that one call of a
    kernel's writer fills every layer; None where that cannot be.

    vLLM places every layer's cache in one backing allocation (``allocate_kv_cache`` in
    ``vllm/v1/worker/utils.py``); where each layer's blocks are a whole number of blocks apart
    (a layer-outermost layout, the default) they are blocks of one larger cache. Both kernels'
    caches are ``[blocks, kv_heads, block_size, ...]``. Layers with different K/V scales (a
    quantized cache) cannot share a call.
    """
    first = caches[0]
    if any(
        c.shape != first.shape
        or c.stride() != first.stride()
        or c.dtype != first.dtype
        or c.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
        for c in caches
    ):
        return None
    scales = {
        (getattr(x, "_k_scale_float", 1.0), getattr(x, "_v_scale_float", 1.0)) for x in layers
    }
    if len(scales) != 1:
        return None
    offsets = [c.storage_offset() for c in caches]
    base, block = min(offsets), first.stride(0)
    starts = [(o - base) // block for o in offsets]
    if any((o - base) % block for o in offsets) or len(set(starts)) != len(starts):
        return None  # blocks of different layers interleave, or layers share a cache
    lowest = caches[offsets.index(base)]
    stacked = lowest.as_strided((max(starts) + first.shape[0], *first.shape[1:]), first.stride())
    slot_starts = torch.tensor(starts, device=first.device).view(-1, 1) * first.shape[2]
    return stacked, slot_starts


def sink_spec(spec: AttentionSpec) -> SinkWindowSpec:
    """The KV-cache spec of a sink layer: pages sized by the bounded page count."""
    if type(spec) is not FullAttentionSpec:
        raise ValueError(
            f"vllm_sink supports plain full-attention layers only, got {type(spec).__name__}"
        )
    layout = current_layout()
    return SinkWindowSpec(
        **{f.name: getattr(spec, f.name) for f in fields(spec)},
        sink_tokens=layout.settings.sink_tokens,
        window_tokens=layout.settings.window_tokens,
        max_step_tokens=layout.max_step_tokens,
    )


def free_sink_state(impls: list, keys: list[int]) -> None:
    """Forget the pristine copies of streams that ended (before the step's build, so a new
    owner of a freed first page, which captures its own sinks in this step, starts clean)."""
    for bank in _banks(impls):
        for key in keys:
            bank.entries.pop(key, None)


def copy_sink_state(impls: list, copies: list[tuple[int, int]]) -> None:
    """Give streams whose sink pages were copied from shared ones their own pristine copies."""
    for src, dst in copies:
        for bank in _banks(impls):
            if src in bank.entries:
                k, v = bank.entries[src]
                bank.entries[dst] = (k.clone(), v.clone())


def rename_sink_state(impls: list, renames: list[tuple[int, int]]) -> None:
    """Move streams' pristine copies to new keys (a swapped stream's first page changes)."""
    for old, new in renames:
        for bank in _banks(impls):
            if old in bank.entries:
                bank.entries[new] = bank.entries.pop(old)


def _banks(impls: list) -> list:
    """The distinct sink banks of ``impls`` (layers sharing a rotary table share one)."""
    banks = {id(i.rotator.bank): i.rotator.bank for i in impls if i.rotator is not None}
    return list(banks.values())
