"""8. Perplexity over a million tokens (the paper's Figure 5), against a re-computation oracle.

    .venv/bin/python benchmarks/long_ppl.py --resume   # 1,000,000 tokens, 2,000 targets, bf16
    .venv/bin/python benchmarks/long_ppl.py --quick    # 5,000 tokens, 8 targets, cache 256

The first ``--tokens`` tokens of the Gutenberg corpus (``vllm_sink.assets.long_text()``,
tokenised with the default model's tokenizer) are scored by ``vllm.LLM`` with prompt
log-probabilities (``SamplingParams(max_tokens=1, prompt_logprobs=0)``), each engine in its own
process, one engine at a time:

- ``sinks`` (config A): the plugin, ``sink_tokens`` 4 + ``window_tokens`` ``cache - 4`` (1,020);
- ``window`` (config B): the plugin, window only: ``sink_tokens`` 0 + ``window_tokens`` ``cache``;
- ``oracle``: sliding window with re-computation on plain vLLM (no plugin): for each of
  ``--targets`` target positions ``t >= cache``, spread evenly over the stream, one prompt of
  ``tokens[t - cache + 1 : t + 1]`` whose last prompt log-probability is token ``t`` given the
  ``cache - 1`` tokens before it. All these requests are submitted at once and stepped to the
  end (what one ``llm.generate`` call does).

A and B each score the whole text as ONE prompt: the plugin streams a prompt of any length
through chunked prefill (``--chunk`` tokens a step, ``max_num_batched_tokens``) with eviction,
so ``max_model_len`` stays 2048. Their prompt log-probabilities come back as vLLM's
``FlatLogprobs`` (``SamplingParams(flat_logprobs=True)``): a handful of flat Python lists
instead of one ``dict[int, Logprob]`` per position: ~190 bytes a position against ~410 (measured
with tracemalloc, 100,000 positions, no detokenising), ~0.2 GB for a million tokens against
~0.4 GB. Either fits this machine's memory; each worker's peak RSS is recorded.

The full run (59 minutes of engine time in bf16 on a 2-core Xeon with AMX; on an AVX2-only CPU
about 5 hours a bf16 stream, 2.4 hours the whole run in float32) may not fit one sitting, so it
is made of parts: A's stream, B's stream and the oracle in ``--shard`` (250) target shards, each
saved in ``OUT/parts`` (its NLL, engine facts, timing, and a key: the settings, the text's
hash, the vLLM and torch versions) when it finishes. ``--resume`` reuses the parts whose key
matches; ``--modes`` and ``--stop-after`` choose what runs in this sitting. The results are
written once every part is there, and the parts are then removed (their numbers are in the
results).

Reported: perplexity per ``--segment`` (10,000) tokens for A and B; on the shared targets, the
NLL of A, B and the oracle, and per segment the ratio of A's and B's perplexity on its targets to
the oracle's (``exp(mean NLL_A - mean NLL_oracle)``). Writes ``results.json`` (command, machine,
settings, engine configs and facts, summary, segments), ``segments.csv``, ``targets.csv`` (one
row per target: position, token, NLL of A, B, oracle), ``nll_per_token.npz`` (the token ids and
A's and B's NLL of every token, float32 as vLLM returns them) and ``long_ppl.png`` (perplexity
against input length, log x, as the paper's Figure 5).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    RESULTS,
    EngineConfig,
    EnginePool,
    JsonWorker,
    log,
    machine_info,
    plt,
    result_envelope,
    save_plot,
    spread,
    standalone,
    write_command,
    write_csv,
    write_json,
)

MODES = ("sinks", "window", "oracle")
LABELS = {
    "sinks": "StreamingLLM: sinks {sinks} + window {w_sinks}",
    "window": "window attention: 0 + window {cache}",
    "oracle": "sliding window with re-computation ({cache})",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="5,000 tokens, 8 targets, segments of 2,500, cache 256, float32 (test suite)",
    )
    parser.add_argument("--tokens", type=int, default=None, help="stream length (1,000,000)")
    parser.add_argument("--targets", type=int, default=None, help="oracle targets (2,000)")
    parser.add_argument("--segment", type=int, default=None, help="tokens per segment (10,000)")
    parser.add_argument("--sinks", type=int, default=4, help="config A's sink_tokens")
    parser.add_argument(
        "--cache",
        type=int,
        default=None,
        help="A: sinks + window; B: window; oracle: context (1,024; quick 256)",
    )
    parser.add_argument(
        "--chunk",
        type=int,
        default=None,
        help="tokens per step, max_num_batched_tokens (512; quick 256)",
    )
    parser.add_argument("--max-model-len", type=int, default=None, help="2,048 (quick 512)")
    parser.add_argument("--kv-space", type=float, default=1.0, help="GiB of KV per engine")
    parser.add_argument("--dtype", default=None, help="engine dtype (default bfloat16)")
    parser.add_argument(
        "--eager", action="store_true", help="eager engines (implied by --quick): no compile"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "long_ppl")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="reuse the finished parts in OUT/parts made with the same settings and text",
    )
    parser.add_argument(
        "--modes", default=",".join(MODES), help="parts to run now (comma-separated)"
    )
    parser.add_argument(
        "--shard", type=int, default=250, help="oracle targets per part (one engine each)"
    )
    parser.add_argument(
        "--stop-after", type=float, default=None, help="start no part after this many minutes"
    )
    args = parser.parse_args(argv)
    # Quick: the test suite's size, a few minutes on 2 cores. float32 there: on a CPU without
    # native bf16 products (AVX2 only) bf16 prefills ~55 tokens/s against float32's ~250, and
    # the suite must fit such a machine too. Full size in bf16, as the model ships: on a CPU
    # with AMX ~2x float32's speed (704 against 363 tokens/s, results/long_ppl_dtype); without
    # it, hours (--dtype float32 there).
    defaults = (
        {
            "tokens": 5_000,
            "targets": 8,
            "segment": 2_500,
            "dtype": "float32",
            "cache": 256,
            "chunk": 256,
            "max_model_len": 512,
        }
        if args.quick
        else {
            "tokens": 1_000_000,
            "targets": 2_000,
            "segment": 10_000,
            "dtype": "bfloat16",
            "cache": 1024,
            "chunk": 512,
            "max_model_len": 2048,
        }
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    # Log-probabilities, not speed: eager in --quick (no compile in the suite; a compiled CPU
    # engine's warm-up takes 16-50 s on 2 cores), else vLLM's default compiled mode.
    args.eager = args.eager or args.quick
    if not 0 <= args.sinks < args.cache:
        parser.error("--sinks must be >= 0 and below --cache")
    if args.cache >= args.max_model_len:
        parser.error("the oracle's --cache-token prompts must fit --max-model-len")
    if args.tokens < args.cache + args.targets:
        parser.error("--tokens must exceed --cache by at least --targets")
    unknown = set(args.modes.split(",")) - set(MODES)
    if unknown:
        parser.error(f"--modes: unknown {sorted(unknown)} (choose from {', '.join(MODES)})")
    if args.shard < 1:
        parser.error("--shard must be at least 1")
    return args


def engine_configs(args: argparse.Namespace) -> dict[str, EngineConfig]:
    """A, B and the oracle's engine: the same settings but for the plugin's."""
    common = {
        "max_model_len": args.max_model_len,
        "max_num_batched_tokens": args.chunk,
        "kv_space_gib": args.kv_space,
        "dtype": args.dtype,
        "eager": args.eager,
    }
    return {
        "sinks": EngineConfig(
            window_tokens=args.cache - args.sinks, sink_tokens=args.sinks, **common
        ),
        "window": EngineConfig(window_tokens=args.cache, sink_tokens=0, **common),
        "oracle": EngineConfig(**common),
    }


def target_positions(n_tokens: int, n_targets: int, cache: int) -> list[int]:
    """``n_targets`` positions spread evenly over ``[cache, n_tokens - 1]``."""
    targets = np.unique(np.linspace(cache, n_tokens - 1, n_targets).round().astype(np.int64))
    assert len(targets) == n_targets, (n_tokens, n_targets, cache)
    return targets.tolist()


def text_tokens(n_tokens: int) -> tuple[list[int], bool]:
    """The first ``n_tokens`` tokens of the corpus; whether the tokenizer added a BOS."""
    from transformers import AutoTokenizer

    from vllm_sink.assets import default_model_dir, long_text

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    ids: list[int] = tok(long_text(n_tokens * 5))["input_ids"]  # ~3.2 characters a token
    if len(ids) < n_tokens:
        ids = tok(long_text())["input_ids"]  # the whole collection
    if len(ids) < n_tokens:
        raise SystemExit(f"the corpus has only {len(ids)} tokens, {n_tokens} asked for")
    return ids[:n_tokens], ids[0] == tok.bos_token_id


# ----------------------------------------------------------------------------- engine side


def prompt_nll(output: Any, ids: list[int] | np.ndarray) -> np.ndarray:
    """NLL of every prompt token from a ``RequestOutput`` with ``prompt_logprobs=0`` (element 0,
    which has no log-probability, is NaN). Checks that each position scored its own token."""
    from vllm.logprobs import FlatLogprobs

    ids = np.asarray(ids, dtype=np.int64)
    plp = output.prompt_logprobs
    if plp is None or len(plp) != len(ids):
        raise RuntimeError(f"{0 if plp is None else len(plp)} prompt logprobs for {len(ids)}")
    nll = np.full(len(ids), np.nan, dtype=np.float32)
    if isinstance(plp, FlatLogprobs):
        starts = np.asarray(plp.start_indices[1:], dtype=np.int64)
        ends = np.asarray(plp.end_indices[1:], dtype=np.int64)
        if not (ends - starts == 1).all():
            raise RuntimeError("expected one log-probability per position (prompt_logprobs=0)")
        scored = np.asarray(plp.token_ids, dtype=np.int64)[starts]
        lp = np.asarray(plp.logprobs, dtype=np.float32)[starts]
    else:  # list[dict[int, Logprob]]
        scored = np.array([next(iter(d)) for d in plp[1:]], dtype=np.int64)
        lp = np.array([next(iter(d.values())).logprob for d in plp[1:]], dtype=np.float32)
    if not np.array_equal(scored, ids[1:]):
        raise RuntimeError("prompt logprobs scored other tokens than the prompt's")
    nll[1:] = -lp
    return nll


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _make_worker_class():
    """The engine worker of ``engine_worker.py`` plus this benchmark's two operations (built
    lazily so that importing this module does not import the worker's dependencies)."""
    from engine_worker import Worker
    from worker_protocol import reply

    class PplWorker(Worker):
        def score_params(self):
            from vllm import SamplingParams
            from vllm.sampling_params import RequestOutputKind

            return SamplingParams(
                max_tokens=1,
                prompt_logprobs=0,
                flat_logprobs=True,  # flat lists, not a dict per position (see the docstring)
                temperature=0.0,
                detokenize=False,
                output_kind=RequestOutputKind.FINAL_ONLY,
            )

        def op_stream(self, ids_path: str, nll_path: str, report_every: int = 4) -> dict:
            """Score the whole token file as one prompt; per-token NLL to ``nll_path``."""
            from vllm.inputs import TokensPrompt

            ids = np.load(ids_path).tolist()
            rid = f"stream{next(self._seq)}"
            t0 = time.perf_counter()
            self.engine.add_request(rid, TokensPrompt(prompt_token_ids=ids), self.score_params())
            final, steps, max_held, step_tokens = None, 0, 0, []
            while self.engine.has_unfinished_requests():
                internal = self.internal_ids(rid)
                before = sum(self.scheduler.requests[r].num_computed_tokens for r in internal)
                for out in self.engine.step():
                    if out.finished:
                        final = out
                steps += 1
                internal = self.internal_ids(rid)
                if internal:
                    held = sum(self.pages_held(r) for r in internal)
                    max_held = max(max_held, held)
                    done = sum(self.scheduler.requests[r].num_computed_tokens for r in internal)
                    step_tokens.append(done - before)
                    if steps % report_every == 0:
                        reply({"progress": done, "total": len(ids)})
            wall = time.perf_counter() - t0
            if final is None:
                raise RuntimeError("the stream did not finish")
            nll = prompt_nll(final, ids)
            np.save(nll_path, nll)
            return {
                "tokens": len(ids),
                "wall_s": wall,
                "tok_s": len(ids) / wall,
                "steps": steps,
                "max_step_tokens": max(step_tokens, default=0),
                "max_pages_held": max_held,
                "preemptions": self.preemptions,
                "peak_rss_gib": _peak_rss_gib(),
            }

        def op_oracle(self, ids_path: str, targets: list[int], context: int) -> dict:
            """Re-computation: token ``t`` scored given the ``context - 1`` tokens before it,
            one fresh prompt per target, all submitted at once and stepped to the end."""
            from vllm.inputs import TokensPrompt

            ids = np.load(ids_path)
            tag = f"oracle{next(self._seq)}"
            t0 = time.perf_counter()
            for i, t in enumerate(targets):
                prompt = ids[t - context + 1 : t + 1].tolist()
                self.engine.add_request(
                    f"{tag}-{i}", TokensPrompt(prompt_token_ids=prompt), self.score_params()
                )
            nll: list[float | None] = [None] * len(targets)
            scored: list[int | None] = [None] * len(targets)
            lens: list[int | None] = [None] * len(targets)
            steps = done = 0
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if not out.finished:
                        continue
                    i = int(out.request_id.rsplit("-", 1)[1])
                    prompt = out.prompt_token_ids
                    nll[i] = float(prompt_nll(out, prompt)[-1])
                    scored[i], lens[i] = int(prompt[-1]), len(prompt)
                    done += 1
                steps += 1
                if steps % 8 == 0:
                    reply({"progress": done, "total": len(targets)})
            wall = time.perf_counter() - t0
            if any(v is None for v in nll):
                raise RuntimeError("an oracle request did not finish")
            tokens = sum(lens)
            return {
                "nll": nll,
                "scored_token_ids": scored,
                "prompt_lens": lens,
                "tokens": tokens,
                "wall_s": wall,
                "tok_s": tokens / wall,
                "steps": steps,
                "preemptions": self.preemptions,
                "peak_rss_gib": _peak_rss_gib(),
            }

    return PplWorker


