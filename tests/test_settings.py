"""Settings validation: every bad value is a start-up error naming the setting."""

from __future__ import annotations

import pytest

from vllm_sink.compat import UnsupportedVllmError, check_vllm_version
from vllm_sink.settings import SinkConfigError, parse_settings, settings_from_additional_config


def test_defaults_and_pages():
    s = parse_settings({"window_tokens": 1020})
    assert (s.sink_tokens, s.window_tokens) == (4, 1020)
    assert s.sink_pages(32) == 1
    assert s.max_pages(32) == 1 + 32 + 1
    assert parse_settings({"sink_tokens": 0, "window_tokens": 1}).sink_pages(32) == 0
    assert parse_settings({"sink_tokens": 33, "window_tokens": 64}).sink_pages(32) == 2


def test_off_without_key():
    assert settings_from_additional_config({}) is None
    assert settings_from_additional_config(None) is None
    assert settings_from_additional_config({"other": 1}) is None


@pytest.mark.parametrize(
    "raw, name",
    [
        ({}, "window_tokens"),
        ({"window_tokens": 0}, "window_tokens"),
        ({"window_tokens": -5}, "window_tokens"),
        ({"window_tokens": "512"}, "window_tokens"),
        ({"window_tokens": 1.5}, "window_tokens"),
        ({"window_tokens": True}, "window_tokens"),
        ({"window_tokens": 64, "sink_tokens": -1}, "sink_tokens"),
        ({"window_tokens": 64, "sink_tokens": "4"}, "sink_tokens"),
        ({"window_tokens": 64, "sink_tokenz": 4}, "sink_tokenz"),
    ],
)
def test_invalid_settings_name_the_setting(raw, name):
    with pytest.raises(SinkConfigError, match=rf"vllm_sink\.{name}"):
        parse_settings(raw)


def test_settings_must_be_a_dict():
    with pytest.raises(SinkConfigError, match="must be a dict"):
        settings_from_additional_config({"vllm_sink": [4, 64]})


def test_engine_start_fails_fast_naming_the_setting(model_dir):
    """Through the real LLM entry point: the error comes before any engine process starts."""
    from vllm import LLM

    with pytest.raises(SinkConfigError, match=r"vllm_sink\.window_tokens"):
        LLM(model=str(model_dir), additional_config={"vllm_sink": {"window_tokens": -1}})


def test_window_too_large_for_model(model_dir):
    from vllm import LLM

    with pytest.raises(SinkConfigError, match=r"window_tokens=500 is too large"):
        LLM(
            model=str(model_dir),
            block_size=32,
            max_model_len=256,
            hf_overrides={"max_position_embeddings": 512},
            additional_config={"vllm_sink": {"sink_tokens": 4, "window_tokens": 500}},
        )


def test_version_guard(monkeypatch):
    import vllm

    check_vllm_version()  # the installed version is supported
    monkeypatch.setattr(vllm, "__version__", "0.31.1")
    with pytest.raises(UnsupportedVllmError, match="supports vLLM 0.32.0 only, found vLLM 0.31.1"):
        check_vllm_version()
