"""Parity at the model's own positions: ``max_position_embeddings`` not shrunk.

The engine gives each request positions shifted from its cache slots (RoPE only sees
differences) and rebases them only when they near the model's limit, so on a long stream they
climb thousands above the slots. Float32 RoPE angles round differently there than at the
reference's slots; both sides compute the angles in float64
(``vllm_sink.attention.rope.exact_cos_sin``, ``vllm_sink.reference._cos_sin``), and this checks
the engine holds the same float32 tolerance as with shrunk positions. Its own module: one
in-process engine at a time (a second engine torn down beside another takes vLLM's process-wide
parallel state with it).
"""

from __future__ import annotations

import gc

import numpy as np
from test_engine_sink import BS, CHUNK, MEAN_TOL, SINK, TOL, WINDOW, _llm

from engine_utils import prompt_logprobs


def test_parity_at_the_models_own_positions(model_dir, text_tokens):
    """The model's own ``max_position_embeddings`` (8,192, not shrunk): the engine's positions
    climb ~7,800 above the cache slots before it rebases them. RoPE only sees differences, but
    float32 angles (vLLM's and transformers' tables) round differently at those positions than at
    the reference's slots. Measured on this stream with float32 angles on both sides: max 8.1e-4,
    mean 2.6e-5 nats, 4.6 % of tokens above 1e-4 (the engine's alone: the same); with float64
    angles (``exact_cos_sin``): max 8.7e-5, mean 5.0e-6, the same as with shrunk positions.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_sink.reference import ReferenceModel, StreamingReference

    ids = text_tokens[:9000]
    engine = _llm(model_dir, max_model_len=1024, max_num_seqs=1)
    try:
        core = engine.llm_engine
        params = SamplingParams(max_tokens=1, prompt_logprobs=0)
        core.add_request("full", TokensPrompt(prompt_token_ids=ids), params)
        final, max_offset = None, 0
        while core.has_unfinished_requests():
            for out in core.step():
                final = out if out.finished else final
            (streams,) = engine.collective_rpc("vllm_sink_streams")
            max_offset = max([max_offset, *(s["offset"] for s in streams.values())])
    finally:
        del engine
        gc.collect()
    # Positions reached 7,000+ above the slots (rebased before 8,192), as the docstring says.
    assert 7000 < max_offset < 8192, max_offset
    got = prompt_logprobs(final, ids)
    reference = ReferenceModel(model_dir)
    ref = StreamingReference(reference, sink_tokens=SINK, window_tokens=WINDOW, block_size=BS)
    diff = np.abs(got - ref.score(ids, CHUNK))[1:]
    measured = f"max {diff.max():.2e} mean {diff.mean():.2e} nats over {len(diff)} tokens"
    print(f"parity at the model's own positions: {measured}")
    assert diff.max() <= TOL and diff.mean() <= MEAN_TOL, measured
