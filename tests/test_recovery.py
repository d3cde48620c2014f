"""Bounded recovery: a stream preempted at 50,000 tokens resumes where it stopped.

The worker copies the pages the contract keeps when the request is preempted and the scheduler
gives it fresh pages and its computed tokens back when it resumes (contract, "Recovery"), so
resuming costs no recomputation of the stream, whatever its length: the step that resumes it
schedules only its uncomputed tokens (counted from the scheduler's output), and it computes
exactly what it would have computed without the preemption (compared token by token, log-prob by
log-prob, with the same request run unpreempted).
"""

from __future__ import annotations

import gc

import numpy as np

from engine_utils import free_blocks, sink_llm

SINK, WINDOW, BS, MAX_LEN = 4, 128, 32, 512
PROMPT, OUTPUTS, PREEMPT_AT = 50_000, 120, 40


def _run(engine, scheduler, req_id, prompt, preempt: bool):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=OUTPUTS, temperature=0, ignore_eos=True, logprobs=0)
    engine.add_request(req_id, TokensPrompt(prompt_token_ids=prompt), params)
    steps: list[tuple[int, int]] = []
    schedule = scheduler.schedule

    def recording_schedule(*args, **kwargs):
        out = schedule(*args, **kwargs)
        for rid, q in out.num_scheduled_tokens.items():
            steps.append((scheduler.requests[rid].num_computed_tokens - q, q))
        return out

    scheduler.schedule = recording_schedule
    preempted_after = None
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    c = out.outputs[0]
                    result = (
                        list(c.token_ids),
                        [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids, strict=True)],
                    )
            (request,) = scheduler.requests.values() or [None]
            if (
                preempt
                and preempted_after is None
                and request is not None
                and request.num_output_tokens == PREEMPT_AT
            ):
                scheduler.reset_prefix_cache(reset_running_requests=True)
                preempted_after = len(steps)
                assert request.num_preemptions == 1
    finally:
        scheduler.schedule = schedule
    return result, steps, preempted_after


def test_stream_preempted_at_50k_tokens_resumes_where_it_stopped(tmp_path, text_tokens):
    from vllm_sink.assets import make_tiny_llama

    model = make_tiny_llama(tmp_path / "tiny", max_position_embeddings=MAX_LEN)
    engine = sink_llm(
        model, SINK, WINDOW, MAX_LEN, dtype="float32", enable_prefix_caching=False,
        max_num_batched_tokens=512,
    )  # fmt: skip
    try:
        core = engine.llm_engine.engine_core.engine_core
        scheduler = core.scheduler
        start_free = free_blocks(engine)
        prompt = text_tokens[:PROMPT]
        (tokens, logprobs), _, _ = _run(engine.llm_engine, scheduler, "plain", prompt, False)
        (tokens2, logprobs2), steps, at = _run(
            engine.llm_engine, scheduler, "preempted", prompt, True
        )
        engine.llm_engine.step()  # the worker hears of the finished request
        (state,) = engine.collective_rpc("vllm_sink_request_state")
        assert free_blocks(engine) == start_free
        assert scheduler.num_swapped_in == 1 and not scheduler.swapped
    finally:
        del engine
        gc.collect()
    assert at is not None, "the request was never preempted"
    # The step that resumes it continues at the token it stopped at, and schedules only what
    # was not computed yet: no replay of the stream.
    n_before, q_before = steps[at - 1]
    n_resume, q_resume = steps[at]
    assert n_resume == n_before + q_before > PROMPT
    assert q_resume <= SINK + WINDOW + BS
    print(f"resumed at token {n_resume} with a {q_resume}-token step")
    # It computes what it would have computed unpreempted, token for token.
    assert len(tokens2) == OUTPUTS
    assert tokens2 == tokens
    diff = np.abs(np.array(logprobs2) - np.array(logprobs))
    print(f"log-prob difference after the resume: max {diff.max():.2e}")
    assert diff.max() <= 1e-5
    assert state["streams"] == state["swapped"] == state["pristine"] == 0
