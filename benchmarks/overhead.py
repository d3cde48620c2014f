"""1. Overhead: decode throughput of vLLM with the plugin against vanilla vLLM.

    .venv/bin/python benchmarks/overhead.py            # full: 1/4/16/64 streams, 5 repeats
    .venv/bin/python benchmarks/overhead.py --quick    # tiny sizes, 2 repeats

Both engines run side by side in their own processes (same settings but for the plugin) and
stay up for the whole run. For each stream count both prefill their streams once; then the
repeats alternate segments of ``--steps`` decode steps between the engines (the order flipped
every other time, the other engine's streams waiting meanwhile), so load from other jobs on the
machine hits both alike. A repeat's ratio is plugin tokens/s over vanilla tokens/s of its two
segments; the spread is over repeats.

Same cached tokens per stream: plugin streams start past the window (already evicting) and hold
``sink pages + window + (0..31)`` tokens, on average ``sink_len + window + 16``; vanilla streams
start ``repeats * steps / 2`` tokens short of that, so over the run they hold the same number on
average. Prompts are staggered by ``(11 i) % 32`` tokens in both engines, so the streams cross
page boundaries (where the plugin evicts and re-rotates its sinks) on different steps.
``--control`` (on in the full run) adds a second vanilla engine, measured in the same rotation:
its ratio to the first (*vanilla B / vanilla*, an A/A test) is the noise floor of the method,
which is mostly how fast one engine process happens to run against another on these cores.
``--profile N`` also runs cProfile over the decode of N streams in both engines and writes the
hot spots.

Writes ``results.json`` (machine, settings, every run, ratio spread per stream count),
``runs.csv``, ``overhead.png`` and, with ``--profile``, ``profile_{plugin,vanilla}_N.txt``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    EnginePool,
    add_engine_args,
    alternate,
    engine_configs,
    engine_facts,
    finish_engine_args,
    fmt_spread,
    log,
    plt,
    result_envelope,
    save_plot,
    sink_len,
    spread,
    standalone,
    write_command,
    write_csv,
    write_json,
)

TARGET = 0.97


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_engine_args(parser, "overhead")
    parser.add_argument("--streams", type=int, nargs="+", default=None)
    parser.add_argument("--steps", type=int, default=None, help="decode steps per measurement")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--profile", type=int, default=None, metavar="STREAMS", help="0: none (full: 16)"
    )
    parser.add_argument(
        "--control",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a second vanilla engine as an A/A control (default: on in the full run)",
    )
    args = finish_engine_args(parser.parse_args(argv))
    if args.streams is None:
        # bf16 prefill runs at ~50 tokens/s on 2 AVX2 cores: 64 streams are for the full run.
        args.streams = [1, 4] if args.quick else [1, 4, 16, 64]
    if args.steps is None:
        args.steps = 4 if args.quick else 16
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.profile is None:
        args.profile = 0 if args.quick else 16
    if args.control is None:
        args.control = not args.quick
    return args


def rotation(rep: int, index: int, names: list[str]) -> list[str]:
    """Order of the engines in one repeat: two engines flip every other time, more rotate."""
    if len(names) == 2:
        return alternate(rep, index, names)
    k = (rep + index) % len(names)
    return names[k:] + names[:k]


def prompt_lens(args: argparse.Namespace) -> dict[str, int]:
    """Prompt lengths giving both engines the same mean cached tokens over the decode."""
    decoded = args.repeats * args.steps + 1  # the first token comes with the prefill
    # Plugin: sink pages + window + (0..31) tokens once evicting; the staggered prompts add
    # (11 i) % 32 tokens to both engines alike, so they are left out here.
    cached = sink_len(args.sinks) + args.window + 16
    return {
        # Two pages past the window: evicting from the first decode step.
        "plugin": sink_len(args.sinks) + args.window + 32,
        "vanilla": cached - decoded // 2,
        "mean_cached": cached,
    }


def run(args: argparse.Namespace, pool: EnginePool) -> dict[str, Any]:
    """Measure, write the result files into ``args.out`` and return the summary."""
    from tqdm import tqdm

    write_command(args.out)
    plugin_cfg, vanilla_cfg = engine_configs(args, max_num_seqs=max(64, *args.streams))
    configs = {"plugin": plugin_cfg, "vanilla": vanilla_cfg}
    if args.control:
        configs["vanilla_b"] = dataclasses.replace(vanilla_cfg, replica=1)
    workers = dict(zip(configs, pool.start(*configs.values()), strict=True))
    lens = prompt_lens(args)
    lens["vanilla_b"] = lens["vanilla"]
    max_tokens = args.repeats * args.steps + 8
    runs: list[dict[str, Any]] = []
    prefill: dict[str, Any] = {}
    total = args.repeats * len(args.streams) * len(workers)
    with tqdm(total=total, desc="overhead", unit="run", file=sys.stderr) as bar:
        for idx, streams in enumerate(args.streams):
            # One prefill per engine and stream count; the repeats then alternate segments of
            # decode steps between the two engines (each keeps its streams alive meanwhile).
            for name, w in workers.items():
                bar.set_postfix(streams=streams, engine=name, phase="prefill")
                prefill[f"{name}_{streams}"] = w.call(
                    "open", streams=streams, prompt_len=lens[name], max_tokens=max_tokens
                )
                w.call("advance", steps=1)  # first-use costs out of the timing
            for rep in range(args.repeats):
                for name in rotation(rep, idx, list(workers)):
                    r = workers[name].call("advance", steps=args.steps)
                    runs.append({"repeat": rep, "engine": name, "streams": streams, **r})
                    bar.set_postfix(streams=streams, engine=name, tok_s=f"{r['tok_s']:.1f}")
                    bar.update()
            for w in workers.values():
                w.call("close")
    summary: dict[str, Any] = {}
    for streams in args.streams:
        by = {
            name: {r["repeat"]: r for r in runs if r["engine"] == name and r["streams"] == streams}
            for name in workers
        }
        ratios = [by["plugin"][k]["tok_s"] / by["vanilla"][k]["tok_s"] for k in by["plugin"]]
        step_ratios = [
            by["vanilla"][k]["step_ms_median"] / by["plugin"][k]["step_ms_median"]
            for k in by["plugin"]
        ]
        summary[str(streams)] = {
            "plugin_tok_s": spread(r["tok_s"] for r in by["plugin"].values()),
            "vanilla_tok_s": spread(r["tok_s"] for r in by["vanilla"].values()),
            "ratio": spread(ratios),
            "ratio_of_median_steps": spread(step_ratios),
            "meets_target": statistics.median(ratios) >= TARGET if ratios else None,
        }
        if "vanilla_b" in by:
            control = [
                by["vanilla_b"][k]["tok_s"] / by["vanilla"][k]["tok_s"] for k in by["plugin"]
            ]
            summary[str(streams)]["control_ratio"] = spread(control)
        control = summary[str(streams)].get("control_ratio")
        log(
            f"{streams:>3} streams: plugin/vanilla = {fmt_spread(summary[str(streams)]['ratio'])}"
            + (f", control vanilla B/vanilla = {fmt_spread(control)}" if control else "")
        )
    profiles = {}
    if args.profile:
        for name in ("plugin", "vanilla"):
            w = workers[name]
            w.call("open", streams=args.profile, prompt_len=lens[name], max_tokens=4 * args.steps)
            r = w.call("advance", steps=4 * args.steps - 2, profile=True)
            w.call("close")
            path = args.out / f"profile_{name}_{args.profile}.txt"
            path.write_text(
                f"# {name}, {args.profile} streams, {r['steps']} decode steps, "
                f"{r['tok_s']:.1f} tok/s under cProfile\n\n"
                + "\n".join(f"## sorted by {k}\n{v}" for k, v in r["profile"].items())
            )
            profiles[name] = str(path.name)
    for r in runs:
        r.pop("step_ms", None)
    payload = result_envelope(
        "overhead",
        {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        engines=configs,
        engine_facts=engine_facts(workers),
        engine_start_s={n: w.ready["start_s"] for n, w in workers.items() if w.ready},
        prompt_lens=lens,
        prefill=prefill,
        target_ratio=TARGET,
        summary=summary,
        profiles=profiles,
        runs=runs,
    )
    write_json(args.out / "results.json", payload)
    write_csv(args.out / "runs.csv", runs)
    plot(summary, args.out / "overhead.png", lens["mean_cached"])
    return summary


def plot(summary: dict[str, Any], path: Path, cached: int) -> None:
    pyplot = plt()
    fig, (ax1, ax2) = pyplot.subplots(1, 2, figsize=(11, 4))
    xs = list(summary)
    med = [summary[s]["ratio"]["median"] for s in xs]
    lo = [summary[s]["ratio"]["median"] - summary[s]["ratio"]["min"] for s in xs]
    hi = [summary[s]["ratio"]["max"] - summary[s]["ratio"]["median"] for s in xs]
    has_control = all("control_ratio" in summary[s] for s in xs)
    width = 0.4 if has_control else 0.8
    pos = list(range(len(xs)))
    ax1.bar(
        [p - width / 2 * has_control for p in pos],
        med,
        width,
        yerr=[lo, hi],
        capsize=5,
        color="tab:blue",
        label="plugin / vanilla",
    )
    if has_control:
        c = [summary[s]["control_ratio"] for s in xs]
        ax1.bar(
            [p + width / 2 for p in pos],
            [x["median"] for x in c],
            width,
            yerr=[[x["median"] - x["min"] for x in c], [x["max"] - x["median"] for x in c]],
            capsize=5,
            color="tab:gray",
            label="control: vanilla B / vanilla",
        )
    ax1.set_xticks(pos, xs)
    ax1.axhline(1.0, color="k", lw=0.8)
    ax1.axhline(TARGET, color="tab:red", ls="--", lw=1, label=f"target {TARGET}")
    lows = [summary[s][k]["min"] for s in xs for k in ("ratio", "control_ratio") if k in summary[s]]
    highs = [
        summary[s][k]["max"] for s in xs for k in ("ratio", "control_ratio") if k in summary[s]
    ]
    ax1.set_ylim(min(0.8, min(lows) - 0.02), max(1.1, max(highs) + 0.02))
    ax1.set_xlabel("concurrent streams")
    ax1.set_ylabel("decode tok/s, plugin / vanilla")
    ax1.set_title(f"Overhead (median, min-max), ~{cached} cached tok/stream")
    ax1.legend()
    for name, color in (("vanilla", "tab:gray"), ("plugin", "tab:blue")):
        ys = [summary[s][f"{name}_tok_s"]["median"] for s in xs]
        ax2.plot(xs, ys, "o-", color=color, label=name)
    ax2.set_xlabel("concurrent streams")
    ax2.set_ylabel("aggregate decode tok/s (median)")
    ax2.set_yscale("log")
    ax2.legend()
    save_plot(fig, path)


def main(argv: list[str] | None = None) -> int:
    return standalone(parse_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
