"""The quality oracle: the pure-PyTorch StreamingLLM reference and its rules.

Runs on the real SmolLM2-135M checkpoint (float32); the whole file takes about a minute or two
on 2 cores.
"""

from __future__ import annotations

import copy
import math
import random

import numpy as np
import pytest
import torch

from vllm_sink.assets import default_model_dir, long_text
from vllm_sink.reference import (
    ReferenceModel,
    StreamingReference,
    first_window_token,
    kept_pages,
    kept_tokens,
    recompute_nll,
    rope_inv_freq,
    slot_positions,
    step_together,
)

# ----------------------------------------------------------------------------- pure rules


@pytest.mark.parametrize(
    ("n", "sink", "window", "bs", "ws", "pages"),
    [
        # sink 4 -> one whole sink page; window a multiple of the page.
        (0, 4, 64, 32, 32, []),
        (100, 4, 64, 32, 32, [0, 1, 2, 3]),  # (100-64)//32 = 1: nothing freed yet
        (127, 4, 64, 32, 32, [0, 1, 2, 3]),  # page 1 ends at 64 > 127-64 = 63
        (128, 4, 64, 32, 64, [0, 2, 3]),  # page 1 ends at 64 <= 64: freed
        (300, 4, 64, 32, 224, [0, 7, 8, 9]),
        # window not a multiple of the page, no sinks.
        (81, 0, 50, 32, 0, [0, 1, 2]),  # page 0 ends at 32 > 81-50 = 31
        (82, 0, 50, 32, 32, [1, 2]),  # 32 <= 32: page 0 freed
        (100, 0, 50, 32, 32, [1, 2, 3]),
        (145, 0, 50, 32, 64, [2, 3, 4]),  # (145-50)//32 = 2
        # sink_tokens > bs: two sink pages (tokens 0..63) pinned.
        (50, 40, 32, 32, 64, [0, 1]),  # sink pages not yet full, no window token cached
        (200, 40, 32, 32, 160, [0, 1, 5, 6]),  # pages 2..4 freed: (4+1)*32 = 160 <= 168
        (191, 40, 32, 32, 128, [0, 1, 4, 5]),
        # another page size
        (1000, 4, 1020, 16, 16, list(range(63))),  # nothing to free before n-W > 0
        (1100, 4, 1020, 16, 80, [0, *range(5, 69)]),  # (1100-1020)//16 = 5
    ],
)
def test_eviction_rule_by_hand(n, sink, window, bs, ws, pages):
    assert first_window_token(n, sink, window, bs) == ws
    assert kept_pages(n, sink, window, bs) == pages


def test_eviction_rule_matches_contract_wording():
    """kept_pages against the contract's sentence, for many random (n, sink, window, bs)."""
    rng = random.Random(0)
    for _ in range(3000):
        bs = rng.choice([16, 32, 64])
        sink = rng.choice([0, 1, 4, bs, bs + 1, 3 * bs])
        window = rng.randint(1, 300)
        n = rng.randint(0, 2000)
        sb = math.ceil(sink / bs)
        started = math.ceil(n / bs)
        expected = [p for p in range(started) if not (p >= sb and (p + 1) * bs <= n - window)]
        assert kept_pages(n, sink, window, bs) == expected, (n, sink, window, bs)
        kept = kept_tokens(n, sink, window, bs)
        # Each later token sees the sink pages plus at least W recent tokens (fewer than W+bs).
        recent = [t for t in kept if t >= sb * bs]
        if n > sb * bs:
            assert min(n - sb * bs, window) <= len(recent) < window + bs


@pytest.mark.parametrize(
    ("n", "q", "sink", "window", "bs", "expected"),
    [
        (128, 3, None, None, 32, [128, 129, 130]),  # dense: plain positions
        (100, 2, 4, 64, 32, [100, 101]),  # no eviction yet: slots == positions
        (128, 3, 4, 64, 32, [96, 97, 98]),  # kept 0..31 and 64..127: 96 slots
        (100, 2, 0, 50, 32, [68, 69]),  # kept 32..99
        (200, 1, 40, 32, 32, [104]),  # kept 0..63 and 160..199
        (50, 4, 40, 32, 32, [50, 51, 52, 53]),  # still inside the sink pages
    ],
)
def test_position_rule_by_hand(n, q, sink, window, bs, expected):
    assert slot_positions(n, q, sink, window, bs) == expected


def test_positions_bounded_by_contract():
    for bs, sink, window, q in [
        (32, 4, 1020, 1),
        (32, 4, 1020, 64),
        (16, 0, 50, 7),
        (32, 40, 33, 5),
    ]:
        sb = math.ceil(sink / bs)
        worst = max(max(slot_positions(n, q, sink, window, bs)) for n in range(0, 5000, 3))
        assert worst < sb * bs + window + bs + q


# ----------------------------------------------------------------------------- RoPE


