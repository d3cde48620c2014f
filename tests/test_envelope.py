"""What works with eviction: each row of the README's "What works with eviction" table that says
*works* is proven here on the real engine, past ``max_model_len``.

Refusals (settings the plugin turns down at start-up) are in ``tests/test_unsupported.py``.
"""

from __future__ import annotations

import gc
import json

import numpy as np
import pytest
import torch

from engine_utils import ROPE_VARIANTS, SIDE_BY_SIDE, Script, prompt_logprobs, sink_llm

SINK, WINDOW, MAX_LEN = 4, 64, 256


@pytest.fixture(scope="module")
def llm(model_dir):
    """The embedded model in float32, a 64-token window, 256 positions."""
    engine = sink_llm(model_dir, SINK, WINDOW, MAX_LEN, dtype="float32", max_num_seqs=8)
    yield engine
    del engine
    gc.collect()


def _token(model_dir, text: str) -> int:
    from transformers import AutoTokenizer

    (token,) = AutoTokenizer.from_pretrained(model_dir)(text, add_special_tokens=False)["input_ids"]
    return token


# ----------------------------------------------------------------------------- RoPE variants


@pytest.mark.parametrize("variant", list(ROPE_VARIANTS))
def test_rope_variant_streams_like_the_reference(variant, tmp_path, text_tokens):
    """A tiny random-weight Llama of each accepted RoPE variant streams 10x its window (float32,
    with position rebases at 256 positions) and matches the reference token by token."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_sink.assets import make_tiny_llama
    from vllm_sink.reference import StreamingReference

    window, max_len, chunk = 60, 256, 32
    model = make_tiny_llama(
        tmp_path / "tiny", max_position_embeddings=max_len, rope_parameters=ROPE_VARIANTS[variant]
    )
    ids = text_tokens[: 10 * window]
    engine = sink_llm(model, SINK, window, max_len, dtype="float32", max_num_batched_tokens=chunk)
    try:
        (out,) = engine.generate(
            TokensPrompt(prompt_token_ids=ids), SamplingParams(max_tokens=1, prompt_logprobs=0)
        )
        got = prompt_logprobs(out, ids)
    finally:
        del engine
        gc.collect()
    ref = StreamingReference(model, sink_tokens=SINK, window_tokens=window, block_size=32)
    diff = np.abs(got - ref.score(ids, chunk))[1:]
    print(f"{variant}: max {diff.max():.2e} mean {diff.mean():.2e}")
    assert diff.max() <= 1e-3, f"{variant}: max {diff.max():.2e}"


def _rotary(**kw):
    """vLLM's own rotary embedding, as a model would build it (inside a vLLM config)."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    kw.setdefault("max_position", 512)
    kw.setdefault("dtype", torch.float32)
    with set_current_vllm_config(VllmConfig()):
        return get_rope(32, **kw)


@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gpt-j"])
@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_rotator_moves_keys_as_the_models_rotary_embedding(is_neox, partial):
    """Re-rotating a key written at position p by e equals vLLM's own rotary embedding at p+e,
    for both pairing styles (GPT-J style comes from the model's embedding, not the config)."""
    from vllm_sink.attention.rope import exact_rope, rotator_from_model_rope

    rope = _rotary(
        is_neox_style=is_neox,
        rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": partial},
    )
    rotator = rotator_from_model_rope(rope, 32)
    exact = exact_rope(rope)  # the embedding the engine's model runs (exact angles)
    torch.manual_seed(0)
    keys = torch.randn(5, 2 * 32)  # [tokens, kv_heads * head]
    q = torch.zeros_like(keys)
    pos = torch.tensor([3, 4, 17, 100, 200])
    for shift in (1, 37, 250, -3):
        _, written = exact.forward_native(pos, q.clone(), keys.clone())
        _, expected = exact.forward_native(pos + shift, q.clone(), keys.clone())
        moved = rotator.rotate(written.view(5, 2, 32), shift).view(5, -1)
        # Two roundings of float32 products against one (vLLM's own float32 angles: 5e-5).
        torch.testing.assert_close(moved, expected, atol=2e-6, rtol=0)


