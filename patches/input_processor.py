"""Patch ``InputProcessor._validate_prompt_len``: accept decoder prompts longer than
``max_model_len`` in engines with sink eviction.

vLLM rejects such prompts in the frontend before the engine sees them; no public hook changes the
limit per engine. With sink eviction a prompt of any length streams through chunked prefill in
bounded memory, so the length check is skipped for engines whose config enables ``vllm_sink``
(the empty-prompt check stays). An omitted ``max_tokens`` keeps vLLM's default
(``max_model_len - prompt_len``), floored at 1 so a long prompt still gets an answer
(:func:`default_max_tokens`, the one place this rule lives); it is written into a copy of the
caller's ``SamplingParams``, never the caller's object. A streamed (``DELTA``) request's copy
is marked (``extra_args[STREAM_MARK]``) so the front end keeps only the tail of its history.
"""

from __future__ import annotations

import functools

from vllm_sink.compat import check_vllm_version
from vllm_sink.settings import CONFIG_KEY

_applied = False
# Marks a streamed (DELTA) request of a sink engine in its SamplingParams.extra_args.
STREAM_MARK = "vllm_sink_stream"


def default_max_tokens(max_model_len: int, prompt_len: int) -> int:
    """``max_tokens`` for a request that gave none: vLLM's default, floored at 1."""
    return max(max_model_len - prompt_len, 1)


def _enabled(processor) -> bool:
    return CONFIG_KEY in (processor.vllm_config.additional_config or {})


def apply() -> None:
    global _applied
    if _applied:
        return
    check_vllm_version("vllm_sink.patches.input_processor")
    from vllm.sampling_params import RequestOutputKind, SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    original_validate = InputProcessor._validate_prompt_len
    original_process = InputProcessor.process_inputs

    @functools.wraps(original_validate)
    def _validate_prompt_len(self, prompt_len, prompt_type):
        if prompt_type == "decoder" and prompt_len > 0 and _enabled(self):
            params = getattr(self, "_vllm_sink_params", None)
            if getattr(params, "max_tokens", 0) is None:
                # vLLM's default, computed here where the prompt length is known.
                params.max_tokens = default_max_tokens(self.model_config.max_model_len, prompt_len)
            return None
        return original_validate(self, prompt_len, prompt_type)

    @functools.wraps(original_process)
    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        if isinstance(params, SamplingParams) and _enabled(self):
            streamed = params.output_kind == RequestOutputKind.DELTA
            if params.max_tokens is None or streamed:
                params = params.clone()  # changes go into a copy, not the caller's object
            if streamed:
                # The front end keeps only the tail of this request's history
                # (vllm_sink.patches.output_processor).
                params.extra_args = {**(params.extra_args or {}), STREAM_MARK: True}
        self._vllm_sink_params = params
        try:
            return original_process(self, request_id, prompt, params, *args, **kwargs)
        finally:
            self._vllm_sink_params = None

    InputProcessor._validate_prompt_len = _validate_prompt_len
    InputProcessor.process_inputs = process_inputs
    _applied = True
