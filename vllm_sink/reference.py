"""Pure-PyTorch StreamingLLM reference: the quality oracle for the contract's semantics.

A from-scratch Llama-family forward (RMSNorm, GQA attention with RoPE, SiLU MLP, tied or untied
head) over a per-layer cache of keys stored *before* RoPE. Each step evicts whole pages exactly as
the contract says, lays the surviving tokens out as cache slots ``0..L-1``, rotates every cached
key by its slot for this step ("cache keys before RoPE, rotate at use") and gives the step's
tokens positions ``L..L+q-1``. A decode step costs O(sinks + window), never a recompute.

With no eviction yet the slots equal the original positions, so the reference is then exactly a
vanilla causal LM (checked against transformers in ``tests/test_reference.py``; RoPE angles are
computed in float64, see ``_cos_sin``).

The eviction and position rules are also exposed as small pure functions so they can be checked
by hand. They are written here a second time, on purpose, independently of
:mod:`vllm_sink.geometry` (which the engine uses): this module is the oracle the engine is tested
against, and ``tests/test_geometry.py`` checks both against a token-by-token simulation of the
contract's words.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------- the rules


def sink_pages(sink_tokens: int, block_size: int) -> int:
    """``sb = ceil(sink_tokens / bs)``: pages pinned as sinks (0 when ``sink_tokens`` is 0)."""
    return math.ceil(sink_tokens / block_size) if sink_tokens > 0 else 0


def first_window_token(n: int, sink_tokens: int, window_tokens: int, block_size: int) -> int:
    """First surviving window token before a step at ``n``: ``max(sb, (n-W)//bs) * bs``.

    Pages ``[sb, ws/bs)`` have been freed for good. May exceed ``n`` while the sink pages are not
    yet full (then no window token is cached).
    """
    sb = sink_pages(sink_tokens, block_size)
    return max(sb, (n - window_tokens) // block_size) * block_size


def kept_tokens(
    n: int, sink_tokens: int | None, window_tokens: int | None, block_size: int
) -> list[int]:
    """Token indices cached before a step at ``n``, in slot order (sinks first, then the rest).

    ``window_tokens=None`` means dense attention (everything kept).
    """
    if window_tokens is None:
        return list(range(n))
    sinks = sink_tokens or 0
    sink_end = min(n, sink_pages(sinks, block_size) * block_size)
    ws = first_window_token(n, sinks, window_tokens, block_size)
    return list(range(sink_end)) + list(range(ws, n))


def kept_pages(
    n: int, sink_tokens: int | None, window_tokens: int | None, block_size: int
) -> list[int]:
    """Page ids holding cached tokens before a step at ``n`` (pages not yet started excluded)."""
    return sorted({t // block_size for t in kept_tokens(n, sink_tokens, window_tokens, block_size)})


def slot_positions(
    n: int, q: int, sink_tokens: int | None, window_tokens: int | None, block_size: int
) -> list[int]:
    """Positions of the step's tokens ``[n, n+q)``: ``L..L+q-1`` with ``L`` cached tokens."""
    length = len(kept_tokens(n, sink_tokens, window_tokens, block_size))
    return list(range(length, length + q))


# ----------------------------------------------------------------------------- RoPE


def rope_inv_freq(config: dict[str, Any]) -> tuple[torch.Tensor, int]:
    """Inverse frequencies (float32) and rotary dim from an HF config dict.

    Supports rope types 'default', 'linear' and 'llama3', and ``partial_rotary_factor``.
    Types whose frequencies depend on the sequence length or rescale attention (dynamic, yarn,
    longrope, ...) raise ``NotImplementedError`` rather than silently computing something else.
    """
    params = dict(config.get("rope_parameters") or {})
    # transformers < 5 spells it rope_scaling + rope_theta at the top level.
    legacy = config.get("rope_scaling") or {}
    for key, value in legacy.items():
        params.setdefault(key, value)
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    partial = float(params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)))
    dim = int(head_dim * partial)
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope_type == "default":
        pass
    elif rope_type == "linear":
        inv_freq = inv_freq / float(params["factor"])
    elif rope_type == "llama3":
        factor = float(params["factor"])
        low = float(params["low_freq_factor"])
        high = float(params["high_freq_factor"])
        old_len = float(params["original_max_position_embeddings"])
        low_wavelen = old_len / low
        high_wavelen = old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    else:
        raise NotImplementedError(
            f"rope type {rope_type!r} is not supported by the reference "
            "(supported: 'default', 'linear', 'llama3')"
        )
    return inv_freq, dim


