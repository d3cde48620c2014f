"""vLLM's own benchmark commands measure streams past ``max_model_len`` (issue 28).

``vllm bench throughput`` and ``vllm bench latency`` with the sink flags run requests whose
prompt plus output exceed ``max_model_len`` and report as usual, every request producing its
output tokens; without the flags they stop with vLLM's own message, exactly as vanilla. (``vllm
bench serve`` against a sink server:
``tests/test_serve.py::test_vllm_bench_serve_past_max_model_len``.) Small versions of the
issue's commands: the embedded model, 256 positions, eager mode, float32 (a CPU without native
bf16 runs the suite too).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine_utils import SIDE_BY_SIDE

VLLM = str(Path(sys.executable).with_name("vllm"))
MAX_LEN = 256
SINK_FLAGS = ["--sink-tokens", "4", "--window-tokens", "64"]
VANILLA_MESSAGE = "Please ensure that max_model_len is greater than"


def _cmd(command: str, model_dir, args: list[str], sink: bool) -> list[str]:
    return [VLLM, "bench", command, "--model", str(model_dir),
            "--max-model-len", str(MAX_LEN),
            "--hf-overrides", json.dumps({"max_position_embeddings": MAX_LEN}),
            "--block-size", "32", "--enforce-eager", "--seed", "0", "--dtype", "float32",
            *args, *(SINK_FLAGS if sink else [])]  # fmt: skip


# The random dataset's own length flags: vLLM 0.32 prefers them (with their defaults, 1024 and
# 128) over --input-len / --output-len, with a warning.
THROUGHPUT = ["--dataset-name", "random", "--random-input-len", "64", "--random-output-len", "400",
              "--num-prompts", "4"]  # fmt: skip
LATENCY = ["--input-len", "32", "--output-len", "300", "--batch-size", "2",
           "--num-iters-warmup", "1", "--num-iters", "2"]  # fmt: skip


@dataclass
class Run:
    returncode: int
    log: str
    out: Path  # the command's --output-json


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory) -> dict[str, Run]:
    """The four commands, started together (mostly imports and start-up; one unbound OpenMP
    thread each, so the two that compute share the two cores): name -> its run."""
    tmp = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", **SIDE_BY_SIDE}
    started = {}
    for command, args in (("throughput", THROUGHPUT), ("latency", LATENCY)):
        for sink in (True, False):
            name = f"{command}-{'sink' if sink else 'vanilla'}"
            out, log = tmp / f"{name}.json", tmp / f"{name}.log"
            cmd = _cmd(command, model_dir, [*args, "--output-json", str(out)], sink)
            with log.open("w") as f:
                proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, text=True, env=env)
            started[name] = (proc, log, out)
    runs = {}
    try:
        for name, (proc, log, out) in started.items():
            proc.wait(timeout=900)
            runs[name] = Run(proc.returncode, log.read_text(), out)
    finally:
        for proc, _, _ in started.values():
            proc.kill()
    return runs


def test_bench_throughput_past_max_model_len(runs):
    run = runs["throughput-sink"]
    assert run.returncode == 0, run.log[-6000:]
    # Every request produced its 400 tokens (counted from the engine's outputs), 64 + 400 > 256.
    (produced,) = re.findall(r"Total num output tokens:\s+(\d+)", run.log)
    assert int(produced) == 4 * 400
    result = json.loads(run.out.read_text())
    assert result["num_requests"] == 4 and result["tokens_per_second"] > 0
    assert "vllm_sink enabled" in run.log


def test_bench_throughput_without_the_flags_keeps_vllms_check(runs):
    run = runs["throughput-vanilla"]
    assert run.returncode != 0
    assert VANILLA_MESSAGE in run.log


@pytest.mark.parametrize("sink", [True, False], ids=["sink", "vanilla"])
def test_bench_latency_past_max_model_len(sink, runs):
    run = runs[f"latency-{'sink' if sink else 'vanilla'}"]
    if not sink:
        assert run.returncode != 0 and VANILLA_MESSAGE in run.log
        return
    assert run.returncode == 0, run.log[-6000:]
    result = json.loads(run.out.read_text())
    assert len(result["latencies"]) == 2 and result["avg_latency"] > 0