@pytest.mark.parametrize(
    "params",
    [
        {"rope_theta": 100000.0},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
         "high_freq_factor": 4.0, "original_max_position_embeddings": 128},
    ],
    ids=["default", "linear", "llama3"],
)  # fmt: skip
def test_exact_rope_table(params):
    """The sink model's rotary embedding: vLLM's frequencies, angles exact at every position
    (float32 angles are off by up to ~5e-4 rad at 8,000), and a copy: the embedding vLLM shares
    between models built in one process keeps its own table."""
    from vllm_sink.attention.rope import exact_cos_sin, exact_rope

    rope = _rotary(rope_parameters=params, max_position=8192)
    own = rope.cos_sin_cache.clone()
    exact = exact_rope(rope)
    assert exact is not rope and torch.equal(rope.cos_sin_cache, own)
    assert torch.equal(exact.cos_sin_cache, exact_cos_sin(rope))
    # Truth: the same float32 frequencies, position x frequency in float64.
    inv = rope._compute_inv_freq(rope.base).double()
    factor = float(params["factor"]) if params.get("rope_type") == "linear" else 1.0
    t = torch.arange(own.shape[0], dtype=torch.float64) / factor
    truth = torch.cat((torch.outer(t, inv).cos(), torch.outer(t, inv).sin()), -1)
    assert (exact.cos_sin_cache.double() - truth).abs().max() < 1e-7
    late = own.shape[0] - 512  # vLLM's float32 angles, far along the table
    assert (own[late:].double() - truth[late:]).abs().max() > 5e-5
    # The copy rotates with its own table.
    q, k = torch.randn(2, 64), torch.randn(2, 64)
    pos = torch.tensor([7, own.shape[0] - 1])
    _, k_exact = exact.forward_native(pos, q.clone(), k.clone())
    _, k_own = rope.forward_native(pos, q.clone(), k.clone())
    assert not torch.equal(k_exact[1], k_own[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_exact_rope_table_in_the_models_dtype(dtype):
    """A bf16 or fp16 model's table: exact angles rounded to its dtype, equal to vLLM's own but
    for that dtype's last bit (the start-up check allows exactly that)."""
    from vllm_sink.attention.rope import exact_cos_sin, exact_rope

    rope = _rotary(rope_parameters={"rope_theta": 100000.0}, max_position=8192, dtype=dtype)
    exact = exact_rope(rope)
    assert exact.cos_sin_cache.dtype == rope.cos_sin_cache.dtype == dtype
    assert torch.equal(exact.cos_sin_cache, exact_cos_sin(rope).to(dtype))
    differ = (exact.cos_sin_cache != rope.cos_sin_cache).float().mean()
    assert differ < 0.05, differ  # the last bit of a few values


def test_rotator_refuses_a_scaled_table():
    """YaRN multiplies its cos/sin by an attention factor: moving a key would rescale it."""
    from vllm_sink.attention.rope import rotator_from_model_rope
    from vllm_sink.enable import UnsupportedConfigError

    yarn = _rotary(
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 128,
        }
    )
    with pytest.raises(UnsupportedConfigError, match="YaRNScalingRotaryEmbedding"):
        rotator_from_model_rope(yarn, 32)


# ----------------------------------------------------------------------------- sampling


def test_min_tokens_counts_the_whole_stream(llm, model_dir, text_tokens):
    """min_tokens far past the window: the stop token is held back for exactly min_tokens
    outputs, then stops the stream at once (vLLM counts on the worker's list, which keeps only
    the window's outputs)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    stop = _token(model_dir, " the")
    min_tokens = 5 * WINDOW
    params = SamplingParams(
        temperature=0,
        min_tokens=min_tokens,
        max_tokens=min_tokens + 100,
        stop_token_ids=[stop],
        logit_bias={stop: 100.0},  # the stop token wins every step it is allowed
    )
    (out,) = llm.generate(TokensPrompt(prompt_token_ids=text_tokens[:100]), params)
    tokens = list(out.outputs[0].token_ids)
    assert stop not in tokens[:min_tokens]
    assert out.outputs[0].finish_reason == "stop"
    assert min_tokens <= len(tokens) <= min_tokens + 1, len(tokens)
    assert params.min_tokens == min_tokens  # the caller's params are untouched


def test_penalties_see_the_tokens_in_the_cache(llm, model_dir, text_tokens):
    """Frequency penalty counts the outputs still in the cache (sinks + window): a token pushed
    up by a logit bias is penalised away while a dozen copies are in the window and comes back
    once they leave it."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    token = _token(model_dir, " the")
    bias, penalty = 20.0, 2.0
    params = SamplingParams(
        temperature=0,
        max_tokens=640,
        ignore_eos=True,
        frequency_penalty=penalty,
        logit_bias={token: bias},
    )
    (out,) = llm.generate(TokensPrompt(prompt_token_ids=text_tokens[:40]), params)
    tokens = np.array(out.outputs[0].token_ids)
    hits = np.flatnonzero(tokens == token)
    most_per_window = max(np.sum((hits >= i) & (hits < i + WINDOW)) for i in range(len(tokens)))
    print(f"{len(hits)} hits, at most {most_per_window} in any {WINDOW} outputs")
    # Within the window the penalty holds it back (unpenalised, the bias wins every step; it
    # allows about bias / penalty copies plus the token's own lead over the runner-up) ...
    assert most_per_window <= WINDOW // 4
    # ... and over the stream it keeps returning (a whole-stream count would stop it for good).
    assert len(hits) > 3 * most_per_window
    assert hits[-1] >= len(tokens) - 2 * WINDOW


def test_bad_words_hold_past_the_window(llm, model_dir, text_tokens):
    """A banned word stays banned for the whole stream, though the bias pushes it every step."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    token = _token(model_dir, " the")
    params = SamplingParams(
        temperature=0,
        max_tokens=5 * WINDOW,
        ignore_eos=True,
        bad_words=[" the"],
        logit_bias={token: 100.0},
    )
    (out,) = llm.generate(TokensPrompt(prompt_token_ids=text_tokens[:300]), params)
    assert len(out.outputs[0].token_ids) == 5 * WINDOW
    assert token not in out.outputs[0].token_ids


def test_n_greater_than_one(llm, text_tokens):
    """n=2 streaming past max_model_len: each child is its own stream. vLLM seeds child i with
    ``seed + i``, so each equals a single request with that seed."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompt = TokensPrompt(prompt_token_ids=text_tokens[:40])

    def params(n: int, seed: int) -> SamplingParams:
        return SamplingParams(n=n, temperature=1.0, seed=seed, max_tokens=300, ignore_eos=True)

    (pair,) = llm.generate(prompt, params(2, 7))
    singles = [llm.generate(prompt, params(1, seed))[0] for seed in (7, 8)]
    assert len(pair.outputs) == 2
    got = sorted(list(c.token_ids) for c in pair.outputs)
    assert got == sorted(list(s.outputs[0].token_ids) for s in singles)
    assert got[0] != got[1]


def test_seeded_request_with_a_chunked_prompt(llm, text_tokens):
    """vLLM's CPU runner rewinds a seeded generator by offset after a partial-prefill step, which
    the CPU generator cannot do (vanilla vLLM's engine dies, once a prompt is chunked). The sink
    runner restores the generator's state instead: a seeded request whose prompt is prefilled
    in chunks samples exactly what it samples when its chunks fall differently (alone, or
    sharing each step's budget with other prompts), and other seeds still differ."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    long_prompt = TokensPrompt(prompt_token_ids=text_tokens[:300])  # several chunks
    params = SamplingParams(seed=1, temperature=1.0, max_tokens=40, ignore_eos=True)
    (alone,) = llm.generate(long_prompt, params)
    others = [TokensPrompt(prompt_token_ids=text_tokens[i : i + 90]) for i in (400, 600, 800)]
    batch = llm.generate([*others, long_prompt], [params.clone() for _ in range(4)])
    assert list(batch[-1].outputs[0].token_ids) == list(alone.outputs[0].token_ids)
    (other_seed,) = llm.generate(long_prompt, SamplingParams(seed=2, max_tokens=40))
    assert list(other_seed.outputs[0].token_ids) != list(alone.outputs[0].token_ids)


def test_beam_search_past_max_model_len(llm, text_tokens):
    """vLLM's beam search runs one request per beam and step; each extends its parent's
    finished stream and continues it (siblings each on their own copy of its pages). With one
    beam it is greedy decoding, and equals it token for token; with two, it completes past the
    length."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import BeamSearchParams

    prompt = text_tokens[:300]  # > max_model_len
    steps = 24
    (greedy,) = llm.generate(
        TokensPrompt(prompt_token_ids=prompt),
        SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True),
    )
    (one,) = llm.beam_search(
        [TokensPrompt(prompt_token_ids=prompt)],
        BeamSearchParams(beam_width=1, max_tokens=steps, ignore_eos=True),
    )
    assert one.sequences[0].tokens[len(prompt) :] == list(greedy.outputs[0].token_ids)
    (two,) = llm.beam_search(
        [TokensPrompt(prompt_token_ids=prompt)],
        BeamSearchParams(beam_width=2, max_tokens=steps, ignore_eos=True),
    )
    assert len(two.sequences) == 2
    assert all(len(s.tokens) == len(prompt) + steps for s in two.sequences)
    assert two.sequences[0].cum_logprob >= two.sequences[1].cum_logprob


