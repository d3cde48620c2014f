"""A list that remembers its length but stores only its most recent entries.

A streamed (``output_kind=DELTA``) request's token lists are read by vLLM at their end only:
the last token for stop checks, the tokens since the last full page for block hashing, the
tokens not sent yet for ``stream_interval``. :class:`TailList` keeps those and the logical
length (``len``, indices and slices stay in stream coordinates), so the host holds a bounded
number of entries however long the stream runs. Reading an entry it no longer stores raises
:class:`IndexError` naming the index: a loud error, never a silently shifted answer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any


class TailList:
    """``len(self)`` entries, of which the last ``keep`` or more are stored.

    Trimming is amortized: the stored part grows to ``2 * keep`` entries, then drops to
    ``keep``, so each append costs O(1) on average.
    """

    __slots__ = ("_items", "_start", "keep")

    def __init__(self, items: Iterable[Any] = (), keep: int = 256, start: int = 0) -> None:
        if keep < 1:
            raise ValueError(f"TailList keep must be >= 1, got {keep}")
        self._items = list(items)
        self._start = start  # logical index of self._items[0]
        self.keep = keep

    # -- size -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._start + len(self._items)

    @property
    def num_stored(self) -> int:
        """Entries held in memory."""
        return len(self._items)

    @property
    def start(self) -> int:
        """Logical index of the oldest stored entry."""
        return self._start

    def _trim(self) -> None:
        excess = len(self._items) - self.keep
        if excess >= self.keep:
            del self._items[:excess]
            self._start += excess

    # -- reads --------------------------------------------------------------------------------

    def _local(self, index: int) -> int:
        n = len(self)
        logical = index + n if index < 0 else index
        if not 0 <= logical < n:
            raise IndexError(f"TailList index {index} out of range (length {n})")
        if logical < self._start:
            raise IndexError(
                f"TailList entry {logical} was dropped (stores {self._start}..{n - 1}): "
                "vllm_sink keeps only the tail of a streamed request's history"
            )
        return logical - self._start

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise IndexError("TailList slices must have step 1")
            if stop <= start:
                return []
            if start < self._start:
                raise IndexError(
                    f"TailList slice [{start}:{stop}] reaches dropped entries (stores "
                    f"{self._start}..{len(self) - 1})"
                )
            return self._items[start - self._start : stop - self._start]
        return self._items[self._local(index)]

    def __iter__(self) -> Iterator[Any]:
        if self._start:
            raise IndexError(
                f"cannot iterate a TailList whose first {self._start} entries were dropped"
            )
        return iter(self._items)

    def __contains__(self, item: Any) -> bool:
        return item in iter(self)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TailList):
            return (self._start, self._items) == (other._start, other._items)
        return self._start == 0 and self._items == other

    def __repr__(self) -> str:
        return f"TailList(len={len(self)}, stored={self._items!r})"

    def copy(self) -> TailList:
        return TailList(self._items, self.keep, self._start)

    def index(self, item: Any, start: int = 0, stop: int | None = None) -> int:
        stop = len(self) if stop is None else stop
        for i in range(max(start, self._start), stop):
            if self._items[i - self._start] == item:
                return i
        raise ValueError(f"{item!r} is not in the stored part of the TailList")

    # -- writes -------------------------------------------------------------------------------

    def append(self, item: Any) -> None:
        self._items.append(item)
        self._trim()

    def extend(self, items: Iterable[Any]) -> None:
        self._items.extend(items)
        self._trim()

    def clear(self) -> None:
        self._items.clear()
        self._start = 0

    def __delitem__(self, index: int | slice) -> None:
        """Only deleting a tail (``del x[i:]``) is supported: that is how vLLM truncates."""
        if isinstance(index, slice) and index.step in (None, 1) and index.stop is None:
            start = index.indices(len(self))[0]
            if start < self._start:
                raise IndexError(f"TailList cannot truncate to {start} (stores from {self._start})")
            del self._items[start - self._start :]
            return
        raise TypeError("TailList supports only `del x[i:]`")
