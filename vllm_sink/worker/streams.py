"""Worker side: each request's stream, kept compacted to ``[sink tokens | window tokens]``.

The runner sizes a request's token row and block-table row by ``max_model_len`` and derives
positions, slot mapping and ``seq_lens`` from ``num_computed_tokens``; an unbounded stream would
overflow all of them. So the scheduler stays in logical coordinates (token ``t`` of the stream)
and the worker translates at the boundary (the hooks are in
:mod:`vllm_sink.patches.model_runner`):

- :func:`before_update` (before vLLM's own state update): every request whose window slid drops
  the freed tokens and pages from its cached state (prompt, outputs, block ids) and is re-added
  to the persistent batch, which rebuilds its rows from that state; ``num_computed_tokens`` from
  the scheduler is shifted by the tokens dropped. Prompts longer than the row are kept as
  ``prompt[:sinks] + prompt[ws : ws + room]`` and refilled as the window slides. A new request
  that continues a stream (a streaming-input session's next chunk, or a request that continues a
  finished stream's parked pages, :mod:`vllm_sink.parked`, on copies of them) keeps that
  stream's dropped tokens, position offset and sink rotation; one that starts from prefix-cache
  pages is a fresh stream at that length. A finished stream's state is parked under its first
  page and dies when any of its pages is handed out again. Pages the scheduler swapped for
  private copies (``SchedulerOutput.sink_page_swaps``; vLLM copies their K/V) replace the shared
  ones in the request's rows, and their sink state is copied with them. A preempted stream's
  pages are copied out (:meth:`StreamTracker.swap_out`) and back into fresh pages when it
  resumes.
- :func:`plan_step` (before vLLM prepares the step's inputs): each request's position offset
  (window keys keep the position they were written with; when positions would reach
  ``max_position_embeddings`` they are rebased once), and the step's sink work for the attention
  backend (:class:`vllm_sink.attention.sink.SinkStep`): sink tokens to load from pages whose
  sinks never moved (a request starting on shared pages), to capture, sinks to move, window keys
  to rotate back, all found from the worker's own block table on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vllm_sink import geometry
from vllm_sink.attention.sink import SinkCapture, SinkLoad, SinkMove, SinkStep, WindowRebase

NULL_BLOCK = 0  # vLLM's block pool keeps block 0 as the null block (freed entries point to it)


@dataclass
class StreamState:
    """Worker-side view of one request's stream."""

    prompt: list[int]  # the logical prompt (or every token, after a preemption)
    dropped: int = 0  # tokens removed from the compact view
    offset: int = 0  # position of compact slot s is s + offset
    prefilled: int = 0  # prompt tokens computed since the request (or its turn) arrived
    continued: bool = False  # this turn continues an earlier stream
    sink_key: int = -1  # first page: keys the backend's sink state (-1: none yet)
    own_params: bool = False  # the runner's sampling params are this worker's own copy


@dataclass
class SwappedOut:
    """A preempted request's stream and a copy of its pages (per KV-cache tensor, in the
    order of its compact block list); the scheduler gives it fresh pages when it resumes."""

    state: StreamState
    pages: list  # list[torch.Tensor]


@dataclass(frozen=True)
class ParkedState:
    """What the worker needs to continue a finished stream, while its pages are parked."""

    dropped: int
    offset: int
    blocks: frozenset[int]


