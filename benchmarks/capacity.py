"""5. Capacity: long streams held at once under a fixed KV budget, plugin against vanilla.

    .venv/bin/python benchmarks/capacity.py            # full: 24 pages, 10 streams of 6x window
    .venv/bin/python benchmarks/capacity.py --quick

Both engines get the same budget of ``--budget-pages`` free KV pages (the rest of the pool is
taken out for the run, so one engine start serves every budget) and the same workload:
``--streams`` requests submitted at once, each a real-text prompt of ``length - decode`` tokens
followed by ``--decode`` generated tokens, ``length = --multiple x window`` (6x by default).
After every step the worker records how many requests run, how many of them are past their
prompt (decoding), how many wait, the preemptions so far and the pages in use.

Reported per engine: the most streams decoding at once, the median while the queue is still
non-empty (the sustained level), preemptions, and the aggregate decode throughput of the run.
The contract's arithmetic is given beside it: ``budget // pages per stream``, with a plugin
stream bounded by ``sink pages + ceil(window / 32) + 1`` pages and a vanilla stream needing
``ceil(length / 32)``. Writes ``results.json``, ``steps_{plugin,vanilla}.csv``, ``capacity.png``.
"""

from __future__ import annotations

import argparse
import math
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
    add_engine_args(parser, "capacity")
    parser.add_argument("--budget-pages", type=int, default=None)
    parser.add_argument("--streams", type=int, default=None, help="requests submitted at once")
    parser.add_argument("--multiple", type=float, default=None, help="stream length / window")
    parser.add_argument("--decode", type=int, default=None, help="generated tokens per stream")
    parser.add_argument("--steps", type=int, default=None, help="engine steps watched (cap)")
    args = finish_engine_args(parser.parse_args(argv))
    if args.multiple is None:
        args.multiple = 6.0
    if args.budget_pages is None:
        args.budget_pages = 18 if args.quick else 24
    if args.streams is None:
        args.streams = 8 if args.quick else 10
    if args.decode is None:
        args.decode = 64
    if args.steps is None:
        args.steps = 100 if args.quick else 150
    return args


def analyse(rows: list[list[float]], columns: list[str], tokens: list[int]) -> dict[str, Any]:
    c = {name: i for i, name in enumerate(columns)}
    decoding = [r[c["decoding"]] for r in rows]
    # The sustained level: while requests still wait, how many streams decode at once.
    queued = [r[c["decoding"]] for r in rows if r[c["waiting"]] > 0]
    first_preempt = next((r for r in rows if r[c["preemptions"]] > 0), None)
    wall = sum(r[c["step_ms"]] for r in rows) / 1000
    return {
        "steps": len(rows),
        "max_decoding_at_once": max(decoding, default=0),
        "median_decoding_while_queued": statistics.median(queued) if queued else None,
        "max_running": max((r[c["running"]] for r in rows), default=0),
        "preemptions": rows[-1][c["preemptions"]] if rows else 0,
        "running_at_first_preemption": first_preempt[c["running"]] if first_preempt else None,
        "max_pages_used": max((r[c["pages_used"]] for r in rows), default=0),
        "streams_finished": sum(1 for t in tokens if t > 0 and t >= max(tokens)),
        "tokens_generated": sum(tokens),
        "wall_s": wall,
        "tok_s": sum(tokens) / wall if wall else 0.0,
    }


def run(args: argparse.Namespace, pool: EnginePool) -> dict[str, Any]:
    write_command(args.out)
    plugin_cfg, vanilla_cfg = engine_configs(args)
    plugin, vanilla = pool.start(plugin_cfg, vanilla_cfg)
    length = int(args.multiple * args.window)
    if length > args.max_model_len:
        raise SystemExit(f"stream length {length} > max_model_len {args.max_model_len}")
    prompt_len = length - args.decode
    per_stream = {
        "plugin": geometry.max_pages(args.sinks, args.window, BLOCK_SIZE),
        "vanilla": math.ceil(length / BLOCK_SIZE),
    }
    results: dict[str, Any] = {}
    raw: dict[str, Any] = {}
    for name, worker in (("plugin", plugin), ("vanilla", vanilla)):
        r = worker.call(
            "capacity",
            progress=f"capacity {name}",
            streams=args.streams,
            prompt_len=prompt_len,
            max_tokens=args.decode,
            budget_pages=args.budget_pages,
            steps=args.steps,
        )
        raw[name] = r
        write_csv(
            args.out / f"steps_{name}.csv",
            [dict(zip(r["columns"], x, strict=True)) for x in r["rows"]],
        )
        a = analyse(r["rows"], r["columns"], r["tokens_per_stream"])
        a["pages_per_stream"] = per_stream[name]
        a["arithmetic_capacity"] = args.budget_pages // per_stream[name]
        results[name] = a
        log(
            f"{name}: up to {a['max_decoding_at_once']} streams decoding at once "
            f"(arithmetic {a['arithmetic_capacity']}), {a['preemptions']} preemptions"
        )
    summary = {
        "budget_pages": args.budget_pages,
        "stream_length": length,
        "plugin_streams": results["plugin"]["max_decoding_at_once"],
        "vanilla_streams": results["vanilla"]["max_decoding_at_once"],
        "ratio": results["plugin"]["max_decoding_at_once"]
        / max(1, results["vanilla"]["max_decoding_at_once"]),
        "plugin_preemptions": results["plugin"]["preemptions"],
        "vanilla_preemptions": results["vanilla"]["preemptions"],
    }
    plot(raw, args, args.out / "capacity.png")
    payload = result_envelope(
        "capacity",
        {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        engines={"plugin": plugin_cfg, "vanilla": vanilla_cfg},
        engine_facts=engine_facts({"plugin": plugin, "vanilla": vanilla}),
        summary=summary,
        results=results,
    )
    write_json(args.out / "results.json", payload)
    return summary


def plot(raw: dict[str, Any], args: argparse.Namespace, path: Path) -> None:
    pyplot = plt()
    fig, (ax1, ax2) = pyplot.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    colors = {"plugin": "tab:blue", "vanilla": "tab:gray"}
    for name, r in raw.items():
        c = {n: i for i, n in enumerate(r["columns"])}
        steps = [x[c["step"]] for x in r["rows"]]
        ax1.plot(steps, [x[c["decoding"]] for x in r["rows"]], color=colors[name],
                 label=f"{name}: decoding")  # fmt: skip
        ax1.plot(steps, [x[c["waiting"]] for x in r["rows"]], color=colors[name], ls=":",
                 label=f"{name}: waiting")  # fmt: skip
        ax2.plot(steps, [x[c["pages_used"]] for x in r["rows"]], color=colors[name], label=name)
        counts = [x[c["preemptions"]] for x in r["rows"]]
        pre = [x[c["step"]] for i, x in enumerate(r["rows"]) if i and counts[i] > counts[i - 1]]
        if pre:
            ax1.plot(pre, [0] * len(pre), "x", color="tab:red", label=f"{name}: preemption")
    ax2.axhline(args.budget_pages, color="tab:red", ls="--", lw=1, label="budget")
    ax1.set_ylabel("streams")
    ax1.set_title(
        f"{args.streams} streams of {int(args.multiple * args.window)} tokens, "
        f"budget {args.budget_pages} pages (sinks {args.sinks} + window {args.window})"
    )
    ax1.legend(fontsize=8)
    ax2.set_ylabel("KV pages in use")
    ax2.set_xlabel("engine step")
    ax2.legend(fontsize=8)
    save_plot(fig, path)


def main(argv: list[str] | None = None) -> int:
    return standalone(parse_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
