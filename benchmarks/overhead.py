"""1. Overhead: decode throughput of vLLM with the plugin against vanilla vLLM, to within 1 %.

    .venv/bin/python benchmarks/overhead.py            # full: 1/16/64 streams, both modes
    .venv/bin/python benchmarks/overhead.py --quick    # tiny: 1 and 4 streams, eager

Method. The engines run side by side in their own processes, identical but for the plugin. For each
mode (vLLM's default compiled mode, and eager) the run is ``--blocks`` blocks, each with a fresh set
of engine processes (full: 16; with 8, the spread between process sets left two of six intervals
near ±1.5 % in the run of ffa2b47). In a block, for each stream count each engine prefills its
streams; then ``--rounds`` rounds each run ``--steps`` decode steps on every engine in turn, the
order rotated every round (1 stream, whose rounds are the shortest and noisiest, gets ``--sets``
such sets of fresh streams per block). A round's ratio is the vanilla engine's time for its steps
over the plugin's (the tokens are the same, one per stream and step), so whatever the machine does
on a scale longer than a round (other jobs, frequency, drift) hits both engines alike and cancels in
it. A block's estimate is the geometric mean of its rounds' ratios; the estimate is the geometric
mean of the blocks', and its 95 % interval is Student's t over the blocks' logs. The block, not the
round, is the unit: two processes of the same engine can differ (memory placement, threads), and
with fresh processes in every block that difference varies from block to block, so it is in the
interval rather than hidden in the estimate. (The interval over rounds alone, ``rounds_ci95``, is
kept beside it for comparison.) The engines of a block start in an order rotated from block to
block, so whatever the first process to start gets (or lacks) falls on each engine in turn. Each
mode first runs ``--warmup-blocks`` blocks (full: 1) measured the same way but left out of the
estimates (kept in ``runs`` with a negative block index): in the clean run of 5557caa the first
block of a mode, started right after other work, lay well outside the other seven in 7 of the 12
estimates (e.g. plugin/vanilla 1.001 against 0.958-0.970 at 64 streams compiled, 0.941 against
0.980-1.000 at 16 eager). Compiled engines start from Inductor's cache (``common.py`` turns off
vLLM's AOT cache, which the CPU build cannot load): ~21 s each alone, 66-87 s for a block's three
started at once on 2 cores (eager: 28-32 s): about half of a compiled block.

Control (``--control``, on in the full run): a copy of the vanilla engine slowed by
``--inject`` (1 %: after each step it sleeps 1 % of that step's time), measured in the same
rotation, in processes of its own. Its ratio to vanilla must come out at 1 / 1.01 = 0.990 or a
little below (the sleep call overshoots by ~0.05-0.1 ms a step), with an interval that excludes
1.0: the method sees a 1 % cost.

Same cached tokens per stream: plugin streams start past the window (already evicting) and hold
``sink pages + window + (0..31)`` tokens, on average ``sink_len + window + 16``; vanilla streams
start half the decoded tokens short of that, so over the run they hold the same number on
average. Prompts are staggered by ``(11 i) % 32`` tokens in both engines, so the streams cross
page boundaries (where the plugin evicts and re-rotates its sinks) on different steps.

Profile (``--profile N``, full: 16): cProfile over N streams' decode on the plugin engine of
each mode; the plugin's own share of a decode step is the time inside the ``vllm_sink`` and
``patches`` functions that vLLM calls, less the vLLM code they hand work on to (the stock
kernels, metadata builders and runner they wrap), over the steps' time (both under cProfile,
which slows Python more than kernels: an upper bound).

Writes ``results.json`` (machine, settings, every round, the estimates per mode and stream
count), ``runs.csv``, ``overhead.png`` and, with ``--profile``, ``profile_plugin_{mode}_N.txt``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    EnginePool,
    add_engine_args,
    engine_configs,
    engine_facts,
    finish_engine_args,
    log,
    plt,
    result_envelope,
    save_plot,
    sink_len,
    standalone,
    write_command,
    write_csv,
    write_json,
)

TARGET = 0.99  # plugin / vanilla decode throughput, at every stream count and in both modes
MODES = ("compiled", "eager")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_engine_args(parser, "overhead")
    parser.add_argument("--streams", type=int, nargs="+", default=None)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=None)
    parser.add_argument("--steps", type=int, default=None, help="decode steps per engine and round")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per block")
    parser.add_argument(
        "--blocks", type=int, default=None, help="blocks, each a fresh set of engine processes"
    )
    parser.add_argument(
        "--warmup-blocks",
        type=int,
        default=None,
        help="blocks run first in each mode and left out of the estimates (full: 1)",
    )
    parser.add_argument(
        "--sets",
        type=int,
        default=None,
        help="stream sets per block at 1 stream (its rounds are the noisiest); 1 elsewhere",
    )
    parser.add_argument(
        "--inject", type=float, default=0.01, help="the control's injected cost (0.01: 1 %%)"
    )
    parser.add_argument(
        "--profile", type=int, default=None, metavar="STREAMS", help="0: none (full: 16)"
    )
    parser.add_argument(
        "--control",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a slowed copy of the vanilla engine (default: on in the full run)",
    )
    args = finish_engine_args(parser.parse_args(argv))
    if args.streams is None:
        args.streams = [1, 4] if args.quick else [1, 16, 64]
    if args.modes is None:
        args.modes = ["eager" if args.eager else "compiled"] if args.quick else list(MODES)
    defaults = (("rounds", 6, 32), ("blocks", 1, 16), ("steps", 2, 4), ("sets", 1, 3),
                ("warmup_blocks", 0, 1))  # fmt: skip
    for key, quick, full in defaults:
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    if args.profile is None:
        args.profile = 0 if args.quick else 16
    if args.control is None:
        args.control = not args.quick
    if args.rounds * args.blocks < 6 or min(args.steps, args.blocks, args.sets) < 1:
        parser.error("need at least 6 rounds in all (the t quantile), 1 step, block and set")
    if args.warmup_blocks < 0:
        parser.error("--warmup-blocks must be >= 0")
    lens = prompt_lens(args)
    if lens["vanilla"] < 1 or lens["vanilla"] + 31 + lens["decoded"] > args.max_model_len:
        parser.error(
            f"--rounds x --steps = {args.rounds * args.steps} decode steps do not fit vanilla's "
            f"streams (mean {lens['mean_cached']} cached tokens, max_model_len "
            f"{args.max_model_len}): fewer rounds or steps, or a larger window"
        )
    return args


def rotation(rnd: int, index: int, names: list[str]) -> list[str]:
    """Order of the engines in one round: rotated by one every round (two engines: flipped)."""
    k = (rnd + index) % len(names)
    return names[k:] + names[:k]


def start_rotated(pool: EnginePool, configs: dict[str, Any], order: list[str]) -> dict[str, Any]:
    """Start a block's engines in ``order`` (rotated from block to block); workers by name."""
    started = dict(zip(order, pool.start(*(configs[n] for n in order)), strict=True))
    return {name: started[name] for name in configs}


