"""Running ``vllm serve`` as a child process: a free port, health, and a clean stop.

Shared by the tests and the benchmarks that start real servers. Each server runs in its own
process group (``SERVER_POPEN``), so stopping it stops vLLM's engine-core and worker processes
with it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    """``preexec_fn``: the child gets SIGTERM when its parent dies (even by SIGKILL), so a
    killed caller leaves no server behind (the server's process group is not the caller's, so a
    signal to the caller's group does not reach it). Delivered when the thread that started the
    child exits: start servers from the main thread."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# Popen keywords for a server: its own process group (``kill_group``) but the caller's session.
# A new session (``start_new_session=True``) is also a new scheduler autogroup
# (CONFIG_SCHED_AUTOGROUP): on 2 cores a server in its own autogroup held both cores for 25 s at
# a time while its caller, runnable all along, got none (its streams trailed by thousands of
# tokens; 7 of 21 host_memory quick runs, against 0 of 7 with one session: benchmarks README §9).
SERVER_POPEN: dict = {"process_group": 0, "preexec_fn": die_with_parent}


def wait_healthy(
    proc: subprocess.Popen, url: str, log_path: Path, name: str = "", timeout: float = 600
) -> None:
    """Return once ``GET {url}/health`` answers 200; raise with the log's tail if the server
    exits first or is not healthy within ``timeout`` seconds."""
    what = f"vllm serve {name}".strip()
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{what} exited {proc.returncode}:\n" + log_path.read_text(errors="replace")[-6000:]
            )
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            if r.status == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{what} not healthy in {timeout:.0f} s:\n"
                + log_path.read_text(errors="replace")[-6000:]
            )
        time.sleep(1)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM ``proc``'s process group, SIGKILL after 30 s."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
