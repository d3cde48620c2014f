"""Engine-core side: a scheduler that lets sink-evicting streams run past ``max_model_len``.

Selected through the public ``scheduler_cls`` engine argument, so it only exists in engines that
enable the feature. vLLM's scheduler stops or clips a request at ``max_model_len`` in several
places (the per-step token bound, ``check_stop``'s length cap, the KV manager's clipping); with
sink eviction a request never holds more than its bounded page count, so the scheduler-side
length limit is lifted. Workers keep their ``max_model_len``-sized buffers: they see each request
compacted to ``[sink pages | window pages]`` (``vllm_sink.patches.model_runner``).

With vLLM's prefix caching on, requests share the pages of a common opening as vanilla vLLM
does (copied when a stream first evicts, :class:`SinkWindowManager`), a request that finishes
normally parks its pages (:meth:`SinkWindowManager.park`), and a new request whose tokens extend
a parked stream continues it on its pages and waits with the stream's computed tokens, exactly
like a streaming-input session's next chunk: only its new tokens are scheduled.

A preempted request is swapped, not recomputed: the scheduler remembers where its stream stood
(computed tokens, which of its pages the contract keeps) and the worker keeps a copy of those
pages (at most ``max_pages``). When it is its turn again and the pool has room for those pages,
it gets fresh ones and its computed tokens back, and the worker copies the pages in: it resumes
exactly where it stopped, whatever its length, and only its uncomputed tokens are scheduled.
Until then it stays out of vLLM's waiting queue, which would otherwise re-prefill it whole.

A streamed request (``output_kind=DELTA``) keeps only the tail of its token lists and block
hashes (:mod:`vllm_sink.tail`) once it is longer than ``max_model_len``: the scheduler reads
them at their end only, so the engine core holds a bounded number of entries per stream, however
long it runs. Up to ``max_model_len`` (what vanilla vLLM holds) they stay plain lists, which
vLLM reads at C speed for every request and step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.sampling_params import RequestOutputKind
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.metrics.stats import SchedulerStats
from vllm.v1.request import Request, RequestStatus
from vllm.v1.utils import ConstantList

from vllm_sink import metrics
from vllm_sink.block_list import BlockList
from vllm_sink.enable import step_tokens_per_request
from vllm_sink.kv_cache import SinkWindowManager, SinkWindowSpec
from vllm_sink.tail import TailList

# Effectively unbounded, and still a plain int for the arithmetic vLLM does with it.
UNBOUNDED_LEN = 1 << 62
# Entries a streamed request keeps of its token lists and of its page hashes (at least).
TAIL_TOKENS = 256
TAIL_HASHES = 8
# Streams are checked for passing max_model_len (to keep only their tails) every this many steps.
TAIL_CHECK_STEPS = 8


@dataclass(frozen=True)
class SwappedStream:
    """Where a preempted request's stream stood; the worker holds its pages' contents."""

    num_computed: int
    # Per logical page, kept (True) or freed by eviction (null): the pages before the freed run,
    # the run's length, the pages after it (bounded whatever the stream's length).
    head: tuple[bool, ...]
    skipped: int
    tail: tuple[bool, ...]
    num_evicted_pages: int


class SinkScheduler(Scheduler):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        groups = self.kv_cache_config.kv_cache_groups
        if len(groups) != 1:
            from vllm_sink.enable import UnsupportedConfigError

            raise UnsupportedConfigError(
                f"vllm_sink supports one KV-cache group (uniform attention layers), "
                f"got {len(groups)}"
            )
        if not isinstance(groups[0].kv_cache_spec, SinkWindowSpec):
            from vllm_sink.enable import UnsupportedConfigError

            # The workers did not build sink layers (a runner the plugin does not hook, such as
            # Model Runner V2): nothing would be evicted while the length caps are lifted.
            raise UnsupportedConfigError(
                "vllm_sink: the workers' attention layers are not sink layers "
                f"({type(groups[0].kv_cache_spec).__name__}); vllm_sink runs on Model Runner V1 "
                "(VLLM_USE_V2_MODEL_RUNNER=0)"
            )
        self.swapped: dict[str, SwappedStream] = {}
        self.num_swapped_in = 0  # preempted streams resumed from their pages (not recomputed)
        # Streamed requests not yet longer than this keep vLLM's plain lists (_keep_tails).
        self.tail_after = self.max_model_len
        self.tails_pending: dict[str, Request] = {}
        self._steps = 0
        self.max_model_len = UNBOUNDED_LEN
        self.kv_cache_manager.max_model_len = UNBOUNDED_LEN
        # Per-request step cap (``long_prefill_token_threshold``, set by the plugin so a
        # compacted request's positions fit the model).
        self.step_tokens_per_request = step_tokens_per_request(self.scheduler_config)

    def sink_manager(self) -> SinkWindowManager:
        (manager,) = self.kv_cache_manager.coordinator.single_type_managers
        return manager

    def add_request(self, request: Request) -> None:
        if (
            request.request_id not in self.requests
            and request.num_computed_tokens == 0
            and not request.skip_reading_prefix_cache
        ):
            resumed = self.sink_manager().resume(request)
            if resumed:
                # Waits like a session's next chunk: only the new tokens get scheduled.
                request.num_computed_tokens = resumed
                if request.prefill_stats is not None:
                    request.prefill_stats.set(request.num_prompt_tokens, resumed, 0)
                self.kv_cache_manager.record_prefix_cache_stats(request, resumed)
        super().add_request(request)
        if self.keeps_tail_only(request):
            if request.num_tokens > self.tail_after:
                self._keep_tail(request)
            else:
                self.tails_pending[request.request_id] = request

    def _keep_tails(self) -> None:
        """Streams that passed ``max_model_len`` keep only their tails from now on. Checked
        every ``TAIL_CHECK_STEPS`` steps, so a stream holds at most that many steps' tokens
        past ``max_model_len`` in full."""
        done = []
        for request_id, request in self.tails_pending.items():
            if self.requests.get(request_id) is not request:
                done.append(request_id)  # finished (or gone) as a plain list
            elif request.num_tokens > self.tail_after:
                self._keep_tail(request)
                done.append(request_id)
        for request_id in done:
            del self.tails_pending[request_id]

    def keeps_tail_only(self, request: Request) -> bool:
        """Whether a request's history may shrink to its tail: a streamed (DELTA) request that
        is not a streaming-input session (whose next chunk re-reads its outputs) and whose
        structured output does not re-read the whole stream for a reasoning parser."""
        params = request.sampling_params
        if params is None or params.output_kind != RequestOutputKind.DELTA:
            return False
        if request.resumable or isinstance(request._all_token_ids, TailList):
            return False
        reasoning = self.vllm_config.structured_outputs_config.reasoning_parser
        return not (request.use_structured_output and reasoning)

    def _keep_tail(self, request: Request) -> None:
        # What the scheduler reads: the last token (stop checks), the tokens since the last
        # hashed page (block hasher), the last page hashes and tokens after them (parking), the
        # repetition-detection window.
        keep = max(TAIL_TOKENS, 4 * self.block_size)
        rep = request.sampling_params.repetition_detection
        if rep is not None:
            keep = max(keep, rep.max_pattern_size * rep.min_count + 1)
        request._all_token_ids = TailList(request._all_token_ids, keep)
        request._output_token_ids = TailList(request._output_token_ids, keep)
        request.all_token_ids = ConstantList(request._all_token_ids)
        request.output_token_ids = ConstantList(request._output_token_ids)
        request.block_hashes = TailList(request.block_hashes, TAIL_HASHES)

    def _preempt_request(self, request: Request, *args: Any, **kwargs: Any) -> None:
        manager = self.sink_manager()
        rid, n = request.request_id, request.num_computed_tokens
        if n:
            # Free what the contract frees at n (the running loop may not have yet): the pages
            # left are exactly the ones the worker copies out.
            manager.remove_skipped_blocks(rid, n)
            # Pages past the computed tokens (allocated for this step, if it was scheduled
            # before being picked) hold nothing yet.
            blocks = manager.req_to_blocks.get(rid) or []
            total = -(-n // self.block_size)
            if isinstance(blocks, BlockList):
                head = blocks.head[:total]
                skipped, tail = min(blocks.nulls, total - len(head)), blocks.tail
            else:
                head, skipped, tail = blocks[:total], 0, []
            tail = tail[: max(total - len(head) - skipped, 0)]
            self.swapped[rid] = SwappedStream(
                num_computed=n,
                head=tuple(not b.is_null for b in head),
                skipped=skipped,
                tail=tuple(not b.is_null for b in tail),
                num_evicted_pages=manager.num_evicted_pages(rid),
            )
        super()._preempt_request(request, *args, **kwargs)

    def _swap_in(self) -> list[Request]:
        """Give swapped requests their pages back where the pool has room; returns those that
        must wait (kept out of the waiting queue for this step)."""
        if not self.swapped:
            return []
        manager = self.sink_manager()
        pool = manager.block_pool
        # Running streams may each need a new page this step: leave them one.
        reserve = len(self.running)
        waiting, restored = [], []
        for request in list(self.waiting):
            swapped = self.swapped.get(request.request_id)
            if swapped is None:
                continue
            need = sum(swapped.head) + sum(swapped.tail)
            if pool.get_num_free_blocks() - need < reserve:
                waiting.append(request)
                continue
            fresh = iter(pool.get_new_blocks(need))
            manager.restore(
                request.request_id,
                [next(fresh) if live else None for live in swapped.head],
                swapped.skipped,
                [next(fresh) if live else None for live in swapped.tail],
                swapped.num_evicted_pages,
            )
            request.num_computed_tokens = swapped.num_computed
            del self.swapped[request.request_id]
            self.num_swapped_in += 1
            restored.append(request)
        # vLLM keeps waiting requests that hold pages in their own queue, drained first.
        self.waiting.remove_requests(restored + waiting)
        self.kv_holding_waiting.prepend_requests(reversed(restored))  # keeps their order
        return waiting

    def _free_blocks(self, request: Request) -> None:
        self.swapped.pop(request.request_id, None)  # aborted while swapped out
        self.tails_pending.pop(request.request_id, None)
        # Only a stream that ended normally is worth continuing; an aborted one may have been
        # cut mid-step, and a preempted one never comes through here.
        if request.status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH_CAPPED):
            self.sink_manager().park(request)
        super()._free_blocks(request)

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        self._steps += 1
        if self.tails_pending and self._steps % TAIL_CHECK_STEPS == 0:
            self._keep_tails()
        held_back = self._swap_in()
        try:
            output = self._schedule(*args, **kwargs)
        finally:
            for request in reversed(held_back):
                self.waiting.prepend_request(request)
        # Which requests' shared pages became private copies this step (vLLM queued the copies
        # in ``kv_cache_block_copies``): the worker updates their rows and sink state.
        output.sink_page_swaps = self.sink_manager().take_page_swaps()
        return output

    def _free_cow_retained_blocks(self, blocks: list, fence_seq: int) -> None:
        super()._free_cow_retained_blocks(blocks, fence_seq)
        self.sink_manager().requeue_parked(blocks)

    def _schedule(self, *args: Any, **kwargs: Any) -> Any:
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
