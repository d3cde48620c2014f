"""10. Shared opening: new conversations that all begin with one system prompt; TTFT and pages.

    .venv/bin/python benchmarks/shared_opening.py           # full: 448-token opening, 32 requests
    .venv/bin/python benchmarks/shared_opening.py --quick   # 96-token opening, 6 requests

Multi-tenant chat: every conversation starts with the same opening (system prompt, few-shot
examples) and its own first question. Two engines, both with vLLM's prefix caching on (its
default) and the same dtype: the plugin and vanilla vLLM. Each first answers one warm-up
request (the opening plus a question), which computes the opening and leaves its pages in the
prefix cache. Then:

- **one at a time**: ``--requests`` new requests, each the opening plus its own
  ``--question``-token question, answered with ``--answer`` tokens; the engines alternate
  request by request (who goes first swaps every request, so drift on a shared machine hits
  both alike). Per request: time to first token (TTFT: from submission to the end of the engine
  step that returns the first token) and ``num_cached_tokens``.
- **all at once**: as many requests with other questions, submitted together: each request's
  TTFT, and the most pages the pool had handed out at the end of any step (pages a finished
  request left in the prefix cache, or parked, count as free in both engines).

Summary: median TTFT plugin / vanilla in each phase (target <= 1.2 one at a time), cached
tokens per request (target: at least the opening's full pages), peak pages each.

Writes ``results.json``, ``requests.csv`` and ``shared_opening.png``.
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
    BLOCK_SIZE,
    EngineConfig,
    EnginePool,
    add_engine_args,
    engine_configs,
    engine_facts,
    finish_engine_args,
    log,
    plt,
    result_envelope,
    save_plot,
    spread,
    standalone,
    write_command,
    write_csv,
    write_json,
)

ENGINES = ("plugin", "vanilla")
TARGET_RATIO = 1.2  # median TTFT plugin / vanilla, one request at a time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_engine_args(parser, "shared_opening")
    parser.add_argument("--requests", type=int, default=None, help="new requests per phase")
    parser.add_argument("--opening", type=int, default=None, help="shared opening tokens")
    parser.add_argument("--question", type=int, default=None, help="tokens of each question")
    parser.add_argument("--answer", type=int, default=None, help="generated tokens a request")
    parser.add_argument("--start", type=int, default=3000, help="first text token used")
    args = parser.parse_args(argv)
    if args.quick:
        defaults = {"requests": 6, "opening": 96, "question": 32, "answer": 8, "window": 64}
    else:
        # The case: window 512 holds the opening and the question (nothing evicted
        # before the first answer token); max_model_len 1024 lets vanilla take every request.
        defaults = {
            "requests": 32,
            "opening": 448,
            "question": 64,
            "answer": 16,
            "window": 512,
            "max_model_len": 1024,
            "dtype": "float32",
        }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return finish_engine_args(args)


def engines(args: argparse.Namespace) -> dict[str, EngineConfig]:
    plugin, vanilla = engine_configs(args)
    return {
        "plugin": dataclasses.replace(plugin, prefix_caching=True),
        "vanilla": dataclasses.replace(vanilla, prefix_caching=True),
    }


def prompts(args: argparse.Namespace) -> tuple[list[int], list[list[int]]]:
    """The opening, then the questions (warm-up, one-at-a-time phase, all-at-once phase)."""
    from transformers import AutoTokenizer

    from vllm_sink.assets import default_model_dir, long_text

    n = 1 + 2 * args.requests
    need = args.start + args.opening + n * args.question
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    ids = tok(long_text(8 * need), add_special_tokens=False)["input_ids"]
    opening = ids[args.start : args.start + args.opening]
    base = args.start + args.opening
    questions = [ids[base + i * args.question : base + (i + 1) * args.question] for i in range(n)]
    return opening, questions


def run(args: argparse.Namespace, pool: EnginePool) -> dict[str, Any]:
    write_command(args.out)
    configs = engines(args)
    workers = dict(zip(configs, pool.start(*configs.values()), strict=True))
    opening, questions = prompts(args)
    warm, one_by_one, at_once = (
        questions[0],
        questions[1 : 1 + args.requests],
        questions[1 + args.requests :],
    )
    for name in ENGINES:
        workers[name].call("turn", prompt_ids=opening + warm, max_tokens=args.answer)
    rows: list[dict[str, Any]] = []
    for i, question in enumerate(one_by_one):
        order = ENGINES if i % 2 == 0 else ENGINES[::-1]
        for name in order:
            r = workers[name].call("turn", prompt_ids=opening + question, max_tokens=args.answer)
            rows.append(
                {
                    "engine": name,
                    "phase": "one_at_a_time",
                    "request": i,
                    "prompt_len": r["prompt_len"],
                    "num_cached_tokens": r["num_cached_tokens"],
                    "ttft_ms": 1000 * r["ttft_s"],
                    "pages_used_after": r["pages_used_after"],
                }
            )
        last = rows[-2:]
        log(
            f"request {i + 1}/{args.requests}: "
            + ", ".join(
                f"{r['engine']} {r['ttft_ms']:.0f} ms ({r['num_cached_tokens']} cached)"
                for r in last
            )
        )
    batch: dict[str, dict[str, Any]] = {}
    for name in ENGINES:
        r = workers[name].call(
            "batch", prompts=[opening + q for q in at_once], max_tokens=args.answer
        )
        batch[name] = r
        for i, (ttft, cached) in enumerate(zip(r["ttft_s"], r["num_cached_tokens"], strict=True)):
            rows.append(
                {
                    "engine": name,
                    "phase": "all_at_once",
                    "request": i,
                    "prompt_len": len(opening) + len(at_once[i]),
                    "num_cached_tokens": cached,
                    "ttft_ms": 1000 * ttft,
                    "pages_used_after": r["pages_used_after"],
                }
            )
        log(f"{name}, {len(at_once)} at once: peak {r['peak_pages_used']} pages")
    summary = summarise(rows, batch, args)
    write_csv(args.out / "requests.csv", rows)
    plot(rows, batch, args, args.out / "shared_opening.png")
    payload = result_envelope(
        "shared_opening",
        {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        engines=configs,
        engine_facts=engine_facts(workers),
        summary=summary,
        rows=rows,
        batch=batch,
    )
    write_json(args.out / "results.json", payload)
    return summary


def summarise(
    rows: list[dict[str, Any]], batch: dict[str, dict[str, Any]], args: argparse.Namespace
) -> dict[str, Any]:
    def ttfts(name: str, phase: str) -> list[float]:
        return [r["ttft_ms"] for r in rows if r["engine"] == name and r["phase"] == phase]

    full_pages = args.opening // BLOCK_SIZE * BLOCK_SIZE
    summary: dict[str, Any] = {
        "requests": args.requests,
        "opening_tokens": args.opening,
        "opening_full_page_tokens": full_pages,
        "target_ttft_ratio": TARGET_RATIO,
    }
    for phase in ("one_at_a_time", "all_at_once"):
        med = {name: statistics.median(ttfts(name, phase)) for name in ENGINES}
        summary[f"{phase}_ttft_ms"] = {name: spread(ttfts(name, phase)) for name in ENGINES}
        summary[f"{phase}_ttft_ratio"] = med["plugin"] / med["vanilla"]
        cached = {
            name: [
                r["num_cached_tokens"] for r in rows if r["engine"] == name and r["phase"] == phase
            ]
            for name in ENGINES
        }
        summary[f"{phase}_min_cached_tokens"] = {name: min(c) for name, c in cached.items()}
    summary["peak_pages_all_at_once"] = {name: batch[name]["peak_pages_used"] for name in ENGINES}
    summary["every_request_cached_the_opening"] = all(
        r["num_cached_tokens"] >= full_pages for r in rows if r["engine"] == "plugin"
    )
    log(
        f"median TTFT plugin / vanilla: one at a time {summary['one_at_a_time_ttft_ratio']:.2f} "
        f"(target <= {TARGET_RATIO}), all at once {summary['all_at_once_ttft_ratio']:.2f}; "
        f"peak pages {summary['peak_pages_all_at_once']}"
    )
    return summary


def plot(
    rows: list[dict[str, Any]],
    batch: dict[str, dict[str, Any]],
    args: argparse.Namespace,
    path: Path,
) -> None:
    pyplot = plt()
    fig, (ax1, ax2) = pyplot.subplots(1, 2, figsize=(11, 4), width_ratios=[3, 1])
    colors = {"plugin": "tab:blue", "vanilla": "tab:gray"}
    for name in ENGINES:
        mine = [r for r in rows if r["engine"] == name and r["phase"] == "one_at_a_time"]
        ax1.plot(
            [r["request"] + 1 for r in mine],
            [r["ttft_ms"] for r in mine],
            color=colors[name],
            marker="o",
            ms=3,
            label=name,
        )
    ax1.set_xlabel("new request (one at a time)")
    ax1.set_ylabel("time to first token (ms)")
    ax1.set_ylim(bottom=0)
    ax1.legend()
    ax1.set_title(
        f"{args.opening}-token shared opening + {args.question}-token question, prefix caching "
        f"on; plugin: sinks {args.sinks} + window {args.window}",
        fontsize=9,
    )
    ax2.bar(
        list(ENGINES),
        [batch[n]["peak_pages_used"] for n in ENGINES],
        color=[colors[n] for n in ENGINES],
    )
    ax2.set_ylabel(f"peak KV pages, {args.requests} at once")
    save_plot(fig, path)


def main(argv: list[str] | None = None) -> int:
    return standalone(parse_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
