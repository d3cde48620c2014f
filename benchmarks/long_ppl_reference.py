"""8b. The model or the engine? Stretches of A's stream re-scored by the project's reference.

    .venv/bin/python benchmarks/long_ppl_reference.py   # the 4 worst segments with ratio > 1.05
    .venv/bin/python benchmarks/long_ppl_reference.py --segments 0,1 --out reference_control.json

Where A (sinks 4 + window 1,020, through the engine) scores worse than the re-computation oracle
on a segment's targets, this asks whether the engine computed what the StreamingLLM contract
says, or whether the method itself (this model with this cache) scores those tokens worse.
``vllm_sink.reference.StreamingReference`` (pure PyTorch, the contract's eviction and cache-slot
positions, written independently of the engine) re-scores the segment, and its NLL is compared
with the engine's on every token of the segment, and with the oracle's on the targets.

A stretch ``[a, b)`` of a million-token stream is re-scored without replaying the million tokens.
The reference reads the sink page (text tokens ``[0, sink_end)``) followed by the text from
``p0 = a - margin`` (rounded down so that ``p0 - sink_end`` is a whole number of steps): its
steps and pages then fall on the same text tokens as the engine's (``--chunk``-token steps from
0), and once its window has slid past ``p0`` its cache holds the same text tokens in the same
slots as the engine's did. What it computed before that differs (it never saw ``[sink_end,
p0)``), but the logits at a token depend only on tokens within ``num_hidden_layers`` hops of
attention context, each hop at most ``window + block + chunk`` tokens back (plus the sink page,
which both hold): a layer's keys and values for a token come from the layers below over that
token's own context. With ``margin >= layers * hop`` the reference computes exactly what the
engine did on ``[a, b)``: their NLLs must agree to float32 noise. Then a ratio above 1.05 there
is the method's, not the engine's.

The control, ``--segments 0,1 --out reference_control.json``: the first two segments, where the
reference replays the stream from token 0 (no margin needed), give float32's own spread between
the engine and the reference at these settings.

Writes ``results/long_ppl_float32/reference_check.json`` (the float32 run: the reference is
float32, so it checks the float32 engine to its noise): per stretch, the agreement (largest and
mean absolute NLL difference over all its tokens), the perplexity ratios to the
oracle on its targets for the engine and for the reference, and the targets with each one's
context length under the cache (sink page + window) and under the oracle.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, log, machine_info, write_json  # noqa: E402

BLOCK = 32  # vLLM's CPU page size, the engine's block_size in every long_ppl run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dir", type=Path, default=RESULTS / "long_ppl_float32", help="a float32 long_ppl run"
    )
    parser.add_argument("--segments", default=None, help="segment numbers (comma-separated)")
    parser.add_argument(
        "--above", type=float, default=1.05, help="default segments: sinks ratio above this"
    )
    parser.add_argument(
        "--most", type=int, default=4, help="default segments: at most this many, worst first"
    )
    parser.add_argument("--margin", type=int, default=None, help="tokens read before a stretch")
    parser.add_argument("--out", default="reference_check.json", help="file name in --dir")
    return parser.parse_args(argv)


def exact_margin(layers: int, window: int, block: int, chunk: int) -> int:
    """Tokens read before a stretch so that the reference computes exactly what the engine did:
    ``layers`` hops of at most ``window + block + chunk`` tokens, plus a step of rounding."""
    return layers * (window + block + chunk) + chunk


def stretch_start(a: int, margin: int, chunk: int, sink_end: int) -> int:
    """First text token after the sink page that the reference reads for a stretch at ``a``:
    ``p0 - sink_end`` a multiple of ``chunk`` (so steps fall where the engine's did), at least
    ``margin`` before ``a``; ``sink_end`` (the whole text) when ``a`` is that close to the start."""
    return max(sink_end, (a - margin - sink_end) // chunk * chunk + sink_end)


def score_stretch(
    ref: Any, ids: list[int], a: int, b: int, *, chunk: int, margin: int
) -> tuple[np.ndarray, int]:
    """NLL of text tokens ``[a, b)`` as the reference stream ``ref`` computes them; and ``p0``."""
    from vllm_sink.reference import sink_pages

    sink_end = sink_pages(ref.sink_tokens, ref.block_size) * ref.block_size  # kept for good
    p0 = stretch_start(a, margin, chunk, sink_end)
    stream = ids[:sink_end] + ids[p0:b]
    nll = -ref.score(stream, chunk)
    offset = p0 - sink_end  # reference index r >= sink_end is text token r + offset
    return nll[a - offset : b - offset], p0


def context_length(t: int, *, sinks: int, window: int, chunk: int) -> int:
    """Tokens the cache attends over when target ``t`` is predicted (from token ``t - 1``, in
    the step starting at ``s``): what is kept before the step, and the step's ``t - s``."""
    from vllm_sink.reference import kept_tokens

    s = (t - 1) // chunk * chunk
    return len(kept_tokens(s, sinks, window, BLOCK)) + t - s


def adjacent_runs(segments: list[int]) -> list[list[int]]:
    """``[3, 4, 9]`` -> ``[[3, 4], [9]]``."""
    runs: list[list[int]] = []
    for s in sorted(segments):
        if runs and runs[-1][-1] == s - 1:
            runs[-1].append(s)
        else:
            runs.append([s])
    return runs


def load(out: Path) -> dict[str, Any]:
    """The text's token ids, A's per-token NLL, the targets with the oracle's NLL, the segments
    and the settings."""
    results = json.loads((out / "results.json").read_text())
    with (out / "targets.csv").open() as f:
        rows = list(csv.DictReader(f))
    per_token = np.load(out / "nll_per_token.npz")
    return {
        "settings": results["settings"],
        "segments": results["segments"],
        "ids": per_token["token_ids"].tolist(),
        "sinks": per_token["sinks"].astype(np.float64),
        "targets": np.array([int(r["position"]) for r in rows]),
        "oracle": np.array([float(r["nll_oracle"]) for r in rows]),
    }


def main(argv: list[str] | None = None) -> int:
    import torch

    from vllm_sink.assets import default_model_dir
    from vllm_sink.reference import ReferenceModel, StreamingReference, sink_pages

    args = parse_args(argv)
    data = load(args.dir)
    st = data["settings"]
    if st["dtype"] != "float32":
        raise SystemExit(f"the reference check is float32; these results are {st['dtype']}")
    sinks, window, chunk, seg = st["sinks"], st["cache"] - st["sinks"], st["chunk"], st["segment"]
    model = ReferenceModel(default_model_dir(), dtype=torch.float32)
    layers = model.num_layers
    margin = args.margin or exact_margin(layers, window, BLOCK, chunk)
    ratio = {r["segment"]: r["ratio_sinks"] or 0 for r in data["segments"]}
    above = {s: x for s, x in ratio.items() if x > args.above}
    if args.segments:
        chosen = [int(s) for s in args.segments.split(",")]
    else:
        chosen = sorted(sorted(above, key=lambda s: -above[s])[: args.most])
    log(f"long_ppl_reference: segments {chosen}, margin {margin} tokens ({layers} layers)")
    ids = data["ids"]
    ref = StreamingReference(model, sink_tokens=sinks, window_tokens=window, block_size=BLOCK)
    sink_end = sink_pages(sinks, BLOCK) * BLOCK
    stretches = []
    # Adjacent segments share one reference run; the worst run first.
    for group in sorted(adjacent_runs(chosen), key=lambda g: -max(ratio[s] for s in g)):
        ga, gb = group[0] * seg, min(len(ids), (group[-1] + 1) * seg)
        t0 = time.perf_counter()
        group_nll, p0 = score_stretch(ref, ids, ga, gb, chunk=chunk, margin=margin)
        wall = time.perf_counter() - t0
        for s in group:
            a, b = s * seg, min(len(ids), (s + 1) * seg)
            ref_nll, eng = group_nll[a - ga : b - ga], data["sinks"][a:b]
            ok = ~np.isnan(eng)
            diff = np.abs(ref_nll[ok] - eng[ok])
            mask = (data["targets"] >= a) & (data["targets"] < b)
            tpos, oracle = data["targets"][mask], data["oracle"][mask]
            t_eng, t_ref = eng[tpos - a], ref_nll[tpos - a]
            stretch = {
                "segment": s, "start": a, "end": b, "p0": p0, "run": [ga, gb],
                "reference_tokens": sink_end + gb - p0, "run_wall_s": wall,
                "tokens_compared": int(ok.sum()),
                "max_abs_nll_diff": float(diff.max()), "mean_abs_nll_diff": float(diff.mean()),
                "ppl_engine": math.exp(eng[ok].mean()),
                "ppl_reference": math.exp(ref_nll[ok].mean()),
                "targets": int(mask.sum()),
                "ratio_engine_to_oracle": math.exp(t_eng.mean() - oracle.mean()),
                "ratio_reference_to_oracle": math.exp(t_ref.mean() - oracle.mean()),
                "target_rows": [
                    {"position": int(t), "nll_engine": float(e), "nll_reference": float(r),
                     "nll_oracle": float(o), "context_cache": context_length(
                         int(t), sinks=sinks, window=window, chunk=chunk),
                     "context_oracle": st["cache"] - 1}
                    for t, e, r, o in zip(tpos, t_eng, t_ref, oracle, strict=True)
                ],
            }  # fmt: skip
            log(f"segment {s}: max |ref - engine| {stretch['max_abs_nll_diff']:.2e} nats over "
                f"{stretch['tokens_compared']} tokens; ratio to oracle engine "
                f"{stretch['ratio_engine_to_oracle']:.3f}, reference "
                f"{stretch['ratio_reference_to_oracle']:.3f} (run {wall:.0f}s)")  # fmt: skip
            stretches.append(stretch)
        write_json(  # after each run, so a cut-short check keeps what it finished
            args.dir / args.out,
            {"machine": machine_info(), "margin": margin, "layers": layers, "block": BLOCK,
             "above": args.above,
             "segments_above": above,
             "segments_chosen": chosen, "stretches": stretches},
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
