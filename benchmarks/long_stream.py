"""2. Long streams: per-token decode latency and KV pages held against position in the stream.

    .venv/bin/python benchmarks/long_stream.py           # full: window 32, 16x window
    .venv/bin/python benchmarks/long_stream.py --quick

Like the paper's Figure 10 (latency against cache size), plus memory: the same workload, a
short real-text prompt followed by greedy decoding with ``ignore_eos``, on the plugin and on
vanilla vLLM. The plugin is asked for ``--multiple`` x window tokens, far past
``max_model_len``; vanilla keeps the whole history and is asked for as many tokens, which it
refuses, so it runs up to ``max_model_len`` (what it can do) instead. Every engine step is timed
and the pages held by the first stream (and by all streams) are read from the scheduler's KV
manager after the step.

Writes ``results.json`` (summary by position bucket), ``steps_{plugin,vanilla}.csv`` (every
step) and ``long_stream.png`` (latency and pages against position).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    BLOCK_SIZE,
    EnginePool,
    add_engine_args,
    engine_configs,
    engine_facts,
    finish_engine_args,
    log,
    plt,
    result_envelope,
    save_plot,
    standalone,
    write_command,
    write_csv,
    write_json,
)

from vllm_sink import geometry  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_engine_args(parser, "long_stream")
    parser.add_argument("--multiple", type=float, default=None, help="stream length / window")
    parser.add_argument("--streams", type=int, default=None, help="concurrent streams")
    parser.add_argument("--prompt-len", type=int, default=32)
    args = finish_engine_args(parser.parse_args(argv))
    if args.multiple is None:
        args.multiple = 9 if args.quick else 16
    if args.streams is None:
        args.streams = 1
    return args


def buckets(rows: list[list[float]], width: int) -> list[dict[str, Any]]:
    """Median step latency and pages held per ``width``-token bucket of stream position."""
    out: dict[int, list[list[float]]] = {}
    for row in rows:
        out.setdefault(int(row[0]) // width, []).append(row)
    return [
        {
            "from": b * width,
            "to": (b + 1) * width,
            "steps": len(rs),
            "step_ms_median": statistics.median(r[1] for r in rs),
            "pages_held_max": max(r[2] for r in rs),
        }
        for b, rs in sorted(out.items())
    ]


def run(args: argparse.Namespace, pool: EnginePool) -> dict[str, Any]:
    write_command(args.out)
    plugin_cfg, vanilla_cfg = engine_configs(args)
    plugin, vanilla = pool.start(plugin_cfg, vanilla_cfg)
    target = int(args.multiple * args.window)
    bound = geometry.max_pages(args.sinks, args.window, BLOCK_SIZE)
    results: dict[str, Any] = {}
    for name, worker in (("plugin", plugin), ("vanilla", vanilla)):
        common = {"prompt_len": args.prompt_len, "streams": args.streams}
        r = worker.call("stream", progress=f"{name} stream", max_tokens=target, **common)
        refused = r.get("error_on_add")
        if refused:
            # Vanilla cannot be asked past max_model_len: run it as far as it goes.
            log(f"{name} refused {target} tokens ({refused.splitlines()[0][:160]})")
            r = worker.call(
                "stream",
                progress=f"{name} stream",
                max_tokens=args.max_model_len - args.prompt_len,
                **common,
            )
            r["refused_target"] = refused
        rows = r.pop("rows")
        write_csv(
            args.out / f"steps_{name}.csv", [dict(zip(r["columns"], x, strict=True)) for x in rows]
        )
        decode = rows[1:]  # the first step is the prefill
        r["last_position"] = rows[-1][0] if rows else 0
        r["max_pages_held_stream0"] = max((x[2] for x in rows), default=0)
        r["step_ms_by_position"] = buckets(decode, args.window)
        r["rows_for_plot"] = decode
        results[name] = r
        log(
            f"{name}: reached position {r['last_position']} ({r['finish_reason']}), "
            f"max pages held {r['max_pages_held_stream0']}"
        )
    summary = {
        "target_tokens": target,
        "page_bound_plugin": bound,
        "plugin_last_position": results["plugin"]["last_position"],
        "vanilla_last_position": results["vanilla"]["last_position"],
        "vanilla_refused_target": bool(results["vanilla"].get("refused_target")),
        "plugin_max_pages": results["plugin"]["max_pages_held_stream0"],
        "vanilla_max_pages": results["vanilla"]["max_pages_held_stream0"],
        "plugin_within_bound": results["plugin"]["max_pages_held_stream0"] <= bound,
    }
    # Latency at comparable positions: the last window vanilla reached, and the plugin's last.
    last_bucket = results["vanilla"]["step_ms_by_position"][-1]["from"]
    at = {
        n: next(
            (
                b["step_ms_median"]
                for b in results[n]["step_ms_by_position"]
                if b["from"] == last_bucket
            ),
            None,
        )
        for n in results
    }
    summary["step_ms_at_vanilla_end"] = {"bucket_from": last_bucket, **at}
    summary["plugin_step_ms_first_vs_last_window"] = [
        results["plugin"]["step_ms_by_position"][1]["step_ms_median"]
        if len(results["plugin"]["step_ms_by_position"]) > 1
        else None,
        results["plugin"]["step_ms_by_position"][-1]["step_ms_median"],
    ]
    plot(results, args, bound, args.out / "long_stream.png")
    for r in results.values():
        r.pop("rows_for_plot")
    payload = result_envelope(
        "long_stream",
        {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        engines={"plugin": plugin_cfg, "vanilla": vanilla_cfg},
        engine_facts=engine_facts({"plugin": plugin, "vanilla": vanilla}),
        summary=summary,
        results=results,
    )
    write_json(args.out / "results.json", payload)
    return summary


def _rolling_median(xs: list[float], k: int) -> list[float]:
    return [statistics.median(xs[max(0, i - k) : i + k + 1]) for i in range(len(xs))]


def plot(results: dict[str, Any], args: argparse.Namespace, bound: int, path: Path) -> None:
    pyplot = plt()
    fig, (ax1, ax2) = pyplot.subplots(2, 1, figsize=(9, 7), sharex=True)
    colors = {"plugin": "tab:blue", "vanilla": "tab:gray"}
    for name, r in results.items():
        rows = r["rows_for_plot"]
        if not rows:
            continue
        pos = [x[0] for x in rows]
        ms = [x[1] for x in rows]
        ax1.plot(pos, ms, ".", ms=2, alpha=0.25, color=colors[name])
        ax1.plot(pos, _rolling_median(ms, 16), color=colors[name], label=f"{name} (rolling median)")
        ax2.plot(pos, [x[2] for x in rows], color=colors[name], label=name)
    for ax in (ax1, ax2):
        ax.axvline(args.max_model_len, color="tab:red", ls=":", lw=1)
    ax2.axhline(bound, color="tab:blue", ls="--", lw=0.8, label=f"contract bound ({bound} pages)")
    ax1.set_ylabel(f"ms per decode step ({args.streams} stream(s))")
    ax1.set_yscale("log")
    ax1.set_title(
        f"Long stream: sinks {args.sinks} + window {args.window}, "
        f"max_model_len {args.max_model_len} (red)"
    )
    ax1.legend()
    ax2.set_ylabel("KV pages held by stream 0")
    ax2.set_xlabel("position in the stream (tokens)")
    ax2.legend()
    save_plot(fig, path)


def main(argv: list[str] | None = None) -> int:
    return standalone(parse_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
