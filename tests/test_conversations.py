"""Conversations: every turn continues one stream, at a constant cost per turn.

Two ways to continue a stream, both checked on the real engine (embedded model, float32, sink 4,
window 128, ``max_model_len`` and the model's positions shrunk to 512) against the reference run
as one stream with the same steps (``conversation_utils``):

- vLLM's streaming-input sessions (``AsyncLLM.generate`` fed ``StreamingInput`` chunks);
- resumed streams: a request whose tokens extend a finished stream's tokens takes over its
  parked pages (vLLM's prefix-caching switch, on by default) and prefills only its new suffix.
"""

from __future__ import annotations

import gc
import math
import statistics

import numpy as np
import pytest

from conversation_utils import greedy_result, reference_stream, reference_turn
from engine_utils import free_blocks, kv_manager, run_script, sink_llm

SINK, WINDOW, MAX_LEN, BS = 4, 128, 512, 32
ANSWER = 20  # generated tokens per turn
TOL = 1e-4  # float32: nats per token
BOUND = math.ceil(SINK / BS) + math.ceil(WINDOW / BS) + 1  # pages held between steps


def _stream(model_dir):
    """A fresh reference stream."""
    return reference_stream(model_dir, SINK, WINDOW, BS)


@pytest.fixture(scope="module")
def reference(model_dir):
    return _stream(model_dir)


def _check_turn(ref, prefill, outputs, logprobs, cap, where: str) -> float:
    """The engine's sampled tokens are the reference's greedy choices, log-probs within TOL."""
    choices, ref_lp, margins = reference_turn(ref, prefill, outputs, cap)
    if list(outputs) != choices:
        j = next(j for j, (a, b) in enumerate(zip(outputs, choices, strict=True)) if a != b)
        raise AssertionError(
            f"{where}: output {j} is {outputs[j]}, the reference chooses {choices[j]} "
            f"(margin {margins[j]:.2e} nats; engine log-prob {logprobs[j]:.5f}, reference "
            f"{ref_lp[j]:.5f}); prefill of {len(prefill)} tokens starting {list(prefill[:4])}"
        )
    err = float(np.max(np.abs(np.asarray(logprobs) - ref_lp)))
    assert err < TOL, f"{where}: log-prob error {err:.2e} nats"
    return err


# ------------------------------------------------------------------------- streaming sessions

SESSION_SCRIPT = """
import asyncio, json, os, sys, time
import prometheus_client
from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.engine.protocol import StreamingInput
from vllm.inputs import TokensPrompt
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM

SINK, WINDOW, MAX_LEN, ANSWER = {sink}, {window}, {max_len}, {answer}


async def session(engine, name, chunks, abort_in_turn=None):
    sp = SamplingParams(max_tokens=ANSWER, temperature=0, ignore_eos=True, logprobs=0,
                        output_kind=RequestOutputKind.DELTA)
    turn_done = asyncio.Event()
    sent = []

    async def inputs():
        for c in chunks:
            turn_done.clear()
            sent.append(time.monotonic())
            # A copy: vLLM's front end extends the first chunk's list with every later chunk.
            yield StreamingInput(prompt=TokensPrompt(prompt_token_ids=list(c)))
            await turn_done.wait()

    turns = [dict(outputs=[], logprobs=[]) for _ in chunks]
    t = 0
    gen = engine.generate(inputs(), sp, name)
    async for out in gen:
        turn = turns[t]
        c = out.outputs[0]
        if c.token_ids and "ttft" not in turn:
            turn["ttft"] = time.monotonic() - sent[t]
        turn["outputs"] += c.token_ids
        turn["logprobs"] += [step[tok].logprob for tok, step in zip(c.token_ids, c.logprobs)]
        if abort_in_turn == t and len(turn["outputs"]) >= ANSWER // 2:
            break  # the client goes away mid-turn: vLLM aborts the session
        if len(turn["outputs"]) >= ANSWER:
            (streams,) = await engine.collective_rpc("vllm_sink_streams")
            turn["stream"] = next(v for k, v in streams.items() if k.startswith(name))
            t += 1
            turn_done.set()
            if t == len(chunks):
                break
    await gen.aclose()
    return turns[: t + 1] if abort_in_turn is not None else turns


def gauge(name):
    return prometheus_client.REGISTRY.get_sample_value(
        name, {{"model_name": os.environ["TEST_MODEL"], "engine": "0"}}
    )


async def main():
    with open(os.environ["TEST_TOKENS_FILE"]) as f:
        ids = json.load(f)
    plan = json.loads(os.environ["TEST_PLAN"])
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=os.environ["TEST_MODEL"], block_size=32, enforce_eager=True, dtype="float32",
        max_model_len=MAX_LEN, hf_overrides={{"max_position_embeddings": MAX_LEN}}, seed=0,
        additional_config={{"vllm_sink": {{"sink_tokens": SINK, "window_tokens": WINDOW}}}}))
    cap = engine.vllm_config.scheduler_config.long_prefill_token_threshold
    result = {{"cap": cap, "sessions": {{}}}}
    for name, spec in plan.items():
        chunks, pos = [], spec["start"]
        for size in spec["sizes"]:
            chunks.append(ids[pos : pos + size])
            pos += size
        turns = await session(engine, name, chunks, spec.get("abort_in_turn"))
        result["sessions"][name] = {{"chunks": chunks, "turns": turns}}
    # One more request after the abort, so the engine reports its state after freeing.
    sp = SamplingParams(max_tokens=2, temperature=0)
    async for _ in engine.generate(TokensPrompt(prompt_token_ids=ids[:40]), sp, "probe"):
        pass
    await asyncio.sleep(0.5)
    result["kv_cache_usage"] = gauge("vllm:kv_cache_usage_perc")
    result["pages_held"] = gauge("vllm_sink:kv_pages_held")
    result["worker_streams"] = (await engine.collective_rpc("vllm_sink_streams"))[0]
    engine.shutdown()
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
"""


