"""Prometheus metrics ``vllm_sink:*``, next to vLLM's own on ``/metrics``.

The numbers are read in the engine core (the scheduler's KV manager counts the pages it frees)
and must reach the API server, where ``/metrics`` is served. vLLM ships ``SchedulerStats`` from
the core to the front end every step, but the struct is decoded by a typed msgspec schema with
no free-form field, so the scheduler adds its counters to the one ``str -> int`` dict that
crosses the process boundary untouched (``num_kv_fetch_reqs_by_stage``, keys prefixed
``vllm_sink:``). :class:`SinkStatLogger` runs before vLLM's own loggers (custom loggers come
first), exports the values and removes the keys, so vLLM's loggers never see them.
"""

from __future__ import annotations

from typing import Any

import prometheus_client
from vllm.v1.metrics.loggers import AggregateStatLoggerBase
from vllm.v1.metrics.stats import IterationStats, MultiModalCacheStats, SchedulerStats

from vllm_sink.settings import CONFIG_KEY

PREFIX = "vllm_sink:"
PAGES_FREED = PREFIX + "pages_freed"  # cumulative, since engine start
TOKENS_EVICTED = PREFIX + "tokens_evicted"  # cumulative
PAGES_HELD = PREFIX + "kv_pages_held"  # now, all running requests
PAGES_HELD_MAX = PREFIX + "kv_pages_per_request_max"  # now, the largest running request
REQUESTS = PREFIX + "num_requests_running"  # now


def scheduler_payload(scheduler: Any) -> dict[str, int]:
    """The scheduler's sink counters, read from its KV managers (engine-core side)."""
    from vllm_sink.kv_cache import SinkWindowManager

    managers = [
        m
        for m in scheduler.kv_cache_manager.coordinator.single_type_managers
        if isinstance(m, SinkWindowManager)
    ]
    if not managers:
        return {}
    held = [sum(m.num_pages_held(rid) for m in managers) for rid in scheduler.requests]
    held = [h for h in held if h]
    return {
        PAGES_FREED: sum(m.pages_freed for m in managers),
        # Only whole pages are evicted; every layer group evicts the same tokens.
        TOKENS_EVICTED: managers[0].pages_freed * managers[0].block_size,
        PAGES_HELD: sum(held),
        PAGES_HELD_MAX: max(held, default=0),
        REQUESTS: len(held),
    }


def _unregister_own_metrics() -> None:
    """Drop earlier ``vllm_sink:`` collectors (a second engine in one process, as in tests)."""
    registry = prometheus_client.REGISTRY
    for collector in list(registry._collector_to_names):
        if getattr(collector, "_name", "").startswith(PREFIX):
            registry.unregister(collector)


class SinkStatLogger(AggregateStatLoggerBase):
    """Exports the scheduler's sink counters as Prometheus series, labelled like vLLM's."""

    def __init__(self, vllm_config: Any, engine_indexes: list[int] | None = None) -> None:
        engine_indexes = engine_indexes or [0]
        self.labels: dict[int, list[str]] = {}
        if CONFIG_KEY not in (vllm_config.additional_config or {}):
            return  # an engine without sinks in a process that also built one: export nothing
        _unregister_own_metrics()
        labels = ["model_name", "engine"]
        model = vllm_config.model_config.served_model_name
        self.labels = {idx: [model, str(idx)] for idx in engine_indexes}
        self.pages_freed = prometheus_client.Counter(
            PAGES_FREED, "KV pages freed back to the block pool by sink eviction.", labels
        )
        self.tokens_evicted = prometheus_client.Counter(
            TOKENS_EVICTED, "Tokens whose KV entries were evicted (freed pages x block size).",
            labels,
        )  # fmt: skip
        self.pages_held = prometheus_client.Gauge(
            PAGES_HELD, "KV pages held by all running sink-evicting requests.", labels
        )
        self.pages_held_max = prometheus_client.Gauge(
            PAGES_HELD_MAX, "KV pages held by the largest running request (bounded).", labels
        )
        self.requests = prometheus_client.Gauge(
            REQUESTS, "Running requests holding KV pages.", labels
        )
        # Last cumulative values seen per engine: counters advance by the difference.
        self.seen: dict[int, dict[str, int]] = {idx: {} for idx in engine_indexes}

    def record(
        self,
        scheduler_stats: SchedulerStats | None,
        iteration_stats: IterationStats | None,
        mm_cache_stats: MultiModalCacheStats | None = None,
        engine_idx: int = 0,
    ) -> None:
        if scheduler_stats is None:
            return
        stage_counts = scheduler_stats.num_kv_fetch_reqs_by_stage
        payload = {k: stage_counts.pop(k) for k in list(stage_counts) if k.startswith(PREFIX)}
        if not payload or engine_idx not in self.labels:  # not a sink engine
            return
        labels = self.labels[engine_idx]
        seen = self.seen[engine_idx]
        for name, counter in (
            (PAGES_FREED, self.pages_freed),
            (TOKENS_EVICTED, self.tokens_evicted),
        ):
            delta = payload[name] - seen.get(name, 0)
            if delta > 0:
                counter.labels(*labels).inc(delta)
            seen[name] = payload[name]
        self.pages_held.labels(*labels).set(payload[PAGES_HELD])
        self.pages_held_max.labels(*labels).set(payload[PAGES_HELD_MAX])
        self.requests.labels(*labels).set(payload[REQUESTS])

    def log_engine_initialized(self) -> None:
        for labels in self.labels.values():
            self.pages_held.labels(*labels).set(0)
            self.pages_held_max.labels(*labels).set(0)
            self.requests.labels(*labels).set(0)
            self.pages_freed.labels(*labels)
            self.tokens_evicted.labels(*labels)
