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
RESUMED = PREFIX + "streams_resumed"  # cumulative: requests that continued a parked stream
RESUMED_TOKENS = PREFIX + "tokens_resumed"  # cumulative: tokens those requests did not prefill
RECLAIMED = PREFIX + "parked_streams_reclaimed"  # cumulative: parked streams whose pages went
# cumulative: shared pages (prefix cache, parked streams) copied before a stream changed them
PAGES_COPIED = PREFIX + "pages_copied"
PARKED = PREFIX + "parked_streams"  # now
PARKED_PAGES = PREFIX + "parked_pages"  # now (counted as free by the block pool)
# now, the largest per-request container in the engine core (entries stored, not logical length)
CORE_TOKENS_MAX = PREFIX + "core_token_ids_stored_max"
CORE_OUTPUTS_MAX = PREFIX + "core_output_token_ids_stored_max"
CORE_HASHES_MAX = PREFIX + "core_block_hashes_stored_max"
# The KV manager's block list of the largest request: entries stored (the freed run is a count).
CORE_BLOCK_LIST_MAX = PREFIX + "core_block_list_entries_max"
# Per engine step: how many requests held pages (the batch the sink engine ran side by side).
REQUESTS_PER_STEP = PREFIX + "requests_per_step"
STEP_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
COUNTERS = (PAGES_FREED, TOKENS_EVICTED, RESUMED, RESUMED_TOKENS, RECLAIMED, PAGES_COPIED)
GAUGES = (
    PAGES_HELD,
    PAGES_HELD_MAX,
    REQUESTS,
    PARKED,
    PARKED_PAGES,
    CORE_TOKENS_MAX,
    CORE_OUTPUTS_MAX,
    CORE_HASHES_MAX,
    CORE_BLOCK_LIST_MAX,
)


def stored(entries: Any) -> int:
    """Entries a container holds in memory (a TailList's tail, a BlockList's pages; a list's
    length)."""
    n = getattr(entries, "num_stored", None)
    return len(entries) if n is None else n


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
    parked = [m.parked for m in managers if m.parked is not None]
    requests = list(scheduler.requests.values())
    return {
        CORE_TOKENS_MAX: max((stored(r._all_token_ids) for r in requests), default=0),
        CORE_OUTPUTS_MAX: max((stored(r._output_token_ids) for r in requests), default=0),
        CORE_HASHES_MAX: max((stored(r.block_hashes) for r in requests), default=0),
        CORE_BLOCK_LIST_MAX: max(
            (stored(b) for m in managers for b in m.req_to_blocks.values()), default=0
        ),
        PAGES_FREED: sum(m.pages_freed for m in managers),
        # Only whole pages are evicted; every layer group evicts the same tokens.
        TOKENS_EVICTED: managers[0].pages_freed * managers[0].block_size,
        # Pages shared by several requests (a common opening) count once, as in the pool.
        PAGES_HELD: sum(m.num_distinct_pages_held(scheduler.requests) for m in managers),
        PAGES_HELD_MAX: max(held, default=0),
        REQUESTS: len(held),
        RESUMED: sum(p.resumed for p in parked),
        RESUMED_TOKENS: sum(p.resumed_tokens for p in parked),
        RECLAIMED: sum(p.reclaimed for p in parked),
        PAGES_COPIED: sum(m.pages_copied for m in managers),
        PARKED: sum(len(p) for p in parked),
        PARKED_PAGES: sum(p.num_pages() for p in parked),
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
        help_text = {
            PAGES_FREED: "KV pages sink eviction took from requests (shared ones stay shared).",
            TOKENS_EVICTED: "Tokens whose KV entries were evicted (freed pages x block size).",
            RESUMED: "Requests that continued a finished stream on its parked pages.",
            RESUMED_TOKENS: "Tokens those requests did not prefill again.",
            RECLAIMED: "Parked streams whose pages the block pool handed out again.",
            PAGES_COPIED: "Shared KV pages copied before a stream changed them (copy on write).",
            PAGES_HELD: "KV pages held by all running sink-evicting requests.",
            PAGES_HELD_MAX: "KV pages held by the largest running request (bounded).",
            REQUESTS: "Running requests holding KV pages.",
            PARKED: "Finished streams whose pages are parked for a later request to continue.",
            PARKED_PAGES: "Pages of parked streams (free for the block pool, reused last).",
            CORE_TOKENS_MAX: "Token ids the engine core stores for its largest request.",
            CORE_OUTPUTS_MAX: "Output token ids the engine core stores for its largest request.",
            CORE_HASHES_MAX: "Page hashes the engine core stores for its largest request.",
            CORE_BLOCK_LIST_MAX: "Block-list entries (null where evicted) of the largest request.",
        }
        self.counters = {n: prometheus_client.Counter(n, help_text[n], labels) for n in COUNTERS}
        self.gauges = {n: prometheus_client.Gauge(n, help_text[n], labels) for n in GAUGES}
        # Every step's count, not a gauge a scrape may miss: a busy server answers /metrics late.
        self.per_step = prometheus_client.Histogram(
            REQUESTS_PER_STEP,
            "Requests holding KV pages, observed once per engine step.",
            labels,
            buckets=STEP_BUCKETS,
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
        for name, counter in self.counters.items():
            delta = payload[name] - seen.get(name, 0)
            if delta > 0:
                counter.labels(*labels).inc(delta)
            seen[name] = payload[name]
        for name, gauge in self.gauges.items():
            gauge.labels(*labels).set(payload[name])
        self.per_step.labels(*labels).observe(payload[REQUESTS])

    def log_engine_initialized(self) -> None:
        for labels in self.labels.values():
            for gauge in self.gauges.values():
                gauge.labels(*labels).set(0)
            for counter in self.counters.values():
                counter.labels(*labels)
            self.per_step.labels(*labels)