def worker_main(config_json: str) -> int:
    """``long_ppl.py --worker '<EngineConfig JSON>'``: one engine, driven like engine_worker."""
    from worker_protocol import serve

    sys.argv = [sys.argv[0], config_json]
    return serve(_make_worker_class(), lambda worker: worker.op_info())


def engine_threads() -> str:
    """OpenMP threads for the engine: an in-process vLLM CPU engine runs one thread unless
    ``OMP_NUM_THREADS`` is set (measured: 222 vs 422 tok/s with two), so all usable cores."""
    return os.environ.get("OMP_NUM_THREADS") or str(len(os.sched_getaffinity(0)))


def start_engine(name: str, config: EngineConfig, log_dir: Path) -> JsonWorker:
    env = {
        "OMP_NUM_THREADS": engine_threads(),
        # In-process engine core: the worker reads the stream's pages from the KV manager.
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": f"{config.kv_space_gib:g}",
        "VLLM_NO_USAGE_STATS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        json.dumps(dataclasses.asdict(config)),
    ]
    return JsonWorker(f"{name}: {config.name}", argv, env, log_dir)


# ----------------------------------------------------------------------------- analysis


def _ppl(nll: np.ndarray) -> float | None:
    vals = np.asarray(nll, dtype=np.float64)
    vals = vals[~np.isnan(vals)]
    return float(math.exp(vals.mean())) if vals.size else None