def stream_sets(args: argparse.Namespace, streams: int) -> int:
    """Sets of fresh streams per block: ``--sets`` at 1 stream (the noisiest rounds), else 1."""
    return args.sets if streams == 1 else 1


def prompt_lens(args: argparse.Namespace) -> dict[str, int]:
    """Prompt lengths giving both engines the same mean cached tokens over the decode."""
    decoded = args.rounds * args.steps + 1  # the first step is a warm-up, out of the timing
    # Plugin: sink pages + window + (0..31) tokens once evicting; the staggered prompts add
    # (11 i) % 32 tokens to both engines alike, so they are left out here.
    cached = sink_len(args.sinks) + args.window + 16
    return {
        # Two pages past the window: evicting from the first decode step.
        "plugin": sink_len(args.sinks) + args.window + 32,
        "vanilla": cached - decoded // 2,
        "mean_cached": cached,
        "decoded": decoded,
    }


# Student's t 0.975 quantiles where the expansion below is off by more than 0.003.
T975_SMALL_DF = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764}


def t_quantile(df: int, p: float = 0.975) -> float:
    """Student's t quantile (Cornish-Fisher expansion: 0.003 from the table at df = 5, 2e-4 at
    df >= 10; the table's own values below df = 5)."""
    if p == 0.975 and df in T975_SMALL_DF:
        return T975_SMALL_DF[df]
    z = statistics.NormalDist().inv_cdf(p)
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )


def paired_ratio(numerators: list[float], denominators: list[float]) -> dict[str, Any]:
    """Geometric mean of the paired ratios and its 95 % interval (t over the logs)."""
    logs = [math.log(a / b) for a, b in zip(numerators, denominators, strict=True)]
    n, mean = len(logs), statistics.fmean(logs)
    half = t_quantile(n - 1) * statistics.stdev(logs) / math.sqrt(n)
    lo, hi = math.exp(mean - half), math.exp(mean + half)
    return {
        "n": n,
        "ratio": math.exp(mean),
        "ci95": [lo, hi],
        "half_width": (hi - lo) / 2 / math.exp(mean),
        "median": math.exp(statistics.median(logs)),
        "min": math.exp(min(logs)),
        "max": math.exp(max(logs)),
    }


