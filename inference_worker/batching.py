"""Per-model dynamic batcher (DESIGN.md section 2, step 5).

Items are queued with their arrival time; one dispatcher task turns them into batches.
A batch leaves when it holds ``max_batch_size`` rows (``size_of``: an item may carry
several), when the oldest item has waited ``max_delay_s``, or on drain, and only while a
concurrency slot is free: while every slot is busy items keep accumulating, so batches
grow with load instead of the worker running many tiny ones.

All timing goes through the injected ``clock`` and ``sleep`` so that tests can drive time
by hand. The dispatcher never polls: it waits on a wakeup event (submit, slot freed,
drain) raced against ``sleep(time until the oldest item is due)``.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class BatcherClosed(Exception):
    """The batcher is draining or drained; the item was not (or will not be) run."""


class BatchOutputMismatch(RuntimeError):
    """A handler returned a different number of results than items: results would be
    mis-assigned, so the whole batch fails instead."""


class DrainTimeout(TimeoutError):
    """`drain` ran out of time; `left` are the items that were never dispatched (their
    futures failed with BatcherClosed), so the caller can hand them on."""

    def __init__(self, message: str, left: list[object]) -> None:
        super().__init__(message)
        self.left = left


class DeadlineExceeded(Exception):
    """The item's deadline passed before it was dispatched; no compute was spent."""


@dataclass(slots=True)
class _Entry(Generic[T, R]):
    item: T
    future: asyncio.Future[R]
    enqueued_at: float
    key: str = ""
    size: int = 1  # rows


class _FairQueue(Generic[T, R]):
    """Waiting entries, one FIFO per key (app), served weighted round-robin.

    With a single key this is a plain FIFO. With several, `popnext` takes up to
    `weight(key)` entries from one key before moving to the next, and the rotation
    carries over from batch to batch, so a chatty app fills at most its share of each
    batch while others wait, instead of everything queued behind it.
    """

    def __init__(self, weight: Callable[[str], int]) -> None:
        self._weight = weight
        self._queues: dict[str, deque[_Entry[T, R]]] = {}
        self._order: deque[str] = deque()
        self._left = 0  # entries the key at the head of `_order` may still give
        self._len = 0
        self.rows = 0  # sum of the waiting entries' sizes

    def __len__(self) -> int:
        return self._len

    def append(self, entry: _Entry[T, R]) -> None:
        q = self._queues.get(entry.key)
        if q is None:
            q = self._queues[entry.key] = deque()
            self._order.append(entry.key)
        q.append(entry)
        self._len += 1
        self.rows += entry.size

    def oldest(self) -> _Entry[T, R]:
        """The entry that has waited longest (it decides the delay flush)."""
        return min((q[0] for q in self._queues.values()), key=lambda e: e.enqueued_at)

    def drop_cancelled(self) -> None:
        """Forget entries at the head of each FIFO whose caller gave up."""
        for key in list(self._order):
            q = self._queues[key]
            while q and q[0].future.done():
                self.rows -= q.popleft().size
                self._len -= 1
            if not q:
                self._remove(key)

    def peeknext(self) -> _Entry[T, R]:
        """The entry `popnext` would return."""
        return self._queues[self._order[0]][0]

    def popnext(self) -> _Entry[T, R]:
        key = self._order[0]
        q = self._queues[key]
        if self._left <= 0:
            self._left = max(1, self._weight(key))
        entry = q.popleft()
        self._len -= 1
        self.rows -= entry.size
        self._left -= 1
        if not q:
            self._remove(key)
        elif self._left == 0:
            self._order.rotate(-1)
        return entry

    def _remove(self, key: str) -> None:
        if self._order and self._order[0] == key:
            self._left = 0
        self._order.remove(key)
        del self._queues[key]