def test_structured_output_past_the_window(llm, text_tokens):
    """A grammar whose answer is several windows long, after a prompt longer than
    max_model_len: the grammar lives in the scheduler and sees every token. (A regex that spells
    a JSON array: a JSON schema compiles to the same kind of grammar, but lets this model fill
    the window with whitespace between items.)"""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import StructuredOutputsParams

    items = 120
    params = SamplingParams(
        temperature=0,
        max_tokens=1000,
        structured_outputs=StructuredOutputsParams(regex=rf"\[[0-9](, [0-9]){{{items - 1}}}\]"),
    )
    (out,) = llm.generate(TokensPrompt(prompt_token_ids=text_tokens[:300]), params)
    assert out.outputs[0].finish_reason == "stop"
    assert len(out.outputs[0].token_ids) > 3 * WINDOW
    value = json.loads(out.outputs[0].text)
    assert isinstance(value, list) and len(value) == items
    assert all(isinstance(v, int) and 0 <= v <= 9 for v in value)


def test_shared_sampling_params_keep_no_default(llm, text_tokens):
    """One SamplingParams(max_tokens=None) for two prompts: each gets its own default, and the
    caller's object is not written to."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0, ignore_eos=True)
    params.max_tokens = None
    prompts = [TokensPrompt(prompt_token_ids=text_tokens[:n]) for n in (200, 50)]
    outs = llm.generate(prompts, params)
    assert params.max_tokens is None
    assert [len(o.outputs[0].token_ids) for o in outs] == [MAX_LEN - 200, MAX_LEN - 50]


# ----------------------------------------------------------------------------- process state

_ONE_PROCESS = """
import json, os
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm import LLM, SamplingParams
from vllm_sink.assets import prepare_model
model = str(prepare_model())
prompt = "The quick brown fox jumps over the lazy dog. " * 12
params = SamplingParams(temperature=0, max_tokens=24, logprobs=3)
common = dict(model=model, dtype="float32", block_size=32, enforce_eager=True,
              max_model_len=512, seed=0)
