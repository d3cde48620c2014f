"""Patch ``GPUModelRunner._update_states``, ``_prepare_inputs``, ``_get_prompt_logprobs_dict``,
``_bookkeeping_sync`` and ``load_model`` (V1 runner; the CPU runner inherits the first four and
has its own ``load_model``, patched too): the hooks that connect the worker's stream state
(:mod:`vllm_sink.worker.streams`) and the sink attention backends (:mod:`vllm_sink.attention`)
to vLLM's runner.

The runner sizes each request's rows by ``max_model_len`` and derives positions, slot mapping and
``seq_lens`` from ``num_computed_tokens``; no public hook lets a plugin change how the runner
indexes a request, hands its attention builders per-step data, or picks a backend per engine.

- ``_update_states``: before vLLM's own update, :func:`~vllm_sink.worker.streams.before_update`
  compacts requests whose window slid, continues, swaps and parks streams; the sink state of
  streams that ended is freed in every layer.
- ``_prepare_inputs``: :func:`~vllm_sink.worker.streams.plan_step` gives each request's position
  offset and the step's sink work; the work goes to each attention metadata builder (one that
  did not use the previous step's is an error) and the offsets are added to the positions vLLM
  computed (after the slot mapping, which stays compact).
- ``load_model``: the sink backend for this platform's kernel is registered only while this
  runner builds its model (:func:`vllm_sink.attention.kernels.registered`), and the start-up log
  names it; each attention layer then gets its module's own rotary embedding
  (:func:`vllm_sink.attention.rope.bind_model_ropes`).
- ``_get_prompt_logprobs_dict``: vLLM indexes prompt log-probabilities by prompt position; it is
  shown the logical prompt for the duration of the call.
- ``_bookkeeping_sync``: after a step that discards a seeded request's sample (a partial
  prefill), vLLM rewinds its generator by offset, which a CPU generator cannot do (the engine
  dies; vanilla vLLM too, once a seeded prompt is chunked). Eviction caps every request's chunk,
  so the sink runner keeps such generators' state in ``_prepare_inputs`` and restores it here.

Every wrapper passes straight through for runners whose config does not enable ``vllm_sink``.
Model Runner V2 would need its own counterpart; :mod:`vllm_sink.enable` selects V1 or refuses.
"""

from __future__ import annotations

import functools

from vllm_sink.compat import check_vllm_version
from vllm_sink.worker.streams import StreamTracker, before_update, plan_step

_applied = False


def sink_enabled(runner) -> bool:
    """Whether this runner's engine enables ``vllm_sink`` (else every wrapper passes through)."""
    from vllm_sink.settings import CONFIG_KEY

    return CONFIG_KEY in (runner.vllm_config.additional_config or {})


def metadata_builders(runner) -> list:
    return [g.get_metadata_builder() for groups in runner.attn_groups for g in groups]


def sink_impls(runner) -> list:
    """The runner's sink attention implementations (one per layer)."""
    from vllm_sink.attention.sink import SinkAttentionImpl

    layers = runner.compilation_config.static_forward_context.values()
    return [
        layer.impl
        for layer in layers
        if isinstance(getattr(layer, "impl", None), SinkAttentionImpl)
    ]


