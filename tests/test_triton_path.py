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

import json

import pytest
import torch

from engine_utils import ROPE_VARIANTS, run_script

TOL = 1e-4  # float32, nats a token

SCRIPT = r"""
import gc, json, os, sys
sys.path.insert(0, "tests")
import numpy as np
from pathlib import Path
from vllm import SamplingParams
from vllm.inputs import TokensPrompt
from conversation_utils import reference_turn
from engine_utils import free_blocks, prompt_logprobs, sink_llm
from vllm_sink.assets import make_tiny_llama
from vllm_sink.reference import StreamingReference

case = json.loads(os.environ["CASE"])
ids = json.loads(os.environ["TOKENS"])
SINK, WINDOW, BS, MAX_LEN = case["sink"], case["window"], case["block_size"], case["max_len"]
model = make_tiny_llama(Path(os.environ["TMP"]) / "tiny", max_position_embeddings=MAX_LEN,
                        rope_parameters=case["rope"])
engine = sink_llm(model, SINK, WINDOW, MAX_LEN, dtype="float32", block_size=BS,
                  max_num_batched_tokens=256, enforce_eager=case.get("eager", True))
cap = engine.llm_engine.vllm_config.scheduler_config.long_prefill_token_threshold
core = engine.llm_engine.engine_core.engine_core
start_free = free_blocks(engine)
result = {"cap": cap}


def ref():
    return StreamingReference(model, sink_tokens=SINK, window_tokens=WINDOW, block_size=BS)


def greedy(prompts, n):
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=0)
    outs = engine.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                           use_tqdm=False)
    return [(list(o.outputs[0].token_ids),
             [s[t].logprob for t, s in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)],
             o.num_cached_tokens) for o in outs]


def check(stream, prefill, outputs, logprobs):
    # The engine's greedy tokens are the reference's choices; returns the log-prob error.
    choices, ref_lp, margins = reference_turn(stream, prefill, outputs, cap)
    same = [a == b or m < 1e-4 for a, b, m in zip(outputs, choices, margins)]
    assert all(same), f"tokens differ from the reference: {outputs} vs {choices}"
    return float(np.max(np.abs(np.asarray(logprobs) - ref_lp)))


# 1. Prompt log-probabilities over a long prompt.
prompt = ids[:case["prompt"]]
(out,) = engine.generate(TokensPrompt(prompt_token_ids=prompt),
                         SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
got = prompt_logprobs(out, prompt)
result["prompt"] = float(np.nanmax(np.abs(got - ref().score(prompt, cap))[1:]))

# 2. Generated tokens, then a resumed turn (the history resent with new tokens).
stream = ref()
history = ids[1000:1000 + case["turn"]]
((outputs, lps, _),) = greedy([history], case["answer"])
result["generated"] = check(stream, history, outputs, lps)
computed = len(history) + len(outputs) - 1
history = history + outputs + ids[2000:2017]
((outputs, lps, cached),) = greedy([history], case["answer"])
result["resumed_cached"], result["resumed_computed"] = cached, computed
result["resumed"] = check(stream, history[computed:], outputs, lps)

if case.get("batch"):
    # 3. A batch of streams of different lengths, each its own reference stream.
    prompts = [ids[3000 + 500 * i : 3000 + 500 * i + n] for i, n in enumerate(case["batch"])]
    outs = greedy(prompts, case["answer"])
    result["batch"] = max(check(ref(), p, o, lp) for p, (o, lp, _) in zip(prompts, outs))

    # 4. Preempted mid-stream (swapped out, resumed into fresh pages).
    scheduler = core.scheduler
    swapped_before = scheduler.num_swapped_in
    prompt = ids[5000:5000 + case["prompt"] // 2]
    params = SamplingParams(max_tokens=case["answer"], temperature=0, ignore_eos=True, logprobs=0)
    engine.llm_engine.add_request("preempted", TokensPrompt(prompt_token_ids=prompt), params)
    preempted = False
    while engine.llm_engine.has_unfinished_requests():
        for o in engine.llm_engine.step():
            if o.finished:
                c = o.outputs[0]
                final = (list(c.token_ids), [s[t].logprob for t, s in zip(c.token_ids, c.logprobs)])
        (request,) = scheduler.requests.values() or [None]
        if not preempted and request is not None and request.num_output_tokens == 5:
            scheduler.reset_prefix_cache(reset_running_requests=True)
            preempted = request.num_preemptions == 1
    result["preempted"] = preempted
    result["swapped_in"] = scheduler.num_swapped_in - swapped_before
    result["preemption"] = check(ref(), prompt, *final)

engine.llm_engine.step()  # the worker hears of the finished requests
(info,) = engine.collective_rpc("vllm_sink_worker_info")
result.update(backends=info["attention_backends"], moves=info["sink_moves"],
              rebases=info["rebases"], free_delta=free_blocks(engine) - start_free)
print("RESULT " + json.dumps(result), flush=True)
"""

