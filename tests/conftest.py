"""Shared fixtures. Engine tests run the real vLLM engine on the real embedded model."""

from __future__ import annotations

import os

import pytest

# Small KV pool, in-process engine core (so tests can read the scheduler's block pool and KV
# manager directly), and no usage stats. Set before vLLM is imported anywhere.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def model_dir():
    from vllm_sink.assets import prepare_model

    return prepare_model()


@pytest.fixture(scope="session")
def text_tokens(model_dir):
    """Token ids of a long real text (Shakespeare), enough for every test here."""
    from transformers import AutoTokenizer

    from vllm_sink.assets import long_text

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return tokenizer(long_text(400_000))["input_ids"]
