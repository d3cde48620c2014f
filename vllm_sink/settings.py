"""The user-facing settings, read from ``additional_config["vllm_sink"]``.

``additional_config`` is vLLM's opaque, hashed, process-travelling dict for out-of-tree
configuration, so every process (API server, engine core, workers) sees the same settings.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

CONFIG_KEY = "vllm_sink"


class SinkConfigError(ValueError):
    """An invalid ``vllm_sink`` setting; the message names the setting."""


class SinkSettings(BaseModel):
    """StreamingLLM eviction settings (see the contract in README.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sink_tokens: StrictInt = Field(
        default=4, ge=0, description="tokens pinned at the start of each stream (0: window only)"
    )
    window_tokens: StrictInt = Field(
        ge=1, description="most recent tokens kept in the cache besides the sinks"
    )

    def sink_pages(self, block_size: int) -> int:
        """``sb = ceil(sink_tokens / block_size)``: pages pinned as sinks."""
        return math.ceil(self.sink_tokens / block_size)

    def max_pages(self, block_size: int) -> int:
        """Pages one request holds between steps (:func:`vllm_sink.geometry.max_pages`)."""
        from vllm_sink import geometry

        return geometry.max_pages(self.sink_tokens, self.window_tokens, block_size)


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"{CONFIG_KEY}.{loc}: {e['msg']} (got {e.get('input')!r})")
    return "invalid vllm_sink settings: " + "; ".join(lines)


def parse_settings(raw: Any) -> SinkSettings:
    """Validate a raw settings dict, raising :class:`SinkConfigError` naming the bad setting."""
    if not isinstance(raw, dict):
        raise SinkConfigError(
            f"invalid vllm_sink settings: additional_config['{CONFIG_KEY}'] must be a dict, "
            f"got {type(raw).__name__}"
        )
    try:
        return SinkSettings.model_validate(raw)
    except ValidationError as err:
        raise SinkConfigError(_describe(err)) from None


def settings_from_additional_config(additional_config: Any) -> SinkSettings | None:
    """The settings when the feature is enabled, else ``None`` (plugin stays inert)."""
    if not additional_config or CONFIG_KEY not in additional_config:
        return None
    return parse_settings(additional_config[CONFIG_KEY])
