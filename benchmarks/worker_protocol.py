"""The worker side of the benchmarks' JSON-lines protocol (the parent side: ``common.JsonWorker``).

A worker process gets its config as JSON in ``argv[1]``, reads one request per line on stdin
(``{"op": name, ...}`` calls its ``op_<name>(...)``) and answers each with one line
``@@BENCH <json>`` on the original stdout; everything else the libraries print goes to stderr.
Long operations may send ``{"progress": k, "total": n}`` lines before their answer.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

_reply_out = None


def reply(obj: dict[str, Any]) -> None:
    """Send one answer (or progress) line to the parent."""
    assert _reply_out is not None, "serve() has not started"
    _reply_out.write("@@BENCH " + json.dumps(obj) + "\n")
    _reply_out.flush()


def serve(make: Callable[[dict[str, Any]], Any], ready: Callable[[Any], dict[str, Any]]) -> int:
    """Build the worker from ``argv[1]``, announce it with ``ready(worker)``, answer requests."""
    global _reply_out
    # Answers get the real stdout; anything the libraries print goes to stderr (the log).
    _reply_out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    try:
        worker = make(json.loads(sys.argv[1]))
    except Exception:
        reply({"error": traceback.format_exc()[-4000:]})
        return 1
    reply({"ready": True, **ready(worker)})
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        op = request.pop("op")
        try:
            result = getattr(worker, f"op_{op}")(**request)
        except Exception:
            result = {"error": traceback.format_exc()[-4000:]}
        reply(result)
    return 0
