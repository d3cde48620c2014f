"""The benchmark suite runs end to end (``run_all.py --quick``, real engines) and its outputs are
well formed: every benchmark writes ``results.json`` with the machine details, its CSV, a PNG and
``COMMAND.txt``, and the headline numbers are there and sane.

The llama.cpp peer is skipped when ``llama_cpp`` is not installed (it is a ~16 minute build on
2 cores, kept out of CI); ``test_peer_llamacpp`` then reports the skip and its reason.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
HAVE_LLAMA = importlib.util.find_spec("llama_cpp") is not None
ENGINE_BENCHMARKS = ["overhead", "long_stream", "capacity", "recompute", "serving", "conversation"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# About 6 minutes on 2 idle cores, 75 s of it the conversation benchmark; the timeout leaves
# room for a machine whose cores are busy with other work.
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


def test_suite_report(quick_root):
    report = json.loads((quick_root / "run_all.json").read_text())
    assert report["mode"] == "quick"
    for name in ENGINE_BENCHMARKS:
        assert report["benchmarks"][name]["status"] == "ok", report["benchmarks"][name]
    # Meant to take ~5 minutes on 2 idle cores; not asserted, since the CPU may be shared.
    assert report["seconds"] > 0


@pytest.mark.parametrize("name", ENGINE_BENCHMARKS)
def test_outputs_well_formed(quick_root, name):
    folder = quick_root / name
    data = _results(quick_root, name)
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
    for csv in csvs:
        lines = csv.read_text().splitlines()
        assert len(lines) >= 2 and "," in lines[0], csv


def test_overhead_numbers(quick_root):
    summary = _results(quick_root, "overhead")["summary"]
    assert sorted(map(int, summary)) == [1, 4]  # 16 and 64 streams: full run only
    for s in summary.values():
        assert s["ratio"]["n"] >= 2  # a spread, from repeats
        assert 0 < s["ratio"]["min"] <= s["ratio"]["median"] <= s["ratio"]["max"]


def test_long_stream_numbers(quick_root):
    data = _results(quick_root, "long_stream")
    s = data["summary"]
    mml = data["settings"]["max_model_len"]
    assert s["plugin_last_position"] >= 8 * data["settings"]["window"]
    assert s["plugin_last_position"] > mml >= s["vanilla_last_position"]
    assert s["plugin_within_bound"], s
    assert s["vanilla_max_pages"] > s["plugin_max_pages"]


def test_capacity_numbers(quick_root):
    s = _results(quick_root, "capacity")["summary"]
    assert s["plugin_streams"] > s["vanilla_streams"] >= 1


def test_recompute_numbers(quick_root):
    summary = _results(quick_root, "recompute")["summary"]
    for s in summary.values():
        assert s["speedup_vs_vllm_recompute"]["median"] > 1, s
        assert "reference_stream" in s and "reference_recompute" in s


def test_serving_numbers(quick_root):
    data = _results(quick_root, "serving")
    assert data["summary"]["plugin_enabled_in_log"]
    for run in data["runs"]:
        assert run["completed"] == data["settings"]["num_prompts"], run
        assert run["output_throughput"] > 0 and run["median_itl_ms"] > 0


def test_conversation_numbers(quick_root):
    data = _results(quick_root, "conversation")
    a, s, res = data["settings"], data["summary"], data["results"]
    assert set(res) == {"plugin_resuming", "plugin_reprefill", "vanilla"}
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


def test_peer_llamacpp(quick_root):
    report = json.loads((quick_root / "run_all.json").read_text())["benchmarks"]
    entry = report["peer_llamacpp"]
    if "skipped" in entry:
        assert not HAVE_LLAMA and "llama_cpp not installed" in entry["skipped"], entry
        pytest.skip("llama.cpp peer skipped: llama_cpp is not installed (pip install -e '.[peer]')")
    assert entry["status"] == "ok", entry
    summary = _results(quick_root, "peer_llamacpp")["summary"]
    for s in summary.values():
        assert s["ratio_plugin_over_llama_cpp"]["median"] > 0
        assert max(s["llama_cpp_context_shifts"]) > 0  # the context did shift


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
    for name in [*ENGINE_BENCHMARKS, "peer_llamacpp"]:
        assert f"<!-- table:{name} -->" in readme, name
