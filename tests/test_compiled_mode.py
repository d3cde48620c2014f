"""vLLM's default mode (``torch.compile``, no ``enforce_eager``) with eviction, on the CPU
backend: one compiled graph for the whole model (vLLM 0.32 on CPU traces it once, no splitting
ops) that calls attention as an opaque custom op, so the sink backend and the cache-slot RoPE it
applies run inside it and must give the reference's log-probabilities there too (the run: max
error ~2e-6 nats a token). A tiny random Llama keeps the compile to seconds; the cases are the
ones every kernel path passes (``stream_cases``): float32, a prompt past ``max_model_len`` and
past position rebases, generated tokens, a resumed turn, a batch of different lengths, a
preemption swap and requests sharing an opening; sinks of 36 tokens span two pages. The
benchmarks run the embedded model compiled (``benchmarks/``).
"""

from __future__ import annotations

import pytest

from engine_utils import ROPE_VARIANTS
from stream_cases import assert_parity, run_case

CASE = dict(
    sink=36, window=64, block_size=32, max_len=256, rope=ROPE_VARIANTS["partial rotary"],
    prompt=600, turn=150, answer=24, batch=[90, 170, 260], budget=512, shared=96, eager=False,
)  # fmt: skip


@pytest.fixture(scope="module")
def compiled(text_tokens, tmp_path_factory):
    return run_case(CASE, text_tokens, tmp_path_factory.mktemp("compiled"), {})


def test_compiled_engine_matches_the_reference(compiled):
    assert compiled["compile_mode"] != "NONE"
    assert_parity(CASE, compiled)
    assert compiled["backends"] == ["SinkCPUAttentionBackend"]
