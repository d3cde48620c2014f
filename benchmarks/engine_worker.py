"""One vLLM engine in its own process, driven by JSON lines (see ``common.EngineWorker``).

    python benchmarks/engine_worker.py '<EngineConfig as JSON>'

Speaks the JSON-lines protocol of ``worker_protocol.py``: one request per line on stdin, one
``@@BENCH <json>`` answer per request (and progress lines for long operations) on stdout.

The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set by the parent)
and every measurement drives ``LLMEngine.step()`` directly, so each step is timed on its own and
the scheduler's KV manager, block pool and queues can be read between steps.
"""

from __future__ import annotations

import cProfile
import io
import itertools
import os
import pstats
import time
from pathlib import Path
from typing import Any

from worker_protocol import reply, serve


class Worker:
    """The engine plus the measurements the benchmarks need."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        from vllm import LLM

        from vllm_sink.assets import default_model_dir

        self.cfg = cfg
        extra: dict[str, Any] = {}
        if cfg["window_tokens"] is not None:
            extra = {
                "vllm_sink": {
                    "sink_tokens": cfg["sink_tokens"],
                    "window_tokens": cfg["window_tokens"],
                }
            }
        kwargs: dict[str, Any] = {}
        if cfg["max_position_embeddings"]:
            kwargs["hf_overrides"] = {"max_position_embeddings": cfg["max_position_embeddings"]}
        if cfg["max_num_batched_tokens"]:
            kwargs["max_num_batched_tokens"] = cfg["max_num_batched_tokens"]
        t0 = time.perf_counter()
        self.llm = LLM(
            model=str(default_model_dir()),
            block_size=32,
            enforce_eager=cfg.get("eager", False),
            max_model_len=cfg["max_model_len"],
            max_num_seqs=cfg["max_num_seqs"],
            # Off unless the config asks for it, for plugin and vanilla alike: repeats reuse
            # prompts, which would otherwise hit vanilla's cache, so both engines do the same
            # work. (The plugin keeps vLLM's switch: on, it parks finished streams and resumes a
            # request that extends one; the conversation benchmark measures that.)
            enable_prefix_caching=cfg.get("prefix_caching", False),
            seed=0,
            dtype=cfg.get("dtype", "bfloat16"),
            additional_config=extra,
            **kwargs,
        )
        self.build_s = time.perf_counter() - t0
        self.engine = self.llm.llm_engine
        if cfg.get("slowdown"):
            self.engine.step = _slowed(self.engine.step, cfg["slowdown"])
        self.scheduler = self.engine.engine_core.engine_core.scheduler
        self.pool = self.scheduler.kv_cache_manager.block_pool
        self.manager = self.scheduler.kv_cache_manager.coordinator.single_type_managers[0]
        self.preemptions = 0
        original = self.scheduler._preempt_request

        def counting_preempt(*args: Any, **kwargs: Any) -> Any:
            self.preemptions += 1
            return original(*args, **kwargs)

        # Benchmark instrumentation only: count preemptions (vLLM keeps no engine-wide total).
        self.scheduler._preempt_request = counting_preempt
        self._ids: list[int] | None = None
        self._seq = itertools.count()

    # ------------------------------------------------------------------ helpers

    @property
    def ids(self) -> list[int]:
        """Token ids of a long real text (Shakespeare), tokenised once."""
        if self._ids is None:
            from transformers import AutoTokenizer

            from vllm_sink.assets import default_model_dir, long_text

            tok = AutoTokenizer.from_pretrained(default_model_dir())
            self._ids = tok(long_text(600_000))["input_ids"]
        return self._ids

    def prompt(self, start: int, length: int):
        from vllm.inputs import TokensPrompt

        ids = self.ids
        start %= len(ids) - length
        return TokensPrompt(prompt_token_ids=ids[start : start + length])

    def params(self, max_tokens: int):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        # Greedy, fixed length, no detokenising: the engine's own work, the same for both.
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=0.0,
            ignore_eos=True,
            detokenize=False,
            output_kind=RequestOutputKind.DELTA,
        )

    def pages_used(self) -> int:
        """Pages taken from the pool (all requests; the null page is not counted)."""
        return self.pool.num_gpu_blocks - 1 - self.pool.get_num_free_blocks()

    def pages_held(self, internal_id: str) -> int:
        blocks = self.manager.req_to_blocks.get(internal_id, [])
        return sum(1 for b in blocks if not b.is_null)

    def add(
        self,
        prefix: str,
        n: int,
        prompt_len: int,
        max_tokens: int,
        stride: int = 997,
        stagger: bool = False,
    ):
        """Add ``n`` requests (prompt ``i`` starts ``i * stride`` tokens into the text).

        ``stagger``: prompt ``i`` is ``(11 * i) % 32`` tokens longer, so streams cross page
        boundaries (where the plugin evicts) on different steps, as independent streams do.
        """
        tag = f"{prefix}{next(self._seq)}"
        rids = [f"{tag}-{i}" for i in range(n)]
        for i, rid in enumerate(rids):
            length = prompt_len + ((11 * i) % 32 if stagger else 0)
            prompt = self.prompt(i * stride, length)
            self.engine.add_request(rid, prompt, self.params(max_tokens))
        return rids

    def internal_ids(self, external: str) -> list[str]:
        # vLLM suffixes request ids internally ("d0-3-1a2b3c4d").
        return [r for r in self.scheduler.requests if r.rsplit("-", 1)[0] == external]

    # ------------------------------------------------------------------ operations

    def op_info(self) -> dict[str, Any]:
        """Start-up facts, read back from the engine as built (not from the config asked for):
        its pool, the KV manager its scheduler runs, the sink settings of its KV-cache spec."""
        spec = self.manager.kv_cache_spec
        config = self.engine.vllm_config
        return {
            "num_pages": self.pool.num_gpu_blocks - 1,
            "build_s": self.build_s,
            "kv_manager": type(self.manager).__name__,
            "kv_spec": type(spec).__name__,
            "sink_tokens": getattr(spec, "sink_tokens", None),
            "window_tokens": getattr(spec, "window_tokens", None),
            "block_size": spec.block_size,
            "max_model_len": config.model_config.max_model_len,
            "dtype": str(config.model_config.dtype).removeprefix("torch."),
            "prefix_caching": bool(config.cache_config.enable_prefix_caching),
            "compile_mode": config.compilation_config.mode.name,  # NONE: eager
            "thread_cpus": thread_cpus(),
        }

    def op_decode(
        self,
        streams: int,
        prompt_len: int,
        gen: int,
        profile: bool | str = False,
        profile_top: int = 45,
    ) -> dict[str, Any]:
        """Prefill ``streams`` prompts, then time every pure-decode step to the end.

        ``profile``: True or ``"decode"`` runs cProfile over the decode steps, ``"prefill"``
        over the prefill steps.
        """
        rids = self.add("d", streams, prompt_len, gen)
        produced = dict.fromkeys(rids, 0)
        prof = cProfile.Profile() if profile else None
        if prof and profile == "prefill":
            prof.enable()
        t0 = time.perf_counter()
        # Prefill phase: until every stream has its first token (steps may mix prefill chunks
        # and decodes; none of them is counted as decode).
        while min(produced.values()) == 0:
            for out in self.engine.step():
                produced[out.request_id] += len(out.outputs[0].token_ids)
        prefill_s = time.perf_counter() - t0
        if prof and profile == "prefill":
            prof.disable()
        steps: list[float] = []
        tokens = 0
        if prof and profile != "prefill":
            prof.enable()
        while self.engine.has_unfinished_requests():
            ts = time.perf_counter()
            outs = self.engine.step()
            steps.append(time.perf_counter() - ts)
            tokens += sum(len(o.outputs[0].token_ids) for o in outs)
        if prof and profile != "prefill":
            prof.disable()
        decode_s = sum(steps)
        result: dict[str, Any] = {
            "streams": streams,
            "prompt_len": prompt_len,
            "gen": gen,
            "prefill_s": prefill_s,
            "decode_steps": len(steps),
            "decode_tokens": tokens,
            "decode_s": decode_s,
            "tok_s": tokens / decode_s if decode_s else 0.0,
            "step_ms_median": 1000 * sorted(steps)[len(steps) // 2] if steps else 0.0,
            "preemptions": self.preemptions,
        }
        if prof:
            result["profile"] = _profile_text(prof, profile_top)
        return result

    def op_open(
        self, streams: int, prompt_len: int, max_tokens: int, stagger: bool = True
    ) -> dict[str, Any]:
        """Start a decode session: add ``streams`` requests and prefill them (timed)."""
        if self.engine.has_unfinished_requests():
            return {"error": "a session is already open"}
        rids = self.add("o", streams, prompt_len, max_tokens, stagger=stagger)
        produced = dict.fromkeys(rids, 0)
        t0 = time.perf_counter()
        steps = 0
        while min(produced.values()) == 0:
            for out in self.engine.step():
                produced[out.request_id] += len(out.outputs[0].token_ids)
            steps += 1
        self._session = rids
        return {"prefill_s": time.perf_counter() - t0, "prefill_steps": steps}

    def op_advance(
        self, steps: int, profile: bool = False, profile_top: int = 45
    ) -> dict[str, Any]:
        """Run ``steps`` decode steps of the open session; every step is timed."""
        times: list[float] = []
        tokens = 0
        prof = cProfile.Profile() if profile else None
        if prof:
            prof.enable()
        for _ in range(steps):
            if not self.engine.has_unfinished_requests():
                break
            ts = time.perf_counter()
            outs = self.engine.step()
            times.append(time.perf_counter() - ts)
            tokens += sum(len(o.outputs[0].token_ids) for o in outs)
        if prof:
            prof.disable()
        total = sum(times)
        result: dict[str, Any] = {
            "steps": len(times),
            "tokens": tokens,
            "decode_s": total,
            "tok_s": tokens / total if total else 0.0,
            "step_ms": [1000 * t for t in times],
            "step_ms_median": 1000 * sorted(times)[len(times) // 2] if times else 0.0,
            "pages_used": self.pages_used(),
            "preemptions": self.preemptions,
        }
        if prof:
            result["profile"] = _profile_text(prof, profile_top)
            result["plugin_share"] = _plugin_share(prof, total)
        return result

    def op_close(self) -> dict[str, Any]:
        """Abort whatever is left of the session."""
        live = [r for rid in getattr(self, "_session", []) for r in self.internal_ids(rid)]
        if live:
            self.engine.abort_request(live, internal=True)
        while self.engine.has_unfinished_requests():
            self.engine.step()
        self._session = []
        return {"pages_used": self.pages_used()}

    def op_stream(
        self, prompt_len: int, max_tokens: int, streams: int = 1, report_every: int = 64
    ) -> dict[str, Any]:
        """Decode long streams; per step: latency, position, pages held by stream 0 and in all."""
        error = None
        try:
            rids = self.add("s", streams, prompt_len, max_tokens)
        except Exception as exc:  # vanilla refuses a stream longer than max_model_len
            error = f"{type(exc).__name__}: {exc}"
            return {"error_on_add": error}
        produced = dict.fromkeys(rids, 0)
        rows: list[list[float]] = []
        finish = None
        t_start = time.perf_counter()
        while self.engine.has_unfinished_requests():
            ts = time.perf_counter()
            outs = self.engine.step()
            dt = time.perf_counter() - ts
            for out in outs:
                produced[out.request_id] += len(out.outputs[0].token_ids)
                if out.finished and out.request_id == rids[0]:
                    finish = out.outputs[0].finish_reason
            ids0 = self.internal_ids(rids[0])
            held0 = sum(self.pages_held(r) for r in ids0)
            rows.append([prompt_len + produced[rids[0]], dt * 1000, held0, self.pages_used()])
            if len(rows) % report_every == 0:
                reply({"progress": produced[rids[0]], "total": max_tokens})
        return {
            "columns": ["position", "step_ms", "pages_held_stream0", "pages_used_all"],
            "rows": rows,
            "generated": produced[rids[0]],
            "finish_reason": finish,
            "wall_s": time.perf_counter() - t_start,
            "preemptions": self.preemptions,
        }

    def op_turn(self, prompt_ids: list[int], max_tokens: int) -> dict[str, Any]:
        """One chat turn: submit ``prompt_ids`` (the whole history) and step it to the end.

        ``ttft_s`` is the wall time from submitting the request to the end of the engine step
        that returns its first token (the engine streams: every step hands back the tokens it
        produced); ``turn_s`` runs to its last token. ``num_cached_tokens`` is the request's
        output field: prompt tokens that were not prefilled (prefix-cache hits, or the tokens
        of a resumed stream).
        """
        from vllm.inputs import TokensPrompt

        rid = f"t{next(self._seq)}"
        t0 = time.perf_counter()
        try:
            prompt = TokensPrompt(prompt_token_ids=list(prompt_ids))
            self.engine.add_request(rid, prompt, self.params(max_tokens))
        except Exception as exc:  # vanilla refuses a prompt of max_model_len tokens or more
            return {"error_on_add": f"{type(exc).__name__}: {exc}"}
        tokens: list[int] = []
        ttft = None
        cached = None
        finish = None
        steps = prefill_steps = 0
        while self.engine.has_unfinished_requests():
            outs = self.engine.step()
            steps += 1
            for out in outs:
                if out.request_id != rid:
                    continue
                tokens += out.outputs[0].token_ids
                if out.num_cached_tokens is not None:
                    cached = out.num_cached_tokens
                if ttft is None and tokens:
                    ttft = time.perf_counter() - t0
                    prefill_steps = steps
                if out.finished:
                    finish = out.outputs[0].finish_reason
        return {
            "ttft_s": ttft,
            "turn_s": time.perf_counter() - t0,
            "prompt_len": len(prompt_ids),
            "num_cached_tokens": cached,
            "generated": len(tokens),
            "token_ids": tokens,
            "finish_reason": finish,
            "steps": steps,
            "prefill_steps": prefill_steps,
            "pages_used_after": self.pages_used(),
        }

    def op_batch(self, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
        """Submit ``prompts`` at once and step them to the end: each request's time to first
        token (from the submission of all), its ``num_cached_tokens``, and the most pages the
        pool had handed out at the end of any step (parked and cached pages count as free)."""
        from vllm.inputs import TokensPrompt

        tag = f"b{next(self._seq)}"
        rids = [f"{tag}-{i}" for i in range(len(prompts))]
        t0 = time.perf_counter()
        for rid, ids in zip(rids, prompts, strict=True):
            prompt = TokensPrompt(prompt_token_ids=list(ids))
            self.engine.add_request(rid, prompt, self.params(max_tokens))
        ttft: dict[str, float] = {}
        cached: dict[str, int] = {}
        peak = 0
        while self.engine.has_unfinished_requests():
            outs = self.engine.step()
            now = time.perf_counter() - t0
            peak = max(peak, self.pages_used())
            for out in outs:
                if out.request_id not in ttft and out.outputs[0].token_ids:
                    ttft[out.request_id] = now
                if out.num_cached_tokens is not None:
                    cached[out.request_id] = out.num_cached_tokens
        return {
            "ttft_s": [ttft.get(r) for r in rids],
            "num_cached_tokens": [cached.get(r) for r in rids],
            "total_s": time.perf_counter() - t0,
            "peak_pages_used": peak,
            "pages_used_after": self.pages_used(),
        }

    def op_recompute(self, window: int, tokens: int, start: int = 5000) -> dict[str, Any]:
        """Sliding window with re-computation: each token is a fresh ``window``-token prefill."""
        times = []
        for t in range(tokens):
            rid = f"r{next(self._seq)}"
            ts = time.perf_counter()
            self.engine.add_request(rid, self.prompt(start + t, window), self.params(1))
            while self.engine.has_unfinished_requests():
                self.engine.step()
            times.append(time.perf_counter() - ts)
        return {"window": window, "token_s": times}

    def op_capacity(
        self, streams: int, prompt_len: int, max_tokens: int, budget_pages: int, steps: int
    ) -> dict[str, Any]:
        """Submit ``streams`` long streams with only ``budget_pages`` free; watch ``steps`` steps.

        The rest of the pool is taken out (held by this worker) so both engines get the same
        budget from one engine start; it goes back at the end.
        """
        free = self.pool.get_num_free_blocks()
        if budget_pages > free:
            return {"error": f"budget {budget_pages} > free pages {free}"}
        reserved = self.pool.get_new_blocks(free - budget_pages)
        p0 = self.preemptions
        rids = self.add("c", streams, prompt_len, max_tokens, stride=1499)
        produced = dict.fromkeys(rids, 0)
        rows = []
        try:
            for step in range(steps):
                if not self.engine.has_unfinished_requests():
                    break
                ts = time.perf_counter()
                outs = self.engine.step()
                dt = time.perf_counter() - ts
                new_tokens = 0
                for out in outs:
                    produced[out.request_id] += len(out.outputs[0].token_ids)
                    new_tokens += len(out.outputs[0].token_ids)
                decoding = sum(
                    1
                    for r in self.scheduler.running
                    if r.num_computed_tokens >= r.num_prompt_tokens
                )
                rows.append(
                    [
                        step,
                        len(self.scheduler.running),
                        decoding,
                        len(self.scheduler.waiting),
                        self.preemptions - p0,
                        self.pages_used() - len(reserved),
                        new_tokens,
                        dt * 1000,
                    ]
                )
                if step % 32 == 0:
                    reply({"progress": step, "total": steps})
        finally:
            live = [r for rid in rids for r in self.internal_ids(rid)]
            self.engine.abort_request(live, internal=True)
            while self.engine.has_unfinished_requests():
                self.engine.step()
            self.pool.free_blocks(reserved)
        return {
            "columns": [
                "step",
                "running",
                "decoding",
                "waiting",
                "preemptions",
                "pages_used",
                "new_tokens",
                "step_ms",
            ],
            "rows": rows,
            "tokens_per_stream": list(produced.values()),
            "budget_pages": budget_pages,
        }


def thread_cpus() -> dict[str, int]:
    """How many of this process's threads may run on each CPU set (``"0"``, ``"0,1"``, ...),
    once torch's OpenMP pool exists: shows whether the engine's threads are bound
    (``common.engine_thread_binding``), since the kernel otherwise places them freely."""
    import torch

    torch.ones(1 << 20).sum()  # a parallel region: starts the OpenMP threads if none ran yet
    counts: dict[str, int] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            cpus = ",".join(map(str, sorted(os.sched_getaffinity(int(task.name)))))
        except OSError:  # the thread ended meanwhile
            continue
        counts[cpus] = counts.get(cpus, 0) + 1
    return counts


def _slowed(step: Any, fraction: float) -> Any:
    """``step`` made ``fraction`` slower: after each call, sleep that fraction of its time."""

    def slowed_step() -> Any:
        t0 = time.perf_counter()
        out = step()
        time.sleep(fraction * (time.perf_counter() - t0))
        return out

    return slowed_step


REPO = Path(__file__).resolve().parents[1]
PLUGIN_DIRS = (str(REPO / "vllm_sink") + "/", str(REPO / "patches") + "/")


def _plugin_share(prof: cProfile.Profile, steps_s: float) -> dict[str, float]:
    """The plugin's own time in the profiled steps: what vLLM's code spends inside plugin
    functions (``vllm_sink``, ``patches``), less what those hand on to vLLM's code (the stock
    kernels, builders and runner they wrap). Torch ops the plugin calls itself stay its own."""

    def plugin(fn: tuple) -> bool:
        return fn[0].startswith(PLUGIN_DIRS)

    def vllm(fn: tuple) -> bool:
        return "/site-packages/vllm/" in fn[0]

    stats = pstats.Stats(prof).stats  # {fn: (cc, nc, tottime, cumtime, {caller: (.., cumtime)})}
    entered = delegated = 0.0
    for fn, (*_, callers) in stats.items():
        if plugin(fn):
            entered += sum(t[3] for c, t in callers.items() if not plugin(c))
        elif vllm(fn):
            delegated += sum(t[3] for c, t in callers.items() if plugin(c))
    own = entered - delegated
    return {
        "steps_s": steps_s,
        "entered_s": entered,
        "delegated_s": delegated,
        "own_s": own,
        "share": own / steps_s if steps_s else 0.0,
    }


def _profile_text(prof: cProfile.Profile, top: int) -> dict[str, str]:
    out = {}
    for key in ("tottime", "cumulative"):
        buf = io.StringIO()
        stats = pstats.Stats(prof, stream=buf)
        stats.sort_stats(key).print_stats(top)
        out[key] = buf.getvalue()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("cumulative").print_stats("vllm_sink|patches", top)
    out["vllm_sink"] = buf.getvalue()
    return out


def main() -> int:
    return serve(Worker, lambda worker: worker.op_info())


if __name__ == "__main__":
    raise SystemExit(main())
