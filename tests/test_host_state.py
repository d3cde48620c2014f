"""Bounded host state for streamed requests (#14 item 2), read from a real ``vllm serve``.

Eight ``stream: true`` requests (four chat, four completions; stop strings, logprobs) stream
6,000+ tokens each through one server on a tiny random model. At 1,000 and at 6,000 tokens
the test reads every per-request container from the live processes (``/vllm_sink/host_state``):
the API server's output processor and chat stream generators, the engine core's request lists
and the worker's request state. Each must hold a bounded number of entries, far below 1,000, so
none grows with the stream. Then the client closes the streams, and the server must let go of
every one. A greedy stream cut by a stop string found after the text was trimmed must equal the
non-streamed request's output.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests
from test_serve import VLLM, cli_env, running_server  # noqa: F401 (fixture)

from vllm_sink.endpoint import flat_sizes
from vllm_sink.serve_process import free_port
from vllm_sink.tail import TailList

STREAM_TOKENS = 6_000
# The streams ask for far more than the test reads, and the client closes them after the second
# reading, so no stream ends before a reading however far the server runs ahead of this process
# (in one CI run the server had finished 7,000-token streams while the client had read 6,000).
MAX_TOKENS = 100_000
# Largest number of entries any per-request container may hold (the tails are 64-256 entries
# plus what is unsent, trimmed at twice that; text keeps ~1,000 characters past the cut).
BOUND = {"entries": 600, "chars": 3_000}


def test_tail_list_keeps_length_and_tail():
    t = TailList(range(10), keep=4)
    assert len(t) == 10 and t[0] == 0  # nothing dropped before the first append
    for i in range(10, 100):
        t.append(i)
    assert len(t) == 100 and 4 <= t.num_stored < 8
    assert t[-1] == 99 and t[99] == 99 and t[-3:] == [97, 98, 99] and t[98:] == [98, 99]
    with pytest.raises(IndexError, match="dropped"):
        t[0]
    with pytest.raises(IndexError, match="dropped"):
        t[10:20]
    with pytest.raises(IndexError, match="dropped"):
        list(t)
    del t[98:]
    assert len(t) == 98 and t[-1] == 97
    c = t.copy()
    c.extend([1, 2])
    assert len(c) == 100 and len(t) == 98  # copies are independent
    assert TailList([1, 2]) == [1, 2] and TailList([1, 2]).index(2) == 1


def test_block_list_keeps_the_freed_run_as_a_count():
    from vllm_sink.block_list import BlockList

    null = object()
    pages = [object() for _ in range(7)]
    restored = BlockList(pages[:3], 1, null, nulls=4)  # a swapped-in stream's list
    assert list(restored) == [pages[0], *[null] * 4, *pages[1:3]] and restored.num_stored == 3
    blocks = BlockList(pages, 1, null)
    assert list(blocks) == pages and len(blocks) == 7
    for i in (2, 1):  # vLLM frees back to front
        blocks[i] = null
    assert (blocks.nulls, blocks.num_stored, len(blocks)) == (2, 5, 7)
    assert blocks[1] is null and blocks[2] is null and blocks[3] is pages[3]
    assert list(reversed(blocks)) == list(blocks)[::-1] == [*pages[:0:-1][:4], null, null, pages[0]]
    blocks.extend([object() for _ in range(1000)])
    for i in range(1000, 2, -1):
        blocks[i] = null
    assert len(blocks) == 1007 and blocks.num_stored == 1 + 6 and blocks.nulls == 1000
    with pytest.raises(ValueError, match="freed page"):
        blocks[5] = object()


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory, cli_env):  # noqa: F811
    from vllm_sink.assets import make_tiny_llama

    model = make_tiny_llama(tmp_path_factory.mktemp("tiny") / "m", max_position_embeddings=256)
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    cmd = [VLLM, "serve", str(model), "--served-model-name", "tiny",
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "256", "--block-size", "32", "--enforce-eager",
           "--max-num-batched-tokens", "64",
           "--sink-tokens", "4", "--window-tokens", "128"]  # fmt: skip
    env = {**cli_env, "VLLM_PLUGINS": "vllm_sink,vllm_sink_state"}
    with running_server(cmd, env, log_path, port) as url:
        yield url


def _stream(url: str, path: str, body: dict, counts: list, i: int, texts: list, stop=None) -> None:
    """POST a streaming request; counts[i] follows the token ids received (the body asks for
    ``return_token_ids`` where counts matter), texts[i] the text, with events (an error, the
    finish reason) as ``(kind, detail)`` tuples. Setting ``stop`` (an Event) closes the
    connection, which aborts the request."""
    try:
        _read_stream(url, path, body, counts, i, texts, stop)
    except Exception as e:  # reported by the test through texts[i]
        texts[i].append(("error", repr(e)))


def _read_stream(url: str, path: str, body: dict, counts: list, i: int, texts: list, stop) -> None:
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with requests.post(f"{url}{path}", json=body, stream=True, timeout=1800) as r:
        if r.status_code != 200:
            texts[i].append(("HTTP", f"{r.status_code}: {r.text}"))
            return
        for line in r.iter_lines():
            if stop is not None and stop.is_set():
                return  # leaving the block closes the connection
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                texts[i].append(("error", chunk["error"]))
            for choice in chunk.get("choices") or ():
                texts[i].append(
                    choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                )
                counts[i] += len(choice.get("token_ids") or ())
                if choice.get("finish_reason"):
                    texts[i].append(("finish", choice["finish_reason"]))


def _events(texts: list) -> list:
    return [[c for c in t if isinstance(c, tuple)] for t in texts]


def _host_state(url: str) -> dict:
    r = requests.get(f"{url}/vllm_sink/host_state", timeout=60)
    r.raise_for_status()
    return r.json()


def test_streamed_requests_hold_bounded_host_state(tiny_server):
    url = tiny_server
    prompt = "Once upon a time, in a city by the sea,"
    # Seeded: eight prompts share each step's 64-token budget, so some are prefilled in chunks.
    # return_token_ids: a lagging front end merges several tokens into one chunk, so the
    # tests count token ids, not chunks.
    common = {"model": "tiny", "max_tokens": MAX_TOKENS, "ignore_eos": True, "seed": 1,
              "return_token_ids": True}  # fmt: skip
    bodies = []
    for i in range(4):
        chat = {"messages": [{"role": "user", "content": f"{prompt} {i}"}], **common}
        if i % 2:
            chat.update(logprobs=True, top_logprobs=2, stop=["never-in-this-text"])
        bodies.append(("/v1/chat/completions", chat))
        comp = {"prompt": f"{prompt} {i}", **common}
        if i % 2:
            comp.update(logprobs=1, stop=["zz-no-such-stop", "qq-none-either"])
        bodies.append(("/v1/completions", comp))
    counts, texts = [0] * len(bodies), [[] for _ in bodies]
    stop = threading.Event()
    threads = [
        threading.Thread(
            target=_stream, args=(url, path, body, counts, i, texts, stop), daemon=True
        )
        for i, (path, body) in enumerate(bodies)
    ]
    for t in threads:
        t.start()
    readings = {}
    deadline = time.monotonic() + 1500
    try:
        for mark in (1_000, STREAM_TOKENS):
            while min(counts) < mark:
                assert time.monotonic() < deadline, f"streams too slow: {counts}"
                assert all(t.is_alive() for t in threads), (
                    f"a stream ended: {counts} {_events(texts)}"
                )
                time.sleep(0.2)
            readings[mark] = _host_state(url)
            readings[mark]["tokens"] = list(counts)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    for chunks in texts:  # every stream was cut by the client, none failed or ended on its own
        ended = [c for c in chunks if isinstance(c, tuple)]
        assert not ended, (ended, chunks[-3:])
    early, late = readings[1_000], readings[STREAM_TOKENS]
    print(json.dumps(readings, indent=1))
    for mark, reading in readings.items():
        # The readings saw the live streams (not an idle server), at least as far as the client.
        assert reading["front_end"]["requests"] == 8
        assert reading["front_end"]["output_tokens_min"] >= mark
        assert reading["chat_streams"]["streams"] == 4
        assert reading["front_end"]["detokenizer_token_ids"] > 0
        assert reading["front_end"]["detokenizer_text_chars"] > 0
        assert reading["front_end"]["sample_logprobs"] > 0
        assert reading["engine_core"]["core_token_ids_stored_max"] > 0
        assert reading["workers"][0]["streams"] == 8
        # The KV block list: the sink page, the window's pages, a partial page and one step's
        # (its freed run is a count, not a null entry per evicted page).
        assert reading["engine_core"]["core_block_list_entries_max"] <= 1 + 128 // 32 + 1 + 2
    for name, value in flat_sizes(late).items():
        bound = BOUND["chars"] if name.endswith("chars") else BOUND["entries"]
        assert value <= bound, f"{name} holds {value} entries after {STREAM_TOKENS} tokens"
        assert flat_sizes(early)[name] <= bound, name
    # Closed by the client: the server aborts the eight and lets go of every one.
    deadline = time.monotonic() + 120
    while True:
        state = _host_state(url)
        held = (state["front_end"]["requests"], state["chat_streams"]["streams"],
                state["workers"][0]["streams"], state["workers"][0]["runner_requests"])  # fmt: skip
        if held == (0, 0, 0, 0):
            break
        assert time.monotonic() < deadline, f"closed streams still held: {state}"
        time.sleep(0.5)


def test_stream_cut_by_stop_string_equals_non_streamed(tiny_server):
    """A greedy stream whose stop string lies far past the text the front end trimmed ends
    exactly where the same non-streamed request does."""
    url = tiny_server
    # Seeded sampling: a random model's greedy text repeats itself.
    body = {"model": "tiny", "prompt": "The tide came in", "max_tokens": 1500,
            "temperature": 1.0, "seed": 3, "ignore_eos": True}  # fmt: skip
    full = requests.post(f"{url}/v1/completions", json=body, timeout=600).json()
    text = full["choices"][0]["text"]
    k = next(
        k for k in range(len(text) * 4 // 5, len(text) - 12) if text.find(text[k : k + 12]) == k
    )
    stop = text[k : k + 12]
    assert k > 3 * 1024  # well past what the front end keeps of the text
    cut = requests.post(f"{url}/v1/completions", json={**body, "stop": [stop]}, timeout=600)
    choice = cut.json()["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == (text[:k], "stop")
    counts, texts = [0], [[]]
    _stream(url, "/v1/completions", {**body, "stop": [stop]}, counts, 0, texts)
    assert "".join(c for c in texts[0] if isinstance(c, str)) == text[:k]
    assert [c for c in texts[0] if isinstance(c, tuple)] == [("finish", "stop")]