def _session_plan() -> dict:
    # "long": 50 turns of 100-token chunks (the acceptance case).
    # "edges": chunk sizes chosen so that turns start alternately on and off a page edge.
    sizes, start = [], 0
    for k in range(12):
        size = 70 + (-(start + 70 + ANSWER - 1) % BS if k % 2 == 0 else 5)
        sizes.append(size)
        start += size + ANSWER - 1  # the session drops each turn's last sampled token
    return {
        "long": {"start": 0, "sizes": [100] * 50},
        "edges": {"start": 20_000, "sizes": sizes},
        "aborted": {"start": 40_000, "sizes": [100] * 4, "abort_in_turn": 3},
    }


@pytest.fixture(scope="module")
def sessions(model_dir, text_tokens, tmp_path_factory):
    import json

    tokens = tmp_path_factory.mktemp("sessions") / "tokens.json"
    tokens.write_text(json.dumps(text_tokens[:50_000]))
    env = {
        "TEST_MODEL": str(model_dir),
        "TEST_TOKENS_FILE": str(tokens),
        "TEST_PLAN": json.dumps(_session_plan()),
    }
    script = SESSION_SCRIPT.format(sink=SINK, window=WINDOW, max_len=MAX_LEN, answer=ANSWER)
    result, _ = run_script(script, env, timeout=1500)
    return result


def test_session_fifty_turns_constant_cost(sessions):
    turns = sessions["sessions"]["long"]["turns"]
    assert len(turns) == 50
    stream_tokens = [t["stream"]["tokens"] for t in turns]
    # The stream the worker holds: every chunk and every computed answer token.
    assert stream_tokens == [100 * (k + 1) + (ANSWER - 1) * k for k in range(50)]
    assert stream_tokens[-1] > max(20 * WINDOW, MAX_LEN)
    # Each turn prefills exactly its new tokens (counted by the worker from what it computes).
    assert [t["stream"]["prefilled"] for t in turns] == [100] * 50
    assert all(t["stream"]["continued"] for t in turns[1:])
    offsets = [t["stream"]["offset"] for t in turns]
    assert any(b < a for a, b in zip(offsets, offsets[1:], strict=False)), (
        "no position rebase happened"
    )
    assert max(t["stream"]["pages"] for t in turns) <= BOUND
    ttft = [t["ttft"] for t in turns]
    early, late = statistics.median(ttft[2:7]), statistics.median(ttft[45:50])
    print(f"TTFT turn 5 {ttft[4]:.3f}s, turn 50 {ttft[49]:.3f}s; medians {early:.3f} {late:.3f}")
    # Medians of five turns around turn 5 and the last five: one turn is too noisy a sample.
    assert late <= 1.5 * early


