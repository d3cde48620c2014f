"""Which paged kernel the sink wrapper runs on a platform, and how it is put in place.

- CPU: ``CPU_ATTN``, :class:`vllm_sink.attention.cpu.SinkCPUAttentionBackend`;
- CPU with ``VLLM_SINK_TRITON_ON_CPU=1``: ``TRITON_ATTN``,
  :class:`vllm_sink.attention.triton.SinkTritonAttentionBackend`, interpreted
  (:mod:`vllm_sink.attention.triton_on_cpu`), in the slot vLLM's CPU platform resolves
  (``CPU_ATTN``);
- CUDA, ROCm: ``TRITON_ATTN``, :class:`vllm_sink.attention.triton.SinkTritonAttentionBackend`.

The sink backend is registered for the slot only while a sink engine's runner builds its model
(:func:`registered`), so a vanilla engine in the same process keeps the stock backend.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vllm_sink.attention import triton_on_cpu


@dataclass(frozen=True)
class SinkKernel:
    kernel: str  # the stock backend whose kernels run: CPU_ATTN or TRITON_ATTN
    slot: str  # the AttentionBackendEnum member the platform resolves
    backend: str  # qualified name of the sink backend class
    simulated: bool = False  # Triton kernels interpreted on CPU tensors

    def describe(self) -> str:
        where = " (interpreted on CPU, VLLM_SINK_TRITON_ON_CPU=1)" if self.simulated else ""
        return f"{self.kernel}{where} via {self.backend}"


CPU = SinkKernel("CPU_ATTN", "CPU_ATTN", "vllm_sink.attention.cpu.SinkCPUAttentionBackend")
TRITON = SinkKernel(
    "TRITON_ATTN", "TRITON_ATTN", "vllm_sink.attention.triton.SinkTritonAttentionBackend"
)
TRITON_ON_CPU = SinkKernel("TRITON_ATTN", "CPU_ATTN", TRITON.backend, simulated=True)


def kernel_for(platform: Any) -> SinkKernel | None:
    """The sink kernel path on ``platform`` (vLLM's platform object); None: not implemented."""
    if platform.is_cpu():
        return TRITON_ON_CPU if triton_on_cpu.requested() else CPU
    if platform.is_cuda_alike():
        return TRITON
    return None


@contextlib.contextmanager
def registered(kernel: SinkKernel) -> Iterator[None]:
    """``kernel.slot`` resolves to the sink backend inside the block only.

    vLLM's backend selection is cached per selector config, so the cache is cleared on entry
    and exit: neither an earlier nor a later engine in this process sees the other's backend.
    """
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
    from vllm.v1.attention.selector import _cached_get_attn_backend

    if kernel.simulated:
        triton_on_cpu.install()
    slot = AttentionBackendEnum[kernel.slot]
    previous = slot.get_path() if slot.is_overridden() else None
    register_backend(slot, kernel.backend)
    _cached_get_attn_backend.cache_clear()
    try:
        yield
    finally:
        if previous is None:
            slot.clear_override()
        else:
            register_backend(slot, previous)
        _cached_get_attn_backend.cache_clear()
