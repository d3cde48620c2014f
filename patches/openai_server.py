"""Patch the OpenAI server's ``/v1/completions`` and ``/v1/chat/completions`` handlers: no
``max_model_len`` limit on prompts, chat histories or ``max_tokens`` for sink-evicting engines.

Before a request reaches the engine the OpenAI layer checks it against ``max_model_len`` in two
places, neither with a per-engine hook:

- ``CompletionRequest.build_tok_params`` / ``ChatCompletionRequest.build_tok_params`` build
  ``TokenizeParams(max_total_tokens=max_model_len, ...)``, whose ``__post_init__`` rejects
  ``max_tokens > max_model_len`` and whose tokenizer arguments reject (or cut at
  ``max_model_len + 1`` tokens) longer prompts. For a sink engine they are built with
  ``max_total_tokens=None``, TokenizeParams' own "no length limit".
- ``get_max_tokens`` (imported by name into both serving modules) rejects prompts longer than
  ``max_model_len`` and clamps ``max_tokens`` to ``max_model_len - prompt_len``. For a sink engine
  an explicit ``max_tokens`` is honoured as given; an omitted one gets
  :func:`vllm_sink.patches.input_processor.default_max_tokens`.

Which engine a request goes to is known only in the serving object's ``create_completion`` /
``create_chat_completion``; those wrappers set a context variable for the request's task, and the
two checks above are lifted only while it is set. Other endpoints and other engines in the same
process keep vLLM's behaviour; the engine's own checks (input processor) stay in force.
"""

from __future__ import annotations

import functools
from contextvars import ContextVar
from typing import Any

from vllm_sink.compat import check_vllm_version
from vllm_sink.settings import CONFIG_KEY

# True while a request for a sink-evicting engine is being prepared (per asyncio task).
_unbounded: ContextVar[bool] = ContextVar("vllm_sink_unbounded", default=False)

_applied = False


def serves_sink_engine(serving: Any) -> bool:
    """Whether an OpenAI serving object fronts an engine whose config enables ``vllm_sink``."""
    vllm_config = getattr(getattr(serving, "engine_client", None), "vllm_config", None)
    return CONFIG_KEY in (getattr(vllm_config, "additional_config", None) or {})


class _NoContextLimit:
    """A ``ModelConfig`` view without ``max_model_len``, for ``build_tok_params`` only."""

    max_model_len = None

    def __init__(self, model_config: Any) -> None:
        self._model_config = model_config

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model_config, name)


def unbounded_max_tokens(
    max_model_len: int,
    max_tokens: int | None,
    input_length: int,
    default_sampling_params: dict,
    override_max_tokens: int | None = None,
    truncate_prompt_tokens: int | None = None,
) -> int:
    """``get_max_tokens`` without the context-length check and clamp (same signature)."""
    from vllm.platforms import current_platform

    from vllm_sink.patches.input_processor import default_max_tokens

    if truncate_prompt_tokens is not None and truncate_prompt_tokens >= 0:
        input_length = min(input_length, truncate_prompt_tokens)
    requested = max_tokens if max_tokens is not None else default_sampling_params.get("max_tokens")
    if requested is None:
        requested = default_max_tokens(max_model_len, input_length)
    limits = (requested, override_max_tokens, current_platform.get_max_output_tokens(input_length))
    return min(v for v in limits if v is not None)


def _wrap_handler(cls: type, name: str) -> None:
    original = getattr(cls, name)

    @functools.wraps(original)
    async def handler(self, *args, **kwargs):
        token = _unbounded.set(serves_sink_engine(self))
        try:
            return await original(self, *args, **kwargs)
        finally:
            _unbounded.reset(token)

    setattr(cls, name, handler)


def _wrap_tok_params(cls: type) -> None:
    original = cls.build_tok_params

    @functools.wraps(original)
    def build_tok_params(self, model_config):
        if _unbounded.get():
            model_config = _NoContextLimit(model_config)
        return original(self, model_config)

    cls.build_tok_params = build_tok_params


def _wrap_max_tokens(module: Any) -> None:
    original = module.get_max_tokens

    @functools.wraps(original)
    def get_max_tokens(*args, **kwargs):
        if _unbounded.get():
            return unbounded_max_tokens(*args, **kwargs)
        return original(*args, **kwargs)

    module.get_max_tokens = get_max_tokens


def apply() -> None:
    """Install the wrappers (idempotent). Called with the first sink-enabled engine config."""
    global _applied
    if _applied:
        return
    check_vllm_version("vllm_sink.patches.openai_server")
    from vllm.entrypoints.openai.chat_completion import protocol as chat_protocol
    from vllm.entrypoints.openai.chat_completion import serving as chat_serving
    from vllm.entrypoints.openai.completion import protocol as completion_protocol
    from vllm.entrypoints.openai.completion import serving as completion_serving

    _wrap_handler(completion_serving.OpenAIServingCompletion, "create_completion")
    _wrap_handler(chat_serving.OpenAIServingChat, "create_chat_completion")
    _wrap_tok_params(completion_protocol.CompletionRequest)
    _wrap_tok_params(chat_protocol.ChatCompletionRequest)
    _wrap_max_tokens(completion_serving)
    _wrap_max_tokens(chat_serving)
    _applied = True