def run(args: argparse.Namespace, pool: EnginePool) -> dict[str, Any]:
    """Measure, write the result files into ``args.out`` and return the summary."""
    from tqdm import tqdm

    write_command(args.out)
    lens = prompt_lens(args)
    max_tokens = lens["decoded"] + 8
    runs: list[dict[str, Any]] = []
    prefill: dict[str, Any] = {}
    configs_by_mode: dict[str, dict[str, Any]] = {}
    facts: dict[str, Any] = {}
    start_s: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    profiles: dict[str, Any] = {}
    for mode in args.modes:
        mode_args = argparse.Namespace(**{**vars(args), "eager": mode == "eager"})
        plugin_cfg, vanilla_cfg = engine_configs(mode_args, max_num_seqs=max(64, *args.streams))
        configs = {"plugin": plugin_cfg, "vanilla": vanilla_cfg}
        if args.control:
            configs["control"] = dataclasses.replace(vanilla_cfg, replica=1, slowdown=args.inject)
        configs_by_mode[mode] = configs
        start_s[mode] = []
        per_block = sum(stream_sets(args, n) for n in args.streams) * args.rounds
        total = (args.warmup_blocks + args.blocks) * per_block * len(configs)
        names = list(configs)
        with tqdm(total=total, desc=f"overhead {mode}", unit="run", file=sys.stderr) as bar:
            # Warm-up blocks have negative indices: measured alike, left out of the estimates.
            for block in range(-args.warmup_blocks, args.blocks):
                if block > -args.warmup_blocks:
                    # Fresh processes every block: what differs between two processes of the
                    # same engine (memory placement, threads) varies between blocks and so
                    # lands in the interval, which is taken over blocks.
                    pool.stop(*configs.values())
                workers = start_rotated(pool, configs, rotation(block, 0, names))
                facts.setdefault(mode, engine_facts(workers))
                start_s[mode].append({n: w.ready["start_s"] for n, w in workers.items()})
                for idx, streams in enumerate(args.streams):
                    sets = stream_sets(args, streams)
                    for part in range(sets):
                        for name, w in workers.items():
                            prompt = lens["plugin" if name == "plugin" else "vanilla"]
                            prefill[f"{mode}_{name}_{streams}_{block}_{part}"] = w.call(
                                "open", streams=streams, prompt_len=prompt, max_tokens=max_tokens
                            )
                            w.call("advance", steps=1)  # first-use costs out of the timing
                        for rnd in range(args.rounds):
                            for name in rotation(rnd, idx + block + part, names):
                                r = workers[name].call("advance", steps=args.steps)
                                r.pop("step_ms", None)
                                runs.append(
                                    {"mode": mode, "streams": streams, "block": block,
                                     "round": (block * sets + part) * args.rounds + rnd,
                                     "engine": name, **r}
                                )  # fmt: skip
                                bar.update()
                        for w in workers.values():
                            w.call("close")
        summary[mode] = {}
        for streams in args.streams:
            s = summarize([r for r in runs if r["mode"] == mode and r["streams"] == streams])
            summary[mode][str(streams)] = s
            est = s["plugin_vs_vanilla"]
            line = f"{mode}, {streams:>2} streams: plugin/vanilla {fmt_ci(est)}"
            if "control_vs_vanilla" in s:
                line += f"; control/vanilla {fmt_ci(s['control_vs_vanilla'])}"
            log(line)
        if args.profile:
            w = workers["plugin"]
            n_steps = 4 * args.steps + 8
            w.call("open", streams=args.profile, prompt_len=lens["plugin"], max_tokens=n_steps + 4)
            w.call("advance", steps=1)
            r = w.call("advance", steps=n_steps, profile=True)
            w.call("close")
            path = args.out / f"profile_plugin_{mode}_{args.profile}.txt"
            share = r["plugin_share"]
            path.write_text(
                f"# plugin, {mode}, {args.profile} streams, {r['steps']} decode steps, "
                f"{r['tok_s']:.1f} tok/s under cProfile; plugin's own share of the steps: "
                f"{share['share']:.2%} ({share['own_s']:.3f} s of {share['steps_s']:.3f} s)\n\n"
                + "\n".join(f"## sorted by {k}\n{v}" for k, v in r["profile"].items())
            )
            profiles[mode] = {"file": path.name, "streams": args.profile, **share}
            log(f"{mode}: plugin's own share of a decode step {share['share']:.2%} (cProfile)")
    payload = result_envelope(
        "overhead",
        {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        engines=configs_by_mode,
        engine_facts=facts,
        engine_start_s=start_s,
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


def blocked_ratio(numerators: list[float], denominators: list[float], blocks: list[int]) -> dict:
    """Paired ratio with the block (a fresh set of processes) as the unit of its interval.

    Each block's estimate is the geometric mean of its rounds' ratios; the estimate is their
    geometric mean, its 95 % interval Student's t over the blocks' logs, so it holds the
    difference between processes as well as the noise between rounds. ``rounds_ci95``: the
    interval the rounds alone would give (one set of processes), for comparison.
    """
    pooled = paired_ratio(numerators, denominators)
    by_block: dict[int, list[float]] = {}
    for a, b, k in zip(numerators, denominators, blocks, strict=True):
        by_block.setdefault(k, []).append(math.log(a / b))
    if len(by_block) < 2:
        return {**pooled, "unit": "round", "rounds_ci95": pooled["ci95"]}
    means = [math.exp(statistics.fmean(v)) for v in by_block.values()]
    est = paired_ratio(means, [1.0] * len(means))
    return {
        **est,
        "unit": "block",
        "blocks": means,
        "rounds": pooled["n"],
        "rounds_ci95": pooled["ci95"],
        "median": pooled["median"],
        "min": pooled["min"],
        "max": pooled["max"],
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Tokens/s per engine and the paired estimates of one mode and stream count (warm-up
    blocks, with negative indices, are left out; their pooled ratios are kept aside)."""
    warmup = [r for r in runs if r["block"] < 0]
    runs = [r for r in runs if r["block"] >= 0]
    by: dict[str, dict[int, dict[str, Any]]] = {}
    for r in runs:
        by.setdefault(r["engine"], {})[r["round"]] = r
    rounds = sorted(by["plugin"])
    blocks = [by["plugin"][k]["block"] for k in rounds]
    s: dict[str, Any] = {}
    for name, rs in by.items():
        tokens = sum(r["tokens"] for r in rs.values())
        s[f"{name}_tok_s"] = tokens / sum(r["decode_s"] for r in rs.values())
    vanilla_s = [by["vanilla"][k]["decode_s"] for k in rounds]
    # Same tokens in every engine's round: a ratio of times is the inverse ratio of tokens/s.
    plugin_s = [by["plugin"][k]["decode_s"] for k in rounds]
    s["plugin_vs_vanilla"] = blocked_ratio(vanilla_s, plugin_s, blocks)
    s["meets_target"] = s["plugin_vs_vanilla"]["ratio"] >= TARGET
    if "control" in by:
        control_s = [by["control"][k]["decode_s"] for k in rounds]
        s["control_vs_vanilla"] = blocked_ratio(vanilla_s, control_s, blocks)
    if warmup:
        w: dict[str, dict[int, float]] = {}
        for r in warmup:
            w.setdefault(r["engine"], {})[r["round"]] = r["decode_s"]
        keys = sorted(w["vanilla"])
        s["warmup"] = {
            f"{name}_vs_vanilla": paired_ratio(
                [w["vanilla"][k] for k in keys], [t[k] for k in keys]
            )
            for name, t in w.items()
            if name != "vanilla"
        }
    return s


def fmt_ci(e: dict[str, Any]) -> str:
    return f"{e['ratio']:.3f} [{e['ci95'][0]:.3f}, {e['ci95'][1]:.3f}]"


def plot(summary: dict[str, Any], path: Path, cached: int) -> None:
    pyplot = plt()
    fig, axes = pyplot.subplots(1, len(summary), figsize=(5.5 * len(summary), 4), squeeze=False)
    for ax, (mode, by_streams) in zip(axes[0], summary.items(), strict=True):
        xs = list(by_streams)
        keys = [("plugin_vs_vanilla", "plugin / vanilla", "tab:blue")]
        if all("control_vs_vanilla" in by_streams[x] for x in xs):
            keys.append(("control_vs_vanilla", "control (vanilla slowed 1 %) / vanilla", "gray"))
        width = 0.8 / len(keys)
        for j, (key, label, color) in enumerate(keys):
            est = [by_streams[x][key] for x in xs]
            mid = [e["ratio"] for e in est]
            err = [
                [e["ratio"] - e["ci95"][0] for e in est],
                [e["ci95"][1] - e["ratio"] for e in est],
            ]
            pos = [i + (j - (len(keys) - 1) / 2) * width for i in range(len(xs))]
            ax.bar(pos, mid, width, yerr=err, capsize=4, color=color, label=label)
        ax.set_xticks(range(len(xs)), xs)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(TARGET, color="tab:red", ls="--", lw=1, label=f"target {TARGET}")
        ax.set_ylim(0.95, 1.05)
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel("decode tok/s ratio (95 % interval)")
        ax.set_title(f"{mode}: ~{cached} cached tokens per stream")
        ax.legend(fontsize=8)
    save_plot(fig, path)


def main(argv: list[str] | None = None) -> int:
    return standalone(parse_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