if {sink_first}:
    sink = LLM(**common, additional_config={{"vllm_sink": {{"sink_tokens": 4,
                                                              "window_tokens": 64}}}})
    sink.generate(prompt, params)
    del sink
    import gc; gc.collect()
llm = LLM(**common)
(out,) = llm.generate(prompt, params)
runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
backends = sorted({{type(layer.impl).__name__
                   for layer in runner.compilation_config.static_forward_context.values()}})
lps = [{{str(k): v.logprob for k, v in step.items()}} for step in out.outputs[0].logprobs]
print("RESULT " + json.dumps({{"tokens": list(out.outputs[0].token_ids), "logprobs": lps,
                               "impls": backends}}))
"""


def test_vanilla_engine_after_a_sink_engine_in_one_process():
    """An in-process sink engine, then a vanilla one: the vanilla one runs the stock backend
    and is bit-identical to a vanilla engine in a fresh process."""
    # Side by side, one thread each: the same thread count in both, so the same bits.
    scripts = [
        Script(_ONE_PROCESS.format(sink_first=first), SIDE_BY_SIDE) for first in (True, False)
    ]
    (after, _), (fresh, _) = (script.result() for script in scripts)
    assert after["impls"] == fresh["impls"] == ["CPUAttentionBackendImpl"]
    assert after["tokens"] == fresh["tokens"]
    assert after["logprobs"] == fresh["logprobs"]


def _worker_state(engine) -> dict[str, int]:
    (state,) = engine.collective_rpc("vllm_sink_request_state")
    return state


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["plain", "prefix-caching"])
def test_many_requests_leave_no_per_request_state(prefix_caching, tmp_path, text_tokens):
    """2,000 requests (prompts from under a page to 3x the window, some past it): afterwards
    the worker holds no state for any of them; with prefix caching, only parked streams. (The plain
    case asserts exactly zero, which any count that leaks fails; 10,000 took 2.5 minutes on an
    AVX2 CPU.)"""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_sink.assets import make_tiny_llama

    count = 2_000 if not prefix_caching else 1_000
    model = make_tiny_llama(tmp_path / "tiny", max_position_embeddings=256)
    engine = sink_llm(
        model,
        SINK,
        WINDOW,
        256,
        max_num_seqs=256,
        max_num_batched_tokens=2048,
        enable_prefix_caching=prefix_caching,
    )
    try:
        rng = np.random.default_rng(0)
        prompts = []
        for _ in range(count):
            start, length = int(rng.integers(0, 50_000)), int(rng.integers(8, 3 * WINDOW))
            prompts.append(TokensPrompt(prompt_token_ids=text_tokens[start : start + length]))
        params = SamplingParams(max_tokens=3, ignore_eos=True)
        outs = engine.generate(prompts, params, use_tqdm=False)
        assert len(outs) == count
        # The worker hears of the last finished requests with the next step (vLLM's own
        # request map too): the engine core takes that step as soon as it has news to send.
        engine.llm_engine.step()
        state = _worker_state(engine)
        scheduler = engine.llm_engine.engine_core.engine_core.scheduler
        parked = scheduler.sink_manager().parked
        num_blocks = engine.llm_engine.vllm_config.cache_config.num_gpu_blocks
    finally:
        del engine
        gc.collect()
    print(state)
    assert state["layers"] > 0
    assert state["streams"] == state["runner_requests"] == state["released_pending"] == 0
    if not prefix_caching:
        assert state["parked"] == state["parked_blocks"] == 0
        assert state["sink_offsets"] == state["pristine"] == 0
        assert parked is None
    else:
        # What stays belongs to parked streams, whose pages the pool hands out last (and
        # which die when it does): bounded by the pool, not by the requests served.
        assert 0 < len(parked) <= state["parked"] <= state["parked_blocks"] <= num_blocks
        assert state["pristine"] <= state["parked"]
        assert state["sink_offsets"] <= state["parked"]
