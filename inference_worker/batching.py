"""Per-model dynamic batcher (DESIGN.md section 2, step 5).

Items are queued with their arrival time; one dispatcher task turns them into batches.
A batch leaves when it holds the policy's row limit (``max_batch_size`` rows at most;
``size_of``: an item may carry several), when the oldest item has waited the policy's
wait, when the item with the earliest deadline must leave to make it, or on drain, and
only while a concurrency slot is free: while every slot is busy items keep accumulating,
so batches grow with load instead of the worker running many tiny ones.

The policy (``batchpolicy``) is the model's fixed ``max_delay_ms``, or a latency target
it aims at with the cost of a batch that the batcher learns from its own batches
(``batchcost``: every batch is timed from dispatch to the handler's return). Which items
a batch takes is the queue's business (``batchqueue``): round-robin between apps, and
within an app priority, then earliest deadline, then arrival. An item that cannot finish
by its deadline given that cost — not even alone — is handed to ``on_expired`` at once,
never computed; one that would miss it inside the batch being formed is too.

All timing goes through the injected ``clock`` and ``sleep`` so that tests can drive time
by hand. The dispatcher never polls: it waits on a wakeup event (submit, slot freed,
drain), which one timer task also sets when the next item is due.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from inference_worker.batchcost import BatchCost
from inference_worker.batchpolicy import BatchPolicy, FixedDelay
from inference_worker.batchqueue import DETACHED, Entry, FairQueue, Outcome

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
        priority_of: Callable[[T], int] = lambda _item: 0,
        arrived_of: Callable[[T], float] | None = None,
        cost: BatchCost | None = None,
        policy: BatchPolicy | None = None,
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
        self._priority_of = priority_of
        self._arrived_of = arrived_of  # when an item's latency started (default: submit)
        # What a batch costs (learned here, from every batch run), and what to do with it.
        self.cost = cost if cost is not None else BatchCost()
        self.policy: BatchPolicy = (
            policy if policy is not None else FixedDelay(max_delay_s, max_batch_size)
        )
        self._queue: FairQueue[T, R] = FairQueue(weight_of)
        self._busy_slots = 0
        self._in_flight = 0
        self._closed = False
        self._wakeup = asyncio.Event()  # something changed: re-evaluate dispatch
        self._not_full = asyncio.Event()  # room in the queue (or closed)
        self._not_full.set()
        self._dispatcher: asyncio.Task[None] | None = None
        self._timer: asyncio.Future[None] | None = None  # wakes the dispatcher (`_arm`)
        self._timer_at = 0.0
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
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._enqueue(item, future)
        return future

    def try_put(self, item: T) -> bool:
        """Queue ``item`` with nobody waiting for its result (the handler's own effects
        are the result); False when the queue is full. Its handler's failures, and its
        expiry when there is no ``on_expired``, are then not reported anywhere: the
        handler and ``on_expired`` must report them themselves."""
        if self._closed:
            raise BatcherClosed(self.name)
        if self.full:
            return False
        self._enqueue(item, DETACHED)
        return True

    def _enqueue(self, item: T, outcome: Outcome[R]) -> None:
        self.start()
        key = self._key_of(item) if self._key_of is not None else ""
        deadline = self._deadline_of(item) if self._deadline_of is not None else None
        size, priority = self._size_of(item), self._priority_of(item)
        now = self._clock()
        arrived = self._arrived_of(item) if self._arrived_of is not None else now
        self._queue.append(Entry(item, outcome, now, key, size, deadline, priority, arrived))
        self._update_not_full()
        self._wakeup.set()

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
        try:
            await self._dispatching()
        finally:
            self._disarm()

    async def _dispatching(self) -> None:
        while True:
            self._wakeup.clear()  # cleared before looking, so no set() is ever missed
            self._queue.drop_cancelled()  # callers who gave up must not hold the timer
            self._expire(self._clock())
            self._update_not_full()
            head = self._queue.oldest()
            if head is None:
                if self._closed:
                    return
                await self._wakeup.wait()
                continue
            now = self._clock()
            hopeless = self._queue.earliest_deadline()  # when it can no longer finish alone
            if hopeless is not None:
                hopeless -= self.cost.mean(1)
            if self._busy_slots >= self._max_concurrent:
                # Accumulate: the next batch will be bigger. Wake for what expires meanwhile.
                if hopeless is not None and hopeless > now:
                    self._arm(hopeless)
                await self._wakeup.wait()
                if hopeless is not None and hopeless > now and self._clock() >= hopeless:
                    # The moment it cannot finish alone any more.
                    self._expire(self._clock(), inclusive=True)
                continue
            origin = self.policy.origin(head.enqueued_at, head.arrived_at)
            limit = self.policy.row_limit(now - origin)
            due = origin + self.policy.wait_s()
            earliest = self._queue.earliest_deadline()
            if earliest is not None:  # leave in time for the tightest deadline
                due = min(due, earliest - self.cost.high(limit))
            # A full queue cannot grow, so waiting for the delay would only add latency.
            size_ready = self._queue.rows >= limit or self.full
            if size_ready or self._closed or now >= due:
                self._dispatch(limit)
                continue
            self._arm(due)
            await self._wakeup.wait()

    def _arm(self, at: float) -> None:
        """Wake the dispatcher at `at` (by the injected clock and sleep). One timer task
        at a time, kept while the moment it wakes for stays the earliest needed: a new
        item behind the same head changes nothing, so it costs no task. A timer that
        rings for a moment no longer needed only makes the dispatcher look again."""
        timer = self._timer
        if timer is not None and not timer.done():
            if self._timer_at <= at:
                return
            timer.cancel()
        self._timer_at = at
        self._timer = asyncio.ensure_future(self._ring(at - self._clock()))

    async def _ring(self, delay: float) -> None:
        await self._sleep(delay)
        self._wakeup.set()

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self, now: float, *, inclusive: bool = False) -> None:
        """Items that cannot finish by their deadline even alone: answered, not computed."""
        hopeless = self._queue.pop_deadlines(now + self.cost.mean(1), inclusive=inclusive)
        if hopeless:
            self._expired(hopeless)

    def _expired(self, entries: list[Entry[T, R]]) -> None:
        if self._on_expired is None:
            for entry in entries:
                entry.outcome.set_exception(DeadlineExceeded(self.name))
        else:
            self._spawn(self._run(self._on_expired, entries, uses_slot=False))

    def _dispatch(self, limit: int) -> None:
        """Pop live items up to `limit` rows, splitting off those that would finish after
        their deadline in this batch.

        An item larger than the whole batch still goes, alone (admission refuses those
        for models; here it must not wedge the queue)."""
        batch: list[Entry[T, R]] = []
        rows = 0
        while (nxt := self._queue.peeknext()) is not None:
            if batch and rows + nxt.size > limit:
                break
            self._queue.popnext()
            batch.append(nxt)
            rows += nxt.size
        finish = self._clock() + self.cost.mean(rows)
        late = [e for e in batch if e.deadline is not None and e.deadline < finish]
        if late:
            batch = [e for e in batch if e.deadline is None or e.deadline >= finish]
            self._expired(late)
        self._update_not_full()
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
        entries: list[Entry[T, R]],
        *,
        uses_slot: bool,
    ) -> None:
        """Run one batch and route results; any failure stays inside this batch. A batch
        that ran (not an `on_expired` call) teaches the cost model what it took."""
        started = self._clock()
        try:
            results = await fn([e.item for e in entries])
            if uses_slot:
                self.cost.observe(sum(e.size for e in entries), self._clock() - started)
            if len(results) != len(entries):
                raise BatchOutputMismatch(
                    f"{self.name}: handler returned {len(results)} results for {len(entries)} items"
                )
            for entry, result in zip(entries, results, strict=True):
                if not entry.outcome.done():
                    entry.outcome.set_result(result)
        except Exception as exc:
            for entry in entries:
                if not entry.outcome.done():
                    entry.outcome.set_exception(exc)
        finally:
            for entry in entries:  # only reached undone on cancellation
                entry.outcome.cancel()
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
        while (entry := self._queue.popnext()) is not None:
            left.append(entry.item)
            entry.outcome.set_exception(BatcherClosed(self.name))
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
