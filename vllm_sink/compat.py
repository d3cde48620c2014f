"""The vLLM versions this plugin was tested against, and the guard that enforces them."""

from __future__ import annotations

SUPPORTED_VLLM_VERSIONS = ("0.32.0",)


class UnsupportedVllmError(RuntimeError):
    """vLLM is a version the plugin's internals patches were not tested against."""


def vllm_version() -> str:
    import vllm

    return vllm.__version__


def check_vllm_version(component: str = "vllm-sink") -> None:
    """Fail loudly when the feature is enabled on a vLLM version it was not tested with."""
    version = vllm_version()
    # Local build tags (``0.32.0+cpu``) do not change the internals we rely on.
    if version.split("+")[0] not in SUPPORTED_VLLM_VERSIONS:
        raise UnsupportedVllmError(
            f"{component} supports vLLM {', '.join(SUPPORTED_VLLM_VERSIONS)} only, found vLLM "
            f"{version}. Install a supported vLLM (`pip install vllm-sink[cpu]` or "
            "`vllm-sink[gpu]`) or remove the `vllm_sink` settings."
        )
