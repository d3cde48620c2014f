"""vLLM's own benchmark commands measure streams past ``max_model_len`` (issue 28).

``vllm bench throughput`` and ``vllm bench latency`` with the sink flags run requests whose
prompt plus output exceed ``max_model_len`` and report as usual, every request producing its
output tokens; without the flags they stop with vLLM's own message, exactly as vanilla. (``vllm
bench serve`` against a sink server:
``tests/test_serve.py::test_vllm_bench_serve_past_max_model_len``.) Small versions of the
issue's commands: the embedded model, 256 positions, eager mode.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

VLLM = str(Path(sys.executable).with_name("vllm"))
MAX_LEN = 256
SINK_FLAGS = ["--sink-tokens", "4", "--window-tokens", "64"]
VANILLA_MESSAGE = "Please ensure that max_model_len is greater than"


def _bench(command: str, model_dir, args: list[str], sink: bool) -> subprocess.CompletedProcess:
    cmd = [VLLM, "bench", command, "--model", str(model_dir),
           "--max-model-len", str(MAX_LEN),
           "--hf-overrides", json.dumps({"max_position_embeddings": MAX_LEN}),
           "--block-size", "32", "--enforce-eager", "--seed", "0",
           *args, *(SINK_FLAGS if sink else [])]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)


# The random dataset's own length flags: vLLM 0.32 prefers them (with their defaults, 1024 and
# 128) over --input-len / --output-len, with a warning.
THROUGHPUT = ["--dataset-name", "random", "--random-input-len", "64", "--random-output-len", "600",
              "--num-prompts", "4"]  # fmt: skip


def test_bench_throughput_past_max_model_len(model_dir, tmp_path):
    out = tmp_path / "throughput.json"
    proc = _bench("throughput", model_dir, [*THROUGHPUT, "--output-json", str(out)], sink=True)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    # Every request produced its 600 tokens (counted from the engine's outputs), 64 + 600 > 256.
    (produced,) = re.findall(r"Total num output tokens:\s+(\d+)", log)
    assert int(produced) == 4 * 600
    result = json.loads(out.read_text())
    assert result["num_requests"] == 4 and result["tokens_per_second"] > 0
    assert "vllm_sink enabled" in log


def test_bench_throughput_without_the_flags_keeps_vllms_check(model_dir):
    proc = _bench("throughput", model_dir, THROUGHPUT, sink=False)
    assert proc.returncode != 0
    assert VANILLA_MESSAGE in proc.stdout + proc.stderr


@pytest.mark.parametrize("sink", [True, False], ids=["sink", "vanilla"])
def test_bench_latency_past_max_model_len(sink, model_dir, tmp_path):
    out = tmp_path / "latency.json"
    args = ["--input-len", "32", "--output-len", "400", "--batch-size", "2",
            "--num-iters-warmup", "1", "--num-iters", "2", "--output-json", str(out)]  # fmt: skip
    proc = _bench("latency", model_dir, args, sink=sink)
    log = proc.stdout + proc.stderr
    if not sink:
        assert proc.returncode != 0 and VANILLA_MESSAGE in log
        return
    assert proc.returncode == 0, log[-6000:]
    result = json.loads(out.read_text())
    assert len(result["latencies"]) == 2 and result["avg_latency"] > 0
