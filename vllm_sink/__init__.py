"""vllm-sink: StreamingLLM attention-sink eviction for vLLM.

Unbounded token streams with bounded KV memory: the first pages of each sequence stay as
attention sinks, a window of recent pages slides, and RoPE sees cache-slot positions.
Enable it with ``additional_config={"vllm_sink": {"sink_tokens": 4, "window_tokens": 1020}}``.
"""

from vllm_sink.assets import cache_dir, corpus_files, default_model_dir, long_text, make_tiny_llama
from vllm_sink.settings import SinkConfigError, SinkSettings, parse_settings

__version__ = "0.1.0"

__all__ = [
    "SinkConfigError",
    "SinkSettings",
    "cache_dir",
    "corpus_files",
    "default_model_dir",
    "long_text",
    "make_tiny_llama",
    "parse_settings",
]
