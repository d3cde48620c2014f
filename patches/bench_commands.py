"""Patch ``vllm.benchmarks.throughput.run_vllm`` / ``run_vllm_chat`` / ``run_vllm_async`` and
``vllm.benchmarks.latency.main``: ``vllm bench throughput`` and ``vllm bench latency`` measure
streams past ``max_model_len`` on a sink engine.

Each of these builds its engine and then asserts that every request's prompt plus output fits
``max_model_len``, whatever the engine accepts; a sink engine streams past it by design, so the
work the plugin exists for could not be measured with vLLM's own commands. The check sits inside
each function with no hook around it, so this module recompiles vLLM's own source with the one
expression that reads the limit (``....max_model_len``, exactly once per function, or the patch
refuses to install) routed through :func:`length_limit`: ``max_model_len`` for any engine
without ``vllm_sink`` (the check stays exactly as vanilla), unbounded for a sink engine.

``vllm bench serve`` needs nothing here: it checks no length, and a sink server accepts prompts
and ``max_tokens`` past ``max_model_len`` (:mod:`vllm_sink.patches.openai_server`).

Installed when a parser is built through ``EngineArgs.add_cli_args``
(:mod:`vllm_sink.patches.cli_args`), for the bench command modules that process has imported:
the ``vllm`` CLI imports them before it builds its parsers, and runs a command after. Each
function is also rebound in the CLI modules that imported it by name. It passes straight through
for engines without ``vllm_sink``.
"""

from __future__ import annotations

import sys
from typing import Any

from vllm_sink.compat import UnsupportedVllmError, check_vllm_version, recompiled

# module -> (function, the expression that reads the length limit, its replacement)
TARGETS = {
    "vllm.benchmarks.throughput": [
        ("run_vllm", "llm.llm_engine.model_config.max_model_len",
         "_vllm_sink_length_limit(llm.llm_engine)"),
        ("run_vllm_chat", "llm.llm_engine.model_config.max_model_len",
         "_vllm_sink_length_limit(llm.llm_engine)"),
        ("run_vllm_async", "model_config.max_model_len", "_vllm_sink_length_limit(llm)"),
    ],
    "vllm.benchmarks.latency": [
        ("main", "llm.llm_engine.model_config.max_model_len",
         "_vllm_sink_length_limit(llm.llm_engine)"),
    ],
}  # fmt: skip
UNBOUNDED = 1 << 62

_patched: set[str] = set()


def length_limit(engine: Any) -> int:
    """The longest prompt plus output a bench command lets ``engine`` run (an ``LLMEngine`` or
    an ``AsyncLLM``): unbounded with ``vllm_sink``, else vLLM's ``max_model_len``."""
    from vllm_sink.settings import CONFIG_KEY

    config = engine.vllm_config
    if CONFIG_KEY in (config.additional_config or {}):
        return UNBOUNDED
    return config.model_config.max_model_len


def apply() -> None:
    """Patch the bench command modules this process has imported (idempotent)."""
    present = [name for name in TARGETS if name in sys.modules and name not in _patched]
    if not present:
        return
    try:
        check_vllm_version("vllm_sink.patches.bench_commands")
    except UnsupportedVllmError as err:
        from vllm.logger import init_logger

        init_logger("vllm.vllm_sink").warning("%s; bench commands keep their length checks", err)
        return
    for name in present:
        module = sys.modules[name]
        for function, expression, replacement in TARGETS[name]:
            original = getattr(module, function)
            new = recompiled(
                original, expression, replacement, {"_vllm_sink_length_limit": length_limit}
            )
            setattr(module, function, new)
            _rebind(original, new)
        _patched.add(name)


def _rebind(original: Any, new: Any) -> None:
    """Point the CLI modules that imported ``original`` by name at ``new``."""
    for name, module in list(sys.modules.items()):
        if name.startswith("vllm.entrypoints.cli.benchmark") and module is not None:
            for attr, value in list(vars(module).items()):
                if value is original:
                    setattr(module, attr, new)
