"""Sink eviction inside the real engine, against the pure-PyTorch reference.

One float32 engine (sink 4, a window that is not a multiple of the page, a prefill chunk that
does not divide the window) with ``max_model_len`` and ``max_position_embeddings`` shrunk to 512
serves the parity and page-bound checks: every stream here is longer than the model's length.
"""

from __future__ import annotations

import gc
import math

import numpy as np
import pytest

from engine_utils import free_blocks, pages_held, prompt_logprobs

SINK, WINDOW, CHUNK, BS = 4, 300, 48, 32
PARITY_TOKENS = 6144
MAX_LEN = 512


def _bound(window=WINDOW, sink=SINK, chunk=CHUNK) -> int:
    """Contract: sb + ceil(W/bs) + 1 pages, plus the pages of the tokens in flight."""
    return math.ceil(sink / BS) + math.ceil(window / BS) + 1 + math.ceil(chunk / BS)


def _llm(model_dir, **kwargs):
    from vllm import LLM

    args = dict(
        model=str(model_dir),
        block_size=BS,
        enforce_eager=True,
        dtype="float32",
        max_num_batched_tokens=CHUNK,
        enable_chunked_prefill=True,
        seed=0,
        additional_config={"vllm_sink": {"sink_tokens": SINK, "window_tokens": WINDOW}},
    )
    args.update(kwargs)
    return LLM(**args)


@pytest.fixture(scope="module")
def llm(model_dir):
    engine = _llm(
        model_dir,
        max_model_len=MAX_LEN,
        hf_overrides={"max_position_embeddings": MAX_LEN},
        max_num_seqs=4,
    )
    yield engine
    del engine
    gc.collect()


def test_shared_opening_is_never_a_prefix_cache_hit(llm, text_tokens):
    """Prefix caching is on (vLLM's default), yet two streams that share their first pages
    never share them: a sink page's keys depend on how far its own window has slid."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    assert llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
    params = SamplingParams(max_tokens=4, temperature=0)
    shared = text_tokens[:96]
    for tail in (text_tokens[1000:1040], text_tokens[2000:2040]):
        (out,) = llm.generate([TokensPrompt(prompt_token_ids=shared + tail)], params)
        assert out.num_cached_tokens == 0


def test_parity_with_reference_float32(llm, model_dir, text_tokens):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_sink.reference import StreamingReference

    ids = text_tokens[:PARITY_TOKENS]
    (out,) = llm.generate(
        TokensPrompt(prompt_token_ids=ids), SamplingParams(max_tokens=1, prompt_logprobs=0)
    )
    engine = prompt_logprobs(out, ids)
    ref = StreamingReference(model_dir, sink_tokens=SINK, window_tokens=WINDOW, block_size=BS)
    reference = ref.score(ids, CHUNK)
    diff = np.abs(engine - reference)[1:]
    early, late = diff[: len(diff) // 4].mean(), diff[-len(diff) // 4 :].mean()
    print(f"parity: mean {diff.mean():.2e} early {early:.2e} late {late:.2e} max {diff.max():.2e}")
    assert diff.mean() <= 1e-3
    assert late <= max(2 * early, 1e-4), "deviation grows with stream length (drift)"
    # Eviction really happened and matters: the sink stream is not the dense one.
    dense = StreamingReference(model_dir, sink_tokens=None, window_tokens=None, block_size=BS)
    dense_lp = dense.score(ids[:1536], CHUNK)
    assert np.nanmean(np.abs(dense_lp - reference[:1536])) > 50 * diff[:1535].mean()


def test_pages_held_stay_bounded_every_step(llm, text_tokens):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    start_free = free_blocks(llm)
    prompt = text_tokens[1000:1700]  # longer than max_model_len
    engine.add_request(
        "bounded",
        TokensPrompt(prompt_token_ids=prompt),
        SamplingParams(max_tokens=600, temperature=0, ignore_eos=True),
    )
    peak, steps, done = 0, 0, False
    while not done:
        outputs = engine.step()
        steps += 1
        held = pages_held(llm, "bounded")
        peak = max(peak, held)
        assert held <= _bound()
        done = any(o.request_id == "bounded" and o.finished for o in outputs)
    # 1300 tokens (2.5x max_model_len) hold no more pages than the window needs, and all
    # return to the pool.
    assert math.ceil(WINDOW / BS) <= peak <= _bound() < math.ceil(1300 / BS)
    assert free_blocks(llm) == start_free


def test_long_text_prompt_is_not_truncated(llm, model_dir):
    """A text prompt longer than max_model_len reaches the engine whole."""
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from vllm_sink.assets import long_text

    text = long_text(8000)[:8000]
    expected = len(AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"])
    assert expected > 2 * MAX_LEN
    (out,) = llm.generate(text, SamplingParams(max_tokens=2))
    assert len(out.prompt_token_ids) == expected
    assert len(out.outputs[0].token_ids) == 2


def test_unsupported_configs_fail_at_startup(model_dir):
    from vllm_sink.enable import UnsupportedConfigError

    with pytest.raises(UnsupportedConfigError, match="fp8 KV cache"):
        _llm(model_dir, max_model_len=1024, kv_cache_dtype="fp8")
    with pytest.raises(UnsupportedConfigError, match="speculative decoding"):
        _llm(
            model_dir,
            max_model_len=1024,
            speculative_config={"method": "ngram", "num_speculative_tokens": 2},
        )
