"""Shared openings: requests that start alike share their pages, as vanilla prefix caching does.

Real engine, embedded model, float32, sink 4, window 128, 32-token pages, ``max_model_len`` and
the model's positions shrunk to 512. A 160-token opening (five full pages) is computed once; every
later request that starts with it starts from its pages (``num_cached_tokens`` == 160). Each
request is checked against the reference run as its own fresh stream with the same steps (the
cached opening is one step: nothing is evicted before it).
"""

from __future__ import annotations

import gc
import math

import numpy as np
import pytest

from conversation_utils import greedy_result, reference_stream, reference_turns
from engine_utils import free_blocks, kv_manager, sink_llm

SINK, WINDOW, MAX_LEN, BS = 4, 128, 512, 32
OPENING = 160  # five full pages
BOUND = math.ceil(SINK / BS) + math.ceil(WINDOW / BS) + 1  # pages held between steps
TOL = 1e-4  # float32: nats per token


def _reference(model_dir):
    return reference_stream(model_dir, SINK, WINDOW, BS)


@pytest.fixture(scope="module")
def llm(model_dir):
    engine = sink_llm(
        model_dir, SINK, WINDOW, MAX_LEN, dtype="float32", max_num_batched_tokens=2048
    )
    yield engine
    del engine
    gc.collect()


def _generate(llm, prompts, answer):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=answer, temperature=0, ignore_eos=True, logprobs=0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [greedy_result(o) for o in outs]


