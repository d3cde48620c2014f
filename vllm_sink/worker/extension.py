"""Worker-process entry for the feature, loaded through ``parallel_config.worker_extension_cls``.

vLLM imports this module in each worker before it builds the model, and only when the plugin
enabled the feature for this engine. It installs the runner patch, which registers the sink
backend only while a sink engine's runner builds its model. The extension class adds read-only RPCs
(``LLM.collective_rpc("vllm_sink_...")``) that tests and tools use to look inside the worker.
"""

from __future__ import annotations

from typing import Any

from vllm_sink.compat import check_vllm_version
from vllm_sink.patches import model_runner

check_vllm_version("vllm_sink worker")
model_runner.apply()


class SinkWorkerExtension:
    """Mixed into vLLM's worker class by ``worker_extension_cls``."""

    def vllm_sink_worker_info(self) -> dict[str, Any]:
        import os

        import vllm_sink.plugin as plugin

        runner = self.model_runner  # type: ignore[attr-defined]
        backends = sorted(
            {
                type(g.backend).__name__ if not isinstance(g.backend, type) else g.backend.__name__
                for groups in runner.attn_groups
                for g in groups
            }
        )
        tracker = getattr(runner, "_vllm_sink_tracker", None)
        # The impls that wrote a step's moves (one per bank): did their caches stack?
        stacks = [getattr(i, "_vllm_sink_stack", None) for i in model_runner.sink_impls(runner)]
        stacked = [stack[1] is not None for stack in stacks if stack is not None]
        return {
            "pid": os.getpid(),
            "plugin_registered": plugin.is_registered(),
            "attention_backends": backends,
            # Since start: sink moves and window rebases applied (what tests check happened).
            "sink_moves": tracker.num_sink_moves if tracker else 0,
            "rebases": tracker.num_rebases if tracker else 0,
            # Whether the moves so far wrote every layer's sinks in one call (None before the
            # first move).
            "moves_in_one_write": all(stacked) if stacked else None,
            # Steps whose layers ran the kernel directly / through the sink wrapper (only
            # steps with sink work need it: route_layers).
            "steps_direct": tracker.steps_routed[0] if tracker else 0,
            "steps_wrapped": tracker.steps_routed[1] if tracker else 0,
        }

    def vllm_sink_streams(self) -> dict[str, dict[str, int]]:
        """Per tracked request: pages held, tokens dropped, position offset, prompt tokens
        computed since it (or its latest turn) arrived, and whether it continued a stream."""
        runner = self.model_runner  # type: ignore[attr-defined]
        tracker = getattr(runner, "_vllm_sink_tracker", None)
        if tracker is None:
            return {}
        out = {}
        for req_id, state in tracker.streams.items():
            req = runner.requests.get(req_id)
            out[req_id] = {
                "pages": len(req.block_ids[0]) if req is not None and req.block_ids else 0,
                "dropped": state.dropped,
                "offset": state.offset,
                "prefilled": state.prefilled,
                "continued": int(state.continued),
                "tokens": len(state.prompt),
            }
        return out

    def vllm_sink_parked(self) -> dict[str, int]:
        """Finished streams whose worker state is kept while their pages are parked."""
        tracker = getattr(self.model_runner, "_vllm_sink_tracker", None)  # type: ignore[attr-defined]
        if tracker is None:
            return {"streams": 0, "pages": 0}
        return {"streams": len(tracker.parked), "pages": len(tracker.parked_blocks)}

    def vllm_sink_request_state(self) -> dict[str, int]:
        """Sizes of every per-request container the plugin keeps in the worker (read, not
        derived): they must hold live and parked streams only."""
        runner = self.model_runner  # type: ignore[attr-defined]
        tracker = getattr(runner, "_vllm_sink_tracker", None)
        impls = model_runner.sink_impls(runner)
        pristine = [set(impl.rotator.pristine) for impl in impls if impl.rotator is not None]
        return {
            "streams": len(tracker.streams) if tracker else 0,
            "parked": len(tracker.parked) if tracker else 0,
            "parked_blocks": len(tracker.parked_blocks) if tracker else 0,
            "released_pending": len(tracker.released) if tracker else 0,
            "swapped": len(tracker.swapped) if tracker else 0,
            "sink_offsets": len(tracker.sink_offsets) if tracker else 0,
            "pristine": max((len(p) for p in pristine), default=0),
            "runner_requests": len(runner.requests),
            "layers": len(impls),
            # The largest per-request lists (entries): they must not grow with a stream.
            "request_prompt_token_ids_max": max(
                (len(r.prompt_token_ids or ()) for r in runner.requests.values()), default=0
            ),
            "request_output_token_ids_max": max(
                (len(r.output_token_ids) for r in runner.requests.values()), default=0
            ),
            "request_block_ids_max": max(
                (sum(map(len, r.block_ids)) for r in runner.requests.values()), default=0
            ),
            "stream_prompt_max": max((len(s.prompt) for s in tracker.streams.values()), default=0)
            if tracker
            else 0,
        }
