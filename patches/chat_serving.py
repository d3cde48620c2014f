"""Patch ``OpenAIServingChat.chat_completion_stream_generator``: a sink engine's chat stream does
not keep the whole text it has streamed.

The generator appends every delta to a local ``previous_texts[i]`` (one string copy of the whole
text per chunk once it is long), which only ``--enable-log-outputs`` reads, after the stream
ends. The generator is some 500 lines with that one statement in the middle and no hook around
it, so rather than copying it this module recompiles vLLM's own source with that single
statement routed through :func:`stream_text`, which keeps appending for other engines and with
``--enable-log-outputs`` (the operator asked for the whole text), and otherwise keeps nothing.
The statement must appear exactly once in the pinned vLLM, or the patch refuses to install.

Tool-call and reasoning parsers keep their own history of the stream; they are vLLM's, not
bounded here (README, "Host memory per stream").
"""

from __future__ import annotations

from typing import Any

from vllm_sink.compat import check_vllm_version, recompiled

_applied = False
STATEMENT = "previous_texts[i] += delta_text"
REPLACEMENT = "previous_texts[i] = _vllm_sink_stream_text(self, previous_texts[i], delta_text)"


def stream_text(serving: Any, previous: str, delta: str) -> str:
    """What the chat stream keeps of its text so far (vLLM: ``previous + delta``)."""
    from vllm_sink.patches.openai_server import serves_sink_engine

    if getattr(serving, "enable_log_outputs", False) or not serves_sink_engine(serving):
        return previous + delta
    return previous


def apply() -> None:
    """Install the recompiled generator (idempotent). Called with the first sink config."""
    global _applied
    if _applied:
        return
    check_vllm_version("vllm_sink.patches.chat_serving")
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat

    OpenAIServingChat.chat_completion_stream_generator = recompiled(
        OpenAIServingChat.chat_completion_stream_generator,
        STATEMENT,
        REPLACEMENT,
        {"_vllm_sink_stream_text": stream_text},
    )
    _applied = True
