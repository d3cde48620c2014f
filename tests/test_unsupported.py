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
    "fp8 KV cache": ({"kv_cache_dtype": "fp8"}, r"does not support an fp8 KV cache"),
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


def test_same_configs_build_without_the_plugin(model_dir):
    """The refusals come from the plugin: vanilla vLLM builds these configs."""
    for case in ("sliding window", "hybrid layers", "M-RoPE"):
        overrides, _ = CASES[case]
        args = EngineArgs(model=str(model_dir), block_size=32, max_model_len=512, **overrides)
        assert args.create_engine_config().model_config is not None
