"""Patch ``EngineArgs.create_engine_config``: where the plugin sees an engine's settings.

vLLM builds every engine's config through this method (``LLM``, ``AsyncLLM``, ``vllm serve``,
Ray Serve's ``LLMServer``), and offers no hook that runs before the config is built (to adjust
engine arguments: scheduler class, worker extension, async scheduling) and after it (to refuse
what the plugin does not support, with the message naming it). The wrapper reads
``additional_config["vllm_sink"]``; without that key it calls the original and returns its result
untouched, so engines without the feature build exactly as before.

Like :mod:`vllm_sink.patches.cli_args` it is installed by :func:`vllm_sink.plugin.register`
whether or not the feature is on (it is how the plugin notices that an engine turns it on). On
an untested vLLM it is still installed, and an engine that enables the feature fails with the
version guard's message (:func:`vllm_sink.enable.prepare_engine_args`).
"""

from __future__ import annotations

import functools

from vllm_sink.settings import settings_from_additional_config

_applied = False


def apply() -> None:
    """Install the wrapper (idempotent)."""
    global _applied
    if _applied:
        return
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config

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

    EngineArgs.create_engine_config = create_engine_config
    _applied = True
