"""Two runs of ``long_ppl.py`` on the same text, token by token (bf16 against float32).

    .venv/bin/python benchmarks/long_ppl_compare.py   # results/long_ppl against long_ppl_float32

Both folders must hold the same stream (token ids) and the same targets. Reported per mode
(sinks, window): perplexity over all tokens in each run and their ratio, the ratio per segment,
the mean and largest per-token |NLL difference|; for the oracle the same on the targets; and
each run's ratio to its own oracle, overall and per segment, with the segments above 1.05 in
either. No engine runs: perplexities and ratios to the oracle are read from each run's
``results.json``, the token-by-token differences from its ``nll_per_token.npz`` and
``targets.csv``. Writes ``OUT/results.json`` and ``OUT/segments.csv``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, log, result_envelope, spread, write_command, write_csv, write_json  # noqa: E402

MODES = ("sinks", "window")
HIGH = 1.05  # the ratio to the oracle the issue asks to explain


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", type=Path, default=RESULTS / "long_ppl", help="first run")
    parser.add_argument("--b", type=Path, default=RESULTS / "long_ppl_float32", help="second")
    parser.add_argument("--out", type=Path, default=RESULTS / "long_ppl_compare")
    return parser.parse_args(argv)


def _run(folder: Path) -> dict[str, Any]:
    """One long_ppl result folder: its results, the per-token NLL of A and B, the targets."""
    npz = np.load(folder / "nll_per_token.npz")
    with (folder / "targets.csv").open() as f:
        targets = list(csv.DictReader(f))
    return {
        "dir": folder,
        "results": json.loads((folder / "results.json").read_text()),
        "ids": npz["token_ids"],
        "nll": {m: npz[m].astype(np.float64) for m in MODES},
        "positions": np.array([int(r["position"]) for r in targets]),
        "oracle_nll": np.array([float(r["nll_oracle"]) for r in targets]),
    }


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(RESULTS.parent))
    except ValueError:
        return str(path)


def compare(a: dict[str, Any], b: dict[str, Any]) -> tuple[dict[str, Any], list[dict]]:
    """The summary and the per-segment rows of run ``a`` against run ``b``. Perplexities and
    ratios to the oracle are each run's own (its ``results.json``); new here are the ratios
    between the runs and the token-by-token differences."""
    ra, rb = a["results"], b["results"]
    if not np.array_equal(a["ids"], b["ids"]):
        raise SystemExit("the two runs scored different text")
    bounds = [[(r["start"], r["end"]) for r in run["segments"]] for run in (ra, rb)]
    if not np.array_equal(a["positions"], b["positions"]) or bounds[0] != bounds[1]:
        raise SystemExit("the two runs have different targets or segments")
    rows: list[dict[str, Any]] = []
    for sa, sb in zip(ra["segments"], rb["segments"], strict=True):
        row: dict[str, Any] = {k: sa[k] for k in ("segment", "start", "end", "targets")}
        for m in MODES:
            pa, pb = sa[f"ppl_{m}"], sb[f"ppl_{m}"]
            row.update({f"ppl_{m}_a": pa, f"ppl_{m}_b": pb, f"ppl_{m}_a_to_b": pa / pb})
            row.update({f"ratio_{m}_a": sa[f"ratio_{m}"], f"ratio_{m}_b": sb[f"ratio_{m}"]})
        rows.append(row)

    summary: dict[str, Any] = {
        "tokens": len(a["ids"]),
        "targets": len(a["positions"]),
        "segments": len(rows),
    }
    for m in MODES:
        diff = np.abs(a["nll"][m][1:] - b["nll"][m][1:])  # token 0 has no log-probability
        pa, pb = ra["summary"][m]["ppl_all"], rb["summary"][m]["ppl_all"]
        summary[m] = {
            "ppl_a": pa,
            "ppl_b": pb,
            "ppl_a_to_b": pa / pb,
            "ppl_a_to_b_per_segment": spread(r[f"ppl_{m}_a_to_b"] for r in rows),
            "mean_abs_nll_diff": float(diff.mean()),
            "max_abs_nll_diff": float(diff.max()),
        }
    oa, ob = ra["summary"]["oracle"]["ppl_targets"], rb["summary"]["oracle"]["ppl_targets"]
    diff = np.abs(a["oracle_nll"] - b["oracle_nll"])
    summary["oracle"] = {
        "ppl_a": oa,
        "ppl_b": ob,
        "ppl_a_to_b": oa / ob,
        "mean_abs_nll_diff": float(diff.mean()),
        "max_abs_nll_diff": float(diff.max()),
    }
    scored = [r for r in rows if r["targets"]]
    for m in MODES:
        per: dict[str, Any] = {}
        for run, key in ((ra, "a"), (rb, "b")):
            per[key] = {
                "ratio": run["summary"][f"ratio_{m}_to_oracle"],
                "per_segment": run["summary"][f"ratio_{m}_per_segment"],
                "segments_above": [r["segment"] for r in scored if r[f"ratio_{m}_{key}"] > HIGH],
            }
        per["max_abs_segment_ratio_diff"] = max(
            abs(r[f"ratio_{m}_a"] - r[f"ratio_{m}_b"]) for r in scored
        )
        # Is a segment high in one run high in the other (the text's) or only there (rounding)?
        above_b = set(per["b"]["segments_above"])
        per["above_in_both"] = [k for k in per["a"]["segments_above"] if k in above_b]
        summary[f"{m}_to_oracle"] = per
    return summary, rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    write_command(args.out)
    a, b = _run(args.a), _run(args.b)
    summary, rows = compare(a, b)
    runs = {}
    for key, run in (("a", a), ("b", b)):
        d = run["results"]
        runs[key] = {
            "dir": _rel(run["dir"]),
            "dtype": d["settings"]["dtype"],
            "git_commit": d["machine"]["git_commit"],
            "cpu_model": d["machine"]["cpu_model"],
            "tok_s": {m: d["summary"][m]["tok_s"] for m in (*MODES, "oracle")},
        }
    labels = a["results"]["labels"]
    payload = result_envelope("long_ppl_compare", args, runs=runs, labels=labels, summary=summary)
    write_json(args.out / "results.json", payload)
    write_csv(args.out / "segments.csv", rows)
    s, ra, rb = summary, runs["a"]["dtype"], runs["b"]["dtype"]
    log(
        f"long_ppl_compare: {ra} / {rb}: sinks ppl {s['sinks']['ppl_a_to_b']:.4f}, window "
        f"{s['window']['ppl_a_to_b']:.4f}, oracle on the targets {s['oracle']['ppl_a_to_b']:.4f}; "
        f"sinks / oracle {s['sinks_to_oracle']['a']['ratio']:.4f} ({ra}) against "
        f"{s['sinks_to_oracle']['b']['ratio']:.4f} ({rb})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
