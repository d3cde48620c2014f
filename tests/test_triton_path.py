"""The GPU path, proven on this machine: the sink wrapper over ``TRITON_ATTN`` (its metadata
builder, KV layout, cache writer and paged kernel), run by the real CPU engine with
``VLLM_SINK_TRITON_ON_CPU=1`` (Triton's interpreter on CPU tensors), against the reference.

Each engine runs in its own interpreter (``run_script``): the simulation hands vLLM's kernel
modules the real Triton for the rest of its process. Tiny random Llamas keep the interpreter's
cost to a few minutes: grouped-query attention (4 query heads over 2 KV heads), partial rotary
and 16-token pages with sinks spanning two pages; full rotary with Llama-3 scaling and 64-token
pages. Every stream runs past ``max_model_len`` and past position rebases (counted by the worker).

The same cases run on CUDA where one is present (``test_cuda_*``, skipped here): they have never
run on GPU hardware.
"""

from __future__ import annotations

import pytest
import torch

from engine_utils import ROPE_VARIANTS, SIDE_BY_SIDE, Script
from stream_cases import assert_parity, finish_case, run_case, start_case

CASES = {
    # Sinks of 20 tokens span two 16-token pages; positions capped at 128.
    "16-token pages, partial rotary": dict(
        sink=20, window=40, block_size=16, max_len=128, rope=ROPE_VARIANTS["partial rotary"],
        prompt=300, turn=100, answer=16, batch=[90, 170, 260], shared=48,
    ),
    "64-token pages, llama3": dict(
        sink=4, window=100, block_size=64, max_len=256, rope=ROPE_VARIANTS["llama3"],
        prompt=500, turn=300, answer=12,
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def triton_runs(text_tokens, tmp_path_factory) -> dict[str, dict]:
    """Both cases, side by side (the interpreter computes on one thread): name -> result."""
    env = {"VLLM_SINK_TRITON_ON_CPU": "1", **SIDE_BY_SIDE}
    scripts = {
        name: start_case(case, text_tokens, tmp_path_factory.mktemp("triton"), env)
        for name, case in CASES.items()
    }
    return {name: finish_case(script) for name, script in scripts.items()}


@pytest.fixture(params=list(CASES))
def triton_on_cpu(request, triton_runs):
    return CASES[request.param], triton_runs[request.param]


def test_triton_path_matches_the_reference(triton_on_cpu):
    """Prompt, generated tokens, a resumed turn, a batch of different lengths and a preemption
    swap on the Triton sink path: float32, max at most 1e-4 nats a token."""
    case, result = triton_on_cpu
    assert_parity(case, result)


def test_triton_path_is_what_ran(triton_on_cpu):
    """The engine ran the sink wrapper over TRITON_ATTN's kernels, and its log says so."""
    _, result = triton_on_cpu
    assert result["backends"] == ["SinkTritonAttentionBackend"]
    assert "TRITON_ATTN (interpreted on CPU" in result["kernel_line"]


def test_switch_changes_nothing_without_the_plugins_settings(model_dir):
    """``VLLM_SINK_TRITON_ON_CPU=1`` on an engine without ``vllm_sink`` settings: the stock
    ``CPU_ATTN`` backend, output identical to the same engine without the switch."""
    code = r"""
import json, os, sys
sys.path.insert(0, "tests")
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
llm = LLM(model=os.environ["MODEL"], block_size=32, max_model_len=256, dtype="float32",
          enforce_eager=True, seed=0)
(o,) = llm.generate(TokensPrompt(prompt_token_ids=list(range(300, 400))),
                    SamplingParams(max_tokens=8, temperature=0, logprobs=0), use_tqdm=False)
runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
backends = sorted({g.backend.__name__ for groups in runner.attn_groups for g in groups})
import vllm.triton_utils as tu
out = {"tokens": list(o.outputs[0].token_ids),
       "logprobs": [s[t].logprob for t, s in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)],
       "backends": backends, "triton_placeholder": type(tu.triton).__name__}
print("RESULT " + json.dumps(out), flush=True)
"""
    # Side by side, one thread each: the same thread count in both, so the same bits.
    scripts = [
        Script(code, {"MODEL": str(model_dir), "VLLM_SINK_TRITON_ON_CPU": flag, **SIDE_BY_SIDE})
        for flag in ("1", "0")
    ]
    (on, _), (off, _) = (script.result() for script in scripts)
    assert on["backends"] == ["CPUAttentionBackend"]
    assert on["triton_placeholder"] == "TritonPlaceholder"
    assert on["tokens"] == off["tokens"] and on["logprobs"] == off["logprobs"]


# ------------------------------------------------------------------------------------- CUDA

cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device (these have not run on GPU hardware)"
)


@cuda
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_triton_path_matches_the_reference(name, text_tokens, tmp_path):
    """The same cases on a CUDA engine (TRITON_ATTN compiled, Model Runner V1, piecewise CUDA
    graphs), with the GPU opt-in."""
    case = {**CASES[name], "eager": False}
    env = {"VLLM_SINK_GPU_UNVERIFIED": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    result = run_case(case, text_tokens, tmp_path, env)
    assert_parity(case, result)
    assert result["backends"] == ["SinkTritonAttentionBackend"]
