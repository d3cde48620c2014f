"""``VLLM_SINK_TRITON_ON_CPU=1``: run vLLM's ``TRITON_ATTN`` kernels on a CPU engine, interpreted.

Nothing here runs vLLM on a GPU, so the GPU path (the sink wrapper over ``TRITON_ATTN``: its
metadata builder, KV layout, cache writer and paged kernel) is proven on CPU tensors through
Triton's interpreter (``TRITON_INTERPRET=1``). This module is the one place that makes that
possible; the shared sink path never asks whether it runs simulated.

vLLM's CPU build turns Triton off (``vllm.triton_utils`` exports placeholders because this Triton
has no CPU backend), so :func:`install`:

- sets ``TRITON_INTERPRET=1`` (read when a kernel is decorated, i.e. when its module is imported)
  and turns the ``@triton.jit`` helpers of ``triton.language`` (``tl.zeros``, ``tl.sum``, ...),
  built as compiled functions when ``import vllm`` imported Triton, into interpreted ones;
- hands ``vllm.triton_utils`` the real ``triton`` / ``triton.language`` and (re)imports the kernel
  modules so their ``@triton.jit`` functions are the interpreter's;
- answers the CUDA-only questions the launchers ask (``torch.cuda.get_device_capability``) with
  the capability of a Hopper GPU, in the kernel modules only.

Slow (the interpreter runs each program instance in Python): for tests on tiny models.
"""

from __future__ import annotations

import importlib
import os
import sys
import types

ENV = "VLLM_SINK_TRITON_ON_CPU"
# The modules whose kernels the sink path runs (vLLM 0.32), in import order.
KERNEL_MODULES = (
    "vllm.v1.attention.ops.triton_attention_helpers",
    "vllm.v1.attention.ops.triton_reshape_and_cache_flash",
    "vllm.v1.attention.ops.triton_prefill_attention",
    "vllm.v1.attention.ops.triton_unified_attention",
    "vllm.v1.attention.backends.triton_attn",
    "vllm_sink.attention.triton",  # its classes derive from the backend's
)
# Kernel modules whose launchers ask ``torch.cuda.get_device_capability``.
CAPABILITY_ASKERS = ("vllm.v1.attention.ops.triton_reshape_and_cache_flash",)
SIMULATED_CAPABILITY = (9, 0)

_installed = False


def requested() -> bool:
    """Whether the user asked for the Triton path on a CPU engine."""
    return os.environ.get(ENV, "0").strip().lower() in ("1", "true", "yes")


def install() -> None:
    """Make vLLM's Triton attention kernels run interpreted on CPU tensors (idempotent)."""
    global _installed
    if _installed:
        return
    os.environ["TRITON_INTERPRET"] = "1"
    import triton
    import triton.language as tl
    import triton.language.extra.libdevice as tldevice
    import vllm.triton_utils as triton_utils

    _interpret_language_helpers()

    triton_utils.triton, triton_utils.tl, triton_utils.tldevice = triton, tl, tldevice
    for name in KERNEL_MODULES:
        module = sys.modules.get(name)
        module = importlib.reload(module) if module is not None else importlib.import_module(name)
        # Launchers ask the CUDA runtime for a tile-size heuristic; answer as a Hopper GPU would.
        if name in CAPABILITY_ASKERS:
            module.torch = _torch_with_capability(module.torch)
    _installed = True


def _interpret_language_helpers() -> None:
    """Replace every compiled ``JITFunction`` that ``triton.language`` modules hold with the
    interpreted function ``@triton.jit`` would have built under ``TRITON_INTERPRET=1``."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    converted: dict[int, InterpretedFunction] = {}
    for name, module in list(sys.modules.items()):
        if not name.startswith("triton.language") or module is None:
            continue
        for attr, value in list(vars(module).items()):
            if isinstance(value, JITFunction):
                if id(value) not in converted:
                    converted[id(value)] = InterpretedFunction(
                        value.fn,
                        version=value.version,
                        do_not_specialize=value.do_not_specialize,
                        do_not_specialize_on_alignment=value.do_not_specialize_on_alignment,
                        debug=value.debug,
                        noinline=value.noinline,
                        repr=value._repr,
                        launch_metadata=value.launch_metadata,
                    )
                setattr(module, attr, converted[id(value)])


def _torch_with_capability(torch_module: types.ModuleType) -> types.ModuleType:
    """``torch`` as seen by one kernel module: the same, except that
    ``torch.cuda.get_device_capability`` answers :data:`SIMULATED_CAPABILITY`."""
    if isinstance(torch_module, _SimulatedTorch):
        return torch_module
    return _SimulatedTorch(torch_module)


class _SimulatedCuda(types.SimpleNamespace):
    def __init__(self, cuda: types.ModuleType) -> None:
        super().__init__()
        self._cuda = cuda

    def __getattr__(self, name: str):
        return getattr(self._cuda, name)

    @staticmethod
    def get_device_capability(device=None) -> tuple[int, int]:
        return SIMULATED_CAPABILITY


class _SimulatedTorch(types.ModuleType):
    def __init__(self, torch_module: types.ModuleType) -> None:
        super().__init__(torch_module.__name__)
        self._torch = torch_module
        self.cuda = _SimulatedCuda(torch_module.cuda)

    def __getattr__(self, name: str):
        return getattr(self._torch, name)
