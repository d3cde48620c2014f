"""``python -m vllm_sink.gpu_check``: check the sink path on your machine, one command.

For users with a GPU (the path is unverified on GPU hardware; see the README's "GPUs"):

1. parity: the embedded model in float32, a long real-text prompt far past ``max_model_len``
   (positions shrunk, so sinks move and positions rebase), prompt log-probabilities through the
   engine against the project's reference, token by token (pass: max at most 1e-4 nats);
2. decode throughput: the same streams on a vanilla engine and on the plugin's, one after the
   other in this process, and their ratio.

It starts the engine with the GPU opt-in (``VLLM_SINK_GPU_UNVERIFIED=1``) set for this process.
On a CPU machine it checks the CPU path (or, with ``VLLM_SINK_TRITON_ON_CPU=1``, the Triton path
interpreted: use ``--quick``, the interpreter is slow). Prints one JSON line; exits 1 on a
parity failure.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

TOL = 1e-4


def _engine(model: str, sink: dict | None, max_len: int, **kwargs):
    from vllm import LLM

    extra = {"additional_config": {"vllm_sink": sink}} if sink else {}
    return LLM(
        model=model,
        max_model_len=max_len,
        hf_overrides={"max_position_embeddings": max_len},
        block_size=kwargs.pop("block_size"),
        seed=0,
        **extra,
        **kwargs,
    )


def parity(model: str, tokens: list[int], args: argparse.Namespace) -> dict:
    import numpy as np
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_sink.reference import StreamingReference

    sink = {"sink_tokens": args.sink, "window_tokens": args.window}
    llm = _engine(model, sink, args.max_len, dtype="float32", block_size=args.block_size)
    cap = llm.llm_engine.vllm_config.scheduler_config.long_prefill_token_threshold
    (out,) = llm.generate(
        TokensPrompt(prompt_token_ids=tokens),
        SamplingParams(max_tokens=1, prompt_logprobs=0),
        use_tqdm=False,
    )
    got = np.array([out.prompt_logprobs[i][tokens[i]].logprob for i in range(1, len(tokens))])
    del llm
    gc.collect()
    ref = StreamingReference(
        model, sink_tokens=args.sink, window_tokens=args.window, block_size=args.block_size
    )
    diff = np.abs(got - ref.score(tokens, cap)[1:])
    return {"tokens": len(tokens), "max_nats": float(diff.max()), "mean_nats": float(diff.mean())}


def decode_rate(model: str, sink: dict | None, args: argparse.Namespace) -> float:
    """Output tokens a second over ``--streams`` greedy streams of ``--decode`` tokens."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    # Both engines hold every stream whole (work both can do); the plugin's also evicts.
    max_len = max(args.max_len, args.decode + 16)
    llm = _engine(model, sink, max_len, dtype=args.dtype, block_size=args.block_size)
    params = SamplingParams(max_tokens=args.decode, temperature=0, ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=[100 + i, 200, 300, 400]) for i in range(args.streams)]
    llm.generate(prompts[:1], SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    rate = args.streams * args.decode / (time.perf_counter() - start)
    del llm
    gc.collect()
    return rate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (CPU, interpreter)")
    parser.add_argument(
        "--model",
        default=None,
        help="a Llama-family checkpoint directory (default: the embedded SmolLM2-135M-Instruct)",
    )
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--prompt", type=int, default=3000)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--decode", type=int, default=1000)
    parser.add_argument("--dtype", default="bfloat16", help="dtype of the throughput runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.window, args.max_len, args.prompt, args.streams, args.decode = 64, 160, 400, 2, 32
    os.environ.setdefault("VLLM_SINK_GPU_UNVERIFIED", "1")

    from transformers import AutoTokenizer

    from vllm_sink.assets import default_model_dir, long_text, prepare_model

    prepare_model()  # the embedded model: the default, and its tokenizer for the corpus
    model = args.model or str(default_model_dir())
    tokens = AutoTokenizer.from_pretrained(model)(long_text(4 * args.prompt + 4000))["input_ids"]
    result = {"parity": parity(model, tokens[: args.prompt], args)}
    sink = {"sink_tokens": args.sink, "window_tokens": args.window}
    vanilla, plugin = decode_rate(model, None, args), decode_rate(model, sink, args)
    result["decode"] = {
        "streams": args.streams,
        "tokens_each": args.decode,
        "vanilla_tok_s": round(vanilla, 1),
        "plugin_tok_s": round(plugin, 1),
        "plugin_over_vanilla": round(plugin / vanilla, 3),
    }
    result["pass"] = result["parity"]["max_nats"] <= TOL
    print(json.dumps(result))
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
