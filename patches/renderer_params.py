"""Patch ``TokenizeParams._token_len_check``: let prompts longer than ``max_model_len`` through
the renderer in processes that serve a sink-evicting engine.

The renderer checks a prompt's token count against ``max_model_len`` before the input
processor sees it, with no per-engine hook. The engine-level check
(:mod:`vllm_sink.patches.input_processor`) still rejects long prompts for engines without
``vllm_sink``, so a process that also hosts a vanilla engine keeps vanilla behaviour there.
"""

from __future__ import annotations

import functools

from vllm_sink.compat import check_vllm_version

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
    _applied = True
