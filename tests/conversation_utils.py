"""What a continued stream computes, spelled out for the tests from the contract's words.

A conversation is one stream. Each engine step of the conversation is listed as the tokens it
processes; the reference (:class:`vllm_sink.reference.StreamingReference`) runs exactly those
steps, so its log-probabilities are what the engine must produce:

- a new turn's prefill is one step (or several of at most ``cap`` tokens) over the tokens the
  engine had not computed yet;
- every generated token but the last of a turn is then computed in its own decode step;
- the last sampled token of a turn is never computed by that turn. A streaming-input session
  drops it (vLLM's session update), a client that resends the history computes it as the first
  token of the next turn's prefill.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def reference_turn(ref, prefill: Sequence[int], outputs: Sequence[int], cap: int):
    """Run one turn on ``ref``; returns (argmax choices, log-probs of ``outputs``, and the
    margin between the best and second-best log-prob at each choice).

    The first output is predicted by the last prefill step, output ``j+1`` by the decode step
    that computes output ``j``.
    """
    # One stream through the batched path: step_together on one stream is ``step``, bit for bit.
    return reference_turns([ref], [prefill], [outputs], cap)[0]


def reference_turns(
    refs, prefills: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]], cap: int
):
    """:func:`reference_turn` for several independent streams at once: what it returns for each
    stream, as a list. Each prefill runs alone (steps of at most ``cap``); the decode steps run
    together (:func:`vllm_sink.reference.step_together`, one weight read per step for all), each
    stream taking part while it still has an output to compute (lengths may differ)."""
    from vllm_sink.reference import step_together

    if not len(refs) == len(prefills) == len(outputs):
        raise ValueError("one prefill and one output list per stream")
    # Per stream: (choice, log-prob of the output, margin) of each prediction, taken at once so
    # that the [B, vocab] step results are not all kept.
    seen: list[list[tuple[int, float, float]]] = [[] for _ in refs]

    def note(b: int, p: torch.Tensor) -> None:
        seen[b].append(
            (
                int(torch.argmax(p)),
                float(p[outputs[b][len(seen[b])]]),
                float(-torch.diff(p.topk(2).values)),
            )
        )

    for b, (ref, prefill) in enumerate(zip(refs, prefills, strict=True)):
        prefill = list(prefill)
        for i in range(0, len(prefill), cap):
            logp = ref.step(prefill[i : i + cap])
        note(b, logp[-1])
    for j in range(max((len(o) for o in outputs), default=0) - 1):
        active = [b for b, o in enumerate(outputs) if j < len(o) - 1]
        logp = step_together([refs[b] for b in active], [outputs[b][j] for b in active])
        for row, b in enumerate(active):
            note(b, logp[row])
    return [
        ([c for c, _, _ in s], np.array([lp for _, lp, _ in s]), [m for _, _, m in s]) for s in seen
    ]


_models: dict = {}


def reference_stream(model_dir, sink: int, window: int, block_size: int):
    """A fresh float32 reference stream (the weights are loaded once per test session)."""
    from vllm_sink.reference import ReferenceModel, StreamingReference

    if "model" not in _models:
        _models["model"] = ReferenceModel(model_dir)
    return StreamingReference(
        _models["model"], sink_tokens=sink, window_tokens=window, block_size=block_size
    )


def greedy_result(output) -> tuple[list[int], list[float], int]:
    """A finished request's sampled tokens, their log-probs and ``num_cached_tokens``."""
    c = output.outputs[0]
    logprobs = [s[t].logprob for t, s in zip(c.token_ids, c.logprobs, strict=True)]
    return list(c.token_ids), logprobs, output.num_cached_tokens
