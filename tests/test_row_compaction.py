"""The worker compacts a running request's row of vLLM's persistent batch in place
(:func:`vllm_sink.worker.streams.compact_row`): the row must equal the one vLLM's own
``add_request`` builds from the compacted request, and a request whose state the batch keeps
elsewhere (penalties, custom logits processors, a lowered ``min_tokens``) must leave the batch
to be re-added. Real vLLM ``InputBatch`` objects, no engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import LogitsProcessors
from vllm.v1.worker.gpu_input_batch import CachedRequestState, InputBatch

from vllm_sink.worker.streams import compact_row

BS = 32


def _batch(logitsprocs: LogitsProcessors | None = None) -> InputBatch:
    return InputBatch(
        max_num_reqs=4,
        max_model_len=512,
        max_num_batched_tokens=512,
        device=torch.device("cpu"),
        vocab_size=1000,
        block_sizes=[BS],
        max_num_blocks_per_req=[16],
        logitsprocs=logitsprocs,
    )


def _request(req_id: str, params: SamplingParams) -> CachedRequestState:
    rng = np.random.default_rng(len(req_id))
    prompt = rng.integers(0, 1000, 100).tolist()
    return CachedRequestState(
        req_id=req_id,
        prompt_token_ids=prompt,
        mm_features=[],
        sampling_params=params,
        generator=None,
        block_ids=([7, 3, 9, 4, 11, 2, 5],),
        num_computed_tokens=199,
        output_token_ids=rng.integers(0, 1000, 100).tolist(),
    )


def _evict(req: CachedRequestState, tokens: int) -> None:
    """What the worker's eviction does to a request: two pages after the sink page go."""
    req.prompt_token_ids = req.prompt_token_ids[:BS] + req.prompt_token_ids[BS + tokens :]
    req.num_prompt_tokens = len(req.prompt_token_ids)
    del req.block_ids[0][1 : 1 + tokens // BS]


def _row(batch: InputBatch, req_id: str) -> dict:
    i = batch.req_id_to_index[req_id]
    n = int(batch.num_tokens_no_spec[i])
    table = batch.block_table[0]
    pages = int(table.num_blocks_per_row[i])
    return {
        "tokens": batch.token_ids_cpu[i, :n].tolist(),
        "num_prompt_tokens": int(batch.num_prompt_tokens[i]),
        "num_tokens": n,
        "pages": table.block_table.np[i, :pages].tolist(),
        "outputs": list(batch.req_output_token_ids[i]),
    }


def test_row_compacted_in_place_equals_a_re_added_row():
    batch = _batch()
    others = [_request(f"r{i}", SamplingParams(temperature=0.0)) for i in range(3)]
    for req in others:
        batch.add_request(req)
    batch.refresh_metadata()
    req = others[1]
    _evict(req, 2 * BS)
    compact_row(batch, req.req_id, req)
    assert batch.req_id_to_index[req.req_id] == 1  # stayed in its row
    assert not batch.batch_update_builder.batch_changed  # no metadata rebuild
    fresh = _batch()
    fresh.add_request(req)
    assert _row(batch, req.req_id) == _row(fresh, req.req_id)
    assert _row(batch, req.req_id)["pages"] == [7, 4, 11, 2, 5]
    for other in (others[0], others[2]):
        alone = _batch()
        alone.add_request(other)
        assert _row(batch, other.req_id) == _row(alone, other.req_id)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(repetition_penalty=1.2),
        SamplingParams(presence_penalty=0.5),
        SamplingParams(frequency_penalty=0.5),
        SamplingParams(min_tokens=300, max_tokens=400),
    ],
)
def test_requests_the_batch_keeps_more_of_leave_it(params):
    batch = _batch()
    req = _request("r", params)
    batch.add_request(req)
    _evict(req, BS)
    compact_row(batch, "r", req)
    assert "r" not in batch.req_id_to_index  # vLLM's own update re-adds it


def test_lowered_min_tokens_and_custom_processors_leave_it():
    batch = _batch()
    req = _request("r", SamplingParams(temperature=0.0))
    batch.add_request(req)
    compact_row(batch, "r", req, in_place=False)  # the worker lowered its min_tokens
    assert "r" not in batch.req_id_to_index

    class Custom:  # a logits processor vLLM did not ship: it may keep anything
        def is_argmax_invariant(self) -> bool:
            return False

    batch = _batch(LogitsProcessors([Custom()]))
    batch.add_request(req)
    compact_row(batch, "r", req)
    assert "r" not in batch.req_id_to_index
