"""The vLLM versions this plugin was tested against, and the guard that enforces them."""

from __future__ import annotations

import inspect
import textwrap
from typing import Any

SUPPORTED_VLLM_VERSIONS = ("0.32.0",)


class UnsupportedVllmError(RuntimeError):
    """vLLM is a version the plugin's internals patches were not tested against."""


def vllm_version() -> str:
    import vllm

    return vllm.__version__


def check_vllm_version(component: str = "vllm-sink") -> None:
    """Fail loudly when the feature is enabled on a vLLM version it was not tested with."""
    version = vllm_version()
    # Local build tags (``0.32.0+cpu``) do not change the internals we rely on.
    if version.split("+")[0] not in SUPPORTED_VLLM_VERSIONS:
        raise UnsupportedVllmError(
            f"{component} supports vLLM {', '.join(SUPPORTED_VLLM_VERSIONS)} only, found vLLM "
            f"{version}. Install a supported vLLM (`pip install vllm-sink[cpu]` or "
            "`vllm-sink[gpu]`) or remove the `vllm_sink` settings."
        )


def recompiled(function: Any, statement: str, replacement: str, extra_globals: dict) -> Any:
    """``function`` compiled from its own source with ``statement`` (a piece of its source,
    which must appear exactly once) replaced; line numbers, globals and defaults are the
    original's. How a patch changes one statement inside a long vLLM function that has no hook
    (:mod:`vllm_sink.patches.chat_serving`, :mod:`vllm_sink.patches.bench_commands`)."""
    lines, first_line = inspect.getsourcelines(function)
    source = textwrap.dedent("".join(lines))
    if source.count(statement) != 1:
        raise RuntimeError(
            f"vllm_sink: cannot patch {function.__qualname__}: expected `{statement}` exactly "
            "once in this vLLM's source"
        )
    source = "\n" * (first_line - 1) + source.replace(statement, replacement)
    module_globals = function.__globals__
    module_globals.update(extra_globals)
    namespace: dict[str, Any] = {}
    exec(compile(source, inspect.getsourcefile(function), "exec"), module_globals, namespace)
    new = namespace[function.__name__]
    new.__qualname__ = function.__qualname__
    new.__defaults__ = function.__defaults__
    new.__kwdefaults__ = function.__kwdefaults__
    new.__wrapped__ = function
    return new
