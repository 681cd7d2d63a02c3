"""The batcher's waiting room: fair between keys (apps), ordered within each.

Entries wait in one queue per key, served weighted round-robin: `popnext` takes up to
`weight(key)` entries from one key before moving to the next, and the rotation carries
over from batch to batch, so a chatty app fills at most its share of each batch while
others wait, instead of everything queued behind it. Within one key the order is
**priority first** (higher first, 0 to 9), then **earliest deadline first** (entries without
a deadline after those with one), then arrival. Priority is strict within its app: a
steady stream of higher-priority requests from an app holds back that app's lower ones
(never another app's, which keep their round-robin share).

Beside the per-key heaps the queue keeps two indexes the batcher times itself by: arrival
order (`oldest`, for the delay flush) and deadline order (`earliest_deadline`,
`pop_deadlines`, to answer what can no longer finish in time without computing it). An
entry leaves all three lazily: it is marked `gone` once, and each index skips marked
entries when it reaches them (compacted when they pile up), so every operation is
O(log n) at most.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

T = TypeVar("T")
R = TypeVar("R")
R_contra = TypeVar("R_contra", contravariant=True)


class Outcome(Protocol[R_contra]):
    """Where an entry's result goes: the `asyncio.Future` its submitter awaits, or
    `DETACHED` when nobody waits for it."""

    def done(self) -> bool: ...
    def set_result(self, result: R_contra, /) -> None: ...
    def set_exception(self, exception: BaseException, /) -> None: ...
    def cancel(self) -> bool: ...


class _Detached:
    """The outcome of an item nobody waits for (`DynamicBatcher.try_put`): never done,
    so the queue never skips it as cancelled, and results are dropped. It saves a future,
    a done callback and its turn through the event loop per item."""

    def done(self) -> bool:
        return False

    def set_result(self, result: object, /) -> None:
        pass

    def set_exception(self, exception: BaseException, /) -> None:
        pass

    def cancel(self) -> bool:
        return False


DETACHED: Outcome[Any] = _Detached()


@dataclass(slots=True, eq=False)
class Entry(Generic[T, R]):
    item: T
    outcome: Outcome[R]  # its submitter's future, or DETACHED
    enqueued_at: float
    key: str = ""
    size: int = 1  # rows
    deadline: float | None = None
    priority: int = 0
    arrived_at: float = 0.0  # when the item's latency started (receipt; else enqueued_at)
    seq: int = 0
    gone: bool = field(default=False, repr=False)

    def order(self) -> tuple[int, float, int]:
        """Within a key: higher priority, then earlier deadline, then earlier arrival."""
        deadline = math.inf if self.deadline is None else self.deadline
        return (-self.priority, deadline, self.seq)


class FairQueue(Generic[T, R]):
    def __init__(self, weight: Callable[[str], int]) -> None:
        self._weight = weight
        self._heaps: dict[str, list[tuple[tuple[int, float, int], Entry[T, R]]]] = {}
        self._order: deque[str] = deque()
        self._left = 0  # entries the key at the head of `_order` may still give
        self._arrivals: deque[Entry[T, R]] = deque()
        self._deadlines: list[tuple[float, int, Entry[T, R]]] = []
        self._seq = 0
        self._len = 0
        self.rows = 0  # sum of the waiting entries' sizes

    def __len__(self) -> int:
        return self._len

    def append(self, entry: Entry[T, R]) -> None:
        entry.seq = self._seq
        self._seq += 1
        heap = self._heaps.get(entry.key)
        if heap is None:
            heap = self._heaps[entry.key] = []
            self._order.append(entry.key)
        heapq.heappush(heap, (entry.order(), entry))
        self._arrivals.append(entry)
        if entry.deadline is not None:
            heapq.heappush(self._deadlines, (entry.deadline, entry.seq, entry))
        self._len += 1
        self.rows += entry.size

    def _discard(self, entry: Entry[T, R]) -> None:
        if not entry.gone:
            entry.gone = True
            self._len -= 1
            self.rows -= entry.size

    # ---- the indexes ------------------------------------------------------------------

    def oldest(self) -> Entry[T, R] | None:
        """The live entry that has waited longest (it decides the delay flush)."""
        q = self._arrivals
        while q and (q[0].gone or q[0].outcome.done()):
            self._discard(q.popleft())
        if len(q) > 2 * self._len + 64:
            q = self._arrivals = deque(e for e in q if not e.gone)
        return q[0] if q else None

    def earliest_deadline(self) -> float | None:
        h = self._deadlines
        while h and (h[0][2].gone or h[0][2].outcome.done()):
            self._discard(heapq.heappop(h)[2])
        if len(h) > 2 * self._len + 64:
            self._deadlines = [t for t in h if not t[2].gone]
            heapq.heapify(self._deadlines)
        return self._deadlines[0][0] if self._deadlines else None

    def pop_deadlines(self, before: float, *, inclusive: bool = False) -> list[Entry[T, R]]:
        """Remove and return the live entries whose deadline is earlier than `before`
        (or equal to it, `inclusive`)."""
        out: list[Entry[T, R]] = []
        while (d := self.earliest_deadline()) is not None and (
            d < before or (inclusive and d == before)
        ):
            entry = heapq.heappop(self._deadlines)[2]
            self._discard(entry)
            out.append(entry)
        return out

    def drop_cancelled(self) -> None:
        """Forget entries at the head of each key whose caller gave up."""
        for key in list(self._order):
            self._clean(key)

    # ---- round-robin --------------------------------------------------------------------

    def _clean(self, key: str) -> None:
        heap = self._heaps[key]
        while heap and (heap[0][1].gone or heap[0][1].outcome.done()):
            self._discard(heapq.heappop(heap)[1])
        if not heap:
            self._remove(key)

    def peeknext(self) -> Entry[T, R] | None:
        """The entry `popnext` would return; None when nothing live is left."""
        while self._order:
            key = self._order[0]
            self._clean(key)
            if key in self._heaps:
                return self._heaps[key][0][1]
        return None

    def popnext(self) -> Entry[T, R] | None:
        entry = self.peeknext()
        if entry is None:
            return None
        key = entry.key
        if self._left <= 0:
            self._left = max(1, self._weight(key))
        heapq.heappop(self._heaps[key])
        self._discard(entry)
        self._left -= 1
        self._clean(key)
        if key in self._heaps and self._left == 0:
            self._order.rotate(-1)
        return entry

    def _remove(self, key: str) -> None:
        if self._order and self._order[0] == key:
            self._left = 0
        self._order.remove(key)
        del self._heaps[key]
