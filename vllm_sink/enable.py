"""Switching the feature on, in the process that builds an engine's config.

Everything goes through public engine arguments: the worker extension (which installs the
attention backend in each worker), async scheduling off, and the start-up checks that refuse
configurations the plugin does not support, each with a message naming the problem.
"""

from __future__ import annotations

from typing import Any

from vllm.logger import init_logger

from vllm_sink import geometry
from vllm_sink.compat import check_vllm_version
from vllm_sink.settings import SinkConfigError, SinkSettings

logger = init_logger("vllm.vllm_sink")

WORKER_EXTENSION = "vllm_sink.worker.SinkWorkerExtension"
SCHEDULER = "vllm_sink.scheduler.SinkScheduler"


class UnsupportedConfigError(ValueError):
    """A vLLM configuration the plugin does not support; the message names it."""


def prepare_engine_args(engine_args: Any, settings: SinkSettings) -> None:
    """Adjust ``EngineArgs`` before vLLM builds its config (public fields only)."""
    check_vllm_version()
    if engine_args.speculative_config:
        raise UnsupportedConfigError("vllm_sink does not support speculative decoding")
    if str(engine_args.kv_cache_dtype).startswith("fp8"):
        raise UnsupportedConfigError(
            "vllm_sink does not support an fp8 KV cache (kv_cache_dtype="
            f"{engine_args.kv_cache_dtype}): sink keys are re-rotated in place"
        )
    ext = engine_args.worker_extension_cls
    if ext and ext != WORKER_EXTENSION:
        raise UnsupportedConfigError(
            f"vllm_sink needs worker_extension_cls={WORKER_EXTENSION}, got {ext}"
        )
    engine_args.worker_extension_cls = WORKER_EXTENSION
    sched = engine_args.scheduler_cls
    if sched and sched not in (SCHEDULER, "vllm.v1.core.sched.scheduler.Scheduler"):
        raise UnsupportedConfigError(f"vllm_sink needs scheduler_cls={SCHEDULER}, got {sched}")
    engine_args.scheduler_cls = SCHEDULER
    # The worker compacts requests between steps; tokens in flight would straddle that.
    engine_args.async_scheduling = False
    # Prefix caching stays the user's switch: with it on, finished streams are parked and
    # resumed (vllm_sink.parked); pages are never shared as prefix-cache hits.


def step_tokens_per_request(scheduler_config: Any) -> int:
    """Most tokens one request may process in one step (its prefill chunk)."""
    cap = scheduler_config.max_num_batched_tokens
    threshold = scheduler_config.long_prefill_token_threshold
    return min(cap, threshold) if threshold > 0 else cap


def finalize_config(vllm_config: Any, settings: SinkSettings) -> None:
    """Refuse built configs the plugin does not support."""
    model_config = vllm_config.model_config
    hf = model_config.hf_text_config
    problems = []
    if model_config.use_mla:
        problems.append("MLA attention")
    if model_config.uses_mrope:
        problems.append("M-RoPE")
    if (
        model_config.is_hybrid
        or getattr(hf, "layer_types", None)
        and any(t != "full_attention" for t in hf.layer_types)
    ):
        problems.append("hybrid / sliding-window layers")
    if getattr(hf, "sliding_window", None):
        problems.append("a model sliding window")
    rope = getattr(hf, "rope_parameters", None) or {}
    if "rope_theta" not in rope and getattr(hf, "rope_theta", None) is None:
        problems.append("a model without RoPE")
    if problems:
        raise UnsupportedConfigError(
            f"vllm_sink does not support {', '.join(problems)} ({model_config.model})"
        )

    block_size = vllm_config.cache_config.block_size
    sb = geometry.sink_pages(settings.sink_tokens, block_size)
    # A compacted request holds the sink pages, the window, a partial page and one step's
    # tokens; they must fit both the worker's rows (max_model_len) and the model's positions.
    held = sb * block_size + settings.window_tokens + block_size
    max_positions = hf.max_position_embeddings
    room = min(model_config.max_model_len - 1, max_positions) - held
    if room < 1:
        raise SinkConfigError(
            f"vllm_sink.window_tokens={settings.window_tokens} is too large for this model: "
            f"sink pages + window + one page need {held + 1} positions and rows, but "
            f"max_position_embeddings={max_positions} and max_model_len="
            f"{model_config.max_model_len}"
        )
    # Cap each request's tokens per step (its prefill chunk), not the whole step's budget:
    # many requests' chunks still share one step, as in vanilla vLLM.
    scheduler_config = vllm_config.scheduler_config
    cap = step_tokens_per_request(scheduler_config)
    if cap > room:
        logger.info(
            "vllm_sink: long_prefill_token_threshold set to %d so one request's step stays "
            "below the model's position limit",
            room,
        )
        scheduler_config.long_prefill_token_threshold = room
    from vllm_sink.patches import input_processor, openai_server, renderer_params, stat_loggers

    input_processor.apply()
    renderer_params.apply()
    openai_server.apply()
    stat_loggers.apply()
    logger.info(
        "vllm_sink enabled: sink_tokens=%d (%d page(s) of %d), window_tokens=%d, "
        "resumed streams %s (prefix caching)",
        settings.sink_tokens,
        sb,
        block_size,
        settings.window_tokens,
        "on" if vllm_config.cache_config.enable_prefix_caching else "off",
    )
