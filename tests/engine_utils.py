"""Helpers for tests that drive the real engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

# The RoPE variants the plugin accepts, as tiny checkpoints write them (make_tiny_llama).
ROPE_VARIANTS = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "partial rotary": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
}


def kv_manager(llm):
    """The scheduler's KV-cache manager of an in-process engine core."""
    core = llm.llm_engine.engine_core.engine_core
    return core.scheduler.kv_cache_manager


def pages_held(llm, external_id: str) -> int:
    """KV pages the request holds now (vLLM suffixes request ids internally)."""
    manager = kv_manager(llm).coordinator.single_type_managers[0]
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    ids = [rid for rid in scheduler.requests if rid.rsplit("-", 1)[0] == external_id]
    held = sum(manager.num_pages_held(rid) for rid in ids)
    # The manager counts in O(1); check it against the block lists themselves.
    null = manager._null_block
    assert held == sum(b != null for rid in ids for b in manager.req_to_blocks.get(rid, []))
    return held


def free_blocks(llm) -> int:
    return kv_manager(llm).block_pool.get_num_free_blocks()


def prompt_logprobs(output, token_ids) -> np.ndarray:
    """Per-token prompt log-probabilities (element 0 is nan), as the reference scores them."""
    pl = output.prompt_logprobs
    return np.array([np.nan] + [pl[i][token_ids[i]].logprob for i in range(1, len(token_ids))])


class Script:
    """A script running in a fresh interpreter (its own vLLM process tree), started at once;
    ``result()`` waits for it. Its output goes to temporary files, not pipes, so several can run
    side by side without one blocking on a full pipe while the test waits on another."""

    def __init__(self, code: str, env: dict[str, str] | None = None, timeout: int = 900):
        self.timeout = timeout
        self._out = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (read in result())
        self._err = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code)],
            stdout=self._out,
            stderr=self._err,
            text=True,
            env={**os.environ, **(env or {})},
            cwd=REPO,
        )

    def result(self):
        """(json, log) once the script has printed its one line ``RESULT <json>`` and exited."""
        try:
            self.proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        with self._out, self._err:
            self._out.seek(0)
            self._err.seek(0)
            stdout, stderr = self._out.read(), self._err.read()
        log = stdout + stderr
        if self.proc.returncode != 0:
            raise AssertionError(f"script failed ({self.proc.returncode}):\n{log[-6000:]}")
        lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
        assert lines, f"no RESULT line:\n{log[-6000:]}"
        return json.loads(lines[-1][len("RESULT ") :]), log


# Two scripts side by side on the 2 cores this suite is sized for: one unbound OpenMP thread
# each, so neither engine spins on a core the other computes on.
SIDE_BY_SIDE = {"OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


def run_script(code: str, env: dict[str, str] | None = None, timeout: int = 900):
    """Run ``code`` in a fresh interpreter (its own vLLM process tree); returns (json, log).

    The script must print one line ``RESULT <json>``.
    """
    return Script(code, env, timeout).result()


def sink_llm(model_dir, sink: int, window: int, max_len: int, **kwargs):
    """An in-process ``LLM`` with the plugin on, ``max_model_len`` and the model's positions
    shrunk to ``max_len`` (so "past the model's length" is cheap), 32-token pages."""
    from vllm import LLM

    args = dict(
        model=str(model_dir),
        block_size=32,
        enforce_eager=True,
        max_model_len=max_len,
        hf_overrides={"max_position_embeddings": max_len},
        seed=0,
        additional_config={"vllm_sink": {"sink_tokens": sink, "window_tokens": window}},
    )
    args.update(kwargs)
    return LLM(**args)
