"""Patch ``AsyncLLM``'s stat-logger list: add :class:`vllm_sink.metrics.SinkStatLogger`.

``AsyncLLM.__init__`` builds its stat loggers from its ``stat_loggers`` argument plus the
``vllm.stat_logger_plugins`` entry points. Neither fits: ``vllm serve`` passes no loggers, and an
entry point would load the logger into every vLLM server on the machine (and turn stats on even
with ``--disable-log-stats``), not only into engines that enable the feature. So, once an engine
config enables ``vllm_sink`` in this process, the module-level factory loader that ``AsyncLLM``
calls gets the sink logger appended; the logger exports nothing for engines without sinks.
"""

from __future__ import annotations

import functools

from vllm_sink.compat import check_vllm_version

_applied = False


def apply() -> None:
    global _applied
    if _applied:
        return
    check_vllm_version("vllm_sink.patches.stat_loggers")
    from vllm.v1.engine import async_llm

    from vllm_sink.metrics import SinkStatLogger

    original = async_llm.load_stat_logger_plugin_factories

    @functools.wraps(original)
    def load_stat_logger_plugin_factories():
        return [SinkStatLogger, *original()]

    async_llm.load_stat_logger_plugin_factories = load_stat_logger_plugin_factories
    _applied = True