class DynamicBatcher(Generic[T, R]):
    """Collects items into batches for ``handler``; see the module docstring.

    The dispatcher task starts on :meth:`start` or lazily on the first submit, so a
    batcher may be built outside a running loop.
    """

    def __init__(
        self,
        handler: Callable[[list[T]], Awaitable[Sequence[R]]],
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_queue: int,
        max_concurrent: int = 1,
        deadline_of: Callable[[T], float | None] | None = None,
        on_expired: Callable[[list[T]], Awaitable[Sequence[R]]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        name: str = "",
        key_of: Callable[[T], str] | None = None,
        weight_of: Callable[[str], int] = lambda _key: 1,
        size_of: Callable[[T], int] = lambda _item: 1,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_concurrent < 1 or max_delay_s < 0:
            raise ValueError(
                "max_batch_size, max_queue, max_concurrent must be >= 1, max_delay_s >= 0"
            )
        self._handler = handler
        self._max_batch = max_batch_size
        self._max_delay = max_delay_s
        self._max_queue = max_queue
        self._max_concurrent = max_concurrent
        self._deadline_of = deadline_of
        self._on_expired = on_expired
        self._clock = clock
        self._sleep = sleep
        self.name = name
        self._key_of = key_of  # fairness key (the app); None = one FIFO
        # Rows an item adds to a batch: `max_batch_size` bounds rows, not items, so a
        # batch of requests that each carry several rows never exceeds what the model
        # was declared for.
        self._size_of = size_of
        self._queue: _FairQueue[T, R] = _FairQueue(weight_of)
        self._busy_slots = 0
        self._in_flight = 0
        self._closed = False
        self._wakeup = asyncio.Event()  # something changed: re-evaluate dispatch
        self._not_full = asyncio.Event()  # room in the queue (or closed)
        self._not_full.set()
        self._dispatcher: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # running handler / on_expired calls

    # ---- intake -----------------------------------------------------------------------

    @property
    def full(self) -> bool:
        return len(self._queue) >= self._max_queue

    @property
    def queued(self) -> int:
        """Items waiting for dispatch (cancelled ones count until dispatch skips them)."""
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def start(self) -> None:
        """Start the dispatcher on the running loop (idempotent)."""
        if self._dispatcher is None:
            self._dispatcher = asyncio.get_running_loop().create_task(
                self._dispatch_loop(), name=f"batcher-{self.name}"
            )

    def try_submit(self, item: T) -> asyncio.Future[R] | None:
        """Queue ``item`` without waiting; None when the queue is full."""
        if self._closed:
            raise BatcherClosed(self.name)
        if self.full:
            return None
        self.start()
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        key = self._key_of(item) if self._key_of is not None else ""
        self._queue.append(_Entry(item, future, self._clock(), key, self._size_of(item)))
        self._update_not_full()
        self._wakeup.set()
        return future

    async def submit(self, item: T) -> asyncio.Future[R]:
        """Wait (backpressure) while the queue is full, then queue ``item``."""
        while True:
            future = self.try_submit(item)  # raises BatcherClosed once draining
            if future is not None:
                return future
            await self._not_full.wait()

    async def room(self) -> None:
        """Return once there is room in the queue, or once the batcher is closed."""
        while self.full and not self._closed:
            await self._not_full.wait()

    @property
    def closed(self) -> bool:
        return self._closed

    def _update_not_full(self) -> None:
        if self._closed or not self.full:
            self._not_full.set()
        else:
            self._not_full.clear()

    # ---- dispatch ---------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while True:
            self._wakeup.clear()  # cleared before looking, so no set() is ever missed
            self._queue.drop_cancelled()  # callers who gave up must not hold the timer
            self._update_not_full()
            if not self._queue:
                if self._closed:
                    return
                await self._wakeup.wait()
                continue
            if self._busy_slots >= self._max_concurrent:
                await self._wakeup.wait()  # accumulate: the next batch will be bigger
                continue
            # A full queue cannot grow, so waiting for the delay would only add latency.
            due = self._queue.oldest().enqueued_at + self._max_delay
            size_ready = self._queue.rows >= self._max_batch or self.full
            if size_ready or self._closed or self._clock() >= due:
                self._dispatch()
                continue
            await self._wait_any(self._sleep(due - self._clock()), self._wakeup.wait())

    def _dispatch(self) -> None:
        """Pop live items up to ``max_batch_size`` rows, splitting off expired ones.

        An item larger than the whole batch still goes, alone (admission refuses those
        for models; here it must not wedge the queue)."""
        batch: list[_Entry[T, R]] = []
        expired: list[_Entry[T, R]] = []
        now = self._clock()
        rows = 0
        while self._queue:
            nxt = self._queue.peeknext()
            if batch and not nxt.future.done() and rows + nxt.size > self._max_batch:
                break
            entry = self._queue.popnext()
            if entry.future.done():
                continue  # cancelled by the caller
            try:
                deadline = self._deadline_of(entry.item) if self._deadline_of else None
            except Exception as exc:
                entry.future.set_exception(exc)
                continue
            if deadline is not None and deadline < now:
                expired.append(entry)
            else:
                batch.append(entry)
                rows += entry.size
        self._update_not_full()
        if expired:
            if self._on_expired is None:
                for entry in expired:
                    entry.future.set_exception(DeadlineExceeded(self.name))
            else:
                self._spawn(self._run(self._on_expired, expired, uses_slot=False))
        if batch:
            self._busy_slots += 1
            self._in_flight += len(batch)
            self._spawn(self._run(self._handler, batch, uses_slot=True))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(
        self,
        fn: Callable[[list[T]], Awaitable[Sequence[R]]],
        entries: list[_Entry[T, R]],
        *,
        uses_slot: bool,
    ) -> None:
        """Run one batch and route results; any failure stays inside this batch."""
        try:
            results = await fn([e.item for e in entries])
            if len(results) != len(entries):
                raise BatchOutputMismatch(
                    f"{self.name}: handler returned {len(results)} results for {len(entries)} items"
                )
            for entry, result in zip(entries, results, strict=True):
                if not entry.future.done():
                    entry.future.set_result(result)
        except Exception as exc:
            for entry in entries:
                if not entry.future.done():
                    entry.future.set_exception(exc)
        finally:
            for entry in entries:  # only reached undone on cancellation
                entry.future.cancel()
            if uses_slot:
                self._busy_slots -= 1
                self._in_flight -= len(entries)
            self._wakeup.set()

    async def _wait_any(self, *aws: Awaitable[object]) -> bool:
        """Wait until the first awaitable finishes; cancel the rest. True when it was
        the first one. Awaited objects are wrapped, so cancelling us leaks nothing."""
        tasks = [asyncio.ensure_future(a) for a in aws]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
        return tasks[0] in done

    # ---- shutdown ---------------------------------------------------------------------

    # The API takes a timeout (not asyncio.timeout) because it must run on the injected sleep.
    async def drain(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Stop intake, flush the queue without waiting for the delay, and wait for every
        running batch. After ``timeout`` (by the injected sleep), items not yet dispatched
        fail with :class:`BatcherClosed` and :class:`DrainTimeout` (a ``TimeoutError``) is
        raised with them; batches already
        running are left to finish (their handlers own threads we cannot interrupt)."""
        self._closed = True
        self._not_full.set()
        self._wakeup.set()
        if self._queue:
            self.start()
        if timeout is None:
            await self._wait_idle()
            return
        if await self._wait_any(self._wait_idle(), self._sleep(timeout)):
            return
        if self._dispatcher is not None:
            self._dispatcher.cancel()
        left: list[object] = []
        while self._queue:
            entry = self._queue.popnext()
            if not entry.future.done():
                left.append(entry.item)
                entry.future.set_exception(BatcherClosed(self.name))
        raise DrainTimeout(f"batcher {self.name!r} did not drain in {timeout}s", left)

    async def _wait_idle(self) -> None:
        """Wait for the dispatcher to empty the queue and for every batch it started.
        asyncio.wait never cancels what it waits on, so a timed-out drain is harmless."""
        while True:
            pending = set(self._tasks)
            if self._dispatcher is not None and not self._dispatcher.done():
                pending.add(self._dispatcher)
            if not pending:
                return
            await asyncio.wait(pending)
