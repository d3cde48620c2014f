"""The sink rotator's arithmetic, against complex-number rotation in float64.

Moving a stream's sinks re-rotates its pristine keys by the tokens evicted so far, for every
layer of the bank at once; the engine tests check the end result against the reference, this
checks the rotation itself for each pairing style and partial rotary, and the bank's bookkeeping
(several streams per step, the per-layer fallback where a moving stream also captures). The
write of every layer's moved sinks in one call is checked against per-layer writes on the real
CPU kernel in ``test_stacked_cache``.
"""

from __future__ import annotations

import pytest
import torch

from vllm_sink.attention.rope import SinkBank, SinkRotator
from vllm_sink.attention.sink import SinkCapture, SinkMove, SinkStep

HEAD, HEADS, SINK_LEN, LAYERS = 64, 3, 32, 4


def table(rotary_dim: int, rows: int = 4096) -> torch.Tensor:
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = torch.outer(torch.arange(rows, dtype=torch.float64), inv_freq)
    return torch.cat((angles.cos(), angles.sin()), dim=-1).float()


def expected(keys: torch.Tensor, offset: int, rotary_dim: int, neox: bool) -> torch.Tensor:
    """``keys`` rotated by ``offset`` positions, as complex numbers in float64."""
    x = keys.double()
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    re, im = (rot[..., :half], rot[..., half:]) if neox else (rot[..., ::2], rot[..., 1::2])
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    turned = torch.complex(re, im) * torch.polar(
        torch.ones(half, dtype=torch.float64), offset * inv_freq
    )
    re, im = turned.real, turned.imag
    rot = torch.cat((re, im), -1) if neox else torch.stack((re, im), -1).flatten(-2)
    return torch.cat((rot, rest), -1)


@pytest.mark.parametrize("neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("rotary_dim", [HEAD, HEAD // 2], ids=["full", "partial"])
def test_moves_rotate_every_layer_by_each_streams_offset(neox: bool, rotary_dim: int) -> None:
    torch.manual_seed(0)
    bank = SinkBank()
    cos_sin = table(rotary_dim)
    layers = [SinkRotator(HEAD, rotary_dim, neox, cos_sin, bank) for _ in range(LAYERS)]
    offsets = {11: 32, 12: 1952, 13: 4064}  # sink page -> tokens evicted
    keys = {s: torch.randn(LAYERS, SINK_LEN, HEADS, HEAD) for s in offsets}
    values = {s: torch.randn(LAYERS, SINK_LEN, HEADS, HEAD) for s in offsets}
    capture = SinkStep()
    for i, layer in enumerate(layers):
        for s in offsets:
            job = SinkCapture(key=s, src=0, dst=0, count=SINK_LEN, sink_len=SINK_LEN)
            layer.capture(capture, [job], keys[s][i], values[s][i])
    for moving in ([12], [11, 12, 13]):
        slots = torch.arange(SINK_LEN)
        step = SinkStep(moves=[SinkMove(s, slots, offsets[s]) for s in moving]).to(
            torch.device("cpu")
        )
        all_k, all_v = layers[0].moved(step, every_layer=True)
        for per_layer in (False, True):
            for i, layer in enumerate(layers):
                # The fallback (a moving stream also captures): each layer turns its own.
                got_k, got_v = layer.moved(step) if per_layer else (all_k[i], all_v[i])
                want_k = torch.cat(
                    [expected(keys[s][i], offsets[s], rotary_dim, neox) for s in moving]
                )
                assert got_k.dtype == torch.float32 and got_k.shape == want_k.shape
                # float32: a few ulps of |key| <= ~5 (cos/sin rounded to float32 once).
                assert (got_k.double() - want_k).abs().max().item() < 5e-6
                assert torch.equal(got_v, torch.cat([values[s][i] for s in moving]))


@pytest.mark.parametrize("neox", [True, False], ids=["neox", "gptj"])
def test_rebase_rotation_is_exact_and_inverts(neox: bool) -> None:
    torch.manual_seed(1)
    rotator = SinkRotator(HEAD, HEAD // 2, neox, table(HEAD // 2))
    keys = torch.randn(40, HEADS, HEAD)
    moved = rotator.rotate(keys, 700)
    assert (moved.double() - expected(keys, 700, HEAD // 2, neox)).abs().max().item() < 5e-6
    assert (rotator.rotate(moved, -700) - keys).abs().max().item() < 5e-6
    assert rotator.rotate(keys, 0) is keys