def test_rope_scaling_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cases = {
        "llama3": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    }
    for kind, params in cases.items():
        hf = LlamaConfig(
            hidden_size=512,
            num_attention_heads=4,
            max_position_embeddings=131072,
            rope_parameters=params,
        )
        expected, _ = ROPE_INIT_FUNCTIONS[kind](hf, None)
        got, dim = rope_inv_freq(
            {"hidden_size": 512, "num_attention_heads": 4, "rope_parameters": params}
        )
        assert dim == 128
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
        plain = {"hidden_size": 512, "num_attention_heads": 4, "rope_theta": params["rope_theta"]}
        assert not torch.allclose(got, rope_inv_freq(plain)[0])  # the scaling did something


def test_rope_partial_and_unknown():
    cfg = {"head_dim": 64, "hidden_size": 576, "num_attention_heads": 9, "rope_theta": 1e4}
    freq, dim = rope_inv_freq({**cfg, "partial_rotary_factor": 0.5})
    assert dim == 32 and freq.shape == (16,)
    with pytest.raises(NotImplementedError, match="yarn"):
        rope_inv_freq({**cfg, "rope_parameters": {"rope_type": "yarn", "factor": 2.0}})


# ----------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def model() -> ReferenceModel:
    return ReferenceModel(default_model_dir())


@pytest.fixture(scope="module")
def tokens() -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    return tok(long_text(min_chars=40_000))["input_ids"][:2048]


