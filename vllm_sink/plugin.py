"""vLLM plugin entry point (group ``vllm.general_plugins``).

vLLM calls :func:`register` once in every process it starts (API server, engine core, workers,
Ray actors). With the feature off the plugin changes nothing: it installs a pass-through around
``EngineArgs.create_engine_config`` that looks for the ``vllm_sink`` key in
``additional_config`` (:mod:`vllm_sink.patches.engine_args`), and the
``--sink-tokens``/``--window-tokens`` CLI flags (:mod:`vllm_sink.patches.cli_args`, the way a
server user turns the feature on; without them, arguments parse exactly as before). Only when that
key is present are settings validated, the vLLM version checked and the feature's components
switched on (see :mod:`vllm_sink.enable`).
"""

from __future__ import annotations

import os

_registered = False


def is_registered() -> bool:
    """Whether :func:`register` ran in this process."""
    return _registered


def register() -> None:
    """Entry point: idempotent, cheap, and inert unless ``vllm_sink`` settings are given."""
    global _registered
    if _registered:
        return
    _registered = True

    from vllm.logger import init_logger

    init_logger("vllm.vllm_sink").info("vllm-sink plugin registered (pid %d)", os.getpid())
    # The CLI flags and the config hook are how an engine turns the feature on, so they exist
    # even when it is off (both pass through unless the feature's settings are given).
    from vllm_sink.patches import cli_args, engine_args

    cli_args.apply()
    engine_args.apply()
