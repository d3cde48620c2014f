"""The plugin caps each request's tokens per step, not the whole step's token budget.

A compacted request must fit its sink pages, window and one step's tokens below the model's
positions, so one request's prefill chunk is capped (``long_prefill_token_threshold``); the
step's budget (``max_num_batched_tokens``) stays the user's, so the chunks of many prompts still
share one step, as in vanilla vLLM.
"""

from __future__ import annotations

import gc

import pytest

from engine_utils import free_blocks, sink_llm

SINK, WINDOW, BS, MAX_LEN, BUDGET = 4, 256, 32, 512, 1024
# max_model_len - 1 - (sink page + window + one page) = 511 - 320
CAP = MAX_LEN - 1 - (BS + WINDOW + BS)


@pytest.fixture(scope="module")
def llm(model_dir):
    engine = sink_llm(
        model_dir, SINK, WINDOW, MAX_LEN, max_num_batched_tokens=BUDGET, max_num_seqs=8
    )
    yield engine
    del engine
    gc.collect()


def _computed(scheduler, external_id: str) -> int:
    (rid,) = [r for r in scheduler.requests if r.rsplit("-", 1)[0] == external_id]
    return scheduler.requests[rid].num_computed_tokens


def test_config_caps_the_request_not_the_step(llm):
    config = llm.llm_engine.vllm_config.scheduler_config
    assert config.max_num_batched_tokens == BUDGET
    assert config.long_prefill_token_threshold == CAP


def test_lone_request_chunks_at_the_cap(llm, text_tokens):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    start_free = free_blocks(llm)
    engine.add_request(
        "lone", TokensPrompt(prompt_token_ids=text_tokens[:1000]), SamplingParams(max_tokens=4)
    )
    chunks, done, prev = [], False, 0
    while not done:
        outs = engine.step()
        if "lone" in {r.rsplit("-", 1)[0] for r in scheduler.requests}:
            now = _computed(scheduler, "lone")
            chunks.append(now - prev)
            prev = now
        done = any(o.finished for o in outs)
    # vLLM would give a lone request the whole 1024-token budget; the plugin keeps it to CAP.
    assert max(chunks) == CAP, chunks
    assert free_blocks(llm) == start_free


def test_short_prompts_share_one_step(llm, text_tokens):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    start_free = free_blocks(llm)
    plen, n = CAP - 11, 4  # 720 tokens in all: more than CAP, within the step budget
    for i in range(n):
        ids = text_tokens[100 * i : 100 * i + plen]
        engine.add_request(
            f"s{i}", TokensPrompt(prompt_token_ids=ids), SamplingParams(max_tokens=3)
        )
    engine.step()
    assert [_computed(scheduler, f"s{i}") for i in range(n)] == [plen] * n
    finished = 0
    while finished < n:
        finished += sum(o.finished for o in engine.step())
    assert free_blocks(llm) == start_free
