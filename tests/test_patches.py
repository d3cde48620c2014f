"""The patches of vLLM internals: each replaced function is replaced exactly when it should be
(two at plugin load, the front end's with the first sink-enabled config, the runner's in a sink
engine's worker), and every guarded patch refuses an untested vLLM.

What each patch does, on and off, is tested where its behaviour shows (see the table in
``vllm_sink/patches/__init__.py``).
"""

from __future__ import annotations

import importlib

import pytest

from engine_utils import run_script
from vllm_sink.compat import UnsupportedVllmError

# Patch module -> what it replaces: (module[:class], attribute).
REPLACED = {
    "cli_args": [
        ("vllm.engine.arg_utils:EngineArgs", "add_cli_args"),
        ("vllm.engine.arg_utils:EngineArgs", "from_cli_args"),
    ],
    "engine_args": [("vllm.engine.arg_utils:EngineArgs", "create_engine_config")],
    "input_processor": [
        ("vllm.v1.engine.input_processor:InputProcessor", "_validate_prompt_len"),
        ("vllm.v1.engine.input_processor:InputProcessor", "process_inputs"),
    ],
    "output_processor": [
        ("vllm.v1.engine.output_processor:RequestState", "from_new_request"),
        ("vllm.v1.engine.output_processor:RequestState", "make_request_output"),
    ],
    "chat_serving": [
        ("vllm.entrypoints.openai.chat_completion.serving:OpenAIServingChat",
         "chat_completion_stream_generator"),
    ],
    "renderer_params": [
        ("vllm.renderers.params:TokenizeParams", "_token_len_check"),
        ("vllm.renderers.base:BaseRenderer", "default_cmpl_tok_params"),
        ("vllm.renderers.base:BaseRenderer", "default_chat_tok_params"),
    ],
    "openai_server": [
        ("vllm.entrypoints.openai.completion.serving:OpenAIServingCompletion", "create_completion"),
        ("vllm.entrypoints.openai.chat_completion.serving:OpenAIServingChat",
         "create_chat_completion"),
        ("vllm.entrypoints.openai.completion.protocol:CompletionRequest", "build_tok_params"),
        ("vllm.entrypoints.openai.chat_completion.protocol:ChatCompletionRequest",
         "build_tok_params"),
        ("vllm.entrypoints.openai.completion.serving", "get_max_tokens"),
        ("vllm.entrypoints.openai.chat_completion.serving", "get_max_tokens"),
    ],
    "stat_loggers": [("vllm.v1.engine.async_llm", "load_stat_logger_plugin_factories")],
    "model_runner": [
        ("vllm.v1.worker.gpu_model_runner:GPUModelRunner", "_update_states"),
        ("vllm.v1.worker.gpu_model_runner:GPUModelRunner", "_prepare_inputs"),
        ("vllm.v1.worker.gpu_model_runner:GPUModelRunner", "_get_prompt_logprobs_dict"),
        ("vllm.v1.worker.gpu_model_runner:GPUModelRunner", "_bookkeeping_sync"),
        ("vllm.v1.worker.gpu_model_runner:GPUModelRunner", "load_model"),
        ("vllm.v1.worker.cpu_model_runner:CPUModelRunner", "load_model"),
    ],
    "bench_commands": [
        ("vllm.benchmarks.throughput", "run_vllm"),
        ("vllm.benchmarks.throughput", "run_vllm_chat"),
        ("vllm.benchmarks.throughput", "run_vllm_async"),
        ("vllm.benchmarks.latency", "main"),
    ],
}  # fmt: skip
ALWAYS = ["cli_args", "engine_args"]  # installed at plugin load: how the feature is noticed
FRONT_END = [
    "input_processor",
    "output_processor",
    "renderer_params",
    "openai_server",
    "chat_serving",
    "stat_loggers",
]
GUARDED = [*FRONT_END, "model_runner"]
BENCH = ["bench_commands"]  # when a bench command builds its parser (pass-through without sinks)