def test_sessions_match_reference(sessions, reference):
    """Whole conversations, turn boundaries on and off page edges, across rebases."""
    cap = sessions["cap"]
    for name in ("long", "edges"):
        session = sessions["sessions"][name]
        reference.reset()
        starts, n = [], 0
        for k, (chunk, turn) in enumerate(zip(session["chunks"], session["turns"], strict=True)):
            starts.append(n)
            _check_turn(
                reference, chunk, turn["outputs"], turn["logprobs"], cap, f"{name} turn {k + 1}"
            )
            n += len(chunk) + ANSWER - 1
        if name == "edges":
            assert any(s % BS == 0 for s in starts[1:]) and any(s % BS for s in starts[1:])


def test_aborted_session_frees_every_page(sessions):
    turns = sessions["sessions"]["aborted"]["turns"]
    assert len(turns) == 4 and len(turns[3]["outputs"]) < ANSWER  # cut mid-turn
    assert sessions["kv_cache_usage"] == 0.0
    assert sessions["pages_held"] == 0
    assert sessions["worker_streams"] == {}


# ---------------------------------------------------------------------------- resumed streams


@pytest.fixture(scope="module")
def llm(model_dir):
    engine = sink_llm(
        model_dir, SINK, WINDOW, MAX_LEN, dtype="float32", max_num_batched_tokens=2048
    )
    yield engine
    del engine
    gc.collect()


def _generate(llm, prompts, answer=ANSWER):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=answer, temperature=0, ignore_eos=True, logprobs=0)
    prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [greedy_result(o) for o in outs]


def _cap(llm) -> int:
    return llm.llm_engine.vllm_config.scheduler_config.long_prefill_token_threshold


def test_resent_history_resumes_and_matches_reference(llm, reference, text_tokens):
    """A chat client resending its history: each turn prefills only its new tokens."""
    assert llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
    cap = _cap(llm)
    reference.reset()
    history, pos, computed = [], 60_000, 0
    starts = []
    for k in range(10):
        # The next turn starts on a page edge after even turns, off one after odd turns.
        size = 64 if k % 2 else 41 + (-(len(history) + 41 + ANSWER - 1) % BS)
        history += text_tokens[pos : pos + size]
        pos += size
        ((outputs, logprobs, cached),) = _generate(llm, [history])
        # Resumed from everything the last turn computed (all but its last sampled token).
        assert cached == computed
        starts.append(computed)
        _check_turn(reference, history[computed:], outputs, logprobs, cap, f"turn {k + 1}")
        history += outputs
        computed = len(history) - 1
    assert len(history) > 5 * WINDOW and len(history) > MAX_LEN
    assert any(s % BS == 0 for s in starts[1:]) and any(s % BS for s in starts[1:])


def test_interleaved_conversations_and_one_owner(llm, model_dir, text_tokens):
    """Eight conversations sharing a system prompt, batched turn by turn, then two concurrent
    requests extending one finished stream (both continue it, each on its own copy): each
    matches its own solo reference stream."""
    cap = _cap(llm)
    system = text_tokens[70_000:70_040]  # the same first page for every conversation
    convs = [list(system) for _ in range(8)]
    refs = [_stream(model_dir) for _ in range(8)]
    computed = [0] * 8
    manager = kv_manager(llm).coordinator.single_type_managers[0]
    for turn in range(3):
        for i in range(8):
            start = 71_000 + 1_000 * i + 100 * turn
            convs[i] += text_tokens[start : start + 60]
        results = _generate(llm, convs, answer=20)
        for i, (outputs, logprobs, cached) in enumerate(results):
            where = f"conversation {i} turn {turn + 1}"
            assert cached == computed[i], f"{where} did not resume"
            _check_turn(refs[i], convs[i][computed[i] :], outputs, logprobs, cap, where)
            convs[i] += outputs
            computed[i] = len(convs[i]) - 1
    # Two requests extend conversation 0's finished stream at once: both continue it.
    resumed_before = manager.parked.resumed
    a = convs[0] + text_tokens[80_000:80_030]
    b = convs[0] + text_tokens[81_000:81_045]
    results = _generate(llm, [a, b], answer=20)
    assert [r[2] for r in results] == [computed[0]] * 2
    assert manager.parked.resumed == resumed_before + 2
    for prompt, (outputs, logprobs, cached) in zip((a, b), results, strict=True):
        ref = refs[0].fork()  # the stream as conversation 0 left it
        _check_turn(ref, prompt[cached:], outputs, logprobs, cap, f"extension, cached={cached}")


# ------------------------------------------------------------- a pool too small to keep them


@pytest.fixture(scope="module")
def small_pool_llm(model_dir):
    engine = sink_llm(
        model_dir,
        SINK,
        WINDOW,
        MAX_LEN,
        dtype="float32",
        max_num_batched_tokens=2048,
        num_gpu_blocks_override=24,
    )
    yield engine
    del engine
    gc.collect()


