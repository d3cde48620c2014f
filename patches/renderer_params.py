"""Patch ``TokenizeParams._token_len_check`` and the renderer's default tokenize settings: let
prompts longer than ``max_model_len`` through the renderer for sink-evicting engines.

The renderer checks a prompt's token count against ``max_model_len`` before the input
processor sees it, and its default settings for text prompts (``default_cmpl_tok_params``,
``default_chat_tok_params``) make the tokenizer cut a text at ``max_model_len + 1`` tokens; no
per-engine hook changes either. The defaults are rebuilt without a length limit when the
renderer's config enables ``vllm_sink``. The engine-level check
(:mod:`vllm_sink.patches.input_processor`) still rejects long prompts for engines without
``vllm_sink``, so a process that also hosts a vanilla engine keeps vanilla behaviour there.
"""

from __future__ import annotations

import dataclasses
import functools

from vllm_sink.compat import check_vllm_version
from vllm_sink.settings import CONFIG_KEY

_applied = False


def apply() -> None:
    global _applied
    if _applied:
        return
    check_vllm_version("vllm_sink.patches.renderer_params")
    from vllm.renderers.params import TokenizeParams

    original = TokenizeParams._token_len_check

    @functools.wraps(original)
    def _token_len_check(self, tokenizer, tokens):
        return tokens

    TokenizeParams._token_len_check = _token_len_check

    from functools import cached_property

    from vllm.renderers.base import BaseRenderer

    for name in ("default_cmpl_tok_params", "default_chat_tok_params"):
        original_prop = BaseRenderer.__dict__[name]

        def unbounded(self, _original=original_prop.func):
            params = _original(self)
            if CONFIG_KEY in (self.config.additional_config or {}):
                params = dataclasses.replace(params, max_total_tokens=None)
            return params

        prop = cached_property(unbounded)
        prop.__set_name__(BaseRenderer, name)
        setattr(BaseRenderer, name, prop)
    _applied = True