CHECK = """
import importlib, json, os

REPLACED = json.loads(os.environ["REPLACED"])

def raw(target, attr):
    module, _, cls = target.partition(":")
    owner = importlib.import_module(module)
    if cls:
        return getattr(owner, cls).__dict__[attr]  # static and cached properties as stored
    return getattr(owner, attr)

original = {name: [raw(*t) for t in targets] for name, targets in REPLACED.items()}

def replaced():
    return {name: [raw(*t) is not o for t, o in zip(REPLACED[name], original[name])]
            for name in REPLACED}

from vllm.engine.arg_utils import EngineArgs
from vllm.plugins import load_general_plugins

result = {"imported": replaced()}
load_general_plugins()
result["loaded"] = replaced()
off = EngineArgs(model=os.environ["TEST_MODEL"], block_size=32).create_engine_config()
result["off"] = replaced()
result["off_extension"] = off.parallel_config.worker_extension_cls
on = EngineArgs(model=os.environ["TEST_MODEL"], block_size=32, max_model_len=1024,
                additional_config={"vllm_sink": {"window_tokens": 256}}).create_engine_config()
result["on"] = replaced()
result["on_extension"] = on.parallel_config.worker_extension_cls
result["on_scheduler"] = str(on.scheduler_config.scheduler_cls)
result["on_prefix_caching"] = on.cache_config.enable_prefix_caching
import vllm_sink.worker.extension  # what vLLM imports in each worker of a sink-enabled engine
result["worker"] = replaced()
from vllm.v1.attention.backends.registry import AttentionBackendEnum
result["cpu_attn_overridden"] = AttentionBackendEnum.CPU_ATTN.is_overridden()
from vllm.utils.argparse_utils import FlexibleArgumentParser
EngineArgs.add_cli_args(FlexibleArgumentParser())  # as `vllm bench throughput/latency` do
result["parser"] = replaced()
print("RESULT " + json.dumps(result), flush=True)
"""


def _expect(names: list[str]) -> dict[str, list[bool]]:
    return {name: [name in names] * len(targets) for name, targets in REPLACED.items()}


def test_every_replaced_function_is_replaced_only_when_enabled(model_dir):
    import json

    result, _ = run_script(CHECK, {"TEST_MODEL": str(model_dir), "REPLACED": json.dumps(REPLACED)})
    assert result["imported"] == _expect([])
    assert result["loaded"] == _expect(ALWAYS)
    assert result["off"] == _expect(ALWAYS)
    assert result["off_extension"] in (None, "")
    # The front end's patches come with the first sink-enabled config; the runner's with the
    # worker extension, imported only in workers of sink-enabled engines.
    assert result["on"] == _expect(ALWAYS + FRONT_END)
    assert result["on_extension"] == "vllm_sink.worker.extension.SinkWorkerExtension"
    assert result["on_scheduler"].endswith("SinkScheduler")
    # Prefix caching stays vLLM's switch (on by default): it turns resumed streams on.
    assert result["on_prefix_caching"] is True
    assert result["worker"] == _expect([n for n in REPLACED if n not in BENCH])
    assert result["parser"] == _expect(list(REPLACED))
    # The sink backend is registered only while a sink runner builds its model.
    assert result["cpu_attn_overridden"] is False


def test_every_patch_module_is_listed():
    from pathlib import Path

    import vllm_sink.patches as patches

    modules = sorted(p.stem for p in Path(patches.__file__).parent.glob("*.py"))
    assert modules == sorted(["__init__", *REPLACED])
    for name in REPLACED:
        assert f"``{name}``" in patches.__doc__, f"{name} missing from the list of patches"


def test_bench_patch_keeps_vanillas_check_on_untested_vllm(monkeypatch):
    """On an untested vLLM the bench patch warns and replaces nothing: the commands keep
    vLLM's own length checks."""
    import vllm
    import vllm.benchmarks.latency
    import vllm.benchmarks.throughput

    from vllm_sink.patches import bench_commands

    monkeypatch.setattr(bench_commands, "_patched", set())
    monkeypatch.setattr(vllm, "__version__", "0.33.0")
    before = vllm.benchmarks.throughput.run_vllm
    bench_commands.apply()
    assert vllm.benchmarks.throughput.run_vllm is before


@pytest.mark.parametrize("name", GUARDED)
def test_patch_refuses_untested_vllm(name, monkeypatch):
    import vllm

    module = importlib.import_module(f"vllm_sink.patches.{name}")
    assert module.__doc__ and "Patch" in module.__doc__  # every patch documents itself
    monkeypatch.setattr(module, "_applied", False)
    monkeypatch.setattr(vllm, "__version__", "0.33.0")
    with pytest.raises(UnsupportedVllmError, match="found vLLM 0.33.0"):
        module.apply()
