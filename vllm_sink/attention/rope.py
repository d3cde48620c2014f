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

    def load(self, key: int, keys: torch.Tensor, values: torch.Tensor, sink_len: int) -> None:
        """Take the pristine copy from the first ``len(keys)`` sink tokens read from the cache
        (pages whose sinks never moved); the step's captures add the rest."""
        shape = (sink_len, *keys.shape[1:])
        k, v = keys.new_zeros(shape), values.new_zeros(shape)
        k[: len(keys)], v[: len(values)] = keys, values
        self.pristine[key] = (k, v)

    def moved(self, step: SinkStep) -> tuple[torch.Tensor, torch.Tensor]:
        """The sink keys of every move of ``step``, each rotated to its move's offset, and
        their values, for ``step.move_slots``: one rotation for all streams moving."""
        pairs = [self.pristine[m.key] for m in step.moves]
        if len(pairs) == 1:
            k, v = pairs[0]
        else:
            k, v = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
        return self._rotate(k, *step.move_angles(self.cos_sin)), v

    def rotate(self, keys: torch.Tensor, offset: int) -> torch.Tensor:
        """Rotate every key (last dim ``head_size``) by ``offset`` positions."""
        if offset == 0:
            return keys
        cos, sin = self.cos_sin[abs(offset)].chunk(2, dim=-1)
        if offset < 0:
            sin = -sin
        return self._rotate(keys, cos, sin)

    def _rotate(self, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``keys`` by the angles whose cos/sin are given (broadcast over the keys)."""
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
    copies: dict[int, tuple[torch.nn.Module, SinkRotator]] = {}
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
            copies[id(rope)] = (exact, rotator)
        module.rotary_emb, shared = copies[id(rope)]
        # Each layer keeps its own pristine copies.
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
