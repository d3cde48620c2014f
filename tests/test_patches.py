"""The patches of vLLM internals: applied only when the feature is on, and version-guarded."""

from __future__ import annotations

import importlib

import pytest

from engine_utils import run_script
from vllm_sink.compat import UnsupportedVllmError

PATCHES = ["input_processor", "renderer_params", "model_runner", "stat_loggers"]

CHECK = """
import json, os
from vllm.engine.arg_utils import EngineArgs
from vllm.plugins import load_general_plugins
from vllm.renderers.params import TokenizeParams
from vllm.v1.engine import async_llm
from vllm.v1.engine.input_processor import InputProcessor
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

def patched():
    return {
        "input_processor": hasattr(InputProcessor._validate_prompt_len, "__wrapped__"),
        "renderer_params": hasattr(TokenizeParams._token_len_check, "__wrapped__"),
        "model_runner": hasattr(GPUModelRunner._update_states, "__wrapped__"),
        "stat_loggers": hasattr(async_llm.load_stat_logger_plugin_factories, "__wrapped__"),
    }

if __name__ == "__main__":
    load_general_plugins()
    result = {}
    off = EngineArgs(model=os.environ["TEST_MODEL"], block_size=32).create_engine_config()
    result["off"] = patched()
    result["off_extension"] = off.parallel_config.worker_extension_cls
    on = EngineArgs(model=os.environ["TEST_MODEL"], block_size=32, max_model_len=1024,
                    additional_config={"vllm_sink": {"window_tokens": 256}}).create_engine_config()
    result["on"] = patched()
    result["on_extension"] = on.parallel_config.worker_extension_cls
    result["on_scheduler"] = str(on.scheduler_config.scheduler_cls)
    result["on_prefix_caching"] = on.cache_config.enable_prefix_caching
    import vllm_sink.worker  # what vLLM imports in each worker of a sink-enabled engine
    result["worker"] = patched()
    print("RESULT " + json.dumps(result), flush=True)
"""


def test_patches_applied_only_when_enabled(model_dir):
    result, _ = run_script(CHECK, {"TEST_MODEL": str(model_dir)})
    assert result["off"] == dict.fromkeys(PATCHES, False)
    assert result["off_extension"] in (None, "")
    # The frontend's patches come with the first sink-enabled config; the worker's with the
    # worker extension, imported only in workers of sink-enabled engines.
    assert result["on"] == {**dict.fromkeys(PATCHES, True), "model_runner": False}
    assert result["on_extension"] == "vllm_sink.worker.SinkWorkerExtension"
    assert result["on_scheduler"].endswith("SinkScheduler")
    # Prefix caching stays vLLM's switch (on by default): it turns resumed streams on.
    assert result["on_prefix_caching"] is True
    assert result["worker"] == dict.fromkeys(PATCHES, True)


@pytest.mark.parametrize("name", PATCHES)
def test_patch_refuses_untested_vllm(name, monkeypatch):
    import vllm

    module = importlib.import_module(f"vllm_sink.patches.{name}")
    assert module.__doc__ and "Patch" in module.__doc__  # every patch documents itself
    monkeypatch.setattr(module, "_applied", False)
    monkeypatch.setattr(vllm, "__version__", "0.33.0")
    with pytest.raises(UnsupportedVllmError, match="found vLLM 0.33.0"):
        module.apply()
