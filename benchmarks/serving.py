"""6. Serving: ``vllm bench serve`` against ``vllm serve`` with and without the plugin's flags.

    .venv/bin/python benchmarks/serving.py            # full: 8 x (128 in, 512 out), 2 repeats,
                                                      # compiled and eager
    .venv/bin/python benchmarks/serving.py --quick    # eager only

Two OpenAI servers start side by side on 127.0.0.1 (free ports), identical but for
``--sink-tokens 4 --window-tokens W`` on one of them; the benchmark client then runs against
each in turn, alternating the order over repeats, on a long-output workload (random prompts of
``--input-len`` tokens, ``--output-len`` generated tokens with ``ignore_eos``, ``--concurrency``
requests in flight). Reported per server: output throughput, TTFT and inter-token latency (ITL)
from vLLM's own client, and the plugin / vanilla ratios with their spread over repeats. The full
run does this in vLLM's default compiled mode, then with ``--enforce-eager`` (a pair of servers
each). Servers are killed with their process groups at the end. Writes ``results.json``,
``runs.csv``, ``serving.png`` and the client's raw JSON per run under ``raw/``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    EnginePool,
    add_engine_args,
    alternate,
    finish_engine_args,
    fmt_spread,
    log,
    plt,
    result_envelope,
    save_plot,
    spread,
    write_command,
    write_csv,
    write_json,
)

from vllm_sink.serve_process import SERVER_POPEN, free_port, kill_group, wait_healthy  # noqa: E402

VLLM = str(Path(sys.executable).with_name("vllm"))
SERVED = "smollm2"
METRICS = [
    "output_throughput",
    "mean_ttft_ms",
    "median_ttft_ms",
    "p99_ttft_ms",
    "mean_itl_ms",
    "median_itl_ms",
    "p99_itl_ms",
    "mean_tpot_ms",
    "duration",
    "completed",
    "total_output_tokens",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_engine_args(parser, "serving")
    parser.add_argument("--input-len", type=int, default=None)
    parser.add_argument("--output-len", type=int, default=None)
    parser.add_argument("--num-prompts", type=int, default=None)
    parser.add_argument("--concurrency", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--modes", nargs="+", choices=("compiled", "eager"), default=None)
    args = finish_engine_args(parser.parse_args(argv))
    if args.modes is None:
        args.modes = (
            ["eager" if args.eager else "compiled"] if args.quick else ["compiled", "eager"]
        )
    defaults = (
        {"input_len": 32, "output_len": 64, "num_prompts": 2, "concurrency": 2, "repeats": 1}
        if args.quick
        else {
            "input_len": 128,
            "output_len": 512,
            "num_prompts": 8,
            "concurrency": 8,
            "repeats": 2,
        }  # fmt: skip
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    # Vanilla must hold a whole request; both servers get the same max_model_len.
    args.max_model_len = max(args.max_model_len, args.input_len + args.output_len)
    return args


class Server:
    """One ``vllm serve`` in its own process group."""

    def __init__(
        self, name: str, extra: list[str], args: argparse.Namespace, logs: Path, eager: bool
    ):
        from vllm_sink.assets import default_model_dir

        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        logs.mkdir(parents=True, exist_ok=True)
        self.log_path = logs / f"server-{name}.log"
        cmd = [VLLM, "serve", str(default_model_dir()), "--served-model-name", SERVED,
               "--host", "127.0.0.1", "--port", str(self.port),
               "--max-model-len", str(args.max_model_len), "--block-size", "32",
               "--dtype", args.dtype, *(["--enforce-eager"] if eager else []),
               "--no-enable-prefix-caching", "--seed", "0", *extra]  # fmt: skip
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": f"{args.kv_space:g}",
               "VLLM_NO_USAGE_STATS": "1", "TOKENIZERS_PARALLELISM": "false",
               "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}  # fmt: skip
        self.cmd = cmd
        with open(self.log_path, "wb") as log_file:
            self.proc = subprocess.Popen(
                cmd,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                **SERVER_POPEN,
            )
        self.started = time.monotonic()

    def wait_healthy(self, timeout: float = 600) -> float:
        wait_healthy(self.proc, self.url, self.log_path, self.name, timeout)
        return time.monotonic() - self.started

    def kill(self) -> None:
        kill_group(self.proc)


def bench(server: Server, args: argparse.Namespace, raw: Path, tag: str, seed: int) -> dict:
    """One ``vllm bench serve`` run; returns the client's metrics."""
    from vllm_sink.assets import default_model_dir

    raw.mkdir(parents=True, exist_ok=True)
    cmd = [VLLM, "bench", "serve", "--backend", "vllm", "--base-url", server.url,
           "--endpoint", "/v1/completions", "--model", SERVED,
           "--tokenizer", str(default_model_dir()), "--dataset-name", "random",
           "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
           "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.concurrency),
           "--ignore-eos", "--seed", str(seed), "--percentile-metrics", "ttft,tpot,itl,e2el",
           "--save-result", "--result-dir", str(raw),
           "--result-filename", f"{tag}.json"]  # fmt: skip
    env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    (raw / f"{tag}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        raise RuntimeError(f"vllm bench serve failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    data = json.loads((raw / f"{tag}.json").read_text())
    return {k: data.get(k) for k in METRICS} | {"command": " ".join(cmd)}


def run(args: argparse.Namespace, pool: EnginePool | None = None) -> dict[str, Any]:
    """``pool`` is unused (servers are their own processes); kept for ``run_all.py``."""
    write_command(args.out)
    runs: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    commands: dict[str, Any] = {}
    start: dict[str, Any] = {}
    for mode in args.modes:
        mode_runs, commands[mode], start[mode], summary[mode] = run_mode(args, mode)
        runs += mode_runs
    payload = result_envelope(
        "serving",
        {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        servers=commands,
        server_start_s=start,
        summary=summary,
        runs=runs,
    )
    write_json(args.out / "results.json", payload)
    write_csv(args.out / "runs.csv", [{k: v for k, v in r.items() if k != "command"} for r in runs])
    plot(summary, args.out / "serving.png")
    return summary


def run_mode(args: argparse.Namespace, mode: str) -> tuple[list, dict, dict, dict[str, Any]]:
    """A plugin and a vanilla server in ``mode``, the client against each in turn."""
    from tqdm import tqdm

    flags = ["--sink-tokens", str(args.sinks), "--window-tokens", str(args.window)]
    logs = args.out / "logs"
    eager = mode == "eager"
    servers = {
        "plugin": Server(f"{mode}-plugin", flags, args, logs, eager),
        "vanilla": Server(f"{mode}-vanilla", [], args, logs, eager),
    }
    runs: list[dict[str, Any]] = []
    try:
        start = {n: s.wait_healthy() for n, s in servers.items()}
        log(f"{mode} servers healthy after {max(start.values()):.0f}s")
        total = 2 * args.repeats
        with tqdm(total=total, desc=f"serving {mode}", unit="run", file=sys.stderr) as bar:
            for rep in range(args.repeats):
                for name in alternate(rep, 0, ["plugin", "vanilla"]):
                    tag = f"{mode}_{name}_{rep}"
                    m = bench(servers[name], args, args.out / "raw", tag, seed=rep)
                    runs.append({"mode": mode, "repeat": rep, "server": name, **m})
                    bar.set_postfix(server=name, tok_s=f"{m['output_throughput']:.1f}")
                    bar.update()
    finally:
        for s in servers.values():
            s.kill()
    plugin_log = servers["plugin"].log_path.read_text(errors="replace")
    summary: dict[str, Any] = {"plugin_enabled_in_log": "vllm_sink enabled" in plugin_log}
    keys = ["output_throughput", "median_ttft_ms", "mean_ttft_ms", "median_itl_ms", "mean_itl_ms",
            "p99_itl_ms"]  # fmt: skip
    for name in servers:
        summary[name] = {k: spread(r[k] for r in runs if r["server"] == name and r[k] is not None)
                         for k in keys}  # fmt: skip
    for k in keys:
        pairs = [
            (p[k], v[k])
            for p in runs
            for v in runs
            if p["server"] == "plugin" and v["server"] == "vanilla" and p["repeat"] == v["repeat"]
        ]
        summary[f"ratio_{k}"] = spread(a / b for a, b in pairs if a and b)
    log(
        f"{mode}: plugin/vanilla output throughput "
        f"{fmt_spread(summary['ratio_output_throughput'])}, "
        f"median ITL {fmt_spread(summary['ratio_median_itl_ms'])}, "
        f"median TTFT {fmt_spread(summary['ratio_median_ttft_ms'])}"
    )
    return runs, {n: s.cmd for n, s in servers.items()}, start, summary


def plot(summary: dict[str, Any], path: Path) -> None:
    pyplot = plt()
    fig, axes = pyplot.subplots(1, 3, figsize=(11, 3.6))
    panels = [("output_throughput", "output tok/s"), ("median_ttft_ms", "median TTFT (ms)"),
              ("median_itl_ms", "median ITL (ms)")]  # fmt: skip
    for ax, (key, label) in zip(axes, panels, strict=True):
        names = [(m, n) for m in summary for n in ("vanilla", "plugin")]
        med = [summary[m][n][key]["median"] for m, n in names]
        lo = [x - summary[m][n][key]["min"] for x, (m, n) in zip(med, names, strict=True)]
        hi = [summary[m][n][key]["max"] - x for x, (m, n) in zip(med, names, strict=True)]
        colors = ["tab:gray" if n == "vanilla" else "tab:blue" for _, n in names]
        ax.bar([f"{n}\n{m}" for m, n in names], med, yerr=[lo, hi], capsize=4, color=colors)
        ax.set_title(label)
    fig.suptitle("vllm bench serve: vllm serve with and without --sink-tokens/--window-tokens")
    save_plot(fig, path)


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
