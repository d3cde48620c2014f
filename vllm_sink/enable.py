"""Switching the feature on, in the process that builds an engine's config.

Everything goes through public engine arguments: the worker extension (which installs the
attention backend in each worker), async scheduling off, and the start-up checks that refuse
configurations the plugin does not support, each with a message naming the problem.
"""

from __future__ import annotations

import os
from typing import Any

from vllm.logger import init_logger

from vllm_sink import geometry
from vllm_sink.compat import check_vllm_version
from vllm_sink.settings import SinkConfigError, SinkSettings

logger = init_logger("vllm.vllm_sink")

WORKER_EXTENSION = "vllm_sink.worker.extension.SinkWorkerExtension"
# A GPU engine starts only with this opt-in until the TRITON_ATTN sink path has run on GPU
# hardware (it is proven through Triton's interpreter on CPU, tests/test_triton_path.py).
GPU_OPT_IN = "VLLM_SINK_GPU_UNVERIFIED"
SCHEDULER = "vllm_sink.scheduler.SinkScheduler"


class UnsupportedConfigError(ValueError):
    """A vLLM configuration the plugin does not support; the message names it."""


# Rotary embeddings whose re-rotation is a pure rotation the plugin implements and tests
# (``rope_type`` of the model's config; partial rotary and either pairing style are allowed).
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def _refused_args(engine_args: Any) -> list[str]:
    """Engine arguments the plugin does not support, each named as the user spells it."""
    a = engine_args
    refused = []
    # Tensor parallel works: every rank gets the same scheduler output, compacts the same rows
    # and moves the sinks of its own KV heads.
    for name in ("pipeline_parallel_size", "data_parallel_size"):
        if (getattr(a, name, 1) or 1) > 1:
            refused.append(f"{name}={getattr(a, name)} (untested with eviction)")
    for name in ("decode_context_parallel_size", "prefill_context_parallel_size"):
        if (getattr(a, name, 1) or 1) > 1:
            refused.append(f"{name}={getattr(a, name)}")
    if a.enable_prompt_embeds:
        refused.append("enable_prompt_embeds (the worker rebuilds prompts from token ids)")
    if a.enable_lora:
        refused.append("enable_lora (LoRA is untested under eviction)")
    if a.kv_transfer_config is not None:
        refused.append("kv_transfer_config (KV connectors move pages the plugin frees)")
    if a.kv_offloading_size:
        refused.append("kv_offloading_size (offloaded pages would outlive their eviction)")
    if a.logits_processors:
        refused.append(
            "logits_processors (custom processors read the worker's token lists, which hold "
            "only the tokens in the cache)"
        )
    if a.enable_chunked_prefill is False:
        refused.append(
            "enable_chunked_prefill=False (prompts longer than the window stream in chunks)"
        )
    if getattr(a, "long_prefill_token_threshold_adaptive", False):
        refused.append(
            "long_prefill_token_threshold_adaptive (a request's chunk must stay below the "
            "model's position limit)"
        )
    return refused


def gpu_opted_in() -> bool:
    return os.environ.get(GPU_OPT_IN, "0").strip().lower() in ("1", "true", "yes")


def prepare_for_platform(engine_args: Any, platform: Any) -> None:
    """On CUDA and ROCm: the sink path's kernel (``TRITON_ATTN``) and Model Runner V1, unless
    the user chose otherwise (then :func:`refused_runtime` names the setting)."""
    if not platform.is_cuda_alike():
        return
    if engine_args.attention_backend is None:
        engine_args.attention_backend = "TRITON_ATTN"
    if "VLLM_USE_V2_MODEL_RUNNER" not in os.environ:
        # Read by the config's ``use_v2_model_runner`` in this process and in the workers it
        # starts (they inherit the environment): later engines of this process use V1 too.
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        logger.info("vllm_sink: Model Runner V1 selected (VLLM_USE_V2_MODEL_RUNNER=0)")