def analyse(
    stream_nll: dict[str, np.ndarray],
    targets: list[int],
    oracle_nll: list[float],
    segment: int,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Segments, target rows and the summary, from the recorded NLLs alone."""
    n = len(next(iter(stream_nll.values())))
    tpos = np.asarray(targets)
    target_nll = {m: np.asarray(v, dtype=np.float64)[tpos] for m, v in stream_nll.items()}
    target_nll["oracle"] = np.asarray(oracle_nll, dtype=np.float64)
    rows = [
        {"position": int(t), "segment": int(t) // segment}
        | {f"nll_{m}": float(target_nll[m][i]) for m in MODES}
        for i, t in enumerate(targets)
    ]
    segments = []
    for s in range(0, n, segment):
        row: dict[str, Any] = {"segment": s // segment, "start": s, "end": min(n, s + segment)}
        for m, nll in stream_nll.items():
            row[f"ppl_{m}"] = _ppl(nll[s : s + segment])
        mask = (tpos >= s) & (tpos < s + segment)
        row["targets"] = int(mask.sum())
        for m in MODES:
            row[f"nll_targets_{m}"] = float(target_nll[m][mask].mean()) if mask.any() else None
        for m in ("sinks", "window"):
            row[f"ratio_{m}"] = (
                math.exp(row[f"nll_targets_{m}"] - row["nll_targets_oracle"])
                if mask.any()
                else None
            )
        segments.append(row)
    summary: dict[str, Any] = {"tokens": n, "targets": len(targets), "segments": len(segments)}
    for m in MODES:
        e: dict[str, Any] = {}
        if m in stream_nll:
            e["ppl_all"] = _ppl(stream_nll[m])
            e["ppl_first_segment"] = segments[0][f"ppl_{m}"]
            e["ppl_last_segment"] = segments[-1][f"ppl_{m}"]
            e["ppl_per_segment"] = spread(r[f"ppl_{m}"] for r in segments)
        e["nll_targets_mean"] = float(target_nll[m].mean())
        e["ppl_targets"] = math.exp(e["nll_targets_mean"])
        summary[m] = e
    for m in ("sinks", "window"):
        summary[f"ratio_{m}_to_oracle"] = (
            summary[m]["ppl_targets"] / summary["oracle"]["ppl_targets"]
        )
        summary[f"ratio_{m}_per_segment"] = spread(
            r[f"ratio_{m}"] for r in segments if r[f"ratio_{m}"] is not None
        )
    return segments, rows, summary


# ----------------------------------------------------------------------------- benchmark


def part_key(args: argparse.Namespace, ids: list[int]) -> dict[str, Any]:
    """What a part's numbers depend on: a part is reused only under the same key."""
    fields = ("tokens", "targets", "cache", "sinks", "chunk", "max_model_len", "dtype", "kv_space")
    info = machine_info()
    return {k: getattr(args, k) for k in fields} | {
        "ids_sha256": hashlib.sha256(np.asarray(ids, dtype=np.int32).tobytes()).hexdigest(),
        "vllm": info["vllm"],
        "torch": info["torch"],
    }


def provenance() -> dict[str, Any]:
    """Where and from what a part was made (recorded, not matched)."""
    info = machine_info()
    git = f"{info['git_commit']}{'-dirty' if info['git_dirty'] else ''}"
    return {"git": git, "cpu_model": info["cpu_model"], "threads": int(engine_threads()),
            "finished_utc": info["started_utc"]}  # fmt: skip


def plan_parts(args: argparse.Namespace, targets: list[int]) -> list[tuple[str, str, list[int]]]:
    """(part name, mode, oracle targets): the two streams, then the oracle in shards."""
    parts: list[tuple[str, str, list[int]]] = [("sinks", "sinks", []), ("window", "window", [])]
    for i in range(0, len(targets), args.shard):
        parts.append((f"oracle-{i // args.shard:03d}", "oracle", targets[i : i + args.shard]))
    return parts


def run(args: argparse.Namespace, pool: EnginePool | None = None) -> dict[str, Any]:
    """Runs its own engines, one at a time (``pool`` is not used: these engines need this
    benchmark's own operations, and each is closed before the next one starts).

    The work is split in parts (A's stream, B's stream, the oracle in ``--shard``-target
    shards), each saved in ``OUT/parts`` when it finishes, so a run that takes longer than one
    sitting is made in several: ``--resume`` reuses the parts made with the same settings and
    text, ``--modes`` and ``--stop-after`` choose what runs now. The results are written when
    every part is there."""
    write_command(args.out)
    configs = engine_configs(args)
    log(f"long_ppl: tokenising {args.tokens} tokens")
    ids, adds_bos = text_tokens(args.tokens)
    targets = target_positions(len(ids), args.targets, args.cache)
    key = part_key(args, ids)
    parts_dir = args.out / "parts"
    if not args.resume and parts_dir.exists():
        shutil.rmtree(parts_dir)
    parts_dir.mkdir(parents=True, exist_ok=True)
    wanted = set(args.modes.split(","))
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="long_ppl-") as tmp:
        ids_path = Path(tmp) / "ids.npy"
        np.save(ids_path, np.asarray(ids, dtype=np.int32))
        for name, mode, part_targets in plan_parts(args, targets):
            meta_path = parts_dir / f"{name}.json"
            if meta_path.exists() and json.loads(meta_path.read_text())["key"] == key:
                log(f"long_ppl {name}: reusing {meta_path}")
                continue
            if mode not in wanted:
                continue
            if args.stop_after is not None and time.monotonic() - t_start > 60 * args.stop_after:
                log(f"long_ppl: --stop-after {args.stop_after:g} min passed; {name} not started")
                break
            worker = start_engine(mode, configs[mode], args.out / "logs")
            try:
                facts = dict(worker.wait_ready())
                if mode == "oracle":
                    res = worker.call(
                        "oracle",
                        progress=f"oracle targets ({name})",
                        ids_path=str(ids_path),
                        targets=part_targets,
                        context=args.cache,
                    )
                    if res["scored_token_ids"] != [ids[t] for t in part_targets]:
                        raise RuntimeError("the oracle scored other tokens than the targets")
                    res["targets"] = part_targets
                else:
                    res = worker.call(
                        "stream",
                        progress=f"{mode} stream",
                        ids_path=str(ids_path),
                        nll_path=str(parts_dir / f"{name}.npy"),
                    )
            finally:
                worker.close()
                del worker
                gc.collect()
            log(f"long_ppl {name}: {res['tokens']} tokens in {res['wall_s']:.0f}s "
                f"({res['tok_s']:.1f} tok/s)")  # fmt: skip
            write_json(meta_path, {"key": key, "made": provenance(), "facts": facts, "result": res})
    parts = {
        name: json.loads(path.read_text())
        for name, _, _ in plan_parts(args, targets)
        if (path := parts_dir / f"{name}.json").exists()
    }
    missing = [name for name, _, _ in plan_parts(args, targets) if name not in parts]
    if missing:
        log(f"long_ppl: {len(parts)} parts done, {len(missing)} to run: {', '.join(missing)} "
            f"(rerun with --resume)")  # fmt: skip
        return {"complete": False, "parts_done": sorted(parts), "parts_missing": missing}

    stream_nll = {m: np.load(parts_dir / f"{m}.npy") for m in ("sinks", "window")}
    modes: dict[str, Any] = {m: parts[m]["result"] for m in ("sinks", "window")}
    facts = {m: parts[m]["facts"] for m in ("sinks", "window")}
    shards = [p for name, p in parts.items() if name.startswith("oracle-")]
    facts["oracle"] = shards[0]["facts"]
    oracle_nll = [v for p in shards for v in p["result"]["nll"]]
    scored = [v for p in shards for v in p["result"]["scored_token_ids"]]
    if [t for p in shards for t in p["result"]["targets"]] != targets:
        raise RuntimeError("the oracle parts do not cover the targets in order")
    modes["oracle"] = {
        "tokens": sum(p["result"]["tokens"] for p in shards),
        "wall_s": sum(p["result"]["wall_s"] for p in shards),
        "steps": sum(p["result"]["steps"] for p in shards),
        "preemptions": sum(p["result"]["preemptions"] for p in shards),
        "peak_rss_gib": max(p["result"]["peak_rss_gib"] for p in shards),
        "prompt_len": sorted({n for p in shards for n in p["result"]["prompt_lens"]}),
        "shards": len(shards),
    }
    modes["oracle"]["tok_s"] = modes["oracle"]["tokens"] / modes["oracle"]["wall_s"]
    made = {name: p["made"] for name, p in parts.items()}
    segments, rows, summary = analyse(stream_nll, targets, oracle_nll, args.segment)
    for row, token in zip(rows, scored, strict=True):
        row["oracle_token_id"] = token  # the token the oracle's last prompt position scored
    for m in MODES:
        summary[m]["tok_s"] = modes[m]["tok_s"]
        summary[m]["seconds"] = modes[m]["wall_s"]
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    payload = result_envelope(
        "long_ppl",
        settings,
        text="vllm_sink.assets.long_text(): concatenated Gutenberg Shakespeare plays",
        tokenizer_adds_bos=bool(adds_bos),
        labels={m: LABELS[m].format(**label_args(args)) for m in MODES},
        engines=configs,
        engine_facts=facts,
        modes=modes,
        parts=made,
        summary=summary,
        segments=segments,
    )
    write_json(args.out / "results.json", payload)
    write_csv(args.out / "segments.csv", segments)
    write_csv(args.out / "targets.csv", rows)
    np.savez_compressed(
        args.out / "nll_per_token.npz",
        token_ids=np.asarray(ids, dtype=np.int32),
        **{m: stream_nll[m].astype(np.float32) for m in stream_nll},
    )
    plot(payload, args.out / "long_ppl.png")
    # Every number is in the results now; the parts (the streams' NLL a second time) go.
    shutil.rmtree(parts_dir)
    log(
        f"long_ppl: ppl sinks {summary['sinks']['ppl_all']:.2f}, window "
        f"{summary['window']['ppl_all']:.2f}; on {len(targets)} targets sinks / oracle "
        f"{summary['ratio_sinks_to_oracle']:.3f}, window / oracle "
        f"{summary['ratio_window_to_oracle']:.3f}"
    )
    return summary


