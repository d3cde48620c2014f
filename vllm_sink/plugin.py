"""vLLM plugin entry point (group ``vllm.general_plugins``).

vLLM calls :func:`register` once in every process it starts (API server, engine core, workers,
Ray actors). With the feature off the plugin changes nothing: it installs a pass-through around
``EngineArgs.create_engine_config`` that looks for the ``vllm_sink`` key in
``additional_config``, and the ``--sink-tokens``/``--window-tokens`` CLI flags (the way a server
user turns the feature on; without them, arguments parse exactly as before). Only when that
key is present are settings validated, the vLLM version checked and the feature's components
switched on (see :mod:`vllm_sink.enable`).
"""

from __future__ import annotations

import functools
import os

from vllm_sink.settings import settings_from_additional_config

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

    from vllm.engine.arg_utils import EngineArgs
    from vllm.logger import init_logger

    init_logger("vllm.vllm_sink").info("vllm-sink plugin registered (pid %d)", os.getpid())
    # The CLI flags are how a server user turns the feature on, so they exist even when it is off.
    from vllm_sink.patches import cli_args

    cli_args.apply()

    original = EngineArgs.create_engine_config
    if getattr(original, "_vllm_sink_observer", False):
        return

    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        settings = settings_from_additional_config(self.additional_config)
        if settings is None:
            return original(self, *args, **kwargs)
        from vllm_sink.enable import finalize_config, prepare_engine_args

        prepare_engine_args(self, settings)
        config = original(self, *args, **kwargs)
        finalize_config(config, settings)
        return config

    create_engine_config._vllm_sink_observer = True
    EngineArgs.create_engine_config = create_engine_config