def _cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    # The float32 frequencies transformers uses, but angles (position x frequency) in float64:
    # float32 rounds an angle by up to half an ulp of p*f (~5e-4 rad at 8,000), a rounding that
    # depends on the absolute position, so two position schemes with the same differences would
    # score differently by up to ~1e-3 nats (measured). The engine does the same (exact_cos_sin).
    freqs = positions.to(torch.float64)[:, None] * inv_freq.to(torch.float64)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE (rotate-half convention) on the first ``cos.shape[-1]`` dims of ``x[..., T, D]``."""
    rd = cos.shape[-1]
    rot, rest = x[..., :rd], x[..., rd:]
    half = rd // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = rot * cos + rotated * sin
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


# ----------------------------------------------------------------------------- the model


@dataclass
class _Layer:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    q_b: torch.Tensor | None
    k_b: torch.Tensor | None
    v_b: torch.Tensor | None
    o_b: torch.Tensor | None
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    ln_in: torch.Tensor
    ln_post: torch.Tensor


def _load_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


class ReferenceModel:
    """Weights of an HF Llama-family checkpoint and a stateless forward over given K/V caches."""

    def __init__(self, model_dir: str | Path, *, dtype: torch.dtype = torch.float32) -> None:
        self.model_dir = Path(model_dir)
        self.config: dict[str, Any] = json.loads((self.model_dir / "config.json").read_text())
        cfg = self.config
        if cfg.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(f"hidden_act {cfg.get('hidden_act')!r} (only silu)")
        self.dtype = dtype
        self.num_layers = int(cfg["num_hidden_layers"])
        self.num_heads = int(cfg["num_attention_heads"])
        self.num_kv_heads = int(cfg.get("num_key_value_heads") or self.num_heads)
        self.head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // self.num_heads)
        self.eps = float(cfg.get("rms_norm_eps", 1e-6))
        self.max_position_embeddings = int(cfg.get("max_position_embeddings", 0)) or None
        self.inv_freq, self.rotary_dim = rope_inv_freq(cfg)

        sd = _load_state_dict(self.model_dir)

        def w(name: str) -> torch.Tensor:
            return sd[name].to(dtype)

        def opt(name: str) -> torch.Tensor | None:
            return sd[name].to(dtype) if name in sd else None

        self.embed = w("model.embed_tokens.weight")
        tied = cfg.get("tie_word_embeddings", False) or "lm_head.weight" not in sd
        self.lm_head = self.embed if tied else w("lm_head.weight")
        self.norm = w("model.norm.weight")
        self.layers: list[_Layer] = []
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            a, m = p + "self_attn.", p + "mlp."
            self.layers.append(
                _Layer(
                    q=w(a + "q_proj.weight"),
                    k=w(a + "k_proj.weight"),
                    v=w(a + "v_proj.weight"),
                    o=w(a + "o_proj.weight"),
                    q_b=opt(a + "q_proj.bias"),
                    k_b=opt(a + "k_proj.bias"),
                    v_b=opt(a + "v_proj.bias"),
                    o_b=opt(a + "o_proj.bias"),
                    gate=w(m + "gate_proj.weight"),
                    up=w(m + "up_proj.weight"),
                    down=w(m + "down_proj.weight"),
                    ln_in=w(p + "input_layernorm.weight"),
                    ln_post=w(p + "post_attention_layernorm.weight"),
                )
            )

    @property
    def vocab_size(self) -> int:
        return int(self.lm_head.shape[0])

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * h.to(x.dtype)

    @torch.inference_mode()
    def forward(
        self,
        token_ids: torch.Tensor,
        query_positions: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        cached: int,
        *,
        last_only: bool = False,
        keys_rotated: bool = False,
    ) -> torch.Tensor:
        """One step of ``q`` tokens over ``cached`` pre-RoPE cached keys (slots ``0..cached-1``).

        ``k_cache``/``v_cache`` are ``[layers, kv_heads, capacity, head_dim]``; the step's own
        pre-RoPE K/V are written at ``[cached, cached+q)``. Returns float32 logits ``[q, vocab]``
        (``[1, vocab]`` with ``last_only``).

        ``keys_rotated``: the cache holds keys already rotated by their slot, and the step's keys
        are stored rotated by ``query_positions``. Only valid while slots never change (dense
        mode); it saves re-rotating a cache that grows without bound. Same arithmetic either way.
        """
        attention = _StepAttention.build(
            self, query_positions, k_cache, v_cache, cached, keys_rotated
        )
        x = self._decoder(self.embed[token_ids], attention)
        if last_only:
            x = x[-1:]
        return self._head(x)

    def _decoder(
        self,
        x: torch.Tensor,
        attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """The layer stack on the rows ``x`` ``[T, hidden]``. ``attend(i, qh, kh, vh)`` is layer
        ``i``'s attention: pre-RoPE ``qh`` ``[T, heads, d]``, ``kh``/``vh`` ``[T, kv_heads, d]``
        in, ``[T, heads * d]`` out."""
        t = x.shape[0]
        nh, nkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        for i, layer in enumerate(self.layers):
            h = self._rms(x, layer.ln_in)
            qh = F.linear(h, layer.q, layer.q_b).view(t, nh, d)
            kh = F.linear(h, layer.k, layer.k_b).view(t, nkv, d)
            vh = F.linear(h, layer.v, layer.v_b).view(t, nkv, d)
            x = x + F.linear(attend(i, qh, kh, vh), layer.o, layer.o_b)
            h = self._rms(x, layer.ln_post)
            x = x + F.linear(F.silu(F.linear(h, layer.gate)) * F.linear(h, layer.up), layer.down)
        return x

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        x = self._rms(x, self.norm)
        return F.linear(x, self.lm_head).to(torch.float32)

    def new_cache(self, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.num_layers, self.num_kv_heads, capacity, self.head_dim)
        return torch.empty(shape, dtype=self.dtype), torch.empty(shape, dtype=self.dtype)


@dataclass
class _StepAttention:
    """One stream's attention for one step of ``q`` tokens over ``cached`` cached slots."""

    model: ReferenceModel
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    cached: int
    cos_q: torch.Tensor
    sin_q: torch.Tensor
    cos_k: torch.Tensor | None  # None: keys_rotated
    sin_k: torch.Tensor | None
    mask: torch.Tensor | None

    @classmethod
    def build(
        cls,
        model: ReferenceModel,
        query_positions: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        cached: int,
        keys_rotated: bool,
    ) -> _StepAttention:
        q = query_positions.shape[0]
        total = cached + q
        cos_q, sin_q = _cos_sin(model.inv_freq, query_positions, model.dtype)
        # Every key is rotated by its slot for this step, from its pre-RoPE copy: no drift.
        cos_k = sin_k = None
        if not keys_rotated:
            cos_k, sin_k = _cos_sin(model.inv_freq, torch.arange(total), model.dtype)
        mask = None
        if q > 1:
            mask = torch.ones(q, total, dtype=torch.bool).tril(diagonal=cached)
        return cls(model, k_cache, v_cache, cached, cos_q, sin_q, cos_k, sin_k, mask)

    def __call__(
        self, i: int, qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor
    ) -> torch.Tensor:
        """Layer ``i``: writes the step's pre-RoPE K/V at ``[cached, cached+q)`` and attends."""
        q = qh.shape[0]
        cached, total = self.cached, self.cached + q
        nh, nkv, d = self.model.num_heads, self.model.num_kv_heads, self.model.head_dim
        qh, kh, vh = qh.transpose(0, 1), kh.transpose(0, 1), vh.transpose(0, 1)
        k_cache, v_cache = self.k_cache, self.v_cache
        v_cache[i, :, cached:total] = vh
        if self.cos_k is None:
            k_cache[i, :, cached:total] = _rotate(kh, self.cos_q, self.sin_q)
            keys = k_cache[i, :, :total]
        else:
            k_cache[i, :, cached:total] = kh
            keys = _rotate(k_cache[i, :, :total], self.cos_k, self.sin_k)
        queries = _rotate(qh, self.cos_q, self.sin_q)
        attn = F.scaled_dot_product_attention(
            queries[None],
            keys[None],
            v_cache[i, :, :total][None],
            attn_mask=self.mask,
            scale=d**-0.5,
            enable_gqa=nh != nkv,
        )[0]
        return attn.transpose(0, 1).reshape(q, nh * d)


