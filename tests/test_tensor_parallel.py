"""Tensor parallel with eviction (issue 26, item 1): two ranks on this machine, one core each.

Every rank receives the same scheduler output, so each compacts the same rows, keeps the same
offsets and moves the sinks of its own KV heads; the scheduler's view is unchanged. A tiny random
Llama with grouped-query attention (4 query heads over 2 KV heads: one KV head per rank) runs the
cases every layout must pass (``stream_cases``) against the reference, float32: a prompt past
``max_model_len`` and past position rebases, generated tokens, a resumed turn, a batch of
different lengths and a preemption swap. The embedded model (9 query heads, 3 KV heads) cannot be
split over two ranks at all (vLLM requires the heads to divide by the ranks).

vLLM's CPU backend starts two workers only with their cores named
(``VLLM_CPU_OMP_THREADS_BIND="0|1"``: "Not enough allowed NUMA nodes" otherwise).
"""

from __future__ import annotations

import pytest

from engine_utils import ROPE_VARIANTS
from stream_cases import assert_parity, run_case

CASE = dict(
    sink=4, window=64, block_size=32, max_len=256, rope=ROPE_VARIANTS["default"],
    prompt=600, turn=150, answer=16, batch=[90, 170, 260], budget=512, shared=96,
    model={"num_heads": 4, "num_kv_heads": 2},
    engine={"tensor_parallel_size": 2},
)  # fmt: skip


@pytest.fixture(scope="module")
def two_ranks(text_tokens, tmp_path_factory):
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    return run_case(CASE, text_tokens, tmp_path_factory.mktemp("tp2"), env)


def test_two_ranks_match_the_reference(two_ranks):
    assert_parity(CASE, two_ranks)
    assert two_ranks["ranks"] == 2
    assert two_ranks["backends"] == ["SinkCPUAttentionBackend"]