def label_args(args: Any) -> dict[str, int]:
    get = args.get if isinstance(args, dict) else lambda k: getattr(args, k)
    return {"sinks": get("sinks"), "cache": get("cache"), "w_sinks": get("cache") - get("sinks")}


def plot(data: dict[str, Any], path: Path) -> None:
    """Perplexity per segment against input length (log x), as the paper's Figure 5 (every token
    of the segment), and below it the ratio to the oracle on the segment's targets."""
    pyplot = plt()
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    segs, labels = data["segments"], data["labels"]
    fig, (ax, ax2) = pyplot.subplots(
        2, 1, figsize=(9, 7), sharex=True, gridspec_kw={"height_ratios": [2, 1]}
    )
    colors = {"sinks": "tab:blue", "window": "tab:red", "oracle": "black"}
    x = [r["end"] for r in segs]
    for m in ("sinks", "window"):
        ax.plot(x, [r[f"ppl_{m}"] for r in segs], "-", color=colors[m], label=labels[m])
    with_t = [r for r in segs if r["targets"]]
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylabel(f"perplexity per {data['settings']['segment']:,}-token segment")
    ax.set_title(
        f"{data['summary']['tokens']:,} tokens of Gutenberg text, "
        f"{data['settings']['dtype']}, {data['summary']['targets']} oracle targets"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    for m in ("sinks", "window"):
        ax2.plot(
            [r["end"] for r in with_t],
            [r[f"ratio_{m}"] for r in with_t],
            "o-",
            color=colors[m],
            markersize=3,
            label=f"{m} / oracle",
        )
    ax2.axhline(1.0, color="black", lw=0.8)
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("input length (tokens, log scale)")
    ax2.set_ylabel("ppl / oracle ppl\n(on the targets)")
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=8)
    plain = FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 100 else f"{v:g}")
    for axis, lim in ((ax.yaxis, ax.get_ylim()), (ax2.yaxis, ax2.get_ylim()),
                      (ax2.xaxis, ax2.get_xlim())):  # fmt: skip
        # Plain numbers on the log axes; minor ticks labelled when less than a decade shows.
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(plain if lim[1] < 10 * lim[0] else NullFormatter())
    lo, hi = ax.get_ylim()
    if hi >= 10 * lo:  # a decade or two shows one power of ten: label 1, 2, 5 x 10^k too
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    save_plot(fig, path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1])
    return standalone(parse_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
