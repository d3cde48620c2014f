"""Scrape a server's ``/metrics`` every half second from a process of its own.

Tests that watch metrics while their own threads stream from the server run this as a
subprocess (``python metrics_sampler.py URL OUT SERIES...``): a sampling loop in the test
process stalls when that process does, while the server's phases go on (a CI run's in-process
sampler saw the first half of a nine-stream phase, then nothing until every stream had ended:
no scrape of the two phases that came after). One JSON line per scrape: the series asked for, ``t``
(seconds since the sampler started, when the scrape was sent) and ``took`` (its wait).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import urllib.request


def parse(text: str) -> dict[str, float]:
    """Prometheus text as series name -> value (one model, one engine: labels dropped)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            out[series.split("{", 1)[0]] = float(value)
    return out


def scrape(url: str, timeout: float = 10) -> dict[str, float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=timeout) as r:
        return parse(r.read().decode())


def read(path: str) -> list[dict[str, float]]:
    """The samples written so far (a line cut by the sampler's end is dropped)."""
    samples = []
    with open(path) as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):
                samples.append(json.loads(line))
    return samples


def main(url: str, out: str, series: list[str]) -> None:
    t0 = time.monotonic()
    with open(out, "a") as f:
        while True:  # until the test terminates this process
            sent = time.monotonic()
            m = scrape(url)
            sample = {k: m[k] for k in series} | {"t": sent - t0, "took": time.monotonic() - sent}
            f.write(json.dumps(sample) + "\n")
            f.flush()
            time.sleep(0.5)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