def prepare_engine_args(engine_args: Any, settings: SinkSettings, platform: Any = None) -> None:
    """Adjust ``EngineArgs`` before vLLM builds its config (public fields only)."""
    check_vllm_version()
    if platform is None:
        from vllm.platforms import current_platform as platform
    if engine_args.speculative_config:
        raise UnsupportedConfigError("vllm_sink does not support speculative decoding")
    refused = _refused_args(engine_args)
    if refused:
        raise UnsupportedConfigError(f"vllm_sink does not support {'; '.join(refused)}")
    if str(engine_args.kv_cache_dtype) not in ("auto", "float16", "bfloat16", "float32"):
        raise UnsupportedConfigError(
            "vllm_sink does not support a quantized KV cache (kv_cache_dtype="
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
    prepare_for_platform(engine_args, platform)
    # Prefix caching stays the user's switch: with it on, pages computed before a stream's first
    # eviction are prefix-cache pages (vllm_sink.kv_cache) and finished streams are parked and
    # continued (vllm_sink.parked).


def step_tokens_per_request(scheduler_config: Any) -> int:
    """Most tokens one request may process in one step (its prefill chunk)."""
    cap = scheduler_config.max_num_batched_tokens
    threshold = scheduler_config.long_prefill_token_threshold
    return min(cap, threshold) if threshold > 0 else cap


def refused_runtime(vllm_config: Any, platform: Any) -> list[str]:
    """Platform, model runner and attention backend: the plugin implements the V1 runner with
    ``CPU_ATTN`` on the CPU platform and ``TRITON_ATTN`` on CUDA and ROCm
    (:mod:`vllm_sink.attention.kernels`); a GPU engine also needs the :data:`GPU_OPT_IN`."""
    from vllm_sink.attention.kernels import kernel_for

    problems = []
    kernel = kernel_for(platform)
    name = getattr(platform, "device_name", type(platform).__name__)
    if kernel is None:
        problems.append(
            f"the {name} platform (vllm_sink implements CPU_ATTN on the CPU platform and "
            "TRITON_ATTN on CUDA and ROCm; on this platform it would evict nothing)"
        )
    elif not platform.is_cpu() and not gpu_opted_in():
        problems.append(
            f"the {name} platform without {GPU_OPT_IN}=1 (the TRITON_ATTN sink path is tested "
            "through Triton's interpreter on CPU and has not run on GPU hardware; set "
            f"{GPU_OPT_IN}=1 to run it unverified)"
        )
    if vllm_config.use_v2_model_runner:
        problems.append("Model Runner V2 (set VLLM_USE_V2_MODEL_RUNNER=0)")
    attention = vllm_config.attention_config
    backend = getattr(attention.backend, "name", attention.backend)
    if kernel is not None and backend not in (None, kernel.slot):
        problems.append(
            f"attention_backend={backend} ({kernel.slot} is the one vllm_sink supports on "
            f"the {name} platform)"
        )
    if attention.backend_per_kind:
        problems.append("attention_config.backend_per_kind")
    return problems


def configure_cuda_graphs(vllm_config: Any, platform: Any) -> None:
    """Declare what the sink wrapper supports: attention outside captured CUDA graphs.

    Sink moves and compacted rows change per step, so attention runs eagerly between captured
    pieces (vLLM's ``PIECEWISE`` mode, the compiled default's attention split); full graphs are
    turned into piecewise ones, or refused where attention is not compiled piecewise."""
    from vllm.config import CompilationMode, CUDAGraphMode

    cc = vllm_config.compilation_config
    mode = cc.cudagraph_mode
    if platform.is_cpu() or mode is None or not mode.has_full_cudagraphs():
        return
    if cc.mode != CompilationMode.VLLM_COMPILE or not cc.splitting_ops_contain_attention():
        raise UnsupportedConfigError(
            f"vllm_sink does not support cudagraph_mode={mode.name} without attention compiled "
            "piecewise (sink attention runs outside captured graphs: use PIECEWISE or NONE)"
        )
    cc.cudagraph_mode = CUDAGraphMode.PIECEWISE
    logger.info(
        "vllm_sink: cudagraph_mode %s -> PIECEWISE (sink attention runs outside captured "
        "CUDA graphs)",
        mode.name,
    )


def rope_type(hf_config: Any) -> str:
    """The model's ``rope_type`` (``rope_parameters`` or, before transformers 5,
    ``rope_scaling``); ``"default"`` when none is given."""
    for name in ("rope_parameters", "rope_scaling"):
        params = getattr(hf_config, name, None) or {}
        kind = params.get("rope_type", params.get("type"))
        if kind:
            return str(kind)
    return "default"


def finalize_config(vllm_config: Any, settings: SinkSettings, platform: Any = None) -> None:
    """Refuse built configs the plugin does not support."""
    if platform is None:
        from vllm.platforms import current_platform as platform

    model_config = vllm_config.model_config
    hf = model_config.hf_text_config
    problems = refused_runtime(vllm_config, platform)
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
    elif not model_config.uses_mrope and rope_type(hf) not in SUPPORTED_ROPE_TYPES:
        problems.append(
            f"rope_type={rope_type(hf)!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)}; "
            "others are not implemented by the plugin's key re-rotation)"
        )
    if problems:
        raise UnsupportedConfigError(
            f"vllm_sink does not support {', '.join(problems)} ({model_config.model})"
        )

    configure_cuda_graphs(vllm_config, platform)
    if not platform.is_cpu():
        logger.warning(
            "vllm_sink on %s is UNVERIFIED on GPU hardware (%s=1): the TRITON_ATTN sink path "
            "is tested through Triton's interpreter on CPU only",
            platform.device_name,
            GPU_OPT_IN,
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
    from vllm_sink.patches import (
        chat_serving,
        input_processor,
        openai_server,
        output_processor,
        renderer_params,
        stat_loggers,
    )

    input_processor.apply()
    output_processor.apply()
    renderer_params.apply()
    openai_server.apply()
    chat_serving.apply()
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
