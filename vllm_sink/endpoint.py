"""``GET /vllm_sink/host_state``: how many entries the host holds per request, read from the live
processes (an endpoint plugin: vLLM's public ``vllm.endpoint_plugins`` entry point).

Opt-in like every endpoint plugin: ``VLLM_PLUGINS=vllm_sink,vllm_sink_state vllm serve ...``.
For each per-request container the answer is the largest one now held, in entries (token ids,
characters, logprob positions), so a client can watch it while its streams run:

- ``front_end``: the output processor's request states (detokenizer, sample logprobs, prompt),
  how many there are and the fewest output tokens any has processed;
- ``chat_streams``: the locals of every live ``/v1/chat/completions`` stream generator;
- ``engine_core``: the scheduler's requests (token lists, page hashes), as the engine core
  reported them with its last step's stats (``vllm_sink:core_*`` metrics);
- ``workers``: each worker's compacted request state (``vllm_sink_request_state``).
"""

from __future__ import annotations

import gc
import time
from argparse import Namespace
from typing import Any

from fastapi import APIRouter, FastAPI, HTTPException, Request

from vllm_sink.settings import CONFIG_KEY

ROUTE = "/vllm_sink/host_state"


def front_end_sizes(engine_client: Any) -> dict[str, int]:
    from vllm_sink.patches.output_processor import host_sizes

    states = list(engine_client.output_processor.request_states.values())
    sizes = [host_sizes(s) for s in states if s.detokenizer is not None]
    keys = ("detokenizer_token_ids", "detokenizer_text_chars", "sample_logprobs")
    out = {k: max((s[k] for s in sizes), default=0) for k in keys}
    out["prompt_token_ids"] = max((s["prompt_token_ids"] for s in sizes), default=0)
    out["requests"] = len(states)
    # How far the front end has got (a client reading the streams may lag behind it).
    progress = [s.detokenizer.num_output_tokens() for s in states if s.detokenizer is not None]
    out["output_tokens_min"] = min(progress, default=0)
    return out


def chat_stream_sizes() -> dict[str, int]:
    """Read the locals of the suspended chat stream generators (the real objects)."""
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat

    code = OpenAIServingChat.chat_completion_stream_generator.__code__
    frames = [
        g.ag_frame
        for g in gc.get_objects()
        if type(g).__name__ == "async_generator" and g.ag_code is code and g.ag_frame is not None
    ]
    texts, token_lists = [], []
    for frame in frames:
        local = frame.f_locals
        texts.extend(len(t) for t in local.get("previous_texts") or ())
        token_lists.extend(len(t) for t in local.get("generated_token_ids") or ())
    return {
        "streams": len(frames),
        "previous_text_chars": max(texts, default=0),
        "generated_token_ids": max(token_lists, default=0),
    }


def engine_core_sizes() -> dict[str, int]:
    """The ``vllm_sink:core_*`` gauges as last exported in this process."""
    import prometheus_client

    from vllm_sink import metrics

    names = (
        metrics.CORE_TOKENS_MAX,
        metrics.CORE_OUTPUTS_MAX,
        metrics.CORE_HASHES_MAX,
        metrics.CORE_BLOCK_LIST_MAX,
    )
    out = dict.fromkeys(names, 0)
    for family in prometheus_client.REGISTRY.collect():
        for sample in family.samples:
            if sample.name in out:
                out[sample.name] = max(out[sample.name], int(sample.value))
    return {name.removeprefix(metrics.PREFIX): value for name, value in out.items()}


def flat_sizes(state: dict[str, Any]) -> dict[str, int]:
    """A ``/vllm_sink/host_state`` answer as ``"where.container" -> entries`` (workers: the
    largest over workers; request counts left out)."""
    counts = ("requests", "output_tokens_min")
    out = {f"front_end.{k}": v for k, v in state["front_end"].items() if k not in counts}
    out.update({f"chat.{k}": v for k, v in state["chat_streams"].items() if k != "streams"})
    out.update({f"engine_core.{k}": v for k, v in state["engine_core"].items()})
    for worker in state["workers"]:
        for k, v in worker.items():
            if k.startswith(("request_", "stream_")):
                out[f"worker.{k}"] = max(out.get(f"worker.{k}", 0), v)
    return out


class HostStateEndpoint:
    """The ``vllm_sink_state`` endpoint plugin."""

    name = "vllm_sink_state"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        router = APIRouter()

        @router.get(ROUTE)
        async def host_state(raw_request: Request) -> dict[str, Any]:
            engine_client = getattr(raw_request.app.state, "vllm_sink_engine_client", None)
            config = getattr(engine_client, "vllm_config", None)
            if CONFIG_KEY not in (getattr(config, "additional_config", None) or {}):
                raise HTTPException(404, "this server's engine does not enable vllm_sink")
            t0 = time.perf_counter()
            out: dict[str, Any] = {"front_end": front_end_sizes(engine_client)}
            t1 = time.perf_counter()
            out["chat_streams"] = chat_stream_sizes()
            t2 = time.perf_counter()
            out["engine_core"] = engine_core_sizes()
            t3 = time.perf_counter()
            out["workers"] = await engine_client.collective_rpc("vllm_sink_request_state")
            t4 = time.perf_counter()
            # Time spent on each part (the first three block the server's event loop).
            out["seconds"] = {
                "front_end": round(t1 - t0, 4),
                "chat_streams": round(t2 - t1, 4),
                "engine_core": round(t3 - t2, 4),
                "workers": round(t4 - t3, 4),
            }
            return out

        app.include_router(router)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        state.vllm_sink_engine_client = engine_client
