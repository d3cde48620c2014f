"""The main job: a streaming chatbot on the embedded model, running far past max_model_len.

    python -m vllm_sink.demo [--turns 40] [--window 256] [--sinks 4] [--max-model-len 512]
    python -m vllm_sink.demo --mode text [--tokens 3000] [--window 512] [--max-model-len 1024]

``--mode chat`` (default) is the paper's streaming chatbot: one conversation of many questions in
a single vLLM streaming-input session. The session's KV stays in the engine between turns, so
each turn prefills only its new tokens, and sink eviction keeps the pages held bounded while the
conversation grows far past ``max_model_len``. Answers stream to stdout; after each turn a line
on stderr shows the time to first token, the tokens prefilled, the pages held against the
contract's bound, and the stream's length.

``--mode text`` streams plain text from one prompt; every ``--report-every`` tokens a line shows
the KV pages the stream holds (read from the engine's own KV-cache manager) against the bound
and against what vanilla vLLM would need for the same stream.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import time
from typing import Any

from vllm_sink import geometry

BLOCK_SIZE = 32
CHAT_ID = "chat"
SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
QUESTIONS: tuple[str, ...] = (
    "Why is the sea salty?",
    "Who built the pyramids of Giza?",
    "How do I boil an egg?",
    "What is the square root of 144?",
    "Why is the sky blue?",
    "What did the Romans eat for breakfast?",
    "How do I make a simple tomato sauce?",
    "Is 97 a prime number?",
    "What causes the tides?",
    "Who was Napoleon Bonaparte?",
    "What is a good spice for roasted carrots?",
    "What is seven times eight?",
    "How deep is the ocean?",
    "When did the Berlin Wall fall?",
    "How long should pasta cook?",
    "What is the difference between a mean and a median?",
    "Why do whales sing?",
    "What was the Silk Road?",
    "How do I keep bread fresh?",
    "What is a Fibonacci number?",
    "What lives at the bottom of the sea?",
    "Who wrote the Magna Carta?",
    "Can you name three kinds of rice?",
    "What is pi, roughly?",
    "Why are waves bigger in winter?",
    "What was the Renaissance?",
    "How do I make pancakes fluffy?",
    "What is one third as a decimal?",
    "Thank you! Can you sum up what we talked about?",
    "Tell me one fun fact about octopuses.",
)


def page_bound(sinks: int, window: int, block_size: int = BLOCK_SIZE) -> int:
    """The contract's bound on pages one stream holds: sink pages + window pages + one open."""
    return geometry.max_pages(sinks, window, block_size)


def chat_chunks(tokenizer: Any, questions: list[str], system: str) -> list[list[int]]:
    """Token ids of each user turn, in SmolLM2's chat template.

    A session drops the last sampled token of each turn (it was never computed), so every later
    chunk starts with ``<|im_end|>\\n`` to close the previous answer in the history.
    """
    chunks = []
    for i, question in enumerate(questions):
        head = f"<|im_start|>system\n{system}<|im_end|>\n" if i == 0 else "<|im_end|>\n"
        text = f"{head}<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
        chunks.append(tokenizer.encode(text, add_special_tokens=False))
    return chunks


async def _stream_stats(engine: Any) -> dict[str, int]:
    """The worker's stats for the chat session (internal ids start with the external id)."""
    for per_worker in await engine.collective_rpc("vllm_sink_streams"):
        for req_id, stats in per_worker.items():
            if req_id.startswith(CHAT_ID):
                return stats
    return {}


