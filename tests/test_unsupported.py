"""Configurations the plugin does not support fail at start-up with a message naming them.

Each case builds the engine config exactly as ``LLM``/``vllm serve`` do
(``EngineArgs.create_engine_config``, where the plugin hooks in); the unsupported models are tiny
config-only checkpoints of the real architectures (no weights are needed to be refused).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from vllm.engine.arg_utils import EngineArgs

from vllm_sink.enable import UnsupportedConfigError

SINK = {"vllm_sink": {"sink_tokens": 4, "window_tokens": 256}}

GPT2 = {  # learned absolute positions, no RoPE
    "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 64, "n_head": 2,
    "n_layer": 2, "n_positions": 1024, "vocab_size": 49152,
}  # fmt: skip
DEEPSEEK_V2 = {  # multi-head latent attention
    "model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"],
    "vocab_size": 49152, "max_position_embeddings": 1024, "rope_theta": 10000.0,
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 2, "kv_lora_rank": 64, "q_lora_rank": None,
    "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32,
    "moe_intermediate_size": 64, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "first_k_dense_replace": 2,
}  # fmt: skip


def _checkpoint(root: Path, name: str, config: dict, model_dir: Path) -> str:
    """A config-only checkpoint with the embedded model's tokenizer files."""
    out = root / name
    out.mkdir()
    for f in model_dir.iterdir():
        if f.suffix in (".json", ".txt") and f.name != "config.json":
            shutil.copy(f, out)
    (out / "config.json").write_text(json.dumps(config))
    return str(out)


CASES = {
    "speculative decoding": (
        {"speculative_config": {"method": "ngram", "num_speculative_tokens": 2,
                                "prompt_lookup_max": 3}},
        "does not support speculative decoding",
    ),
    "fp8 KV cache": ({"kv_cache_dtype": "fp8"}, r"does not support a quantized KV cache"),
    "int8 KV cache": ({"kv_cache_dtype": "int8_per_token_head"},
                      r"a quantized KV cache \(kv_cache_dtype=int8_per_token_head"),
    "sliding window": ({"hf_overrides": {"sliding_window": 128}}, "a model sliding window"),
    "hybrid layers": (
        {"hf_overrides": {"layer_types": ["sliding_attention", "full_attention"] * 15,
                          "sliding_window": 64}},
        "hybrid / sliding-window layers",
    ),
    "M-RoPE": (
        {"hf_overrides": {"rope_scaling": {"rope_type": "default", "mrope_section": [16, 8, 8],
                                           "rope_theta": 100000.0}}},
        r"does not support M-RoPE \(",
    ),
    "no RoPE": ({"model": GPT2}, "does not support a model without RoPE"),
    "MLA": ({"model": DEEPSEEK_V2}, "does not support MLA attention"),
    "YaRN": (
        {"hf_overrides": {"rope_parameters": {"rope_type": "yarn", "rope_theta": 100000.0,
                                              "factor": 4.0,
                                              "original_max_position_embeddings": 2048}}},
        r"rope_type='yarn'",
    ),
    "dynamic NTK": (
        {"hf_overrides": {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 100000.0,
                                              "factor": 2.0}}},
        r"rope_type='dynamic'",
    ),
    "LongRoPE": (
        {"hf_overrides": {"rope_parameters": {
            "rope_type": "longrope", "rope_theta": 100000.0,
            "short_factor": [1.0] * 32, "long_factor": [2.0] * 32,
            "original_max_position_embeddings": 1024}}},
        r"rope_type='longrope'",
    ),
    "prompt embeds": ({"enable_prompt_embeds": True}, "enable_prompt_embeds"),
    "LoRA": ({"enable_lora": True}, "enable_lora"),
    "pipeline parallel": ({"pipeline_parallel_size": 2}, "pipeline_parallel_size=2"),
    "data parallel": ({"data_parallel_size": 2}, "data_parallel_size=2"),
    "KV connector": (
        {"kv_transfer_config": {"kv_connector": "ExampleConnector", "kv_role": "kv_both"}},
        "kv_transfer_config",
    ),
    "KV offloading": ({"kv_offloading_size": 1.0}, "kv_offloading_size"),
    "custom logits processors": (
        {"logits_processors": ["vllm.v1.sample.logits_processor.builtin.MinPLogitsProcessor"]},
        "logits_processors",
    ),
    "chunked prefill off": ({"enable_chunked_prefill": False}, "enable_chunked_prefill=False"),
    "adaptive prefill threshold": (
        {"long_prefill_token_threshold": 64, "long_prefill_token_threshold_adaptive": True},
        "long_prefill_token_threshold_adaptive",
    ),
    "other attention backend": ({"attention_backend": "FLEX_ATTENTION"},
                                "attention_backend=FLEX_ATTENTION"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_unsupported_config_fails_at_start(case, model_dir, tmp_path):
    overrides, message = CASES[case]
    kwargs = dict(overrides)
    if isinstance(kwargs.get("model"), dict):
        kwargs["model"] = _checkpoint(tmp_path, case.replace(" ", "_"), kwargs["model"], model_dir)
    kwargs.setdefault("model", str(model_dir))
    args = EngineArgs(block_size=32, max_model_len=512, additional_config=SINK, **kwargs)
    with pytest.raises(UnsupportedConfigError, match=message):
        args.create_engine_config()


def test_platforms_other_than_cpu_are_refused(model_dir):
    """On any platform but CPU the plugin's backend would not be used: nothing would be evicted
    while the scheduler lifts the length caps. vLLM's own platform classes, without a device."""
    from vllm.platforms import current_platform
    from vllm.platforms.interface import UnspecifiedPlatform

    from vllm_sink.enable import refused_runtime

    config = EngineArgs(model=str(model_dir), block_size=32, max_model_len=512)
    vllm_config = config.create_engine_config()
    assert refused_runtime(vllm_config, current_platform) == []
    (problem,) = refused_runtime(vllm_config, UnspecifiedPlatform())
    assert "platform" in problem and "CPU_ATTN" in problem


def test_model_runner_v2_is_refused(model_dir, monkeypatch):
    """vLLM's CPU build refuses Model Runner V2 itself (it needs Triton); where it can run, the
    plugin refuses it. The config's own property reads the switch when asked."""
    from vllm.platforms import current_platform

    from vllm_sink.enable import refused_runtime

    vllm_config = EngineArgs(model=str(model_dir), block_size=32, max_model_len=512)
    vllm_config = vllm_config.create_engine_config()
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    assert vllm_config.use_v2_model_runner
    (problem,) = refused_runtime(vllm_config, current_platform)
    assert "Model Runner V2" in problem


def test_same_configs_build_without_the_plugin(model_dir):
    """The refusals come from the plugin: vanilla vLLM builds these configs."""
    for case in (
        "sliding window",
        "hybrid layers",
        "M-RoPE",
        "YaRN",
        "KV offloading",
        "chunked prefill off",
        "other attention backend",
    ):
        overrides, _ = CASES[case]
        args = EngineArgs(model=str(model_dir), block_size=32, max_model_len=512, **overrides)
        assert args.create_engine_config().model_config is not None
