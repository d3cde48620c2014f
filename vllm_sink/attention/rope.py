"""RoPE for the sink path: the model's own rotary embedding with exact angles, and the rotator
that moves sink keys (and rebases window keys) with it. Kernel-independent.

The moves re-rotate keys already in the cache, so the rotation must be exactly the one the model
applied: the same frequencies, pairing style and partial rotary, taken from each attention
layer's own ``rotary_emb`` once the model is built (:func:`bind_model_ropes`).
"""

from __future__ import annotations

from copy import deepcopy
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vllm_sink.attention.sink import SinkCapture, SinkStep


class SinkBank:
    """The pristine sink keys/values of every stream, for the layers that share one rotary table:
    one tensor per stream, ``[layers, sink_len, kv_heads, head]``, so that the sink moves of a step
    rotate every layer's sinks at once, and write them in one call of the kernel's writer
    (:meth:`~vllm_sink.attention.sink.SinkAttentionImpl.write_moved_sinks`). Entries are keyed by
    the request's first sink page, unique among live requests; a new owner of that page replaces the
    entry when it writes (or loads) its own sink tokens.
    """

    def __init__(self) -> None:
        # The attention layers whose rotators share the bank, in row order (None where a
        # rotator has no layer, as in unit tests): one write puts all their moved sinks.
        self.members: list = []
        self.entries: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._step: object = None
        self._fresh: set[int] = set()  # keys (re)allocated in ``_step``

    def entry(
        self, step: object, key: int, shape: tuple[int, ...], like: torch.Tensor, reset: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``key``'s tensors; new ones (zeros) if it has none, or if ``reset`` and no layer of
        ``step`` has made them yet (a new owner: the first layer to see it allocates)."""
        if step is not self._step:
            self._step, self._fresh = step, set()
        if key not in self.entries or (reset and key not in self._fresh):
            full = (len(self.members), *shape)
            self.entries[key] = (like.new_zeros(full), like.new_zeros(full))
            self._fresh.add(key)
        return self.entries[key]


class SinkRotator:
    """One layer's view of its :class:`SinkBank`: captures its sink keys/values, re-writes
    moved sinks.

    The copy is taken as the model writes the sink tokens (sink token ``i`` rotated at position
    ``i``). Moving the sinks to offset ``e`` (tokens evicted so far) rotates the pristine keys by
    ``e`` in float32 and writes them through the backend's own cache writer, so the kernel's
    page layout is never assumed: one rounding per move, never a rotation of a rotated value.
    """

    def __init__(
        self,
        head_size: int,
        rotary_dim: int,
        is_neox: bool,
        cos_sin: torch.Tensor,
        bank: SinkBank | None = None,
        layer: torch.nn.Module | None = None,
    ):
        self.head_size = head_size
        self.rotary_dim = rotary_dim
        self.is_neox = is_neox
        self.cos_sin = cos_sin  # float32 [max_position, rotary_dim]
        self.bank = bank if bank is not None else SinkBank()
        self.index = len(self.bank.members)  # this layer's row in the bank's tensors
        self.bank.members.append(layer)

    @property
    def pristine(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Every stream's pristine copy (shared by the bank's layers)."""
        return self.bank.entries

    def capture(
        self, step: SinkStep, jobs: list[SinkCapture], key: torch.Tensor, value: torch.Tensor
    ) -> None:
        """Copy the step's sink tokens (``key``/``value``: ``[tokens, kv_heads, head]``)."""
        for job in jobs:
            shape = (job.sink_len, *key.shape[1:])
            k, v = self.bank.entry(step, job.key, shape, key, reset=job.dst == 0)
            k[self.index, job.dst : job.dst + job.count] = key[job.src : job.src + job.count]
            v[self.index, job.dst : job.dst + job.count] = value[job.src : job.src + job.count]

    def load(
        self, step: SinkStep, key: int, keys: torch.Tensor, values: torch.Tensor, sink_len: int
    ) -> None:
        """Take the pristine copy from the first ``len(keys)`` sink tokens read from the cache
        (pages whose sinks never moved); the step's captures add the rest."""
        k, v = self.bank.entry(step, key, (sink_len, *keys.shape[1:]), keys, reset=True)
        k[self.index, : len(keys)], v[self.index, : len(values)] = keys, values

    def moved(self, step: SinkStep, every_layer: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The sink keys of every move of ``step``, each rotated to its move's offset, and their
        values, for ``step.move_slots``: this layer's, ``[slots, kv_heads, head]``, or with
        ``every_layer`` every layer's of the bank, rotated at once, ``[layers, slots, kv_heads,
        head]`` (written in one call: ``SinkAttentionImpl.write_moved_sinks``). Where a moving
        stream also writes (or loads) sinks in this step, each layer rotates its own, after
        its capture."""
        rows = slice(None) if every_layer else self.index
        pairs = [self.bank.entries[m.key] for m in step.moves]
        if len(pairs) == 1:
            k, v = pairs[0][0][rows], pairs[0][1][rows]
        else:  # the sink tokens' dimension: -3 with or without the layers'
            k = torch.cat([p[0][rows] for p in pairs], -3)
            v = torch.cat([p[1][rows] for p in pairs], -3)
        return self._rotate(k, *step.move_angles(self.cos_sin, k.shape[-2])), v

    def rotate(self, keys: torch.Tensor, offset: int) -> torch.Tensor:
        """Rotate every key (last dim ``head_size``) by ``offset`` positions."""
        if offset == 0:
            return keys
        cos, sin = self.cos_sin[abs(offset)].chunk(2, dim=-1)
        if offset < 0:
            sin = -sin
        return self._rotate(keys, cos, sin)

    def _rotate(self, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``keys`` by the angles whose cos/sin are given (broadcast over the keys).

        Written into one float32 buffer by four in-place kernels: the sink moves of a step
        turn every layer's sinks at once, and temporaries of that size (with ``cat``) cost
        several times more on a CPU."""
        x = keys.float()
        out = torch.empty_like(x)
        rot, out_rot = x[..., : self.rotary_dim], out[..., : self.rotary_dim]
        if self.is_neox:
            (x1, x2), (o1, o2) = rot.chunk(2, dim=-1), out_rot.chunk(2, dim=-1)
        else:
            x1, x2, o1, o2 = rot[..., ::2], rot[..., 1::2], out_rot[..., ::2], out_rot[..., 1::2]
        torch.mul(x1, cos, out=o1)
        o1.addcmul_(x2, sin, value=-1)
        torch.mul(x2, cos, out=o2)
        o2.addcmul_(x1, sin)
        if self.rotary_dim < self.head_size:
            out[..., self.rotary_dim :] = x[..., self.rotary_dim :]
        return out.to(keys.dtype)


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
    from vllm_sink.attention.sink import SinkAttentionImpl
    from vllm_sink.enable import UnsupportedConfigError

    bound, unbound = 0, []
    # One exact copy and one cos/sin table per rotary embedding the model shares between layers.
    copies: dict[int, tuple[torch.nn.Module, SinkRotator, SinkBank]] = {}
    for name, module in model.named_modules():
        impl = getattr(getattr(module, "attn", None), "impl", None)
        if not isinstance(impl, SinkAttentionImpl):
            continue
        rope = getattr(module, "rotary_emb", None)
        if rope is None:
            unbound.append(name)
            continue
        if id(rope) not in copies:
            rotator = rotator_from_model_rope(rope, impl.head_size)
            exact = exact_rope(rope, rotator.cos_sin)
            # The table lives where the keys do (moves stay on the device).
            rotator.cos_sin = rotator.cos_sin.to(exact.cos_sin_cache.device)
            copies[id(rope)] = (exact, rotator, SinkBank())
        module.rotary_emb, shared, bank = copies[id(rope)]
        # Each layer has its row in the bank of the layers sharing its table.
        impl.rotator = SinkRotator(
            shared.head_size, shared.rotary_dim, shared.is_neox, shared.cos_sin, bank, module.attn
        )
        bound += 1
    if unbound or not bound:
        raise UnsupportedConfigError(
            "vllm_sink found no rotary embedding (rotary_emb) next to attention layer(s) "
            f"{', '.join(unbound) or '(none found)'}"
        )
    return bound
