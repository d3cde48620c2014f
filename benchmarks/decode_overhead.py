"""Decode throughput with the plugin against vanilla vLLM at the same number of cached tokens.

    .venv/bin/python benchmarks/decode_overhead.py [--streams 1 4] [--repeats 3]

Each engine runs in its own process (the plugin's backend override is per process), one after
the other, alternating over the repeats so machine noise hits both alike. Vanilla streams start
from a prompt of ``cached - gen/2`` tokens, so over the measured decode they hold on average
``cached`` tokens; plugin streams hold ``sink pages + window`` (about ``cached``) throughout,
evicting as they go. Decode throughput excludes the prefill (timed separately with
``max_tokens=1``). Results: JSON in ``benchmarks/results/decode_overhead/`` and the ratio per
stream count (plugin / vanilla; 1.0 means no overhead).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORKER = r"""
import json, os, sys, time
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from vllm_sink.assets import default_model_dir, long_text
from transformers import AutoTokenizer
if __name__ == "__main__":
    cfg = json.loads(sys.argv[1])
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    ids = tok(long_text(200000))["input_ids"]
    extra = {}
    prompt_len = cfg["cached"] - cfg["gen"] // 2
    if cfg["plugin"]:
        extra = {"vllm_sink": {"sink_tokens": 4, "window_tokens": cfg["cached"] - 32}}
        prompt_len = cfg["cached"] + 64  # already evicting when decode starts
    llm = LLM(model=str(default_model_dir()), block_size=32, enforce_eager=True,
              max_model_len=cfg["cached"] + cfg["gen"] + 128, max_num_seqs=64, seed=0,
              additional_config=extra)
    out = {}
    for streams in cfg["streams"]:
        prompts = [TokensPrompt(prompt_token_ids=ids[i * 997 : i * 997 + prompt_len])
                   for i in range(streams)]
        t0 = time.perf_counter()
        llm.generate(prompts, SamplingParams(max_tokens=1), use_tqdm=False)
        prefill = time.perf_counter() - t0
        params = SamplingParams(max_tokens=cfg["gen"], temperature=0, ignore_eos=True)
        t0 = time.perf_counter()
        res = llm.generate(prompts, params, use_tqdm=False)
        total = time.perf_counter() - t0
        tokens = sum(len(r.outputs[0].token_ids) for r in res)
        out[str(streams)] = tokens / max(total - prefill, 1e-9)
    print("RESULT " + json.dumps(out), flush=True)
"""


def run_engine(plugin: bool, streams: list[int], cached: int, gen: int) -> dict[str, float]:
    cfg = {"plugin": plugin, "streams": streams, "cached": cached, "gen": gen}
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, json.dumps(cfg)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"engine run failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return json.loads(lines[-1][7:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--cached", type=int, default=512, help="cached tokens per stream")
    parser.add_argument("--gen", type=int, default=128, help="decode tokens per stream")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/decode_overhead")
    args = parser.parse_args(argv)

    runs: dict[str, list[dict[str, float]]] = {"vanilla": [], "plugin": []}
    for rep in range(args.repeats):
        for name in ("vanilla", "plugin") if rep % 2 == 0 else ("plugin", "vanilla"):
            start = time.monotonic()
            runs[name].append(run_engine(name == "plugin", args.streams, args.cached, args.gen))
            print(f"repeat {rep + 1}/{args.repeats} {name}: {runs[name][-1]} "
                  f"({time.monotonic() - start:.0f}s)", flush=True)
    summary = {}
    for s in map(str, args.streams):
        ratios = [p[s] / v[s] for p, v in zip(runs["plugin"], runs["vanilla"], strict=True)]
        summary[s] = {
            "vanilla_tok_s": statistics.mean(v[s] for v in runs["vanilla"]),
            "plugin_tok_s": statistics.mean(p[s] for p in runs["plugin"]),
            "ratio_mean": statistics.mean(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
        }
        print(f"{s} stream(s): plugin/vanilla = {summary[s]['ratio_mean']:.3f} "
              f"(range {summary[s]['ratio_min']:.3f}-{summary[s]['ratio_max']:.3f})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "settings": vars(args),
        "runs": runs,
        "summary": summary,
    }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
