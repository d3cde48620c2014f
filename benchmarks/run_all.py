"""Run the whole benchmark suite: one command, quick (test suite) or full (the README).

    .venv/bin/python benchmarks/run_all.py --quick --out-root /tmp/bench   # tiny sizes
    .venv/bin/python benchmarks/run_all.py --full                          # README

Quick: ~6 min on 2 cores (the conversation benchmark 75 s of it; host_memory ~1 min). Full: 71
min on 2 cores of an AMD EPYC with AVX-512 bf16 (2026-12-05): overhead 44 of them (a warm-up and
8 fresh process sets per mode), conversation 8.5, serving 7, recompute 4.5, host_memory 4 (46 on
a Xeon with AMX, 2026-12-03, before the warm-up blocks). The engines run bf16, as the model
ships, on a CPU with native bf16, and float32 on one without (AVX2 only: vLLM's CPU kernels
emulate bf16 there, ~5x slower; ``common.finish_engine_args``); ``--dtype`` sets it for every
engine benchmark. (Benchmarks 7, 9 and 10 run float32 whatever the CPU: their sections say why.)
The engine benchmarks share one plugin and one vanilla engine (same sizes by default), so each
engine starts once; the conversation benchmark adds two engines with prefix caching on (in quick
mode its re-prefill engine is the shared plugin one). The llama.cpp peer is skipped, with the
reason recorded, when ``llama_cpp`` is not installed (``pip install -e '.[peer]'``, a ~16 minute
build on 2 cores). The long perplexity run (``long_ppl``) is in the quick suite; ``--full``
runs it only when ``--only`` names it (its full size takes hours).
Writes ``run_all.json`` (what ran, how long, what was skipped) under ``--out-root`` and, for a
full run into the default folder, regenerates ``benchmarks/results/TABLES.md``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, EnginePool, log, machine_info, write_json  # noqa: E402

# The overhead benchmark (most of a full run's time) goes last, so a failure in any other shows
# within the first minutes rather than after it.
SUITE = [
    "recompute",
    "long_stream",
    "capacity",
    "serving",
    "host_memory",
    "peer_llamacpp",
    "conversation",
    "shared_opening",
    "overhead",
    "long_ppl",
]
# Run float32 in the full run whatever --dtype says (their sections say why): not passed on.
FIXED_DTYPE = {"conversation", "host_memory", "shared_opening"}
# Run by --full only when named in --only: at full size (a million tokens through each of two
# plugin engines, plus 2,000 re-computed 1,024-token windows) it takes hours on 2 cores.
FULL_ONLY_WHEN_NAMED = {"long_ppl": "hours at full size: run_all.py --full --only long_ppl"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_true", help="tiny sizes, a few minutes")
    mode.add_argument("--full", action="store_true", help="the README's sizes")
    parser.add_argument("--out-root", type=Path, default=RESULTS)
    parser.add_argument("--only", nargs="+", choices=SUITE, default=None)
    parser.add_argument("--skip", nargs="+", choices=SUITE, default=[])
    parser.add_argument(
        "--dtype",
        default=None,
        help="every engine benchmark's dtype (default: bfloat16 with native bf16, else float32)",
    )
    parser.add_argument("--keep-going", action="store_true", help="continue after a failure")
    parser.add_argument(
        "--allow-dirty",
        action="store_true",
        help="write full results from a tree with uncommitted changes (not for committing)",
    )
    args = parser.parse_args(argv)
    # Committed results name the commit they ran on; they must be reproducible from it.
    committed = args.full and args.out_root == RESULTS and not args.allow_dirty
    if committed and machine_info()["git_dirty"]:
        parser.error("the tree has uncommitted changes: commit first (or --allow-dirty)")

    names = [n for n in (args.only or SUITE) if n not in args.skip]
    report: dict = {"mode": "quick" if args.quick else "full", "machine": machine_info()}
    report["benchmarks"] = {}
    failed = False
    start_all = time.monotonic()
    with EnginePool(log_dir=args.out_root / "logs") as pool:
        for name in names:
            entry: dict = {}
            report["benchmarks"][name] = entry
            if args.full and not args.only and name in FULL_ONLY_WHEN_NAMED:
                entry["skipped"] = FULL_ONLY_WHEN_NAMED[name]
                log(f"{name}: skipped, {entry['skipped']}")
                continue
            if name == "peer_llamacpp" and importlib.util.find_spec("llama_cpp") is None:
                entry["skipped"] = "llama_cpp not installed (pip install -e '.[peer]')"
                log(f"{name}: skipped, {entry['skipped']}")
                continue
            module = importlib.import_module(name)
            bench_argv = ["--out", str(args.out_root / name)]
            if args.quick:
                bench_argv.append("--quick")
            elif name == "long_ppl":
                bench_argv.append("--resume")  # made in parts over sittings: keep what is made
            if args.dtype and name not in FIXED_DTYPE:
                bench_argv += ["--dtype", args.dtype]
            t0 = time.monotonic()
            log(f"== {name}")
            try:
                entry["summary"] = module.run(module.parse_args(bench_argv), pool)
                entry["status"] = "ok"
            except (Exception, SystemExit):  # SystemExit: a benchmark's argparse refusal
                entry["status"] = "failed"
                entry["error"] = traceback.format_exc()[-4000:]
                log(f"{name} failed:\n{entry['error']}")
                failed = True
                if not args.keep_going:
                    break
            finally:
                entry["seconds"] = round(time.monotonic() - t0, 1)
                log(f"{name}: {entry['seconds']:.0f}s")
    report["seconds"] = round(time.monotonic() - start_all, 1)
    write_json(args.out_root / "run_all.json", report)
    if args.full and args.out_root == RESULTS and not failed:
        import tables

        tables.main([])
    log(f"suite done in {report['seconds']:.0f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