CASES = {
    # Sinks of 20 tokens span two 16-token pages; positions capped at 128.
    "16-token pages, partial rotary": dict(
        sink=20, window=40, block_size=16, max_len=128, rope=ROPE_VARIANTS["partial rotary"],
        prompt=400, turn=150, answer=24, batch=[90, 170, 260],
    ),
    "64-token pages, llama3": dict(
        sink=4, window=100, block_size=64, max_len=256, rope=ROPE_VARIANTS["llama3"],
        prompt=500, turn=300, answer=12,
    ),
}  # fmt: skip


def _run_case(case: dict, text_tokens, tmp_path, env: dict[str, str]) -> dict:
    result, log = run_script(
        SCRIPT,
        {
            "CASE": json.dumps(case),
            "TOKENS": json.dumps(text_tokens[:6000]),
            "TMP": str(tmp_path),
            **env,
        },
    )
    kernel_lines = [ln for ln in log.splitlines() if "sink attention runs" in ln]
    result["kernel_line"] = kernel_lines[-1] if kernel_lines else ""
    print(json.dumps(result))
    return result


def _assert_parity(case: dict, result: dict) -> None:
    for part in ("prompt", "generated", "resumed", "batch", "preemption"):
        if part in result:
            assert result[part] <= TOL, f"{part}: max {result[part]:.2e} nats a token"
    # The resumed turn computed only its new tokens.
    assert result["resumed_cached"] == result["resumed_computed"]
    # Past max_model_len, with sinks moved and positions rebased.
    assert case["prompt"] > case["max_len"]
    assert result["moves"] > 0 and result["rebases"] > 0
    if case.get("batch"):
        assert result["preempted"] and result["swapped_in"] == 1
    # Every page back to the pool (finished streams parked there, free and reused last).
    assert result["free_delta"] == 0


@pytest.fixture(scope="module", params=list(CASES))
def triton_on_cpu(request, text_tokens, tmp_path_factory):
    case = CASES[request.param]
    env = {"VLLM_SINK_TRITON_ON_CPU": "1"}
    return case, _run_case(case, text_tokens, tmp_path_factory.mktemp("triton"), env)


def test_triton_path_matches_the_reference(triton_on_cpu):
    """Prompt, generated tokens, a resumed turn, a batch of different lengths and a preemption
    swap on the Triton sink path: float32, max at most 1e-4 nats a token."""
    case, result = triton_on_cpu
    _assert_parity(case, result)


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
    on, _ = run_script(code, {"MODEL": str(model_dir), "VLLM_SINK_TRITON_ON_CPU": "1"})
    off, _ = run_script(code, {"MODEL": str(model_dir), "VLLM_SINK_TRITON_ON_CPU": "0"})
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
    result = _run_case(case, text_tokens, tmp_path, env)
    _assert_parity(case, result)
    assert result["backends"] == ["SinkTritonAttentionBackend"]