def _step_all(llm, prompts, answer, on_step):
    """``prompts`` through the engine step by step; ``on_step(scheduler)`` after each step."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    params = SamplingParams(max_tokens=answer, temperature=0, ignore_eos=True, logprobs=0)
    for i, p in enumerate(prompts):
        engine.add_request(f"s{i}", TokensPrompt(prompt_token_ids=p), params)
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id.split("-")[0]] = out  # internal ids get a suffix
        on_step(scheduler)
    return [greedy_result(final[f"s{i}"]) for i in range(len(prompts))]


def _error(model_dir, llm, prompt, result, where: str) -> float:
    """The request's outputs are the reference's greedy choices; returns the largest log-prob
    error (nats). The reference computes the cached tokens as one step, then the same steps."""
    (error,) = _errors(model_dir, llm, [prompt], [result], where)
    return error


def _errors(model_dir, llm, prompts, results, where: str) -> list[float]:
    """:func:`_error` for several requests, their references' decode steps run together; the
    message names each request as ``{where} {index}``."""
    cap = llm.llm_engine.vllm_config.scheduler_config.long_prefill_token_threshold
    refs, prefills = [], []
    for prompt, (_, _, cached) in zip(prompts, results, strict=True):
        ref = _reference(model_dir)
        if cached:
            ref.step(prompt[:cached])
        refs.append(ref)
        prefills.append(prompt[cached:])
    turns = reference_turns(refs, prefills, [r[0] for r in results], cap)
    errors = []
    for i, ((outputs, logprobs, _), (choices, ref_lp, _)) in enumerate(
        zip(results, turns, strict=True)
    ):
        assert list(outputs) == choices, f"{where} {i}: outputs differ from the reference's choices"
        errors.append(float(np.max(np.abs(np.asarray(logprobs) - ref_lp))))
    return errors


def _worker_counts(llm) -> tuple[int, int]:
    (info,) = llm.collective_rpc("vllm_sink_worker_info")
    return info["sink_moves"], info["rebases"]


def test_concurrent_streams_share_an_opening_past_eviction_and_rebase(llm, model_dir, text_tokens):
    """One warm-up request computes the opening; eight requests then start from its pages and
    run at once, each past its first eviction (its sinks move while the others still read the
    shared pages) and past a position rebase. Their questions differ in length, so each moves
    and rebases on its own steps: without the copy on write they read each other's sinks (by
    hand: errors of 0.07-0.26 nats, wrong tokens)."""
    manager = kv_manager(llm).coordinator.single_type_managers[0]
    start_free = free_blocks(llm)
    opening = text_tokens[1000 : 1000 + OPENING]
    warm = opening + text_tokens[5000:5020]
    (result,) = _generate(llm, [warm], 40)
    assert result[2] == 0
    assert _error(model_dir, llm, warm, result, "warm-up") <= TOL

    copied, (moves, rebases) = manager.pages_copied, _worker_counts(llm)
    prompts = [opening + text_tokens[6000 + 100 * i : 6010 + 109 * i] for i in range(8)]
    seen = {}

    def pages(scheduler):
        """After the first step (every prompt's rest, in one step): the opening's pages are
        held once for all eight. After each decode step: each request within the bound."""
        if not seen:
            rids = list(scheduler.requests)
            seen["sum"] = sum(manager.num_pages_held(r) for r in rids)
            seen["distinct"] = manager.num_distinct_pages_held(rids)
            pool = manager.block_pool
            seen["pool"] = pool.num_gpu_blocks - 1 - pool.get_num_free_blocks()
            return
        for rid in scheduler.requests:
            seen["max"] = max(seen.get("max", 0), manager.num_pages_held(rid))

    results = _step_all(llm, prompts, 400, pages)  # 570-643 tokens: past eviction, max_model_len
    shared = OPENING // BS
    assert seen["distinct"] == seen["pool"] == seen["sum"] - 7 * shared, seen
    assert seen["max"] <= BOUND + 1, seen  # the bound, plus a decode step's page
    assert [r[2] for r in results] == [OPENING] * 8  # the opening's full pages, for each
    errors = _errors(model_dir, llm, prompts, results, "request")
    print(f"shared opening: max error per request {[f'{e:.1e}' for e in errors]} nats")
    assert max(errors) <= TOL
    # Each copied the shared pages it still held at its first eviction; all moved and rebased.
    new_moves, new_rebases = _worker_counts(llm)
    assert manager.pages_copied - copied >= 8 * 4, manager.pages_copied - copied
    assert new_moves - moves >= 8 and new_rebases - rebases >= 8
    assert free_blocks(llm) == start_free


def test_one_finished_stream_continued_twice_from_the_prefix_cache(llm, model_dir, text_tokens):
    """A finished stream that never evicted: two requests extending it both start from its
    pages (prefix cache and parked stream agree) and both match the reference."""
    start_free = free_blocks(llm)
    prompt = text_tokens[20_000:20_100]
    (first,) = _generate(llm, [prompt], 10)
    history = prompt + first[0]
    a = history + text_tokens[21_000:21_030]
    b = history + text_tokens[22_000:22_047]
    results = _generate(llm, [a, b], 20)
    assert [r[2] for r in results] == [len(history) - 1] * 2
    for p, r in zip((a, b), results, strict=True):
        assert _error(model_dir, llm, p, r, "extension") <= TOL
    assert free_blocks(llm) == start_free


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


def test_small_pool_shares_and_reclaims(small_pool_llm, model_dir, text_tokens):
    """24 pages for eight requests that each need up to 7 past eviction: they wait, are
    preempted and swapped; shared pages go back to the pool only when no one holds them. Every
    output is the reference's and the free count returns to its start."""
    llm = small_pool_llm
    manager = kv_manager(llm).coordinator.single_type_managers[0]
    start_free = free_blocks(llm)
    opening = text_tokens[30_000 : 30_000 + OPENING]
    warm = opening + text_tokens[31_000:31_010]
    (result,) = _generate(llm, [warm], 10)
    assert _error(model_dir, llm, warm, result, "warm-up") <= TOL
    prompts = [opening + text_tokens[32_000 + 100 * i : 32_010 + 107 * i] for i in range(8)]
    results = _generate(llm, prompts, 150)
    assert any(r[2] == OPENING for r in results)
    errors = _errors(model_dir, llm, prompts, results, "request")
    assert max(errors) <= TOL, errors
    assert free_blocks(llm) == start_free
    pool = manager.block_pool
    assert all(b.ref_cnt == 0 for b in pool.blocks if not b.is_null)
