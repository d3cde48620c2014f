"""One script that runs a sink engine through the cases every kernel path and parallel layout
must pass against the reference, in its own interpreter: prompt log-probabilities past
``max_model_len`` and past position rebases, generated tokens, a resumed conversation turn, a
batch of streams of different lengths, a preemption swap and requests sharing an opening
(float32, tiny random Llamas).

Used by ``test_triton_path.py`` (the Triton kernels interpreted) and
``test_tensor_parallel.py`` (two ranks). A case is a dict: ``sink``, ``window``, ``block_size``,
``max_len``, ``rope`` (the checkpoint's RoPE parameters), ``prompt``, ``turn``, ``answer``
(lengths), ``batch`` (prompt lengths; also runs the preemption), ``shared`` (an opening's
length: three requests start from its prefix-cache pages and run past eviction), and optionally
``model``
(``make_tiny_llama`` arguments), ``engine`` (extra ``LLM`` arguments), ``eager`` and ``budget``
(``max_num_batched_tokens``: the batch's prompts must each get their full chunk, ``cap``, per
step, as the reference runs them).
"""

from __future__ import annotations

import json

from engine_utils import Script

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
                        rope_parameters=case["rope"], **case.get("model", {}))
engine = sink_llm(model, SINK, WINDOW, MAX_LEN, dtype="float32", block_size=BS,
                  max_num_batched_tokens=case.get("budget", 256),
                  enforce_eager=case.get("eager", True), **case.get("engine", {}))
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

if case.get("shared"):
    # 5. Requests that start with one opening: prefix-cache pages, shared while they run and
    # copied at each one's first eviction (they evict on different steps).
    manager = core.scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    opening = ids[5600:5600 + case["shared"]]
    greedy([opening + ids[5590:5595]], 4)
    copied = manager.pages_copied
    prompts = [opening + ids[5700 + 50 * i : 5705 + 59 * i] for i in range(3)]
    errors = []
    for p, (o, lp, c) in zip(prompts, greedy(prompts, case["answer"] * 4)):
        stream = ref()
        if c:
            stream.step(p[:c])
        errors.append(check(stream, p[c:], o, lp))
        result.setdefault("shared_cached", []).append(c)
    result["shared"] = max(errors)
    result["shared_copied"] = manager.pages_copied - copied

engine.llm_engine.step()  # the worker hears of the finished requests
infos = engine.collective_rpc("vllm_sink_worker_info")  # one per rank
info = infos[0]
compilation = engine.llm_engine.vllm_config.compilation_config
result["compile_mode"] = compilation.mode.name  # NONE when eager
result.update(backends=info["attention_backends"], moves=info["sink_moves"],
              moves_in_one_write=info["moves_in_one_write"],
              steps_direct=info["steps_direct"], steps_wrapped=info["steps_wrapped"],
              rebases=info["rebases"], free_delta=free_blocks(engine) - start_free,
              ranks=len(infos), same_on_every_rank=all(
                  (i["sink_moves"], i["rebases"]) == (info["sink_moves"], info["rebases"])
                  for i in infos))
print("RESULT " + json.dumps(result), flush=True)
"""


def start_case(case: dict, text_tokens, tmp_path, env: dict[str, str]) -> Script:
    """Start a case's script (``finish_case`` waits for it): several can run side by side."""
    env = {"CASE": json.dumps(case), "TOKENS": json.dumps(text_tokens[:6000]),
           "TMP": str(tmp_path), **env}  # fmt: skip
    return Script(SCRIPT, env)


def run_case(case: dict, text_tokens, tmp_path, env: dict[str, str]) -> dict:
    return finish_case(start_case(case, text_tokens, tmp_path, env))


def finish_case(script: Script) -> dict:
    result, log = script.result()
    kernel_lines = [ln for ln in log.splitlines() if "sink attention runs" in ln]
    result["kernel_line"] = kernel_lines[-1] if kernel_lines else ""
    print(json.dumps(result))
    return result


def assert_parity(case: dict, result: dict) -> None:
    for part in ("prompt", "generated", "resumed", "batch", "preemption", "shared"):
        if part in result:
            assert result[part] <= TOL, f"{part}: max {result[part]:.2e} nats a token"
    # The resumed turn computed only its new tokens.
    assert result["resumed_cached"] == result["resumed_computed"]
    # Past max_model_len, with sinks moved and positions rebased.
    assert case["prompt"] > case["max_len"]
    assert result["moves"] > 0 and result["rebases"] > 0
    # vLLM's layout stacks the layers' caches: a step's moves are one write for all layers.
    assert result["moves_in_one_write"] is True
    # Steps without sink work skipped the wrapper, the others ran it: parity holds for both.
    assert result["steps_direct"] > 0 and result["steps_wrapped"] > 0
    if case.get("batch"):
        assert result["preempted"] and result["swapped_in"] == 1
    if case.get("shared"):
        # Each started from the opening's full pages and copied what it shared at eviction.
        full = case["shared"] // case["block_size"] * case["block_size"]
        assert result["shared_cached"] == [full] * 3, result["shared_cached"]
        assert result["shared_copied"] >= 3
    # Every page back to the pool (finished streams parked there, free and reused last).
    assert result["free_delta"] == 0
    # Every rank moved and rebased the same (each its own heads).
    assert result["same_on_every_rank"]
