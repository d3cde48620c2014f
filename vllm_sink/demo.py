"""The main job: stream text from the embedded model with sink eviction, showing the pages held.

    python -m vllm_sink.demo [--tokens 3000] [--window 512] [--sinks 4] [--max-model-len 1024]

The stream runs well past ``max_model_len`` (where vanilla vLLM stops). Tokens are printed as
they come; every ``--report-every`` tokens a line shows how many KV pages the stream holds (read
from the engine's own KV-cache manager) against the contract's bound and against what vanilla
vLLM would need for the same stream.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model dir (default: embedded SmolLM2)")
    parser.add_argument("--tokens", type=int, default=3000, help="tokens to generate")
    parser.add_argument("--window", type=int, default=512, help="window_tokens")
    parser.add_argument("--sinks", type=int, default=4, help="sink_tokens")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--report-every", type=int, default=128)
    parser.add_argument("--prompt", default="Once upon a time, in a small village by the sea,")
    parser.add_argument("--temperature", type=float, default=0.8)
    args = parser.parse_args(argv)

    # In-process engine core, so the demo can read the KV manager's page counts.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import RequestOutputKind

    from vllm_sink.assets import prepare_model

    model = args.model or str(prepare_model())
    block_size = 32
    llm = LLM(
        model=model,
        block_size=block_size,
        enforce_eager=True,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=256,
        seed=0,
        additional_config={"vllm_sink": {"sink_tokens": args.sinks, "window_tokens": args.window}},
    )
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    pages = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    bound = math.ceil(args.sinks / block_size) + math.ceil(args.window / block_size) + 1
    params = SamplingParams(
        max_tokens=args.tokens,
        temperature=args.temperature,
        seed=0,
        ignore_eos=True,
        output_kind=RequestOutputKind.DELTA,
    )
    engine.add_request("demo", args.prompt, params)
    print(args.prompt, end="", flush=True)
    generated, next_report, start, finished = 0, args.report_every, time.monotonic(), False
    while not finished:
        for out in engine.step():
            text = out.outputs[0].text
            generated += len(out.outputs[0].token_ids)
            print(text, end="", flush=True)
            finished = out.finished
        if generated >= next_report or finished:
            next_report += args.report_every
            # vLLM suffixes request ids internally ("demo-1a2b3c4d").
            held = sum(
                pages.num_pages_held(rid)
                for rid in scheduler.requests
                if rid.rsplit("-", 1)[0] == "demo"
            )
            vanilla = math.ceil(generated / block_size)
            past = " (past max_model_len)" if generated > args.max_model_len else ""
            print(
                f"\n  [vllm-sink] {generated} tokens generated{past}: {held} pages held "
                f"(bound {bound}; vanilla would need {vanilla}+)",
                file=sys.stderr,
                flush=True,
            )
    rate = generated / (time.monotonic() - start)
    print(f"\n[vllm-sink] done: {generated} tokens at {rate:.1f} tok/s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
