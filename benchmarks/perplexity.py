"""Streaming perplexity on a long text (the paper's Figure 3 experiment).

Streams the text through each mode with teacher forcing in chunked steps, records the NLL of
every token, and writes per-1,000-token perplexity (CSV), per-token NLL (gzipped CSV), a summary
(JSON, with the exact command, machine and settings) and a log-scale plot (PNG).

Modes (``--modes``): ``dense``, ``window:W`` (0 sinks), ``sink:S+W`` (StreamingLLM),
``recompute:W`` (sliding window with re-computation, scored every ``--recompute-every`` tokens),
and ``vllm-dense`` / ``vllm-sink:S+W`` (prompt logprobs through ``vllm.LLM``; vLLM is imported
only when such a mode runs).

Example::

    python benchmarks/perplexity.py --tokens 16384 --chunk 32 \\
        --modes dense window:1024 sink:4+1020 window:256 sink:4+252 recompute:1024
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from vllm_sink.assets import default_model_dir, long_text
from vllm_sink.reference import ReferenceModel, StreamingReference, recompute_nll

DEFAULT_OUT = Path(__file__).parent / "results" / "perplexity"


class Scorer(Protocol):
    """Anything that gives the NLL of every token of a stream (NaN where not scored)."""

    name: str

    def nll(self, token_ids: Sequence[int]) -> np.ndarray: ...


@dataclass
class ReferenceScorer:
    """The pure-PyTorch reference, streamed in chunks of ``chunk_size`` tokens."""

    name: str
    model: ReferenceModel
    sink_tokens: int | None
    window_tokens: int | None
    chunk_size: int
    block_size: int = 32

    def nll(self, token_ids: Sequence[int]) -> np.ndarray:
        ref = StreamingReference(
            self.model,
            sink_tokens=self.sink_tokens,
            window_tokens=self.window_tokens,
            block_size=self.block_size,
        )
        return -ref.score(token_ids, self.chunk_size, progress=True)


@dataclass
class RecomputeScorer:
    """Sliding window with re-computation: a full forward over the last ``window`` tokens."""

    name: str
    model: ReferenceModel
    window: int
    every: int

    def nll(self, token_ids: Sequence[int]) -> np.ndarray:
        return recompute_nll(
            self.model, token_ids, self.window, every=self.every, start=self.every, progress=True
        )


@dataclass
class VllmScorer:
    """Prompt logprobs through ``vllm.LLM`` for the same chunked steps (one chunk per step).

    ``sink_settings`` (e.g. ``{"sink_tokens": 4, "window_tokens": 1020}``) is passed as
    ``additional_config={"vllm_sink": ...}``; ``None`` runs vanilla vLLM. vLLM is imported here
    only, so the reference paths never start an engine.
    """

    name: str
    model_dir: str
    chunk_size: int
    max_model_len: int
    sink_settings: dict | None = None
    dtype: str = "float32"
    block_size: int = 32

    def nll(self, token_ids: Sequence[int]) -> np.ndarray:
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        extra = {"vllm_sink": self.sink_settings} if self.sink_settings is not None else None
        llm = LLM(
            model=self.model_dir,
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            enable_chunked_prefill=True,
            max_num_batched_tokens=self.chunk_size,
            block_size=self.block_size,
            enforce_eager=True,
            additional_config=extra,
        )
        out = llm.generate(
            TokensPrompt(prompt_token_ids=list(token_ids)),
            SamplingParams(max_tokens=1, prompt_logprobs=0),
        )[0]
        nll = np.full(len(token_ids), np.nan)
        for i, entry in enumerate(out.prompt_logprobs or []):
            if entry:
                nll[i] = -entry[token_ids[i]].logprob
        return nll


# ----------------------------------------------------------------------------- harness


def build_scorer(
    spec: str, *, model: ReferenceModel | None, model_dir: Path, args: argparse.Namespace
) -> Scorer:
    kind, _, arg = spec.partition(":")
    if kind == "dense":
        return ReferenceScorer("dense", model, None, None, args.chunk, args.block_size)
    if kind == "window":
        w = int(arg)
        return ReferenceScorer(f"window 0+{w}", model, 0, w, args.chunk, args.block_size)
    if kind == "sink":
        s, w = (int(x) for x in arg.split("+"))
        return ReferenceScorer(f"sink {s}+{w}", model, s, w, args.chunk, args.block_size)
    if kind == "recompute":
        w = int(arg)
        return RecomputeScorer(f"recompute {w}", model, w, args.recompute_every)
    if kind == "vllm-dense":
        return VllmScorer("vllm dense", str(model_dir), args.chunk, args.tokens + 1)
    if kind == "vllm-sink":
        s, w = (int(x) for x in arg.split("+"))
        settings = {"sink_tokens": s, "window_tokens": w}
        return VllmScorer(f"vllm sink {s}+{w}", str(model_dir), args.chunk, 8192, settings)
    raise SystemExit(f"unknown mode {spec!r}")


def segment_ppl(nll: np.ndarray, segment: int) -> list[float | None]:
    """Perplexity per segment of ``segment`` tokens over the scored (non-NaN) tokens."""
    out: list[float | None] = []
    for s in range(0, len(nll), segment):
        part = nll[s : s + segment]
        part = part[~np.isnan(part)]
        out.append(float(np.exp(part.mean())) if part.size else None)
    return out


def ppl(nll: np.ndarray) -> float | None:
    vals = nll[~np.isnan(nll)]
    return float(np.exp(vals.mean())) if vals.size else None


def machine_info() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def plot(results: dict[str, np.ndarray], segment: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for name, nll in results.items():
        seg = segment_ppl(nll, segment)
        xs = [(i + 1) * segment for i, v in enumerate(seg) if v is not None]
        ys = [v for v in seg if v is not None]
        style = "--o" if name.startswith("recompute") else "-"
        ax.plot(xs, ys, style, label=name, markersize=3)
    ax.set_yscale("log")
    ax.set_xlabel("input length (tokens)")
    ax.set_ylabel(f"perplexity per {segment}-token segment (log scale)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="HF checkpoint (default: SmolLM2)")
    p.add_argument("--tokens", type=int, default=16384, help="stream length in tokens")
    p.add_argument("--chunk", type=int, default=32, help="tokens per step (teacher forcing)")
    p.add_argument("--block-size", type=int, default=32, help="KV page size")
    p.add_argument("--segment", type=int, default=1000, help="tokens per reported segment")
    p.add_argument("--recompute-every", type=int, default=128, help="score every k-th token")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument(
        "--modes",
        nargs="+",
        default=["dense", "window:1024", "sink:4+1020", "recompute:1024"],
        help="dense | window:W | sink:S+W | recompute:W | vllm-dense | vllm-sink:S+W",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = args.model or default_model_dir()
    command = shlex.join([Path(sys.executable).name, *sys.argv])

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = long_text(min_chars=args.tokens * 8)
    ids: list[int] = tokenizer(text)["input_ids"]
    if len(ids) < args.tokens:
        raise SystemExit(f"text has only {len(ids)} tokens")
    ids = ids[: args.tokens]

    needs_ref = any(not m.startswith("vllm") for m in args.modes)
    model = ReferenceModel(model_dir) if needs_ref else None
    results: dict[str, np.ndarray] = {}
    timings: dict[str, float] = {}
    for spec in args.modes:
        scorer = build_scorer(spec, model=model, model_dir=model_dir, args=args)
        print(f"== {scorer.name}", flush=True)
        t0 = time.monotonic()
        results[scorer.name] = scorer.nll(ids)
        timings[scorer.name] = time.monotonic() - t0
        print(f"   ppl {ppl(results[scorer.name])} in {timings[scorer.name]:.0f}s", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    names = list(results)
    n_seg = (len(ids) + args.segment - 1) // args.segment
    seg = {name: segment_ppl(results[name], args.segment) for name in names}
    with (args.out / "segments.csv").open("w") as f:
        f.write(",".join(["segment_start", "segment_end", *names]) + "\n")
        for i in range(n_seg):
            row = [str(i * args.segment), str(min(len(ids), (i + 1) * args.segment))]
            row += ["" if seg[n][i] is None else f"{seg[n][i]:.4f}" for n in names]
            f.write(",".join(row) + "\n")
    with gzip.open(args.out / "nll_per_token.csv.gz", "wt") as f:
        f.write(",".join(["index", "token_id", *names]) + "\n")
        for i, t in enumerate(ids):
            vals = ["" if np.isnan(results[n][i]) else f"{results[n][i]:.5f}" for n in names]
            f.write(",".join([str(i), str(t), *vals]) + "\n")

    # Tail: the last quarter of the stream, well past any window and past the trained length
    # when the stream is long enough.
    tail_start = len(ids) - len(ids) // 4
    recompute_names = [n for n in names if n.startswith("recompute")]
    summary: dict = {
        "command": command,
        "machine": machine_info(),
        "settings": {
            "model": str(model_dir),
            "tokens": len(ids),
            "chunk": args.chunk,
            "block_size": args.block_size,
            "segment": args.segment,
            "recompute_every": args.recompute_every,
            "dtype": "float32",
            "text": "vllm_sink.assets.long_text(): concatenated Gutenberg Shakespeare plays",
            "tokenizer_adds_bos": ids[0] == tokenizer.bos_token_id,
            "modes": args.modes,
        },
        "tail_start": tail_start,
        "modes": {},
    }
    for n in names:
        nll = results[n]
        entry = {
            "ppl_all": ppl(nll),
            "ppl_tail": ppl(nll[tail_start:]),
            "ppl_per_segment": seg[n],
            "scored_tokens": int((~np.isnan(nll)).sum()),
            "seconds": round(timings[n], 1),
        }
        # Fair comparison with the sparse recompute baseline: every mode on exactly its tokens
        # (beyond the first window, where recompute differs from dense).
        for r in recompute_names:
            w = int(r.split()[-1])
            mask = ~np.isnan(results[r])
            mask[:w] = False
            entry[f"ppl_on_{r.replace(' ', '_')}_tokens"] = ppl(np.where(mask, nll, np.nan))
        summary["modes"][n] = entry
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    (args.out / "COMMAND.txt").write_text(command + "\n")
    model_name = Path(model_dir).name
    plot(results, args.segment, args.out / "perplexity.png", f"{model_name}, Shakespeare stream")

    print(f"\nwrote {args.out}")
    print(f"{'mode':<18}{'ppl all':>10}{'ppl tail':>10}{'sec':>8}")
    for n in names:
        e = summary["modes"][n]
        fmt = lambda v: "-" if v is None else f"{v:.2f}"
        print(f"{n:<18}{fmt(e['ppl_all']):>10}{fmt(e['ppl_tail']):>10}{e['seconds']:>8}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
