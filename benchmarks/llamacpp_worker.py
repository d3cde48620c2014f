"""llama.cpp (llama-cpp-python low-level bindings) with context shift, in its own process.

    python benchmarks/llamacpp_worker.py '{"gguf": ..., "streams": 16, "n_keep": 4, ...}'

Same JSON-lines protocol as ``engine_worker.py`` (``worker_protocol.py``). One context holds
``streams`` sequences, each with its own ``n_ctx_seq = n_keep + window + discard`` cells
(``kv_unified`` off), and every decode step is one ``llama_batch`` with one token per sequence.
When a sequence is full, llama.cpp's own context shift is applied to it: ``llama_memory_seq_rm``
drops ``discard`` tokens after the first ``n_keep`` (the sinks) and ``llama_memory_seq_add``
shifts the rest back, which re-rotates their cached keys (llama.cpp's K-shift). Greedy sampling
(argmax).
"""

from __future__ import annotations

import ctypes
import time
from typing import Any

import numpy as np
from worker_protocol import serve


class LlamaStreams:
    def __init__(self, cfg: dict[str, Any]) -> None:
        import llama_cpp as lc

        self.lc = lc
        self.cfg = cfg
        lc.llama_backend_init()
        mparams = lc.llama_model_default_params()
        self.model = lc.llama_model_load_from_file(cfg["gguf"].encode(), mparams)
        if not self.model:
            raise RuntimeError(f"cannot load {cfg['gguf']}")
        self.n_seq = cfg["streams"]
        self.n_ctx_seq = cfg["n_keep"] + cfg["window"] + cfg["discard"]
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = self.n_ctx_seq * self.n_seq
        cparams.n_seq_max = self.n_seq
        cparams.n_batch = max(512, self.n_seq)
        cparams.n_ubatch = max(512, self.n_seq)
        cparams.n_threads = cfg["threads"]
        cparams.n_threads_batch = cfg["threads"]
        cparams.kv_unified = False  # one cache stream per sequence: independent shifts
        self.ctx = lc.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise RuntimeError("llama_init_from_model failed")
        self.mem = lc.llama_get_memory(self.ctx)
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.batch = lc.llama_batch_init(max(512, self.n_seq), 0, 1)
        self.n_past = [0] * self.n_seq
        self.shifts = 0

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """``items``: (seq, token, pos, want_logits), one batch."""
        b = self.batch
        for i, (seq, tok, pos, logits) in enumerate(items):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = 1 if logits else 0
        b.n_tokens = len(items)
        rc = self.lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _argmax(self, i: int) -> int:
        ptr = self.lc.llama_get_logits_ith(self.ctx, i)
        arr = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                    shape=(self.n_vocab,))  # fmt: skip
        return int(arr.argmax())

    def _shift(self, seq: int) -> None:
        """llama.cpp's context shift: keep ``n_keep``, drop ``discard``, slide the rest back."""
        keep, d = self.cfg["n_keep"], self.cfg["discard"]
        n = self.n_past[seq]
        if not self.lc.llama_memory_seq_rm(self.mem, seq, keep, keep + d):
            raise RuntimeError("llama_memory_seq_rm failed")
        self.lc.llama_memory_seq_add(self.mem, seq, keep + d, n, -d)
        self.n_past[seq] = n - d
        self.shifts += 1

    def op_decode(self, prompts: list[list[int]], gen: int) -> dict[str, Any]:
        """Prefill each sequence's prompt, then ``gen`` one-token-per-sequence decode steps."""
        self.lc.llama_memory_clear(self.mem, True)
        self.n_past = [0] * self.n_seq
        self.shifts = 0
        nxt = []
        t0 = time.perf_counter()
        for seq, prompt in enumerate(prompts):
            prompt = prompt[: self.n_ctx_seq - 1]
            for s in range(0, len(prompt), 512):
                chunk = prompt[s : s + 512]
                last = s + len(chunk) == len(prompt)
                self._decode([(seq, t, s + j, last and j == len(chunk) - 1)
                              for j, t in enumerate(chunk)])  # fmt: skip
            self.n_past[seq] = len(prompt)
            nxt.append(self._argmax(-1))
        prefill_s = time.perf_counter() - t0
        steps = []
        for _ in range(gen - 1):
            ts = time.perf_counter()
            for seq in range(len(prompts)):
                if self.n_past[seq] + 1 > self.n_ctx_seq:
                    self._shift(seq)
            self._decode([(seq, nxt[seq], self.n_past[seq], True) for seq in range(len(prompts))])
            for seq in range(len(prompts)):
                self.n_past[seq] += 1
            nxt = [self._argmax(i) for i in range(len(prompts))]
            steps.append(time.perf_counter() - ts)
        decode_s = sum(steps)
        tokens = len(steps) * len(prompts)
        return {
            "streams": len(prompts),
            "prefill_s": prefill_s,
            "decode_steps": len(steps),
            "decode_tokens": tokens,
            "decode_s": decode_s,
            "tok_s": tokens / decode_s if decode_s else 0.0,
            "step_ms_median": 1000 * sorted(steps)[len(steps) // 2] if steps else 0.0,
            "context_shifts": self.shifts,
            "n_ctx_seq": self.n_ctx_seq,
        }


def _ready(worker: LlamaStreams) -> dict[str, Any]:
    import llama_cpp

    return {"llama_cpp_python": llama_cpp.__version__, "n_ctx_seq": worker.n_ctx_seq}


def main() -> int:
    return serve(LlamaStreams, _ready)


if __name__ == "__main__":
    raise SystemExit(main())