def _run_turn(llm, req_id, prompt, answer, on_step=None):
    """One request through the engine step by step; ``on_step(outputs_so_far)`` may act."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    params = SamplingParams(max_tokens=answer, temperature=0, ignore_eos=True, logprobs=0)
    engine.add_request(req_id, TokensPrompt(prompt_token_ids=list(prompt)), params)
    last = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            last = out
        if on_step is not None and last is not None and on_step(list(last.outputs[0].token_ids)):
            on_step = None
    c = last.outputs[0]
    return (
        list(c.token_ids),
        [s[t].logprob for t, s in zip(c.token_ids, c.logprobs or [], strict=True)],
        last.num_cached_tokens,
        last.finished,
    )


def test_small_pool_reclaims_aborts_and_preemption(small_pool_llm, model_dir, text_tokens):
    """Parked streams give way to new requests; whatever is resumed afterwards is right."""
    llm = small_pool_llm
    cap = _cap(llm)
    manager = kv_manager(llm).coordinator.single_type_managers[0]
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    start_free = free_blocks(llm)
    # Conversation 0 talks every other request and stays recent; 1..4 wait their turn and
    # their parked pages are reclaimed (least recently parked first) before they come back.
    convs = {i: [] for i in range(5)}
    refs = {i: _stream(model_dir) for i in range(5)}
    computed = dict.fromkeys(convs, 0)
    order = [0, 1, 0, 2, 0, 3, 0, 4] * 2
    kinds = []
    for n, i in enumerate(order):
        start = 90_000 + 2_000 * i + 50 * n
        convs[i] += text_tokens[start : start + 50]
        outputs, logprobs, cached, _ = _run_turn(llm, f"c{i}-{n}", convs[i], 20)
        assert cached in (0, computed[i])
        if cached == 0 and computed[i]:
            refs[i] = _stream(model_dir)  # reclaimed: computed from scratch, never wrong
            kinds.append("re-prefill")
        elif cached:
            kinds.append("resumed")
        _check_turn(refs[i], convs[i][cached:], outputs, logprobs, cap, f"c{i} request {n}")
        convs[i] += outputs
        computed[i] = len(convs[i]) - 1
    assert "resumed" in kinds and "re-prefill" in kinds, kinds
    assert manager.parked.reclaimed > 0

    # An aborted request leaves no stream to resume (it may have been cut mid-step): its
    # extension starts from its whole pages computed before any eviction (prefix-cache pages,
    # as on vanilla vLLM), and computes the rest as a fresh stream.
    prompt = text_tokens[95_000:95_070]
    seen = {}

    def abort_after_ten(outputs):
        if len(outputs) >= 10:
            seen["outputs"] = outputs
            llm.llm_engine.abort_request(["aborted"])
            return True
        return False

    _run_turn(llm, "aborted", prompt, 200, abort_after_ten)
    extension = prompt + seen["outputs"] + text_tokens[96_000:96_030]
    outputs, logprobs, cached, _ = _run_turn(llm, "after-abort", extension, 20)
    assert cached == (len(prompt) + len(seen["outputs"]) - 1) // BS * BS
    ref = _stream(model_dir)
    ref.step(extension[:cached])
    _check_turn(ref, extension[cached:], outputs, logprobs, cap, "after abort")

    # A preempted request resumes where it stopped (the contract's recovery): one stream across
    # the preemption; what it parks afterwards continues that stream.
    prompt = text_tokens[97_000:97_060]
    state = {}

    def preempt_after_five(outputs):
        if len(outputs) >= 5:
            state["k"] = len(outputs)
            scheduler.reset_prefix_cache(reset_running_requests=True)
            return True
        return False

    outputs, logprobs, cached, _ = _run_turn(llm, "preempted", prompt, 20, preempt_after_five)
    assert state["k"] < len(outputs)
    ref = _stream(model_dir)
    _check_turn(ref, prompt, outputs, logprobs, cap, "across the preemption")
    history = prompt + outputs + text_tokens[98_000:98_040]
    outputs2, logprobs2, cached2, _ = _run_turn(llm, "after-preemption", history, 20)
    assert cached2 == len(prompt) + len(outputs) - 1
    _check_turn(ref, history[cached2:], outputs2, logprobs2, cap, "resumed after preemption")

    assert free_blocks(llm) == start_free  # parked pages count as free: nothing leaked
