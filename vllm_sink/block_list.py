"""A request's KV block list with its run of freed pages stored as a count.

vLLM's KV managers index a request's blocks by logical page and mark a freed page with the
shared null block. Under sink eviction every freed page lies in one run right after the sink
pages, so the list is ``[sink pages | n null entries | window pages]`` and the null run grows by
one entry per page for as long as the stream runs. :class:`BlockList` keeps ``n`` as a number:
the same sequence to every reader (indices, ``len``, iteration yield the null block there), in
memory bounded by the sink and window pages.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any


class BlockList:
    """``head + [null] * nulls + tail``; nulls at the front of ``tail`` fold into the count."""

    __slots__ = ("head", "nulls", "tail", "null_block")

    def __init__(
        self, blocks: Iterable[Any], num_head: int, null_block: Any, nulls: int = 0
    ) -> None:
        """``blocks``' first ``num_head`` entries, then ``nulls`` null entries, then the rest."""
        blocks = list(blocks)
        self.head = blocks[:num_head]
        self.nulls = nulls
        self.tail = blocks[num_head:]
        self.null_block = null_block
        self._fold()

    def _fold(self) -> None:
        k = 0
        while k < len(self.tail) and self.tail[k] is self.null_block:
            k += 1
        if k:
            del self.tail[:k]
            self.nulls += k

    def __len__(self) -> int:
        return len(self.head) + self.nulls + len(self.tail)

    def _where(self, index: int) -> tuple[str, int]:
        n = len(self)
        i = index + n if index < 0 else index
        if not 0 <= i < n:
            raise IndexError(f"BlockList index {index} out of range (length {n})")
        if i < len(self.head):
            return "head", i
        i -= len(self.head)
        if i < self.nulls:
            return "null", i
        return "tail", i - self.nulls

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return list(self)[index]
        part, i = self._where(index)
        if part == "null":
            return self.null_block
        return getattr(self, part)[i]

    def __setitem__(self, index: int, block: Any) -> None:
        part, i = self._where(index)
        if part == "null":
            if block is not self.null_block:
                raise ValueError("BlockList: a freed page cannot take a block back")
            return
        getattr(self, part)[i] = block
        if part == "tail" and block is self.null_block:
            self._fold()

    def __iter__(self) -> Iterator[Any]:
        yield from self.head
        for _ in range(self.nulls):
            yield self.null_block
        yield from self.tail

    def __reversed__(self) -> Iterator[Any]:
        yield from reversed(self.tail)
        for _ in range(self.nulls):
            yield self.null_block
        yield from reversed(self.head)

    def __eq__(self, other: object) -> bool:
        return list(self) == list(other)  # type: ignore[call-overload]

    def __repr__(self) -> str:
        return f"BlockList(head={self.head!r}, nulls={self.nulls}, tail={self.tail!r})"

    def append(self, block: Any) -> None:
        self.tail.append(block)
        self._fold()

    def extend(self, blocks: Iterable[Any]) -> None:
        self.tail.extend(blocks)
        self._fold()

    def copy(self) -> BlockList:
        return BlockList([*self.head, *self.tail], len(self.head), self.null_block, self.nulls)

    @property
    def num_stored(self) -> int:
        """Entries held in memory."""
        return len(self.head) + len(self.tail)


def stored_pages(blocks: BlockList | list) -> list[tuple[int, Any]]:
    """(logical index, entry) of what a request's block list holds in memory: every entry of a
    plain list, a :class:`BlockList`'s entries around its freed run."""
    if isinstance(blocks, BlockList):
        after = len(blocks.head) + blocks.nulls
        return [*enumerate(blocks.head), *enumerate(blocks.tail, after)]
    return list(enumerate(blocks))
