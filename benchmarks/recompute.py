"""3. Against the paper's baseline: the plugin vs sliding window with re-computation.

    .venv/bin/python benchmarks/recompute.py            # full: caches 64 128 256, 3 repeats
    .venv/bin/python benchmarks/recompute.py --quick

Per-token decode latency at the same cache size ``C = sink pages + window`` (the paper's
Figure 10, where StreamingLLM is up to 22.2x faster than re-computation):

- ``plugin``: vLLM with the plugin, one stream already past the window, decoding (median step);
- ``vllm_recompute``: vanilla vLLM re-computing every token from scratch over the last ``C``
  tokens (one ``C``-token prefill + one sampled token per output token, the paper's baseline);
- ``reference_stream`` / ``reference_recompute``: the same two on the project's pure-PyTorch
  reference (``vllm_sink/reference.py``, float32, HF-style, the paper's own kind of
  implementation), in this process.

Each repeat measures all four back to back (order flipped every other repeat); the speed-ups are
ratios within one repeat, reported as min/median/max over repeats. Writes ``results.json``,
``runs.csv`` and ``recompute.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
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

PAPER_MAX_SPEEDUP = 22.2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_engine_args(parser, "recompute")
    parser.add_argument("--windows", type=int, nargs="+", default=None, help="window_tokens")
    parser.add_argument("--tokens", type=int, default=None, help="tokens timed per measurement")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-reference", action="store_true", help="skip the reference")
    args = finish_engine_args(parser.parse_args(argv))
    if args.windows is None:
        # Cache sizes 64, 128 and 256 (window + one 32-token sink page) in the full run.
        args.windows = [args.window] if args.quick else [32, 96, 224]
    if args.tokens is None:
        args.tokens = 3
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    return args


class Reference:
    """The pure-PyTorch reference: streaming steps and from-scratch re-computation."""

    def __init__(self, sinks: int) -> None:
        from transformers import AutoTokenizer

        from vllm_sink.assets import default_model_dir, long_text
        from vllm_sink.reference import ReferenceModel

        self.model = ReferenceModel(default_model_dir())
        self.sinks = sinks
        tok = AutoTokenizer.from_pretrained(default_model_dir())
        self.ids = tok(long_text(120_000))["input_ids"]

    def stream(self, window: int, tokens: int) -> list[float]:
        """Seconds per decode token of a stream already past the window (greedy)."""
        import torch

        from vllm_sink.reference import StreamingReference

        ref = StreamingReference(self.model, sink_tokens=self.sinks, window_tokens=window)
        prompt = self.ids[5000 : 5000 + sink_len(self.sinks) + window + 64]
        with torch.inference_mode():
            for s in range(0, len(prompt), 256):  # chunked prefill, untimed
                logp = ref.step(prompt[s : s + 256])
            nxt = int(logp[-1].argmax())
            times = []
            for _ in range(tokens):
                t0 = time.perf_counter()
                logp = ref.step([nxt])
                nxt = int(logp[-1].argmax())
                times.append(time.perf_counter() - t0)
        return times

    def recompute(self, cache: int, tokens: int) -> list[float]:
        """Seconds per token when each token re-runs the model over the last ``cache`` tokens."""
        import torch

        k, v = self.model.new_cache(cache)
        times = []
        with torch.inference_mode():
            for t in range(tokens):
                ctx = self.ids[5000 + t : 5000 + t + cache]
                t0 = time.perf_counter()
                logits = self.model.forward(
                    torch.as_tensor(ctx), torch.arange(len(ctx)), k, v, 0, last_only=True
                )
                int(logits[-1].argmax())
                times.append(time.perf_counter() - t0)
        return times


def run(args: argparse.Namespace, pool: EnginePool) -> dict[str, Any]:
    from tqdm import tqdm

    write_command(args.out)
    base_plugin, vanilla_cfg = engine_configs(args)
    reference = None if args.no_reference else Reference(args.sinks)
    runs: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    engines: dict[str, Any] = {"vanilla": vanilla_cfg}
    started: dict[str, Any] = {}  # name in ``engines`` -> its worker
    for window in args.windows:
        cache = sink_len(args.sinks) + window
        cfg = dataclasses.replace(base_plugin, window_tokens=window)
        if cfg.max_model_len < cache + 128:
            cfg = dataclasses.replace(cfg, max_model_len=cache + 128)
        engines[f"plugin_{window}"] = cfg
        # Vanilla re-computes over `cache` tokens plus the sampled one: its length must hold them.
        vcfg, vname = vanilla_cfg, "vanilla"
        if vcfg.max_model_len <= cache:
            vcfg = dataclasses.replace(vcfg, max_model_len=cfg.max_model_len)
            vname = f"vanilla_{window}"
            engines[vname] = vcfg
        plugin, vanilla = pool.start(cfg, vcfg)
        started[f"plugin_{window}"], started[vname] = plugin, vanilla
        plugin.call("decode", streams=1, prompt_len=cache + 64, gen=4)  # warm-up
        vanilla.call("recompute", window=cache, tokens=2)
        methods = {
            "plugin": lambda plugin=plugin, cache=cache: (
                plugin.call("decode", streams=1, prompt_len=cache + 64, gen=args.tokens + 1)[
                    "step_ms_median"
                ]
                / 1000
            ),
            "vllm_recompute": lambda vanilla=vanilla, cache=cache: statistics.median(
                vanilla.call("recompute", window=cache, tokens=args.tokens)["token_s"]
            ),
        }
        if reference:
            methods["reference_stream"] = lambda window=window: statistics.median(
                reference.stream(window, args.tokens)
            )
            methods["reference_recompute"] = lambda cache=cache: statistics.median(
                reference.recompute(cache, args.tokens)
            )
        per: dict[str, list[float]] = {m: [] for m in methods}
        for rep in tqdm(range(args.repeats), desc=f"recompute C={cache}", file=sys.stderr):
            for m in alternate(rep, 0, list(methods)):
                per[m].append(methods[m]())
                runs.append({"window": window, "cache": cache, "repeat": rep, "method": m,
                             "s_per_token": per[m][-1]})  # fmt: skip
        s: dict[str, Any] = {m: spread(v) for m, v in per.items()}
        s["speedup_vs_vllm_recompute"] = spread(
            r / p for r, p in zip(per["vllm_recompute"], per["plugin"], strict=True)
        )
        if reference:
            s["speedup_vs_reference_recompute"] = spread(
                r / p for r, p in zip(per["reference_recompute"], per["plugin"], strict=True)
            )
            s["plugin_vs_reference_stream"] = spread(
                r / p for r, p in zip(per["reference_stream"], per["plugin"], strict=True)
            )
            s["reference_stream_vs_recompute"] = spread(
                r / p
                for r, p in zip(per["reference_recompute"], per["reference_stream"], strict=True)
            )
        summary[str(cache)] = {"window_tokens": window, **s}
        log(
            f"cache {cache}: plugin {fmt_spread(s['plugin'], 4, 's')}/tok, speed-up vs "
            f"re-computation {fmt_spread(s['speedup_vs_vllm_recompute'], 1, 'x')}"
        )
    payload = result_envelope(
        "recompute",
        {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        engines=engines,
        engine_facts=engine_facts(started),
        paper_max_speedup=PAPER_MAX_SPEEDUP,
        summary=summary,
        runs=runs,
    )
    write_json(args.out / "results.json", payload)
    write_csv(args.out / "runs.csv", runs)
    plot(summary, args.out / "recompute.png")
    return summary


def plot(summary: dict[str, Any], path: Path) -> None:
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(8, 4.5))
    caches = [int(c) for c in summary]
    styles = {
        "vllm_recompute": ("tab:red", "vLLM, re-computation"),
        "plugin": ("tab:blue", "vLLM + plugin (sinks)"),
        "reference_recompute": ("tab:orange", "reference, re-computation"),
        "reference_stream": ("tab:green", "reference, streaming"),
    }
    for m, (color, label) in styles.items():
        if m not in summary[str(caches[0])]:
            continue
        med = [summary[str(c)][m]["median"] * 1000 for c in caches]
        lo = [med[i] - summary[str(c)][m]["min"] * 1000 for i, c in enumerate(caches)]
        hi = [summary[str(c)][m]["max"] * 1000 - med[i] for i, c in enumerate(caches)]
        ax.errorbar(caches, med, yerr=[lo, hi], fmt="o-", color=color, label=label, capsize=4)
    for c in caches:
        sp = summary[str(c)]["speedup_vs_vllm_recompute"]["median"]
        y = summary[str(c)]["vllm_recompute"]["median"] * 1000
        ax.annotate(f"{sp:.1f}x", (c, y), textcoords="offset points", xytext=(4, 6))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(caches, [str(c) for c in caches])
    ax.set_xlabel("cache size C (tokens)")
    ax.set_ylabel("ms per output token (median)")
    ax.set_title("Per-token latency: sinks vs sliding window with re-computation")
    ax.legend()
    save_plot(fig, path)


def main(argv: list[str] | None = None) -> int:
    return standalone(parse_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