def apply() -> None:
    """Install the wrappers (idempotent). Called in workers of sink-enabled engines; they pass
    through for any other engine's runner in the same process."""
    global _applied
    if _applied:
        return
    check_vllm_version("vllm_sink.patches.model_runner")
    import numpy as np
    import torch
    from vllm.logger import init_logger
    from vllm.platforms import current_platform
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_sink.attention import kernels
    from vllm_sink.attention.rope import bind_model_ropes
    from vllm_sink.attention.sink import route_layers

    logger = init_logger("vllm.vllm_sink")
    original_loads = {cls: cls.load_model for cls in (GPUModelRunner, CPUModelRunner)}
    original_update = GPUModelRunner._update_states
    original_prepare = GPUModelRunner._prepare_inputs
    original_prompt_logprobs = GPUModelRunner._get_prompt_logprobs_dict
    original_bookkeeping = GPUModelRunner._bookkeeping_sync

    def tracker_of(runner) -> StreamTracker | None:
        tracker = getattr(runner, "_vllm_sink_tracker", None)
        if tracker is None:
            if not sink_enabled(runner):
                return None
            if getattr(runner, "use_async_scheduling", False):
                raise RuntimeError("vllm_sink requires async scheduling off")
            tracker = StreamTracker(runner)
            runner._vllm_sink_tracker = tracker
        return tracker

    def layers_of(runner, tracker: StreamTracker) -> tuple[list, list]:
        """The runner's metadata builders and sink impls, found once per set of attention
        groups (a per-step walk of every layer costs more than the step's own sink work)."""
        groups = runner.attn_groups
        if tracker.layers is None or tracker.layers[0] is not groups:
            tracker.layers = (groups, metadata_builders(runner), sink_impls(runner))
        return tracker.layers[1], tracker.layers[2]

    def load_model_of(cls):
        original_load = original_loads[cls]

        @functools.wraps(original_load)
        def load_model(self, *args, **kwargs):
            if not sink_enabled(self) or getattr(self, "_vllm_sink_loading", False):
                return original_load(self, *args, **kwargs)
            kernel = kernels.kernel_for(current_platform)
            if kernel is None:
                raise RuntimeError(f"vllm_sink: no sink kernel for {current_platform.device_name}")
            self._vllm_sink_loading = True  # one registration if a runner's load calls super's
            try:
                with kernels.registered(kernel):
                    result = original_load(self, *args, **kwargs)
            finally:
                self._vllm_sink_loading = False
            layers = bind_model_ropes(self.get_model())
            logger.info("vllm_sink: sink attention runs %s (%d layers)", kernel.describe(), layers)
            return result

        return load_model

    @functools.wraps(original_update)
    def _update_states(self, scheduler_output):
        tracker = tracker_of(self)
        if tracker is None:
            return original_update(self, scheduler_output)
        before_update(tracker, self, scheduler_output)
        if tracker.copied or tracker.released or tracker.renamed:
            tracker.settle_sink_state(layers_of(self, tracker)[1])
        return original_update(self, scheduler_output)

    @functools.wraps(original_prepare)
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        tracker = tracker_of(self)
        if tracker is None:
            return original_prepare(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        offsets, step = plan_step(tracker, self, num_scheduled_tokens)
        builders, impls = layers_of(self, tracker)
        for builder in builders:
            if builder.sink_step is not None:
                raise RuntimeError(
                    f"vllm_sink: {type(builder).__name__} did not use the previous step's work"
                )
            builder.sink_step = step
        work = bool(step)
        route_layers(impls, work)
        tracker.steps_routed[work] += 1
        result = original_prepare(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        if any(offsets):
            # Slot mapping is already computed from the compact positions; the model reads
            # these buffers afterwards.
            per_token = np.repeat(np.asarray(offsets, dtype=np.int64), num_scheduled_tokens)
            total = len(per_token)
            if self.positions.device.type == "cpu":
                self.positions.numpy()[:total] += per_token  # a third of torch's op overhead
            else:
                self.positions[:total] += torch.from_numpy(per_token).to(
                    self.positions.device, non_blocking=True
                )
        # Seeded rows whose sampled token this step discards (a partial prefill): vLLM rewinds
        # their generator by offset afterwards, which a CPU generator cannot do (it raises and
        # the engine dies). Keep their state now, restore it instead (_bookkeeping_sync).
        gens = self.input_batch.generators
        if gens:
            rows = np.nonzero(self.discard_request_mask.np[: self.input_batch.num_reqs])[0]
            saved = {int(i): gens[int(i)].get_state() for i in rows if int(i) in gens}
            self._vllm_sink_rewind = saved
        else:
            self._vllm_sink_rewind = None
        return result

    @functools.wraps(original_bookkeeping)
    def _bookkeeping_sync(self, *args, **kwargs):
        saved = getattr(self, "_vllm_sink_rewind", None)
        if not saved:
            return original_bookkeeping(self, *args, **kwargs)
        self._vllm_sink_rewind = None
        gens = self.input_batch.generators
        held = {i: gens.pop(i) for i in saved if i in gens}
        for i, generator in held.items():
            generator.set_state(saved[i])  # as if this step had not sampled
        try:
            return original_bookkeeping(self, *args, **kwargs)
        finally:
            gens.update(held)

    @functools.wraps(original_prompt_logprobs)
    def _get_prompt_logprobs_dict(self, hidden_states, num_scheduled_tokens):
        # Prompt log-probabilities are indexed by prompt position: show vLLM the logical prompt
        # and position for the duration of the call.
        tracker = tracker_of(self)
        swapped = []
        for req_id in self.num_prompt_logprobs if tracker is not None else ():
            state = tracker.streams.get(req_id)
            req_state = self.requests.get(req_id)
            if (
                state is None
                or req_state is None
                or not state.dropped
                and (len(state.prompt) == len(req_state.prompt_token_ids or []))
            ):
                continue
            swapped.append((req_state, req_state.prompt_token_ids, req_state.num_computed_tokens))
            req_state.prompt_token_ids = state.prompt
            req_state.num_computed_tokens += state.dropped
        try:
            return original_prompt_logprobs(self, hidden_states, num_scheduled_tokens)
        finally:
            for req_state, prompt, computed in swapped:
                req_state.prompt_token_ids = prompt
                req_state.num_computed_tokens = computed

    for cls in original_loads:
        cls.load_model = load_model_of(cls)
    GPUModelRunner._update_states = _update_states
    GPUModelRunner._prepare_inputs = _prepare_inputs
    GPUModelRunner._get_prompt_logprobs_dict = _get_prompt_logprobs_dict
    GPUModelRunner._bookkeeping_sync = _bookkeeping_sync
    _applied = True