async def _chat(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.engine.protocol import StreamingInput
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    from vllm_sink.assets import prepare_model

    model = args.model or str(prepare_model())
    tokenizer = AutoTokenizer.from_pretrained(model)
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.turns)]
    chunks = chat_chunks(tokenizer, questions, SYSTEM_PROMPT)
    bound = page_bound(args.sinks, args.window)
    engine = AsyncLLM.from_engine_args(
        AsyncEngineArgs(
            model=model,
            block_size=BLOCK_SIZE,
            enforce_eager=args.enforce_eager,
            max_model_len=args.max_model_len,
            # Shrink the model's positions too, so the stream really outgrows them.
            hf_overrides={"max_position_embeddings": args.max_model_len},
            seed=0,
            additional_config={
                "vllm_sink": {"sink_tokens": args.sinks, "window_tokens": args.window}
            },
        )
    )
    # Sessions refuse stop strings; the EOS (<|im_end|>) ends each answer instead.
    params = SamplingParams(
        max_tokens=args.answer_tokens,
        temperature=args.temperature,
        seed=0,
        output_kind=RequestOutputKind.DELTA,
    )
    turn_done = asyncio.Event()
    sent_at = [0.0] * len(chunks)
    ttfts: list[float] = []
    max_pages, tokens = 0, 0

    async def inputs() -> Any:
        for turn, (question, chunk) in enumerate(zip(questions, chunks, strict=True)):
            turn_done.clear()
            print(f"\nUser: {question}\nAssistant: ", end="", flush=True)
            sent_at[turn] = time.monotonic()
            # A copy: vLLM's front end extends the first chunk's list with every later chunk.
            yield StreamingInput(prompt=TokensPrompt(prompt_token_ids=list(chunk)))
            await turn_done.wait()
        # Returning ends the session: vLLM sends its final request and generate() finishes.

    try:
        turn, first_at = 0, None
        async for out in engine.generate(inputs(), params, CHAT_ID):
            c = out.outputs[0]
            if c.token_ids and first_at is None:
                first_at = time.monotonic()
            print(c.text, end="", flush=True)
            # A session reports each turn's end as finish_reason ("stop" at the EOS, "length" at
            # max_tokens) while out.finished stays False until the session itself ends.
            if c.finish_reason is None:
                continue
            stats = await _stream_stats(engine)
            ttft = (first_at or time.monotonic()) - sent_at[turn]
            ttfts.append(ttft)
            max_pages = max(max_pages, stats.get("pages", 0))
            tokens = stats.get("tokens", 0)
            past = " (past max_model_len)" if tokens > args.max_model_len else ""
            print(flush=True)  # end the answer's line on stdout
            print(
                f"  [turn {turn + 1}] ttft {ttft:.2f}s | prefilled {stats.get('prefilled')} "
                f"of {len(chunks[turn])} | pages {stats.get('pages')} (bound {bound}) | "
                f"stream {tokens} tokens{past} | end {c.finish_reason}",
                file=sys.stderr,
                flush=True,
            )
            turn, first_at = turn + 1, None
            turn_done.set()
    finally:
        engine.shutdown()
        # Something still holds the engine at interpreter exit, where AsyncLLM.__del__ calls
        # shutdown() again on torn-down module globals and prints a traceback; it is done now.
        engine.shutdown = lambda timeout=None: None
    first, last = (f"{ttfts[0]:.2f}s", f"{ttfts[-1]:.2f}s") if ttfts else ("-", "-")
    print(
        f"\n[vllm-sink] done: {len(ttfts)} turns, {tokens} tokens in the stream "
        f"(max_model_len {args.max_model_len}); ttft first {first}, last {last}; "
        f"max pages held {max_pages} (bound {bound})",
        file=sys.stderr,
    )
    return 0


def run_chat(args: argparse.Namespace) -> int:
    """The streaming chatbot: ``args.turns`` questions in one streaming-input session."""
    # vLLM's INFO lines (engine start, shutdown) would land in the middle of the chat on stdout.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    return asyncio.run(_chat(args))


def run_text(args: argparse.Namespace) -> int:
    """Plain text stream from one prompt, reporting the pages held as it goes."""
    # In-process engine core, so the demo can read the KV manager's page counts.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import RequestOutputKind

    from vllm_sink.assets import prepare_model

    model = args.model or str(prepare_model())
    llm = LLM(
        model=model,
        block_size=BLOCK_SIZE,
        enforce_eager=args.enforce_eager,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=256,
        seed=0,
        additional_config={"vllm_sink": {"sink_tokens": args.sinks, "window_tokens": args.window}},
    )
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    pages = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    bound = page_bound(args.sinks, args.window)
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
            vanilla = math.ceil(generated / BLOCK_SIZE)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("chat", "text"), default="chat")
    parser.add_argument("--model", default=None, help="model dir (default: embedded SmolLM2)")
    # Defaults differ by mode (None = the mode's own), so text mode behaves as it always did.
    parser.add_argument(
        "--window", type=int, default=None, help="window_tokens (chat 256, text 512)"
    )
    parser.add_argument("--sinks", type=int, default=4, help="sink_tokens")
    parser.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        default=True,
        # Measured here (2 cores, AMX): a cold compile of the model adds ~75 s to the engine's
        # start, and compiled decoding saves ~25 % of the demo's ~1 minute of decoding.
        help="vLLM's eager mode (default: the demo's few thousand tokens do not repay a cold "
        "~75 s compile; --no-enforce-eager runs vLLM's default compiled mode)",
    )
    parser.add_argument("--max-model-len", type=int, default=None, help="(chat 512, text 1024)")
    parser.add_argument("--temperature", type=float, default=None, help="(chat 0.7, text 0.8)")
    chat = parser.add_argument_group("chat mode")
    chat.add_argument("--turns", type=int, default=40, help="questions asked, cycling the list")
    chat.add_argument("--answer-tokens", type=int, default=48, help="cap on each answer")
    text = parser.add_argument_group("text mode")
    text.add_argument("--tokens", type=int, default=3000, help="tokens to generate")
    text.add_argument("--report-every", type=int, default=128)
    text.add_argument("--prompt", default="Once upon a time, in a small village by the sea,")
    args = parser.parse_args(argv)
    chat_mode = args.mode == "chat"
    for name, chat_default, text_default in (
        ("window", 256, 512),
        ("max_model_len", 512, 1024),
        ("temperature", 0.7, 0.8),
    ):
        if getattr(args, name) is None:
            setattr(args, name, chat_default if chat_mode else text_default)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return run_chat(args) if chat_mode else run_text(args)


if __name__ == "__main__":
    raise SystemExit(main())
