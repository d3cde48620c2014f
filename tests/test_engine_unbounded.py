"""Streams far past ``max_model_len`` in bf16: long prompts, long generations, bounded pages.

``max_model_len`` and ``max_position_embeddings`` are shrunk to 512 so "beyond the model's
length" is cheap to reach; the stream here is 9x that.
"""

from __future__ import annotations

import gc
import math

import numpy as np
import pytest

from engine_utils import free_blocks, pages_held, prompt_logprobs, run_script, sink_llm

SINK, WINDOW, CHUNK, BS, MAX_LEN = 4, 256, 64, 32, 512
PROMPT, GENERATE = 3072, 1536


@pytest.fixture(scope="module")
def llm(model_dir):
    engine = sink_llm(
        model_dir,
        SINK,
        WINDOW,
        MAX_LEN,
        dtype="bfloat16",
        max_num_batched_tokens=CHUNK,
        max_num_seqs=4,
    )
    yield engine
    del engine
    gc.collect()


@pytest.mark.timeout(2400)
def test_long_prompt_and_generation_with_bounded_pages(llm, text_tokens):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    start_free = free_blocks(llm)
    bound = math.ceil(SINK / BS) + math.ceil(WINDOW / BS) + 1 + math.ceil(CHUNK / BS)
    engine.add_request(
        "long",
        TokensPrompt(prompt_token_ids=text_tokens[:PROMPT]),
        # No per-request seed: vLLM 0.32 on CPU fails seeded requests in chunked prefill
        # ("CPU Generator does not use offset"), with or without this plugin.
        SamplingParams(max_tokens=GENERATE, temperature=0.8, ignore_eos=True),
    )
    peak, generated, finished = 0, 0, False
    while not finished:
        for out in engine.step():
            generated = len(out.outputs[0].token_ids)
            finished = out.finished
        held = pages_held(llm, "long")
        peak = max(peak, held)
        assert held <= bound, f"{held} pages held > bound {bound} after {generated} tokens"
    assert generated == GENERATE
    assert math.ceil(WINDOW / BS) <= peak <= bound
    assert free_blocks(llm) == start_free


VANILLA = """
import json, os
import numpy as np
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
if __name__ == "__main__":
    ids = json.loads(os.environ["TEST_IDS"])
    llm = LLM(model=os.environ["TEST_MODEL"], block_size=32, max_model_len=len(ids) + 16,
              dtype="bfloat16", enforce_eager=True, max_num_batched_tokens=64)
    (out,) = llm.generate(TokensPrompt(prompt_token_ids=ids),
                          SamplingParams(max_tokens=1, prompt_logprobs=0))
    lp = [out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))]
    print("RESULT " + json.dumps(lp), flush=True)
"""


def test_bf16_parity_within_vanilla_bf16_noise(llm, model_dir, text_tokens):
    """bf16 vs the float32 reference: no worse than 1.5x vanilla bf16 vs the dense reference."""
    import json

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_sink.reference import StreamingReference

    ids = text_tokens[:PROMPT]
    (out,) = llm.generate(
        TokensPrompt(prompt_token_ids=ids), SamplingParams(max_tokens=1, prompt_logprobs=0)
    )
    ours = prompt_logprobs(out, ids)
    # The reference takes the engine's steps: the plugin caps a request's step below the model's
    # position limit (long_prefill_token_threshold), and a reference scored in other steps
    # evicts elsewhere. (Shrunk to window 128 / 256 positions, the cap is 63: scored in 64-token
    # steps, the reference differed from a float32 engine by 0.12 nats a token, from 5.7e-6.)
    cap = llm.llm_engine.vllm_config.scheduler_config.long_prefill_token_threshold or CHUNK
    assert cap <= CHUNK
    sink_ref = StreamingReference(model_dir, sink_tokens=SINK, window_tokens=WINDOW).score(ids, cap)
    ours_diff = np.abs(ours - sink_ref)[1:]

    dense_ids = text_tokens[:1024]
    vanilla, _ = run_script(
        VANILLA, {"TEST_MODEL": str(model_dir), "TEST_IDS": json.dumps(dense_ids)}
    )
    dense_ref = StreamingReference(model_dir, sink_tokens=None, window_tokens=None).score(
        dense_ids, CHUNK
    )
    vanilla_diff = np.abs(np.array(vanilla) - dense_ref[1:])
    early, late = ours_diff[: len(ours_diff) // 4].mean(), ours_diff[-len(ours_diff) // 4 :].mean()
    print(
        f"bf16: ours {ours_diff.mean():.4f} (early {early:.4f}, late {late:.4f}), "
        f"vanilla {vanilla_diff.mean():.4f}"
    )
    assert ours_diff.mean() <= 1.5 * vanilla_diff.mean()
    assert late <= 1.5 * early, "bf16 deviation grows with stream length (drift)"
