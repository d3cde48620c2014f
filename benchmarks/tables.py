"""Markdown tables of the latest results, generated from the committed JSON files.

    .venv/bin/python benchmarks/tables.py [--root benchmarks/results] [--out TABLES.md]
    .venv/bin/python benchmarks/tables.py --check    # does the README show the results?

Each section reads ``<root>/<benchmark>/results.json`` (skipped when absent) and renders the
table the README shows. ``benchmarks/README.md`` holds each table between the markers
``<!-- table:NAME -->`` and ``<!-- /table -->``; this script rewrites what is between them, and
``--check`` fails when the README differs from the committed results.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, fmt_num, fmt_spread  # noqa: E402


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header: list[str], rows: list[list[Any]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---" if a == "l" else "---:" for a in align]
    return "\n".join([_row(header), _row(sep), *(_row(r) for r in rows)])


def _mode(settings: dict[str, Any]) -> str:
    """The vLLM mode a result ran in (results from before the mode was recorded ran eager)."""
    modes = settings.get("modes")
    # (Benchmark 8's ``modes`` are its streams, given as a comma-separated string.)
    if isinstance(modes, list) and set(modes) <= {"compiled", "eager"}:
        return " and ".join(modes)
    return "eager" if settings.get("eager", True) else "compiled"


def _machine(d: dict[str, Any]) -> str:
    m = d["machine"]
    bf16 = m.get("cpu_bf16", "bf16 support not recorded")
    dtype = d["settings"].get("dtype")  # recorded by every engine benchmark since 2026-12-04
    # Recorded since 2026-12-05 (common.engine_thread_binding); earlier engines ran unbound.
    binding = m.get("engine_omp_binding")
    bound = f"engine threads bound ({binding.get('OMP_PLACES', 'custom')}), " if binding else ""
    return (
        f"_{m['cpu_model']} ({bf16}), {m['cpus_usable']} cores, {bound}{_mode(d['settings'])}, "
        f"{dtype + ', ' if dtype else ''}"
        f"torch {m['torch']}, vLLM {m['vllm']}, "
        f"commit {str(m['git_commit'])[:10]}{' (dirty)' if m['git_dirty'] else ''}, "
        f"{m['started_utc']}_"
    )


def _ci(e: dict[str, Any]) -> str:
    return f"{e['ratio']:.3f} [{e['ci95'][0]:.3f}, {e['ci95'][1]:.3f}]"


def _unit(est: dict[str, Any]) -> str:
    """What an overhead interval is taken over (older results: rounds of one process set)."""
    if est.get("unit") == "block":
        lo, hi = est["rounds_ci95"]
        return f"{len(est['blocks'])} process sets (rounds alone: [{lo:.3f}, {hi:.3f}])"
    return f"{est['n']} rounds, one process set"


def overhead(d: dict[str, Any]) -> str:
    rows = []
    for mode, by_streams in d["summary"].items():
        for streams, s in by_streams.items():
            est = s["plugin_vs_vanilla"]
            control = s.get("control_vs_vanilla")
            rows.append(
                [
                    mode,
                    streams,
                    f"{s['vanilla_tok_s']:.1f}",
                    f"{s['plugin_tok_s']:.1f}",
                    f"**{_ci(est)}**",
                    f"±{est['half_width']:.1%}",
                    _unit(est),
                    _ci(control) if control else "-",
                ]
            )
    head = [
        "mode",
        "streams",
        "vanilla tok/s",
        "plugin tok/s",
        "plugin / vanilla [95 % interval]",
        "half-width",
        "interval over",
        "control: vanilla slowed 1 % / vanilla",
    ]
    table = _table(head, rows, "llrrrrlr")
    shares = [
        f"{mode}: {p['share']:.1%} of a decode step at {p['streams']} streams"
        for mode, p in d.get("profiles", {}).items()
    ]
    if shares:
        table += "\n\nPlugin's own share (cProfile, an upper bound): " + "; ".join(shares) + "."
    return table


def long_stream(d: dict[str, Any]) -> str:
    s = d["summary"]
    rows = []
    for name in ("plugin", "vanilla"):
        r = d["results"][name]
        buckets = r["step_ms_by_position"]
        rows.append(
            [
                name,
                r["last_position"],
                r["finish_reason"],
                r["max_pages_held_stream0"],
                f"{buckets[0]['step_ms_median']:.1f}",
                f"{buckets[-1]['step_ms_median']:.1f}",
            ]
        )
    table = _table(
        [
            "engine",
            "last position",
            "finish",
            "max pages held",
            "ms/step, first window",
            "ms/step, last window",
        ],
        rows,
        "llrrrr",
    )
    by_pos = []
    plugin = {b["from"]: b for b in d["results"]["plugin"]["step_ms_by_position"]}
    vanilla = {b["from"]: b for b in d["results"]["vanilla"]["step_ms_by_position"]}
    for start in sorted(plugin):
        p, v = plugin[start], vanilla.get(start)
        by_pos.append(
            [
                f"{start}-{p['to']}",
                f"{p['step_ms_median']:.1f}",
                p["pages_held_max"],
                f"{v['step_ms_median']:.1f}" if v else "stopped",
                v["pages_held_max"] if v else "-",
            ]
        )
    table2 = _table(
        ["positions", "plugin ms/step", "plugin pages", "vanilla ms/step", "vanilla pages"],
        by_pos,
    )
    return f"{table}\n\nContract bound: {s['page_bound_plugin']} pages.\n\n{table2}"


def recompute(d: dict[str, Any]) -> str:
    rows = []
    for cache, s in d["summary"].items():
        row = [
            cache,
            fmt_spread(
                {k: v * 1000 for k, v in s["plugin"].items() if k != "n"} | {"n": s["plugin"]["n"]},
                1,
            ),
            fmt_spread(
                {k: v * 1000 for k, v in s["vllm_recompute"].items() if k != "n"}
                | {"n": s["vllm_recompute"]["n"]},
                0,
            ),
            f"**{fmt_spread(s['speedup_vs_vllm_recompute'], 1, 'x')}**",
        ]
        if "reference_stream" in s:
            row += [
                f"{s['reference_stream']['median'] * 1000:.1f}",
                f"{s['reference_recompute']['median'] * 1000:.0f}",
                fmt_spread(s["speedup_vs_reference_recompute"], 1, "x"),
            ]
        rows.append(row)
    head = ["cache C", "plugin ms/tok", "vLLM re-computation ms/tok", "speed-up"]
    if rows and len(rows[0]) > 4:
        head += ["reference stream ms/tok", "reference re-comp. ms/tok", "plugin vs ref. re-comp."]
    return _table(head, rows)


def capacity(d: dict[str, Any]) -> str:
    rows = []
    for name in ("plugin", "vanilla"):
        r = d["results"][name]
        rows.append(
            [
                name,
                r["pages_per_stream"],
                r["arithmetic_capacity"],
                f"**{r['max_decoding_at_once']}**",
                r["median_decoding_while_queued"],
                r["preemptions"],
                r["max_pages_used"],
                f"{r['tok_s']:.1f}",
            ]
        )
    s = d["summary"]
    head = [
        "engine",
        "pages / stream",
        "budget // pages",
        "max streams decoding at once",
        "median while queued",
        "preemptions",
        "max pages used",
        "tok/s",
    ]
    return (
        f"Budget {s['budget_pages']} pages, streams of {s['stream_length']} tokens.\n\n"
        + _table(head, rows)
    )


def peer(d: dict[str, Any]) -> str:
    # A row per stream count and llama.cpp GGUF (``precision``: Q4_1 as shipped, bf16 = vLLM's);
    # results from before the bf16 GGUF ran Q4_1 only and have no weights column.
    by_weights = all("llama_cpp" in s for s in d["summary"].values())
    rows = []
    for streams, s in d["summary"].items():
        if by_weights:
            per = s["llama_cpp"]
        else:
            per = {
                None: {
                    "tok_s": s["llama_cpp_tok_s"],
                    "ratio_plugin_over_llama_cpp": s["ratio_plugin_over_llama_cpp"],
                    "context_shifts": s["llama_cpp_context_shifts"],
                }
            }
        for precision, p in per.items():
            rows.append(
                [streams]
                + ([precision] if by_weights else [])
                + [
                    fmt_spread(s["plugin_tok_s"], 1),
                    fmt_spread(p["tok_s"], 1),
                    f"**{fmt_spread(p['ratio_plugin_over_llama_cpp'])}**",
                    max(p["context_shifts"]),
                ]
            )
    head = ["streams", "vLLM + plugin tok/s", "llama.cpp tok/s", "plugin / llama.cpp", "shifts"]
    if by_weights:
        return _table(head[:1] + ["llama.cpp weights"] + head[1:], rows, "llrrrr")
    return _table(head, rows)


def serving(d: dict[str, Any]) -> str:
    keys = [
        ("output_throughput", "output tok/s", 1),
        ("median_ttft_ms", "median TTFT ms", 0),
        ("median_itl_ms", "median ITL ms", 1),
        ("p99_itl_ms", "p99 ITL ms", 0),
    ]
    # Results from before the modes were recorded ran eager, one summary.
    by_mode = d["summary"] if "modes" in d["settings"] else {"eager": d["summary"]}
    rows = [[mode, label, fmt_spread(s["vanilla"][k], dg), fmt_spread(s["plugin"][k], dg),
             f"**{fmt_spread(s[f'ratio_{k}'])}**"]
            for mode, s in by_mode.items() for k, label, dg in keys]  # fmt: skip
    a = d["settings"]
    return (
        f"{a['num_prompts']} requests, {a['input_len']} tokens in, {a['output_len']} out, "
        f"{a['concurrency']} in flight.\n\n"
        + _table(["mode", "metric", "vanilla", "plugin", "plugin / vanilla"], rows, "llrrr")
    )


def shared_opening(d: dict[str, Any]) -> str:
    s, a = d["summary"], d["settings"]
    rows = []
    for phase, label in (("one_at_a_time", "one at a time"), ("all_at_once", "all at once")):
        ttft = s[f"{phase}_ttft_ms"]
        cached = s[f"{phase}_min_cached_tokens"]
        rows.append(
            [
                label,
                fmt_spread(ttft["vanilla"], 0),
                fmt_spread(ttft["plugin"], 0),
                f"**{s[f'{phase}_ttft_ratio']:.2f}**",
                f"{cached['vanilla']} / {cached['plugin']}",
            ]
        )
    peak = s["peak_pages_all_at_once"]
    return (
        f"{a['requests']} new requests per phase, each a {a['opening']}-token shared opening "
        f"plus its own {a['question']}-token question, {a['answer']} tokens out; {a['dtype']}, "
        f"prefix caching on in both; plugin: sinks {a['sinks']} + window {a['window']}. Peak "
        f"pages handed out with all at once: vanilla {peak['vanilla']}, plugin {peak['plugin']}."
        "\n\n"
        + _table(
            [
                "phase",
                "vanilla TTFT ms",
                "plugin TTFT ms",
                "plugin / vanilla (median)",
                "fewest cached tokens (vanilla / plugin)",
            ],
            rows,
        )
    )


CONVERSATION_TURNS = (1, 5, 10, 25, 50)
_CONV = ("plugin_resuming", "plugin_reprefill", "vanilla")


def conversation(d: dict[str, Any]) -> str:
    s, a = d["summary"], d["settings"]
    rows_by = {n: {r["turn"]: r for r in d["results"][n]["rows"]} for n in _CONV}
    last = max(max(rows_by[n], default=0) for n in _CONV)
    stop = s["vanilla_stopped"]
    # The listed turns up to the last, the last, and vanilla's last turn before it stopped.
    turns = {t for t in CONVERSATION_TURNS if t <= last} | {last}
    if stop and stop["turn"] > 1:
        turns.add(stop["turn"] - 1)

    def cell(name: str, turn: int, key: str, fmt: str) -> str:
        row = rows_by[name].get(turn)
        if row is not None:
            return fmt.format(row[key])
        return "stopped" if stop and turn >= stop["turn"] else "-"

    rows = []
    for t in sorted(turns):
        history = next(rows_by[n][t]["prompt_len"] for n in _CONV if t in rows_by[n])
        ratio = next((r["ttft_ratio"] for r in s["ttft_ratio_by_turn"] if r["turn"] == t), None)
        rows.append(
            [
                t,
                history,
                *(cell(n, t, "ttft_ms", "{:.0f}") for n in _CONV),
                f"{ratio:.1f}x" if ratio is not None else "-",
                *(cell(n, t, "prefilled", "{}") for n in _CONV),
            ]
        )
    head = [
        "turn",
        "history tokens",
        "TTFT ms, resuming",
        "TTFT ms, re-prefill",
        "TTFT ms, vanilla",
        "re-prefill / resuming",
        "prefilled, resuming",
        "prefilled, re-prefill",
        "prefilled, vanilla",
    ]
    flat = s["resuming_ttft_ms_after_turn_1"]
    lines = [
        f"{a['turns']} turns of {a['chunk']} user + {a['answer']} answer tokens; sinks "
        f"{a['sinks']} + window {a['window']}, max_model_len {a['max_model_len']}.",
        "",
        _table(head, rows),
        "",
        f"Turn {s['last_turn']}: re-prefill / resuming TTFT **{s['ttft_ratio_last_turn']:.1f}x** "
        f"(target >= {s['target_ratio_last_turn']:g}x). Resuming TTFT over turns 2-"
        f"{s['turns_run']['plugin_resuming']}: {fmt_spread(flat, 0, ' ms')}.",
    ]
    if stop:
        lines[-1] += (
            f" Vanilla stopped at turn {stop['turn']} (history {stop['prompt_len']} tokens, "
            f"max_model_len {s['max_model_len']})."
        )
    return "\n".join(lines)


def long_ppl(d: dict[str, Any]) -> str:
    s, a, labels = d["summary"], d["settings"], d["labels"]
    rows = []
    for m in ("sinks", "window", "oracle"):
        e = s[m]
        ratio = s.get(f"ratio_{m}_to_oracle")
        rows.append(
            [
                labels[m],
                fmt_num(e.get("ppl_all")),
                fmt_num(e.get("ppl_first_segment")),
                fmt_num(e.get("ppl_last_segment")),
                f"{e['nll_targets_mean']:.4f}",
                fmt_num(e["ppl_targets"]),
                f"**{ratio:.3f}**" if ratio is not None else "1",
                f"{e['tok_s']:.0f}",
            ]
        )
    head = [
        "mode",
        "ppl, all tokens",
        "ppl, first segment",
        "ppl, last segment",
        "mean NLL on the targets",
        "ppl on the targets",
        "/ oracle",
        "tok/s",
    ]
    # Segments at 1, 2, 5, 10, 20, 50, ... segments of input, and the last.
    segs = d["segments"]
    marks = {m * 10**k for k in range(8) for m in (1, 2, 5)}
    picked = [r for i, r in enumerate(segs) if i + 1 in marks or i == len(segs) - 1]
    seg_rows = [
        [
            f"{r['start']:,}-{r['end']:,}",
            fmt_num(r["ppl_sinks"]),
            fmt_num(r["ppl_window"]),
            r["targets"],
            fmt_num(r["ratio_sinks"], 3),
            fmt_num(r["ratio_window"], 3),
        ]
        for r in picked
    ]
    seg_head = ["tokens", "ppl sinks", "ppl window", "targets", "sinks / oracle", "window / oracle"]
    return "\n".join(
        [
            f"{s['tokens']:,} tokens, {a['dtype']}, {a['chunk']} tokens a step; "
            f"{s['targets']:,} oracle targets. Per-segment ratio to the oracle (on each "
            f"segment's targets): sinks {fmt_spread(s['ratio_sinks_per_segment'])}, window "
            f"{fmt_spread(s['ratio_window_per_segment'])}.",
            "",
            _table(head, rows),
            "",
            _table(seg_head, seg_rows),
        ]
    )


def long_ppl_compare(d: dict[str, Any]) -> str:
    s, runs = d["summary"], d["runs"]
    ta, tb = runs["a"]["dtype"], runs["b"]["dtype"]
    rows = []
    for m in ("sinks", "window"):
        e = s[m]
        rows.append(
            [
                d["labels"][m],
                fmt_num(e["ppl_a"]),
                fmt_num(e["ppl_b"]),
                f"**{e['ppl_a_to_b']:.4f}**",
                fmt_spread(e["ppl_a_to_b_per_segment"], 4),
                f"{e['mean_abs_nll_diff']:.4f}",
            ]
        )
    o = s["oracle"]
    rows.append(
        [
            f"{d['labels']['oracle']}, on the targets",
            fmt_num(o["ppl_a"]),
            fmt_num(o["ppl_b"]),
            f"**{o['ppl_a_to_b']:.4f}**",
            "-",
            f"{o['mean_abs_nll_diff']:.4f}",
        ]
    )
    head = ["stream", f"ppl {ta}", f"ppl {tb}", f"{ta} / {tb}", "per segment",
            "mean abs NLL difference"]  # fmt: skip
    ratio_rows = []
    for m in ("sinks", "window"):
        r = s[f"{m}_to_oracle"]
        ratio_rows.append(
            [
                m,
                f"**{r['a']['ratio']:.3f}**",
                f"**{r['b']['ratio']:.3f}**",
                fmt_spread(r["a"]["per_segment"]),
                fmt_spread(r["b"]["per_segment"]),
                f"{len(r['a']['segments_above'])} / {len(r['b']['segments_above'])} "
                f"({len(r['above_in_both'])} in both)",
                f"{r['max_abs_segment_ratio_diff']:.3f}",
            ]
        )
    ratio_head = ["/ oracle", ta, tb, f"per segment, {ta}", f"per segment, {tb}",
                  "segments above 1.05", "largest segment difference"]  # fmt: skip
    return "\n".join(
        [
            f"`{runs['a']['dir']}` ({ta}) against `{runs['b']['dir']}` ({tb}): {s['tokens']:,} "
            f"tokens, {s['targets']:,} targets, {s['segments']} segments.",
            "",
            _table(head, rows),
            "",
            _table(ratio_head, ratio_rows),
        ]
    )


def host_memory(d: dict[str, Any]) -> str:
    s, a = d["summary"], d["settings"]
    streams = d["streams"]
    chat = sum(x["path"] == "/v1/chat/completions" for x in streams)
    logprobs = sum(x["logprobs"] for x in streams)
    names = {p["role"]: p["name"] for p in d["processes"]}
    rows = [
        [
            f"{role} (`{names.get(role, '?')}`)",
            f"{s['rss_mib_at_10pct'][role]:.1f}",
            f"{s['rss_mib_end'][role]:.1f}",
            f"**{s['rss_growth_mib_10pct_to_end'][role]:+.1f}**",
            f"{s['rss_growth_mib_10pct_to_90pct'][role]:+.1f}",
        ]
        for role in s["rss_growth_mib_10pct_to_end"]
    ]
    cpu, gap = s["front_end_cpu_ms_per_chunk"], s["mean_gap_ms"]
    readings = [r for r in d["readings"] if r["sizes"]]
    marks = f"{readings[0]['tokens']:,} and {readings[-1]['tokens']:,}" if readings else "-"
    state_rows = [[f"`{k}`", v[0], v[-1], max(v)] for k, v in s["host_state_by_reading"].items()]
    return "\n".join(
        [
            f"{len(streams)} streams x {a['tokens']:,} tokens ({chat} chat, {len(streams) - chat} "
            f"completions, {logprobs} of them with logprobs), sinks {a['sinks']} + window "
            f"{a['window']}: {s['tokens']:,} tokens counted in {s['seconds']:.0f} s, "
            f"{s['samples']} samples. Each stream was closed by its client at {a['tokens']:,} "
            f"tokens; {s['closed_streams_released_s']:.1f} s after the last one the server held "
            "none of them.",
            "",
            _table(
                ["process", "RSS at 10 % MiB", "RSS at end MiB", "growth MiB", "growth to 90 %"],
                rows,
            ),
            "",
            f"Front-end CPU per chunk, last 20 % / 10-30 % of the tokens: "
            f"**{fmt_num(s['cpu_per_chunk_ratio_last20_over_10_30'], 3)}** "
            f"({fmt_num(cpu['80-100%'], 3)} / {fmt_num(cpu['10-30%'], 3)} ms); client's mean "
            f"time between chunks: {fmt_num(s['mean_gap_ratio_last20_over_10_30'], 3)} "
            f"({fmt_num(gap['80-100%'], 1)} / {fmt_num(gap['10-30%'], 1)} ms).",
            "",
            f"Largest container of each kind, `GET /vllm_sink/host_state` ({len(readings)} "
            f"readings, first and last at {marks} tokens):",
            "",
            _table(["container", "first reading", "last reading", "max"], state_rows),
        ]
    )


SECTIONS: dict[str, Callable[[dict[str, Any]], str]] = {
    "overhead": overhead,
    "long_stream": long_stream,
    "recompute": recompute,
    "peer_llamacpp": peer,
    "capacity": capacity,
    "serving": serving,
    "conversation": conversation,
    "shared_opening": shared_opening,
    "long_ppl": long_ppl,
    "long_ppl_float32": long_ppl,
    "long_ppl_compare": long_ppl_compare,
    "host_memory": host_memory,
}


README = Path(__file__).resolve().parent / "README.md"
_MARKED = re.compile(r"(<!-- table:(\w+) -->\n)(.*?)(<!-- /table -->)", re.S)


def section(root: Path, name: str) -> str:
    """The machine line and table of one benchmark's committed results."""
    path = root / name / "results.json"
    if not path.is_file():  # a benchmark added since the last full run
        return f"_Not run yet: no `results/{name}/results.json`._\n"
    d = json.loads(path.read_text())
    return f"{_machine(d)}\n\n{SECTIONS[name](d)}\n"


def fill_readme(text: str, root: Path) -> str:
    """``text`` with every marked table regenerated from ``root``."""
    return _MARKED.sub(lambda m: m.group(1) + section(root, m.group(2)) + m.group(4), text)


def render(root: Path) -> str:
    parts = []
    for name in SECTIONS:
        path = root / name / "results.json"
        if not path.is_file():
            continue
        parts.append(f"### {name}\n\n{section(root, name)}")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=None, help="default: <root>/TABLES.md")
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    args = parser.parse_args(argv)
    text = render(args.root)
    readme = args.readme.read_text()
    filled = fill_readme(readme, args.root)
    if args.check:
        ok = filled == readme
        print("README tables match the results" if ok else f"{args.readme} is stale: rerun")
        return 0 if ok else 1
    (args.out or args.root / "TABLES.md").write_text(text)
    args.readme.write_text(filled)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
