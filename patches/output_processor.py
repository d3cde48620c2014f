"""Patch ``RequestState.make_request_output`` (front end): a streamed request of a sink engine
keeps only the tail of its history.

vLLM's output processor keeps, per request, every output token id (the detokenizer's
``token_ids``), the whole output text (one ``str`` grown per token, so a copy of the text per
token once it is long) and every sample logprob, although in ``DELTA`` mode each output carries
only what is new. No hook bounds them. After each output of a ``DELTA`` request that the input
processor marked as a sink engine's (``input_processor.STREAM_MARK``) this wrapper:

- stores the detokenizer's token ids, once more than ``TAIL_AFTER``, in a
  :class:`~vllm_sink.tail.TailList`: the length stays (``min_tokens`` counts it), the tokens not
  sent yet stay (``stream_interval``);
- cuts the output text before what is not sent yet and the longest stop string (the stop-string
  search reads no further back), shifting the sent offset by the same amount;
- keeps the last sample-logprob positions (each output slices its new ones from the end; the
  processor re-reads the last 4 to fix up split UTF-8).

Models with a slow (Python) tokenizer keep everything: their incremental state indexes the whole
token list. Streaming-input sessions keep everything too (a session's next chunk re-reads it).
Requests of other engines, non-streamed requests and ``FINAL_ONLY`` pass straight through.
"""

from __future__ import annotations

import functools
from typing import Any

from vllm.sampling_params import RequestOutputKind

from vllm_sink.compat import check_vllm_version
from vllm_sink.tail import TailList

_applied = False
# Entries kept beyond what is not sent yet; characters kept beyond the longest stop string.
TAIL_TOKENS = 64
TAIL_CHARS = 1024
# Token ids a stream's detokenizer holds as vLLM's plain list before it keeps only their tail:
# a short stream holds what vanilla vLLM holds, read at C speed.
TAIL_AFTER = 512


def is_sink_stream(state: Any) -> bool:
    """A DELTA request of a sink engine (marked by the input processor), not a session."""
    return (
        getattr(state, "_vllm_sink_stream", False)
        and state.output_kind == RequestOutputKind.DELTA
        and not state.streaming_input
    )


@functools.cache
def _detokenizer_kinds() -> tuple[type, type]:
    from vllm.v1.engine.detokenizer import FastIncrementalDetokenizer, IncrementalDetokenizer

    return FastIncrementalDetokenizer, IncrementalDetokenizer


def keep_tail(state: Any) -> None:
    """Drop what no later output of ``state`` reads (after an output was made). Runs for every
    output of a stream, so each part first checks, cheaply, whether it has anything to do."""
    fast, slow = _detokenizer_kinds()
    keep = TAIL_TOKENS + state.stream_interval  # token ids and logprob positions
    det = state.detokenizer
    kind = type(det)
    if (
        (kind is fast or kind is slow)
        and type(det.token_ids) is not TailList
        and len(det.token_ids) > TAIL_AFTER
    ):
        det.token_ids = TailList(det.token_ids, keep=keep)
    # Text is cut only once at least TAIL_CHARS of it were sent (cut >= hold >= TAIL_CHARS).
    if kind is fast and det._last_output_text_offset >= TAIL_CHARS:
        hold = max((len(s) for s in det.stop), default=0) + TAIL_CHARS
        cut = min(det._last_output_text_offset, len(det.output_text) - hold)
        if cut >= hold:  # amortized: the text is copied once per `hold` characters or more
            det.output_text = det.output_text[cut:]
            det._last_output_text_offset -= cut
    processor = state.logprobs_processor
    logprobs = getattr(processor, "logprobs", None)
    if logprobs is not None and len(logprobs) >= 2 * keep:
        processor.logprobs = logprobs[-keep:]


def host_sizes(state: Any) -> dict[str, int]:
    """Entries the front end holds for one request (read, for ``/vllm_sink/host_state``)."""
    from vllm_sink.metrics import stored

    det = state.detokenizer
    logprobs = getattr(state.logprobs_processor, "logprobs", None)
    return {
        "detokenizer_token_ids": stored(det.token_ids) if det is not None else 0,
        "detokenizer_text_chars": len(getattr(det, "output_text", "")),
        "sample_logprobs": len(logprobs) if logprobs is not None else 0,
        "prompt_token_ids": len(state.prompt_token_ids or ()),
    }


def apply() -> None:
    """Install the wrappers (idempotent). Called with the first sink-enabled engine config."""
    global _applied
    if _applied:
        return
    check_vllm_version("vllm_sink.patches.output_processor")
    from vllm.v1.engine.output_processor import RequestState

    from vllm_sink.patches.input_processor import STREAM_MARK

    original_new = RequestState.from_new_request.__func__
    original_output = RequestState.make_request_output

    @functools.wraps(original_new)
    def from_new_request(cls, tokenizer, request, *args, **kwargs):
        state = original_new(cls, tokenizer, request, *args, **kwargs)
        extra = getattr(request.sampling_params, "extra_args", None) or {}
        state._vllm_sink_stream = bool(extra.get(STREAM_MARK))
        return state

    @functools.wraps(original_output)
    def make_request_output(self, *args, **kwargs):
        output = original_output(self, *args, **kwargs)
        if is_sink_stream(self):
            keep_tail(self)
        return output

    RequestState.from_new_request = classmethod(from_new_request)
    RequestState.make_request_output = make_request_output
    _applied = True