class StreamTracker:
    """Per-runner bookkeeping of compacted requests."""

    def __init__(self, runner) -> None:
        from vllm_sink.attention.sink import current_layout

        layout = current_layout()
        self.settings = layout.settings
        self.block_size = runner.cache_config.block_size
        self.sink_len = geometry.sink_pages(self.settings.sink_tokens, self.block_size) * (
            self.block_size
        )
        self.row_len = runner.max_model_len
        hf = runner.model_config.hf_text_config
        # Largest position a step may use: rebase before crossing it.
        self.max_position = hf.max_position_embeddings - 1
        self.max_step = layout.max_step_tokens
        self.streams: dict[str, StreamState] = {}
        # Finished streams that a later request may continue (vLLM's prefix-caching switch).
        self.keep_finished = bool(runner.cache_config.enable_prefix_caching)
        self.parked: dict[int, ParkedState] = {}  # first page -> state
        self.parked_blocks: dict[int, int] = {}  # page -> first page of its parked stream
        # First pages of streams that ended (finished, parked state reclaimed): their sink
        # state in the backend is freed before the step is built.
        self.released: list[int] = []
        # Preempted streams, and the keys their sink state is kept under meanwhile (negative:
        # never a page id, so a new owner of the old first page cannot overwrite it).
        self.swapped: dict[str, SwappedOut] = {}
        self.renamed: list[tuple[int, int]] = []  # (old key, new key), applied after releases
        # (key, key of its private copy): a stream's sink pages copied from shared ones.
        self.copied: list[tuple[int, int]] = []
        self._next_stash = -2
        # First sink page -> offset the stream's sinks were last rotated to.
        self.sink_offsets: dict[int, int] = {}
        # Counts since start (what the tests check happened): sink moves and window rebases.
        self.num_sink_moves = 0
        self.num_rebases = 0
        # The runner's (attention groups, metadata builders, sink impls), found once.
        self.layers: tuple[list, list, list] | None = None
        self.steps_routed = [0, 0]  # steps whose layers ran [the kernel directly, the wrapper]

    def settle_sink_state(self, impls: list) -> None:
        """Apply the step's copies, releases, then renames, to the sink state here and in each
        layer (copy before freeing the source; free before renaming: a renamed stream may take
        over a key freed in this step). A key a live stream still uses is never freed."""
        from vllm_sink.attention.sink import copy_sink_state, free_sink_state, rename_sink_state

        copies = [(src, dst) for src, dst in self.copied if src in self.sink_offsets]
        for src, dst in copies:
            self.sink_offsets[dst] = self.sink_offsets[src]
        copy_sink_state(impls, copies)
        live = {state.sink_key for state in self.streams.values()}
        released = [key for key in self.released if key not in live]
        for key in released:
            self.sink_offsets.pop(key, None)
        free_sink_state(impls, released)
        for old, new in self.renamed:
            if old in self.sink_offsets:
                self.sink_offsets[new] = self.sink_offsets.pop(old)
        rename_sink_state(impls, self.renamed)
        self.copied, self.released, self.renamed = [], [], []

    def release(self, state: StreamState | None) -> None:
        if state is not None and state.sink_key != -1 and self.sink_len:
            self.released.append(state.sink_key)

    def swap_out(self, runner, req_id: str, state: StreamState) -> None:
        """Copy a preempted request's pages (the scheduler frees them this step; nothing
        overwrites them before this step's forward) and park its sink state under a stash key."""
        req_state = runner.requests[req_id]
        blocks = torch.tensor(list(req_state.block_ids[0]), dtype=torch.long)
        pages = [kv.index_select(0, blocks) for kv in runner.kv_caches]
        if state.sink_key >= 0 and self.sink_len:
            self.renamed.append((state.sink_key, self._next_stash))
            state.sink_key = self._next_stash
            self._next_stash -= 1
        self.swapped[req_id] = SwappedOut(state, pages)

    def swap_in(self, runner, req_id: str, n: int, new_rows) -> StreamState:
        """Copy a swapped request's pages into the fresh ones the scheduler gave it.

        The scheduler kept the pages the contract keeps at ``n`` (and may add pages for the
        step's new tokens after them); the copy may hold a few more (eviction the worker had not
        applied yet). They stay in the rows as placeholders for the usual eviction
        (:func:`drop_evicted`) to remove, so prompt, outputs and offset move with them.
        """
        swapped = self.swapped.pop(req_id)
        state = swapped.state
        first = self.sink_len // self.block_size
        extra = (self.evicted(n) - state.dropped) // self.block_size
        fresh = [b for b in new_rows[0] if b != NULL_BLOCK]
        copied = len(swapped.pages[0]) - extra  # the rest of ``fresh`` is for new tokens
        if copied > len(fresh) or copied < first:
            raise RuntimeError(
                f"vllm_sink: request {req_id} resumes with {len(fresh)} pages, its copy has "
                f"{len(swapped.pages[0])} ({extra} evicted since)"
            )
        keep = list(range(first)) + list(range(first + extra, copied + extra))
        src, dst = torch.tensor(keep), torch.tensor(fresh[:copied])
        for kv, pages in zip(runner.kv_caches, swapped.pages, strict=True):
            kv.index_copy_(0, dst, pages.index_select(0, src))
        runner.requests[req_id].block_ids = (fresh[:first] + [NULL_BLOCK] * extra + fresh[first:],)
        if state.sink_key < -1:
            self.renamed.append((state.sink_key, fresh[0]))
            state.sink_key = fresh[0]
        self.streams[req_id] = state
        return state

    def evicted(self, n: int) -> int:
        # geometry.evicted_tokens, inlined: called for every request and step.
        bs = self.block_size
        return max(self.sink_len, (n - self.settings.window_tokens) // bs * bs) - self.sink_len

    def compact_prompt(self, state: StreamState) -> list[int]:
        """``prompt[:sinks] + prompt[ws : ws + room]`` (whole prompt while it fits)."""
        prompt, ws = state.prompt, self.sink_len + state.dropped
        head = prompt[: self.sink_len] if state.dropped else []
        start = ws if state.dropped else 0
        room = self.row_len - len(head)
        return head + prompt[start : start + room]

    def park(self, req_state, state: StreamState) -> bool:
        """Keep a finished stream's state while its pages are parked; False: not kept."""
        rows = req_state.block_ids
        if not self.keep_finished or not rows or not rows[0]:
            return False
        first = rows[0][0]
        self.unpark(first)
        blocks = frozenset(b for row in rows for b in row)
        self.parked[first] = ParkedState(state.dropped, state.offset, blocks)
        for b in blocks:
            self.parked_blocks[b] = first
        return True

    def unpark(self, first: int) -> ParkedState | None:
        """Take a parked stream's state (to resume it, or because its pages were reused)."""
        parked = self.parked.pop(first, None)
        if parked is not None:
            for b in parked.blocks:
                if self.parked_blocks.get(b) == first:
                    del self.parked_blocks[b]
        return parked

    def reclaim(self, block_ids) -> None:
        """Pages handed out anew: any parked stream that owned one of them is gone."""
        for b in block_ids:
            first = self.parked_blocks.get(b)
            if first is not None:
                self.unpark(first)
                if self.sink_len:
                    self.released.append(first)


def continue_stream(tracker: StreamTracker, new, state: StreamState) -> None:
    """``new`` continues ``state``'s stream: compact its block list and computed count.

    The scheduler sends the logical computed count and every block id, with null entries where
    pages were freed; it has already freed the pages this step's eviction rule frees.
    """
    n = new.num_computed_tokens
    evicted = tracker.evicted(n)
    state.prompt = list(new.prompt_token_ids or [])
    state.offset += evicted - state.dropped
    state.dropped = evicted
    state.continued = True
    first = tracker.sink_len // tracker.block_size
    skip = evicted // tracker.block_size
    new.block_ids = tuple(list(ids[:first]) + list(ids[first + skip :]) for ids in new.block_ids)
    new.num_computed_tokens = n - evicted


def drop_evicted(
    tracker: StreamTracker, runner, req_id: str, state: StreamState, evicted: int
) -> None:
    """Drop tokens ``[sinks + state.dropped, sinks + evicted)`` from the request's cached state."""
    req_state = runner.requests[req_id]
    d = evicted - state.dropped
    sink_len = tracker.sink_len
    prompt_len = len(state.prompt)

    def dropped_outputs(e: int) -> int:
        # Output tokens (logical index >= prompt_len) inside the freed range [sinks, sinks + e).
        return max(0, sink_len + e - max(prompt_len, sink_len))

    newly = dropped_outputs(evicted) - dropped_outputs(state.dropped)
    if newly:
        s0 = max(0, sink_len - prompt_len)
        del req_state.output_token_ids[s0 : s0 + newly]
        params = req_state.sampling_params
        if params is not None and params.min_tokens:
            # vLLM's sampler counts min_tokens on this (now shorter) list: lower the worker's
            # count by what left it, so the whole stream's outputs count. A private copy: an
            # in-process engine core shares the params object with its scheduler.
            if not state.own_params:
                params = req_state.sampling_params = params.clone()
                state.own_params = True
            params.min_tokens = max(0, params.min_tokens - newly)
    state.dropped = evicted
    state.offset += d
    req_state.prompt_token_ids = tracker.compact_prompt(state)
    req_state.num_prompt_tokens = len(req_state.prompt_token_ids)
    pages = d // tracker.block_size
    first = sink_len // tracker.block_size
    for block_ids in req_state.block_ids:
        del block_ids[first : first + pages]
    # A request whose min_tokens this lowered keeps vLLM's count only if re-added.
    compact_row(runner.input_batch, req_id, req_state, in_place=not state.own_params)


def compact_row(batch, req_id: str, req_state, in_place: bool = True) -> None:
    """Bring a running request's row of vLLM's persistent batch to its compacted state.

    In place where nothing in the batch keeps more of the request than its row (its tokens,
    prompt length and block ids): a removed request would be re-added by vLLM's own update,
    which rebuilds the whole batch's sampling metadata, every step at tens of streams.
    Otherwise (penalties and min_tokens read the prompt or output counts vLLM cached at
    add time; custom logits processors may keep anything) it is removed and re-added.
    """
    row = batch.req_id_to_index.get(req_id)
    if row is None:
        return
    if not (in_place and _row_is_all_it_keeps(batch, row, req_state)):
        batch.remove_request(req_id)  # re-added by vLLM's own update
        return
    prompt, outputs = req_state.prompt_token_ids, req_state.output_token_ids
    p = len(prompt)
    end = p + len(outputs)
    batch.token_ids_cpu[row, :p] = prompt
    batch.token_ids_cpu[row, p:end] = outputs
    batch.num_prompt_tokens[row] = p
    batch.num_tokens_no_spec[row] = end
    batch.block_table.add_row(req_state.block_ids, row)


_BUILTIN_LOGITS_PROCESSORS = "vllm.v1.sample.logits_processor.builtin"


def _row_is_all_it_keeps(batch, row: int, req_state) -> bool:
    params = req_state.sampling_params
    return (
        params is not None
        and req_state.prompt_token_ids is not None
        and req_state.prompt_embeds is None
        and not params.min_tokens
        and params.frequency_penalty == 0.0
        and params.presence_penalty == 0.0
        and params.repetition_penalty == 1.0
        and not getattr(batch, "use_replayssm", False)
        and getattr(batch, "thinking_budget_state_holder", None) is None
        and not batch.logits_processing_needs_token_ids[row]
        and all(type(p).__module__ == _BUILTIN_LOGITS_PROCESSORS for p in batch.logitsprocs.all)
    )


def continued_state(tracker: StreamTracker, new, swaps) -> StreamState:
    """The state of a new request that starts on computed pages: a parked stream's (scheduler:
    ``SinkWindowManager.resume``) or the prefix cache's (a stream that has evicted nothing).

    Its first live page is one of the stream's, or a copy of it (``swaps``: the stream stays
    parked for others; its sink state is copied too); pages for new tokens come after it.
    """
    page = next(b for b in new.block_ids[0] if b != NULL_BLOCK)
    origin = {dst: src for src, dst in swaps}.get(page, page)
    first = tracker.parked_blocks.get(origin, -1)
    # Continued in place (not copied): the stream ends here, its state goes to this request.
    parked = tracker.parked.get(first) if origin != page else tracker.unpark(first)
    if parked is None:
        if tracker.evicted(new.num_computed_tokens):
            raise RuntimeError(
                f"vllm_sink: request {new.req_id} continues a stream whose worker state "
                f"is gone (page {page})"
            )
        # Prefix-cache pages: what a fresh stream holds at this length.
        parked = ParkedState(0, 0, frozenset())
    if origin != page:
        tracker.copied.append((origin, page))
    return StreamState(prompt=[], dropped=parked.dropped, offset=parked.offset, sink_key=page)


def apply_page_swaps(tracker: StreamTracker, runner, swaps: dict) -> None:
    """Running requests whose shared pages the scheduler swapped for private copies (copied by
    vLLM before this step's forward): their rows and sink state follow the copies."""
    for req_id, pairs in swaps.items():
        state = tracker.streams.get(req_id)
        req_state = runner.requests.get(req_id)
        if state is None or req_state is None:
            continue  # a new request (its rows already name the copies) or one that left
        copy_of = dict(pairs)
        row = req_state.block_ids[0]
        row[:] = [copy_of.get(b, b) for b in row]
        old = state.sink_key
        if old in copy_of:
            tracker.copied.append((old, copy_of[old]))
            state.sink_key = copy_of[old]
            if tracker.sink_len and old not in tracker.parked:
                # The shared page's sink state goes with its last user (settle keeps a key that
                # another live stream still uses; a parked stream's is kept until reclaimed).
                tracker.released.append(old)
        if runner.input_batch.req_id_to_index.get(req_id) is not None:
            runner.input_batch.remove_request(req_id)  # re-added by vLLM from the new rows


def before_update(tracker: StreamTracker, runner, scheduler_output) -> None:
    for req_id in scheduler_output.preempted_req_ids or ():
        # The scheduler frees its pages this step and gives fresh ones back when it resumes.
        state = tracker.streams.pop(req_id, None)
        if state is not None and req_id in runner.requests:
            tracker.swap_out(runner, req_id, state)
    for req_id in scheduler_output.finished_req_ids:
        swapped = tracker.swapped.pop(req_id, None)
        if swapped is not None:  # aborted while preempted
            tracker.release(swapped.state)
        state = tracker.streams.pop(req_id, None)
        req_state = runner.requests.get(req_id)
        if state is None or req_state is None or not tracker.park(req_state, state):
            tracker.release(state)
    swaps = getattr(scheduler_output, "sink_page_swaps", None) or {}
    apply_page_swaps(tracker, runner, swaps)
    cached = scheduler_output.scheduled_cached_reqs
    fresh_blocks = []
    for new in scheduler_output.scheduled_new_reqs:
        state = tracker.streams.get(new.req_id)
        fresh_blocks.extend(new.block_ids)
        if new.num_computed_tokens == 0:
            state = StreamState(prompt=list(new.prompt_token_ids or []))
        elif state is None:
            state = continued_state(tracker, new, swaps.get(new.req_id, ()))
        tracker.streams[new.req_id] = state
        state.prefilled = 0
        state.continued = False
        if new.num_computed_tokens:
            continue_stream(tracker, new, state)
        elif new.block_ids and new.block_ids[0]:
            state.sink_key = new.block_ids[0][0]
        new.prompt_token_ids = tracker.compact_prompt(state)
    if tracker.parked_blocks:  # pages handed out anew may be a parked stream's
        for ids in fresh_blocks:
            tracker.reclaim(ids)
        for ids in cached.new_block_ids:
            for row in ids or ():
                tracker.reclaim(row)
    # Per running request and step: tracker.evicted inlined, lookups hoisted.
    bs, sink_len, window = tracker.block_size, tracker.sink_len, tracker.settings.window_tokens
    streams, resumed_ids = tracker.streams, cached.resumed_req_ids
    computed = cached.num_computed_tokens
    for i, req_id in enumerate(cached.req_ids):
        n = computed[i]
        resumed = req_id in resumed_ids
        swapped_in = resumed and n > 0 and req_id in tracker.swapped
        if swapped_in:
            tracker.swap_in(runner, req_id, n, cached.new_block_ids[i])
        elif resumed:
            # Preempted before it computed anything: a fresh stream over every token so far.
            tracker.release(getattr(tracker.swapped.pop(req_id, None), "state", None))
            if n:
                raise RuntimeError(
                    f"vllm_sink: request {req_id} resumes at token {n} without its pages' copy"
                )
            tokens = cached.all_token_ids.get(req_id)
            req_state = runner.requests[req_id]
            if tokens is None:
                tokens = list(req_state.prompt_token_ids or []) + list(req_state.output_token_ids)
            rows = cached.new_block_ids[i]
            first = rows[0][0] if rows and rows[0] else -1
            state = StreamState(prompt=list(tokens), sink_key=first)
            tracker.streams[req_id] = state
            req_state.prompt_token_ids = tracker.compact_prompt(state)
            req_state.num_prompt_tokens = len(req_state.prompt_token_ids)
            req_state.output_token_ids = []
        if resumed:
            cached.all_token_ids.pop(req_id, None)
        state = streams[req_id]
        evicted = max(sink_len, (n - window) // bs * bs) - sink_len
        if evicted > state.dropped:
            drop_evicted(tracker, runner, req_id, state, evicted)
        computed[i] = n - state.dropped
        if swapped_in:
            # vLLM replaces a resumed request's rows with these: the compacted ones.
            cached.new_block_ids[i] = tuple(list(ids) for ids in runner.requests[req_id].block_ids)


def plan_step(
    tracker: StreamTracker, runner, num_scheduled_tokens: np.ndarray
) -> tuple[list[int], SinkStep]:
    """Each batch row's position offset for this step, and the step's sink work.

    Read from the worker's host-side state only (its block table rows, compact computed
    counts), so planning never waits on the device.
    """
    batch = runner.input_batch
    table = batch.block_table[0].block_table.np
    bs, sink_len = tracker.block_size, tracker.sink_len
    step = SinkStep()
    offsets: list[int] = []
    start = 0  # the row's first token in the batch
    # Per row and step: the arrays read once as lists, lookups hoisted.
    num_reqs, streams, sink_offsets = batch.num_reqs, tracker.streams, tracker.sink_offsets
    computed = batch.num_computed_tokens_cpu[:num_reqs].tolist()  # compact, before this step
    scheduled = num_scheduled_tokens[:num_reqs].tolist()
    first_pages = table[:num_reqs, 0].tolist()
    for row, req_id in enumerate(batch.req_ids[:num_reqs]):
        state = streams[req_id]
        n, q = computed[row], scheduled[row]
        old = state.offset
        if old and n + q + old > tracker.max_position:
            # Rebase: the oldest window token moves right after the sinks (offset 0); its
            # window keys are rotated back by the old offset once.
            state.offset = 0
            if n > sink_len:
                step.rebases.append(WindowRebase(_slots(table[row], sink_len, n, bs), -old))
                tracker.num_rebases += 1
        offsets.append(state.offset)
        logical = n + state.dropped
        if logical < len(state.prompt):
            state.prefilled += min(q, len(state.prompt) - logical)
        if sink_len:
            key = first_pages[row]
            if n and key not in sink_offsets:
                # Starts on computed pages whose sinks have never moved (prefix-cache pages,
                # or a copy of them): their sink tokens are the pristine copy.
                cached = min(n, sink_len)
                step.loads.append(SinkLoad(key, _slots(table[row], 0, cached, bs), sink_len))
                sink_offsets[key] = 0
            if n < sink_len:
                count = min(q, sink_len - n)
                step.captures.append(SinkCapture(key, start, n, count, sink_len))
                if n == 0:
                    sink_offsets[key] = 0  # a new owner of this page
            elif sink_offsets.get(key, 0) != state.offset:
                sink_offsets[key] = state.offset
                step.moves.append(SinkMove(key, _slots(table[row], 0, sink_len, bs), state.offset))
                tracker.num_sink_moves += 1
        start += q
    return offsets, step


def _slots(row: np.ndarray, start: int, stop: int, bs: int) -> torch.Tensor:
    """Cache slots of compact tokens ``[start, stop)`` of one block-table row."""
    tokens = np.arange(start, stop)
    return torch.from_numpy(row[tokens // bs].astype(np.int64) * bs + tokens % bs)