# ----------------------------------------------------------------------------- streaming


class StreamingReference:
    """One stream with the contract's page-granular eviction and cache-slot positions.

    ``window_tokens=None`` gives dense attention (plain positions ``0..n-1``);
    ``sink_tokens=0`` plain window attention; ``sink_tokens>0`` StreamingLLM.
    ``max_positions``, when set, is a guard: a step whose positions reach it raises.
    """

    def __init__(
        self,
        model: str | Path | ReferenceModel,
        *,
        sink_tokens: int | None,
        window_tokens: int | None,
        block_size: int = 32,
        dtype: torch.dtype = torch.float32,
        max_positions: int | None = None,
    ) -> None:
        self.model = (
            model if isinstance(model, ReferenceModel) else ReferenceModel(model, dtype=dtype)
        )
        if window_tokens is not None and window_tokens < 1:
            raise ValueError(f"window_tokens must be >= 1, got {window_tokens}")
        if sink_tokens is not None and sink_tokens < 0:
            raise ValueError(f"sink_tokens must be >= 0, got {sink_tokens}")
        self.sink_tokens = (sink_tokens or 0) if window_tokens is not None else None
        self.window_tokens = window_tokens
        self.block_size = block_size
        self.max_positions = max_positions
        self.reset()

    @property
    def dense(self) -> bool:
        return self.window_tokens is None

    def reset(self) -> None:
        """Start a new stream."""
        self.n = 0  # tokens processed so far
        self._len = 0  # tokens in the cache
        # Layout: sink tokens [0, min(n, sb*bs)) then window tokens [self._ws, n).
        sb = 0 if self.dense else sink_pages(self.sink_tokens, self.block_size)
        self._sink_end = sb * self.block_size
        self._ws = self._sink_end
        cap = 256 if self.dense else self._sink_end + self.window_tokens + 2 * self.block_size
        self._k, self._v = self.model.new_cache(cap)

    def fork(self) -> StreamingReference:
        """An independent copy of the stream as it stands (the model is shared): what each of
        several requests continuing one stream continues from."""
        other = copy.copy(self)
        other._k, other._v = self._k.clone(), self._v.clone()
        return other

    def evicted_before(self, n: int) -> tuple[int, list[int]]:
        """``(ws, kept page ids)`` before a step at ``n`` (dense: ``ws`` is 0, all pages kept)."""
        if self.dense:
            return 0, kept_pages(n, None, None, self.block_size)
        ws = first_window_token(n, self.sink_tokens, self.window_tokens, self.block_size)
        return ws, kept_pages(n, self.sink_tokens, self.window_tokens, self.block_size)

    def positions_for_step(self, n: int, q: int) -> list[int]:
        """Positions the step ``[n, n+q)`` gets."""
        return slot_positions(n, q, self.sink_tokens, self.window_tokens, self.block_size)

    def _evict(self) -> None:
        if self.dense:
            return
        ws = first_window_token(self.n, self.sink_tokens, self.window_tokens, self.block_size)
        drop = ws - self._ws
        if drop > 0:
            a = min(self.n, self._sink_end)  # == sink_end: ws > sink_end implies n > sink_end
            rest = self._len - a - drop
            for buf in (self._k, self._v):
                buf[:, :, a : a + rest] = buf[:, :, a + drop : a + drop + rest].clone()
            self._len -= drop
            self._ws = ws

    def _reserve(self, extra: int) -> None:
        need = self._len + extra
        cap = self._k.shape[2]
        if need <= cap:
            return
        new_cap = max(need, 2 * cap)
        k, v = self.model.new_cache(new_cap)
        k[:, :, : self._len] = self._k[:, :, : self._len]
        v[:, :, : self._len] = self._v[:, :, : self._len]
        self._k, self._v = k, v

    def _begin(self, q: int) -> int:
        """A step of ``q`` tokens at ``n``: evicts, checks the positions, makes room; returns
        the cached token count (the step's first position)."""
        if q == 0:
            raise ValueError("a step needs at least one token")
        self._evict()
        if self.max_positions is not None and self._len + q > self.max_positions:
            raise ValueError(
                f"step at n={self.n} needs positions up to {self._len + q - 1}, "
                f"beyond max_positions={self.max_positions}"
            )
        self._reserve(q)
        return self._len

    def _end(self, q: int) -> None:
        self._len += q
        self.n += q

    def _run(self, token_ids: Sequence[int], *, last_only: bool = False) -> torch.Tensor:
        q = len(token_ids)
        cached = self._begin(q)
        logits = self.model.forward(
            torch.as_tensor(list(token_ids), dtype=torch.long),
            torch.arange(cached, cached + q),
            self._k,
            self._v,
            cached,
            last_only=last_only,
            keys_rotated=self.dense,  # dense slots == positions, fixed forever
        )
        self._end(q)
        return logits

    def step(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Process tokens ``[n, n+q)``; returns float32 log-probabilities ``[q, vocab]``."""
        return torch.log_softmax(self._run(token_ids), dim=-1)

    def cached_token_count(self) -> int:
        """Tokens currently held in the cache (after the last step's writes)."""
        return self._len

    def score(
        self, token_ids: Sequence[int], chunk_size: int, *, progress: bool = False
    ) -> np.ndarray:
        """Teacher-forced log-probabilities of ``token_ids`` with steps ``[0,c), [c,2c), ...``.

        Element ``i >= 1`` is ``log p(token_i | what the cache holds when it is predicted)``;
        element 0 is NaN. This matches vLLM's ``prompt_logprobs`` for the same chunked steps.
        Resets the stream first.
        """
        self.reset()
        ids = list(token_ids)
        out = np.full(len(ids), np.nan, dtype=np.float64)
        starts = range(0, len(ids), chunk_size)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc="score", unit="step")
        for s in starts:
            chunk = ids[s : s + chunk_size]
            logp = self.step(chunk)
            targets = ids[s + 1 : s + 1 + len(chunk)]
            if targets:
                t = torch.as_tensor(targets, dtype=torch.long)
                out[s + 1 : s + 1 + len(targets)] = (
                    logp[torch.arange(len(targets)), t].double().numpy()
                )
        return out


def step_together(streams: Sequence[StreamingReference], token_ids: Sequence[int]) -> torch.Tensor:
    """One single-token step for each of several streams at once: stream ``b`` processes
    ``token_ids[b]`` at its own ``n``, exactly as ``streams[b].step([token_ids[b]])`` would.

    It exists for speed: a decode step is bound by reading the weights, so the embedding,
    projections, MLP and head run on the ``B`` rows together (one weight read per step for all
    the streams); only the attention, over each stream's own cache and positions, is per stream.
    The arithmetic is ``forward``'s, but a matrix product over several rows rounds differently
    from one over a single row (float32, 8 streams of the embedded model: up to 6e-5 nats over
    the vocabulary, 1e-5 at the argmax; one stream: bit-identical to ``step``). Returns float32
    log-probabilities ``[B, vocab]``.
    """
    streams = list(streams)
    if len(streams) != len(token_ids):
        raise ValueError(f"{len(streams)} streams but {len(token_ids)} tokens")
    if not streams:
        raise ValueError("step_together needs at least one stream")
    model = streams[0].model
    assert all(s.model is model for s in streams), "the streams must share one ReferenceModel"
    assert len({id(s) for s in streams}) == len(streams), "a stream appears twice"
    attentions = []
    for s in streams:
        cached = s._begin(1)
        attentions.append(
            _StepAttention.build(
                model, torch.tensor([cached]), s._k, s._v, cached, keys_rotated=s.dense
            )
        )

    def attend(i: int, qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [a(i, qh[b : b + 1], kh[b : b + 1], vh[b : b + 1]) for b, a in enumerate(attentions)]
        )

    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    # Bookkeeping (_begin/_end: eviction, new caches) stays outside, as in _run: a cache made in
    # inference mode could not be compacted by a later plain step.
    with torch.inference_mode():
        logits = model._head(model._decoder(model.embed[ids], attend))
    for s in streams:
        s._end(1)
    return torch.log_softmax(logits, dim=-1)


def recompute_nll(
    model: ReferenceModel,
    token_ids: Sequence[int],
    window: int,
    *,
    every: int = 1,
    start: int = 1,
    progress: bool = False,
) -> np.ndarray:
    """The paper's "sliding window with re-computation" baseline.

    Token ``t`` is predicted by running the model from scratch on ``[max(0, t-window), t)`` with
    positions ``0..``; only ``t = start, start+every, ...`` are scored (it costs a full window
    forward per token). Returns NLL (``-log p``) per token, NaN where not scored.
    """
    ids = list(token_ids)
    out = np.full(len(ids), np.nan, dtype=np.float64)
    targets = range(max(1, start), len(ids), every)
    if progress:
        from tqdm import tqdm

        targets = tqdm(targets, desc=f"recompute w={window}", unit="tok")
    k, v = model.new_cache(window)
    for t in targets:
        ctx = ids[max(0, t - window) : t]
        logits = model.forward(
            torch.as_tensor(ctx, dtype=torch.long), torch.arange(len(ctx)), k, v, 0, last_only=True
        )
        out[t] = -float(torch.log_softmax(logits[0], dim=-1)[ids[t]])
    return out
