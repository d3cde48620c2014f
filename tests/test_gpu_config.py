"""What the plugin builds for a GPU engine (CUDA, ROCm), checked on this machine's CPU build.

vLLM's ``CudaPlatform`` and ``RocmPlatform`` cannot be imported from the CPU build (their modules
load CUDA kernels at import), so the platforms here are vLLM's own ``Platform`` interface with the
CUDA and ROCm identities (``PlatformEnum``), which is what every platform check the plugin makes
reads (``is_cpu``, ``is_cuda_alike``, ``device_name``). The config is vLLM's own, built from the
engine arguments the plugin prepared for that platform; a GPU config's compiled-mode fields
(``VLLM_COMPILE``, ``FULL_AND_PIECEWISE``, attention as splitting ops) are set as vLLM's
defaults set them on CUDA, since the CPU platform turns CUDA graphs off.
"""

from __future__ import annotations

import os

import pytest
from vllm.engine.arg_utils import EngineArgs
from vllm.platforms.interface import Platform, PlatformEnum

from vllm_sink.enable import GPU_OPT_IN, UnsupportedConfigError, prepare_engine_args
from vllm_sink.settings import settings_from_additional_config

SINK = {"vllm_sink": {"sink_tokens": 4, "window_tokens": 256}}


class CudaLike(Platform):
    _enum = PlatformEnum.CUDA
    device_name = "cuda"
    device_type = "cuda"


class RocmLike(Platform):
    _enum = PlatformEnum.ROCM
    device_name = "rocm"
    device_type = "cuda"


@pytest.fixture
def clean_env(monkeypatch):
    """No opt-in and no runner choice unless a test sets them; whatever the plugin sets in the
    environment is removed afterwards."""
    monkeypatch.delenv(GPU_OPT_IN, raising=False)
    saved = os.environ.pop("VLLM_USE_V2_MODEL_RUNNER", None)
    yield monkeypatch
    os.environ.pop("VLLM_USE_V2_MODEL_RUNNER", None)
    if saved is not None:
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = saved


def _gpu_config(model_dir, platform, **kwargs):
    """The vLLM config of a sink engine whose arguments the plugin prepared for ``platform``."""
    args = EngineArgs(
        model=str(model_dir), block_size=32, max_model_len=512, additional_config=SINK, **kwargs
    )
    prepare_engine_args(args, settings_from_additional_config(SINK), platform)
    # vLLM's own config build (the plugin's hook would check it against this CPU platform).
    build = getattr(EngineArgs.create_engine_config, "__wrapped__", EngineArgs.create_engine_config)
    return args, build(args)


def _as_compiled_gpu_default(config) -> None:
    """The compiled-mode fields vLLM 0.32 gives a V1 engine on CUDA by default."""
    from vllm.config import CompilationMode, CUDAGraphMode

    cc = config.compilation_config
    cc.mode = CompilationMode.VLLM_COMPILE
    cc.cudagraph_mode = CUDAGraphMode.FULL_AND_PIECEWISE
    cc.splitting_ops = list(cc._attention_ops)


@pytest.mark.parametrize("platform", [CudaLike(), RocmLike()], ids=["cuda", "rocm"])
def test_gpu_engine_runs_triton_attn_on_model_runner_v1(platform, model_dir, clean_env):
    """On CUDA and ROCm the plugin selects TRITON_ATTN and Model Runner V1 (V2 is vLLM's GPU
    default), turns full CUDA graphs into piecewise ones, and starts with the opt-in."""
    from vllm.config import CUDAGraphMode

    from vllm_sink.attention.kernels import kernel_for
    from vllm_sink.enable import finalize_config

    clean_env.setenv(GPU_OPT_IN, "1")
    args, config = _gpu_config(model_dir, platform)
    assert args.attention_backend == "TRITON_ATTN"
    assert config.attention_config.backend.name == "TRITON_ATTN"
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    assert config.use_v2_model_runner is False
    assert args.async_scheduling is False
    assert kernel_for(platform).backend.endswith("SinkTritonAttentionBackend")
    _as_compiled_gpu_default(config)
    finalize_config(config, settings_from_additional_config(SINK), platform)
    assert config.compilation_config.cudagraph_mode == CUDAGraphMode.PIECEWISE


