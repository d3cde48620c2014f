"""Engine-core side: a scheduler that lets sink-evicting streams run past ``max_model_len``.

Selected through the public ``scheduler_cls`` engine argument, so it only exists in engines that
enable the feature. vLLM's scheduler stops or clips a request at ``max_model_len`` in several
places (the per-step token bound, ``check_stop``'s length cap, the KV manager's clipping); with
sink eviction a request never holds more than its bounded page count, so the scheduler-side
length limit is lifted. Workers keep their ``max_model_len``-sized buffers: they see each request
compacted to ``[sink pages | window pages]`` (``vllm_sink.patches.model_runner``).
"""

from __future__ import annotations

from typing import Any

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.metrics.stats import SchedulerStats

from vllm_sink import metrics
from vllm_sink.enable import step_tokens_per_request

# Effectively unbounded, and still a plain int for the arithmetic vLLM does with it.
UNBOUNDED_LEN = 1 << 62


class SinkScheduler(Scheduler):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.max_model_len = UNBOUNDED_LEN
        self.kv_cache_manager.max_model_len = UNBOUNDED_LEN
        # Per-request step cap (``long_prefill_token_threshold``, set by the plugin so a
        # compacted request's positions fit the model).
        self.step_tokens_per_request = step_tokens_per_request(self.scheduler_config)

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        running, waiting = self.get_request_counts()
        if running + waiting > 1:
            return super().schedule(*args, **kwargs)
        # vLLM lifts long_prefill_token_threshold for a lone request ("nobody to starve"); a
        # lone sink stream must still keep to it, so its step budget is lowered instead.
        budget = self.max_num_scheduled_tokens
        self.max_num_scheduled_tokens = min(budget, self.step_tokens_per_request)
        try:
            return super().schedule(*args, **kwargs)
        finally:
            self.max_num_scheduled_tokens = budget

    def make_stats(self, *args: Any, **kwargs: Any) -> SchedulerStats | None:
        stats = super().make_stats(*args, **kwargs)
        if stats is not None:
            # Rides to the API server's stat loggers; see vllm_sink.metrics for why here.
            stats.num_kv_fetch_reqs_by_stage.update(metrics.scheduler_payload(self))
        return stats
