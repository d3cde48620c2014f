"""7. Conversation: a chat that resends its whole history every turn; TTFT and prefill per turn.

    .venv/bin/python benchmarks/conversation.py           # full: 50 turns, window 256
    .venv/bin/python benchmarks/conversation.py --quick   # 6 turns, tiny sizes

Each turn the client appends a user chunk of ``--chunk`` tokens of real text (consecutive
slices of ``vllm_sink.assets.long_text()``, tokenised with the model's tokenizer) to the
history and sends the whole history as token ids, as a chat client does; the engine answers
with ``--answer`` tokens (greedy, ``ignore_eos``), which join the history. Three engines hold
one conversation each, all in this run, alternating turn by turn (order rotated every turn, so
drift on a shared machine hits all three alike):

- ``plugin_resuming``: the plugin with vLLM's prefix caching on (its default). A finished
  stream's pages are parked, and the next turn, whose tokens extend them, resumes the stream
  and prefills only what is new.
- ``plugin_reprefill``: the same plugin settings with ``enable_prefix_caching=False``: every
  turn prefills the whole history again, through eviction.
- ``vanilla``: vLLM without the plugin, prefix caching on, until the history no longer fits
  ``max_model_len``; where it stops is recorded.

Per turn: time to first token (TTFT: the wall time from submitting the request to the end of the
engine step that hands back its first token; the worker drives ``LLMEngine.step()``, which
streams each step's tokens), the whole turn's time, and the tokens prefilled, ``len(prompt) -
RequestOutput.num_cached_tokens``. The summary gives re-prefill / resuming TTFT at every turn
both ran, the last one included (the target is >= 10x at turn 50, reported, not asserted).

Writes ``results.json`` (per-turn rows of every engine, each engine's answers, the summary),
``turns.csv`` and ``conversation.png`` (TTFT and tokens prefilled against the turn).
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

ENGINES = ("plugin_resuming", "plugin_reprefill", "vanilla")
LABELS = {
    "plugin_resuming": "plugin, resuming",
    "plugin_reprefill": "plugin, re-prefill",
    "vanilla": "vanilla",
}
TARGET_RATIO = 10.0  # re-prefill / resuming TTFT at the last turn (reported, not asserted)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_engine_args(parser, "conversation")
    parser.add_argument("--turns", type=int, default=None)
    parser.add_argument("--chunk", type=int, default=None, help="user tokens per turn")
    parser.add_argument("--answer", type=int, default=None, help="generated tokens per turn")
    parser.add_argument("--start", type=int, default=2000, help="first text token of the chat")
    args = parser.parse_args(argv)
    if args.quick:
        # The suite's quick plugin engine (window 32, max_model_len 256) is the re-prefill one.
        defaults = {"turns": 6, "chunk": 64, "answer": 16}
    else:
        # max_model_len 2048: vanilla gets 14 turns of the 50 (history 7,000 tokens). float32:
        # with vLLM's CPU backend on 2 AVX2 cores a bf16 prefill costs ~13 ms a token (about a
        # decode step), so re-prefilling 50 growing histories in bf16 takes ~40 min.
        defaults = {
            "turns": 50,
            "chunk": 100,
            "answer": 40,
            "window": 256,
            "max_model_len": 2048,
            "dtype": "float32",
        }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return finish_engine_args(args)


def engines(args: argparse.Namespace) -> dict[str, EngineConfig]:
    """The three engines: the plugin with and without prefix caching, vanilla with it."""
    reprefill, vanilla = engine_configs(args)
    return {
        "plugin_resuming": dataclasses.replace(reprefill, prefix_caching=True),
        "plugin_reprefill": reprefill,
        "vanilla": dataclasses.replace(vanilla, prefix_caching=True),
    }


def user_chunks(turns: int, chunk: int, start: int) -> list[list[int]]:
    """``turns`` consecutive ``chunk``-token slices of the long text, from token ``start``."""
    from transformers import AutoTokenizer

    from vllm_sink.assets import default_model_dir, long_text

    need = start + turns * chunk
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    ids = tok(long_text(8 * need), add_special_tokens=False)["input_ids"]
    if len(ids) < need:
        raise SystemExit(f"the text has {len(ids)} tokens, the conversation needs {need}")
    return [ids[start + t * chunk : start + (t + 1) * chunk] for t in range(turns)]


def run(args: argparse.Namespace, pool: EnginePool) -> dict[str, Any]:
    write_command(args.out)
    configs = engines(args)
    workers = dict(zip(configs, pool.start(*configs.values()), strict=True))
    chunks = user_chunks(args.turns, args.chunk, args.start)
    history: dict[str, list[int]] = {name: [] for name in ENGINES}
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in ENGINES}
    answers: dict[str, list[list[int]]] = {name: [] for name in ENGINES}
    stopped: dict[str, dict[str, Any]] = {}
    for turn, chunk in enumerate(chunks, start=1):
        shift = turn % len(ENGINES)
        order = [*ENGINES[shift:], *ENGINES[:shift]]
        for name in order:
            if name in stopped:
                continue
            prompt = history[name] + chunk
            r = workers[name].call("turn", prompt_ids=prompt, max_tokens=args.answer)
            if r.get("error_on_add") or r["generated"] < args.answer:
                # The history (plus the answer) no longer fits vanilla's max_model_len.
                reason = r.get("error_on_add") or f"finish {r['finish_reason']}"
                stopped[name] = {
                    "turn": turn,
                    "prompt_len": len(prompt),
                    "generated": r.get("generated", 0),
                    "reason": reason.splitlines()[0][:300],
                }
                log(f"{name} stopped at turn {turn} (history {len(prompt)}): {reason[:120]}")
                continue
            generated = r["generated"]
            rows[name].append(
                {
                    "engine": name,
                    "turn": turn,
                    "chunk_tokens": len(chunk),
                    "prompt_len": len(prompt),
                    "num_cached_tokens": r["num_cached_tokens"],
                    "prefilled": len(prompt) - r["num_cached_tokens"],
                    "ttft_ms": 1000 * r["ttft_s"],
                    "turn_ms": 1000 * r["turn_s"],
                    "decode_ms_per_token": 1000 * (r["turn_s"] - r["ttft_s"]) / (generated - 1)
                    if generated > 1
                    else None,
                    "generated": generated,
                    "finish_reason": r["finish_reason"],
                    "prefill_steps": r["prefill_steps"],
                    "pages_used_after": r["pages_used_after"],
                }
            )
            answers[name].append(r["token_ids"])
            history[name] = prompt + r["token_ids"]
        line = ", ".join(
            f"{n} {rows[n][-1]['ttft_ms']:.0f} ms / {rows[n][-1]['prefilled']} tok"
            for n in ENGINES
            if rows[n] and rows[n][-1]["turn"] == turn
        )
        log(f"turn {turn}/{args.turns} (TTFT / prefilled): {line}")
    summary = summarise(rows, stopped, args)
    write_csv(args.out / "turns.csv", [row for name in ENGINES for row in rows[name]])
    plot(rows, stopped, args, args.out / "conversation.png")
    results = {
        name: {
            "label": LABELS[name],
            "engine": configs[name].name,
            "rows": rows[name],
            "stopped": stopped.get(name),
            "answers": answers[name],
        }
        for name in ENGINES
    }
    payload = result_envelope(
        "conversation",
        {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        engines=configs,
        engine_facts=engine_facts(workers),
        summary=summary,
        results=results,
    )
    write_json(args.out / "results.json", payload)
    return summary


def summarise(
    rows: dict[str, list[dict[str, Any]]],
    stopped: dict[str, dict[str, Any]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    by_turn = {name: {r["turn"]: r for r in rows[name]} for name in ENGINES}
    res, rep = by_turn["plugin_resuming"], by_turn["plugin_reprefill"]
    ratios = [
        {"turn": t, "ttft_ratio": rep[t]["ttft_ms"] / res[t]["ttft_ms"]}
        for t in sorted(res)
        if t in rep
    ]
    last = ratios[-1] if ratios else None
    later = [res[t] for t in sorted(res) if t > 1]
    summary: dict[str, Any] = {
        "turns": args.turns,
        "turns_run": {name: len(rows[name]) for name in ENGINES},
        "history_tokens_at_last_turn": max(
            (r["prompt_len"] for name in ENGINES for r in rows[name]), default=0
        ),
        "ttft_ratio_by_turn": ratios,
        "last_turn": last["turn"] if last else None,
        "ttft_ratio_last_turn": last["ttft_ratio"] if last else None,
        "target_ratio_last_turn": TARGET_RATIO,
        "resuming_ttft_ms_after_turn_1": spread(r["ttft_ms"] for r in later),
        "resuming_prefilled_after_turn_1": spread(r["prefilled"] for r in later),
        "reprefill_prefilled_equals_history": all(
            r["prefilled"] == r["prompt_len"] for r in rows["plugin_reprefill"]
        ),
        "vanilla_stopped": stopped.get("vanilla"),
        "max_model_len": args.max_model_len,
    }
    for name in ENGINES:
        if rows[name]:
            first, final = rows[name][0], rows[name][-1]
            summary[f"{name}_ttft_ms_first_last"] = [first["ttft_ms"], final["ttft_ms"]]
            summary[f"{name}_prefilled_first_last"] = [first["prefilled"], final["prefilled"]]
    if later:
        # Flatness: the resuming plugin's later turns against its second one.
        summary["resuming_ttft_last_over_turn_2"] = later[-1]["ttft_ms"] / later[0]["ttft_ms"]
        summary["resuming_ttft_median_ms_after_turn_1"] = statistics.median(
            r["ttft_ms"] for r in later
        )
    if last:
        log(
            f"turn {last['turn']}: re-prefill / resuming TTFT = {last['ttft_ratio']:.1f}x "
            f"(target >= {TARGET_RATIO:g}x)"
        )
    return summary


def plot(
    rows: dict[str, list[dict[str, Any]]],
    stopped: dict[str, dict[str, Any]],
    args: argparse.Namespace,
    path: Path,
) -> None:
    pyplot = plt()
    fig, (ax1, ax2) = pyplot.subplots(2, 1, figsize=(9, 7), sharex=True)
    style = {
        "plugin_resuming": ("tab:blue", "o"),
        "plugin_reprefill": ("tab:orange", "s"),
        "vanilla": ("tab:gray", "^"),
    }
    for name in ENGINES:
        if not rows[name]:
            continue
        color, marker = style[name]
        turns = [r["turn"] for r in rows[name]]
        kw = {"color": color, "marker": marker, "ms": 3, "label": LABELS[name]}
        ax1.plot(turns, [r["ttft_ms"] for r in rows[name]], **kw)
        ax2.plot(turns, [r["prefilled"] for r in rows[name]], **kw)
    stop = stopped.get("vanilla")
    if stop:
        for ax in (ax1, ax2):
            ax.axvline(stop["turn"], color="tab:red", ls=":", lw=1)
    ax1.set_yscale("log")
    ax1.set_ylabel("time to first token (ms)")
    where = f", vanilla stops at turn {stop['turn']} (red)" if stop else ""
    ax1.set_title(
        f"Conversation: {args.chunk} user + {args.answer} answer tokens a turn, sinks "
        f"{args.sinks} + window {args.window}, max_model_len {args.max_model_len}{where}",
        fontsize=9,
    )
    ax1.legend()
    ax2.set_yscale("log")
    ax2.set_ylabel("tokens prefilled")
    ax2.set_xlabel("turn")
    ax2.legend()
    save_plot(fig, path)


def main(argv: list[str] | None = None) -> int:
    return standalone(parse_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
