"""Many concurrent streams past ``max_model_len``, mixed sampling, aborts, preemption: no leaks."""

from __future__ import annotations

import gc
import math
import random

import pytest

from engine_utils import free_blocks, kv_manager, sink_llm

SINK, WINDOW, CHUNK, BS = 4, 128, 64, 32
STREAMS = 16
# A decoding stream holds sb + ceil(W/bs) + 1 = 6 pages (more while prefilling): a pool of
# 60 blocks cannot hold 16 of them at once, so admission must wait for freed pages.
POOL_BLOCKS = 60


@pytest.fixture(scope="module")
def llm(model_dir):
    engine = sink_llm(
        model_dir,
        SINK,
        WINDOW,
        512,
        max_num_seqs=STREAMS,
        max_num_batched_tokens=CHUNK * 4,
        num_gpu_blocks_override=POOL_BLOCKS,
    )
    yield engine
    del engine
    gc.collect()


def test_concurrent_streams_aborts_and_preemption_leak_nothing(llm, text_tokens):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    manager = kv_manager(llm).coordinator.single_type_managers[0]
    start_free = free_blocks(llm)
    rng = random.Random(0)
    expected: dict[str, int] = {}
    for i in range(STREAMS):
        plen = 400 + 30 * i  # 400 .. 850 tokens: with the output, every stream passes 512
        max_tokens = rng.randint(140, 260)
        sampled = i % 2 == 1
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=0.9 if sampled else 0.0,
            # No per-request seed: vLLM 0.32 on CPU fails seeded requests in chunked prefill.
            seed=None,
            ignore_eos=True,
        )
        start = 500 * i
        prompt = TokensPrompt(prompt_token_ids=text_tokens[start : start + plen])
        engine.add_request(f"s{i}", prompt, params)
        expected[f"s{i}"] = max_tokens
    to_abort = {"s3", "s8", "s12", "s15"}
    bound = math.ceil(SINK / BS) + math.ceil(WINDOW / BS) + 1 + math.ceil(CHUNK * 4 / BS)
    finished: dict[str, int] = {}
    max_preemptions, steps = 0, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = len(out.outputs[0].token_ids)
        steps += 1
        if steps == 40:
            # Preempt every running request (vLLM's own mechanism, used for weight updates):
            # they are recomputed from their tokens when resumed.
            scheduler.reset_prefix_cache(reset_running_requests=True)
        if steps == 60:
            engine.abort_request(sorted(to_abort))
        for req_id, request in scheduler.requests.items():
            max_preemptions = max(max_preemptions, request.num_preemptions)
            assert manager.num_pages_held(req_id) <= bound
    survivors = set(expected) - to_abort
    assert survivors <= set(finished)
    for req_id in survivors:
        assert finished[req_id] == expected[req_id]
    assert max_preemptions > 0, "requests should have been preempted and resumed"
    assert free_blocks(llm) == start_free