def test_gpu_engine_needs_the_opt_in(model_dir, clean_env):
    from vllm_sink.enable import refused_runtime

    _, config = _gpu_config(model_dir, CudaLike())
    (problem,) = refused_runtime(config, CudaLike())
    assert f"{GPU_OPT_IN}=1" in problem and "has not run on GPU hardware" in problem
    clean_env.setenv(GPU_OPT_IN, "1")
    assert refused_runtime(config, CudaLike()) == []


@pytest.mark.parametrize("backend", ["FLASH_ATTN", "FLASHINFER", "FLEX_ATTENTION"])
def test_gpu_engine_refuses_other_backends_by_name(backend, model_dir, clean_env):
    from vllm_sink.enable import refused_runtime

    clean_env.setenv(GPU_OPT_IN, "1")
    _, config = _gpu_config(model_dir, CudaLike(), attention_backend=backend)
    (problem,) = refused_runtime(config, CudaLike())
    assert f"attention_backend={backend}" in problem
    assert "TRITON_ATTN is the one vllm_sink supports" in problem


def test_gpu_engine_refuses_model_runner_v2_when_asked_for(model_dir, clean_env):
    """A user who asks for V2 keeps the choice and is told which setting the plugin needs (the
    config is built with V1, since this CPU build refuses V2 itself; the property reads the
    switch when asked)."""
    from vllm_sink.enable import refused_runtime

    clean_env.setenv(GPU_OPT_IN, "1")
    clean_env.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    args = EngineArgs(
        model=str(model_dir), block_size=32, max_model_len=512, additional_config=SINK
    )
    prepare_engine_args(args, settings_from_additional_config(SINK), CudaLike())
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "1"  # the user's choice is kept
    clean_env.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    _, config = _gpu_config(model_dir, CudaLike())
    clean_env.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    assert config.use_v2_model_runner
    (problem,) = refused_runtime(config, CudaLike())
    assert "Model Runner V2 (set VLLM_USE_V2_MODEL_RUNNER=0)" in problem


def test_full_cuda_graphs_without_piecewise_attention_are_refused(model_dir, clean_env):
    from vllm.config import CompilationMode, CUDAGraphMode

    from vllm_sink.enable import configure_cuda_graphs

    clean_env.setenv(GPU_OPT_IN, "1")
    _, config = _gpu_config(model_dir, CudaLike())
    cc = config.compilation_config
    cc.mode = CompilationMode.VLLM_COMPILE
    cc.cudagraph_mode = CUDAGraphMode.FULL
    cc.splitting_ops = []
    with pytest.raises(UnsupportedConfigError, match="cudagraph_mode=FULL without attention"):
        configure_cuda_graphs(config, CudaLike())


def test_sink_builders_declare_no_full_cuda_graph_capture():
    """vLLM asks each metadata builder what CUDA graphs it supports; the sink wrapper's answer
    makes vLLM itself fall back to piecewise graphs for decode."""
    from vllm.v1.attention.backend import AttentionCGSupport

    from vllm_sink.attention.cpu import SinkCPUAttentionMetadataBuilder
    from vllm_sink.attention.triton import SinkTritonAttentionMetadataBuilder

    for builder in (SinkTritonAttentionMetadataBuilder, SinkCPUAttentionMetadataBuilder):
        assert builder._cudagraph_support == AttentionCGSupport.NEVER


def test_gpu_deploy_files_use_the_opt_in():
    from pathlib import Path

    deploy = Path(__file__).resolve().parents[1] / "deploy"
    for name in ("cluster.yaml", "rayservice.yaml", "Dockerfile"):
        assert f"{GPU_OPT_IN}" in (deploy / name).read_text(), name


def test_gpu_check_command_runs(model_dir, tmp_path):
    """The command a GPU user runs first, run here on the CPU path at its quick size (on a tiny
    random Llama, to keep it short): parity against the reference passes and both decode rates
    are measured."""
    import json
    import subprocess
    import sys

    from vllm_sink.assets import make_tiny_llama

    model = make_tiny_llama(tmp_path / "tiny")
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_sink.gpu_check", "--quick", "--model", str(model)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["pass"] and result["parity"]["max_nats"] <= 1e-4
    assert result["decode"]["vanilla_tok_s"] > 0 and result["decode"]["plugin_tok_s"] > 0