def test_dense_matches_transformers(model, tokens):
    """No eviction: the reference is exactly a vanilla causal LM (float32, chunked steps)."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([tokens])).logits[0].float()
    del hf
    expected = torch.log_softmax(logits, -1)[
        torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])
    ]
    expected = expected.double().numpy()

    dense = StreamingReference(model, sink_tokens=None, window_tokens=None).score(tokens, 160)
    assert np.isnan(dense[0])
    err = np.abs(dense[1:] - expected)
    assert err.mean() < 1e-4, err.mean()
    assert err.max() < 1e-2, err.max()
    # Sinks + a window longer than the stream never evict: identical to dense.
    sink = StreamingReference(model, sink_tokens=4, window_tokens=4096).score(tokens, 160)
    np.testing.assert_allclose(sink[1:], dense[1:], atol=1e-5, rtol=0)
    # Sanity of the text/model pairing: a real LM on real text, not noise.
    assert 5 < math.exp(-dense[1:].mean()) < 100


def test_one_layer_step_equals_recompute_over_kept_tokens(model, tokens):
    """With one layer, cached K/V depend only on the token, so each streamed step must equal a
    from-scratch forward over [kept tokens, step tokens] at positions 0.. (slots, rotate at use)."""
    one = copy.copy(model)
    one.layers = model.layers[:1]
    one.num_layers = 1
    sink, window, bs, chunk = 4, 50, 32, 7
    ref = StreamingReference(one, sink_tokens=sink, window_tokens=window, block_size=bs)
    ids = tokens[:400]
    evicting_steps = 0
    for n in range(0, len(ids), chunk):
        step = ids[n : n + chunk]
        kept = kept_tokens(n, sink, window, bs)
        assert ref.positions_for_step(n, len(step))[0] == len(kept)
        got = ref.step(step)
        assert ref.cached_token_count() == len(kept) + len(step)
        fresh = StreamingReference(one, sink_tokens=None, window_tokens=None)
        ctx = [ids[t] for t in kept] + step
        want = fresh.step(ctx)[len(kept) :]
        torch.testing.assert_close(got, want, atol=2e-4, rtol=0)
        evicting_steps += len(kept) < n
    assert evicting_steps > 40


def test_step_together_equals_separate_steps(model, tokens):
    """Streams decoded together (one batched pass over the weights) are each the stream stepped
    alone, up to the rounding of the batched products (and bit for bit one at a time). Three
    windowed streams at different lengths evict on different steps (their caches, slots and
    positions all differ), plus a dense one; the model is cut to four layers for speed (the
    attention is the per-stream part, the same in every layer)."""
    few = copy.copy(model)
    few.layers = model.layers[:4]
    few.num_layers = 4
    sink, window, bs, steps = 4, 32, 16, 60
    # Windowed: before a step at n >= 64 with n % 16 == 0 a page is freed, so from n = 40, 53, 70
    # the streams evict at steps 24/40/56, 11/27/43/59 and 0/10/26/42/58 (the 70-token prefill
    # ran at n = 0 and evicted nothing; page 1 goes before the first decode step, at n = 70).
    prefills = [40, 53, 70, 12]
    alone = [
        StreamingReference(few, sink_tokens=sink, window_tokens=window, block_size=bs)
        for _ in range(3)
    ]
    alone.append(StreamingReference(few, sink_tokens=None, window_tokens=None))
    texts = [tokens[300 * b : 300 * b + prefills[b] + steps + 1] for b in range(len(alone))]
    for ref, text, length in zip(alone, texts, prefills, strict=True):
        ref.step(text[:length])
    together = [ref.fork() for ref in alone]
    evicted_at: list[set[int]] = [set() for _ in alone]
    for j in range(steps):
        ids = [text[length + j] for text, length in zip(texts, prefills, strict=True)]
        before = [ref.cached_token_count() for ref in together]
        got = step_together(together, ids)
        assert got.shape == (len(alone), few.vocab_size) and got.dtype == torch.float32
        for b, (ref, twin) in enumerate(zip(alone, together, strict=True)):
            want = ref.step([ids[b]])
            # Matrix products over B rows round differently from one row's (float32: measured
            # < 4e-6 of |log-prob| here, < 1e-5 at the argmax on the full model); a stream
            # batched with the wrong cache or positions is off by more than 1e-2.
            torch.testing.assert_close(got[b : b + 1], want, atol=1e-5, rtol=2e-5)
            assert twin.n == ref.n == prefills[b] + j + 1
            assert twin.cached_token_count() == ref.cached_token_count()
            if twin.cached_token_count() <= before[b]:
                evicted_at[b].add(j)
    assert evicted_at == [{24, 40, 56}, {11, 27, 43, 59}, {0, 10, 26, 42, 58}, set()], evicted_at
    # One stream alone through step_together, from the same state: step's products, bit for bit.
    for ref, text, length in zip(alone, texts, prefills, strict=True):
        twin, t = ref.fork(), text[length + steps]
        assert torch.equal(step_together([twin], [t]), ref.step([t]))


def test_sink_deviates_from_dense_only_after_eviction(model, tokens):
    sink, window, bs, chunk = 4, 200, 32, 16
    ids = tokens[:640]
    dense = StreamingReference(model, sink_tokens=None, window_tokens=None).score(ids, chunk)
    streamed = StreamingReference(model, sink_tokens=sink, window_tokens=window).score(ids, chunk)
    # First step that runs with evicted pages: its outputs predict tokens from first_evict+1 on.
    first_evict = next(
        n for n in range(0, len(ids), chunk) if len(kept_tokens(n, sink, window, bs)) < n
    )
    assert first_evict == 272  # (272-200)//32 = 2 > sb: page 1 freed
    before = slice(1, first_evict + 1)
    np.testing.assert_allclose(streamed[before], dense[before], atol=1e-5, rtol=0)
    after = np.abs(streamed[first_evict + 1 :] - dense[first_evict + 1 :])
    assert after.mean() > 1e-3, after.mean()


def test_window_without_sinks_differs_from_sinks(model, tokens):
    """The two streamed modes keep different pages after eviction and so must differ."""
    ids = tokens[:512]
    a = StreamingReference(model, sink_tokens=0, window_tokens=128).score(ids, 64)
    b = StreamingReference(model, sink_tokens=4, window_tokens=128).score(ids, 64)
    np.testing.assert_allclose(a[1:129], b[1:129], atol=1e-5, rtol=0)
    assert np.abs(a[200:] - b[200:]).mean() > 1e-2


def test_recompute_baseline(model, tokens):
    ids = tokens[:200]
    window, every = 64, 40
    nll = recompute_nll(model, ids, window, every=every)
    scored = np.flatnonzero(~np.isnan(nll))
    assert scored.tolist() == list(range(1, 200, every))
    dense = -StreamingReference(model, sink_tokens=None, window_tokens=None).score(ids, 64)
    for t in scored:
        if t <= window:  # the whole prefix fits: same as dense
            assert nll[t] == pytest.approx(dense[t], abs=1e-4)
        else:  # a fresh dense run on exactly the last `window` tokens
            ctx = ids[t - window : t + 1]
            fresh = -StreamingReference(model, sink_tokens=None, window_tokens=None).score(ctx, 65)
            assert nll[t] == pytest.approx(fresh[-1], abs=1e-4)
            assert abs(nll[t] - dense[t]) > 1e-4


def test_rope_angles_are_exact_at_any_position():
    """Position x frequency in float64: float32 would round the angle by up to ~5e-4 rad at
    8,000 and differently at each position, which shifted positions would see as noise."""
    from vllm_sink.reference import _cos_sin, rope_inv_freq

    inv, _ = rope_inv_freq({"hidden_size": 64, "num_attention_heads": 1, "rope_theta": 1e5})
    pos = torch.tensor([3, 4000, 8191, 100_000])
    cos, sin = _cos_sin(inv, pos, torch.float32)
    angles = pos.double()[:, None] * inv.double()[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    assert (cos.double() - angles.cos()).abs().max() < 1e-7
    assert (sin.double() - angles.sin()).abs().max() < 1e-7
    rounded = (pos.float()[:, None] * inv[None, :]).double()  # what float32 angles would give
    assert (rounded.cos() - angles[:, :32].cos()).abs().max() > 1e-5
