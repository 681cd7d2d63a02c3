"""DynamicBatcher tests: all time is fake (FakeClock), nothing sleeps on real time."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inference_worker.batching import (
    BatcherClosed,
    BatchOutputMismatch,
    DeadlineExceeded,
    DrainTimeout,
    DynamicBatcher,
)


async def settle(rounds: int = 50) -> None:
    """Let every ready task run until the loop is quiet (no real time passes)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


class FakeClock:
    """Monotonic clock plus an async sleep that only returns when the test advances."""

    def __init__(self) -> None:
        self.now = 0.0
        self._waiters: list[tuple[float, asyncio.Future[None]]] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, dt: float) -> None:
        if dt <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((self.now + dt, fut))
        await fut

    @property
    def sleepers(self) -> int:
        return sum(1 for _, f in self._waiters if not f.done())

    async def advance(self, dt: float) -> None:
        """Move time forward, waking sleepers in due order at their exact due time."""
        target = self.now + dt
        await settle()
        while True:
            self._waiters = [(d, f) for d, f in self._waiters if not f.done()]
            due = [d for d, _ in self._waiters if d <= target]
            if not due:
                break
            self.now = min(due)
            for d, f in self._waiters:
                if d <= self.now:
                    f.set_result(None)
            await settle()
        self.now = target
        await settle()


class Handler:
    """Records batches; when gated, each batch blocks until the test releases it."""

    def __init__(self, *, gated: bool = False) -> None:
        self.gated = gated
        self.batches: list[list[Any]] = []
        self.gates: list[asyncio.Event] = []

    async def __call__(self, items: list[Any]) -> Sequence[Any]:
        self.batches.append(list(items))
        if self.gated:
            gate = asyncio.Event()
            self.gates.append(gate)
            await gate.wait()
        return [i * 10 for i in items]


def make(handler: Any, clock: FakeClock, **kw: Any) -> DynamicBatcher[Any, Any]:
    opts: dict[str, Any] = {"max_batch_size": 4, "max_delay_s": 1.0, "max_queue": 100}
    opts.update(kw)
    return DynamicBatcher(handler, clock=clock, sleep=clock.sleep, **opts)


async def test_size_flush_dispatches_at_once() -> None:
    clock, h = FakeClock(), Handler()
    b = make(h, clock, max_batch_size=3)
    futs = [await b.submit(i) for i in range(3)]
    await settle()
    assert h.batches == [[0, 1, 2]]
    assert [f.result() for f in futs] == [0, 10, 20]
    assert clock.now == 0.0
    await b.drain()


async def test_max_batch_size_bounds_rows_not_items() -> None:
    """Items carrying several rows (size_of): a batch never holds more than max_batch_size
    rows, and a full batch's worth of rows flushes at once."""
    clock, h = FakeClock(), Handler()
    rows = {1: 3, 2: 3, 3: 2, 4: 1, 5: 4}
    b = make(h, clock, max_batch_size=4, size_of=lambda item: rows[item])
    futs = [await b.submit(i) for i in rows]
    await clock.advance(2.0)
    await b.drain()
    assert [f.result() for f in futs] == [i * 10 for i in rows]
    assert all(sum(rows[i] for i in batch) <= 4 for batch in h.batches), h.batches
    assert [i for batch in h.batches for i in batch] == list(rows)


async def test_delay_flush_exactly_at_boundary_not_before() -> None:
    clock, h = FakeClock(), Handler()
    b = make(h, clock, max_batch_size=10, max_delay_s=1.0)
    f0 = await b.submit(1)
    await clock.advance(0.5)
    f1 = await b.submit(2)
    await clock.advance(0.25)
    assert h.batches == []
    await clock.advance(0.125)
    f2 = await b.submit(3)  # wakes the dispatcher just before the boundary
    await settle()
    assert h.batches == [] and b.queued == 3
    await clock.advance(0.125)  # now == 1.0: the oldest has waited exactly max_delay_s
    assert h.batches == [[1, 2, 3]]
    assert (f0.result(), f1.result(), f2.result()) == (10, 20, 30)
    await b.drain()


async def test_zero_delay_dispatches_whatever_is_queued() -> None:
    clock, h = FakeClock(), Handler()
    b = make(h, clock, max_delay_s=0.0)
    f = await b.submit(7)
    await settle()
    assert h.batches == [[7]] and f.result() == 70
    await b.drain()


async def test_max_batch_size_respected_when_more_queued() -> None:
    clock, h = FakeClock(), Handler()
    b = make(h, clock, max_batch_size=2)
    for i in range(5):
        b.try_submit(i)
    await settle()
    assert h.batches == [[0, 1], [2, 3]]
    assert b.queued == 1
    await clock.advance(1.0)
    assert h.batches == [[0, 1], [2, 3], [4]]
    await b.drain()


async def test_accumulates_while_slot_busy_so_next_batch_is_bigger() -> None:
    clock, h = FakeClock(), Handler(gated=True)
    b = make(h, clock, max_batch_size=8, max_concurrent=1)
    await b.submit(0)
    await clock.advance(1.0)
    assert h.batches == [[0]] and b.in_flight == 1
    for i in range(1, 6):
        await b.submit(i)
    await clock.advance(5.0)  # way past the delay, but the only slot is busy
    assert len(h.batches) == 1 and b.queued == 5
    h.gates[0].set()
    await settle()
    assert h.batches == [[0], [1, 2, 3, 4, 5]]
    h.gates[1].set()
    await b.drain()


async def test_max_concurrent_runs_batches_concurrently() -> None:
    clock, h = FakeClock(), Handler(gated=True)
    b = make(h, clock, max_batch_size=2, max_concurrent=2)
    futs = [await b.submit(i) for i in range(6)]
    await settle()
    assert h.batches == [[0, 1], [2, 3]]  # both running, neither finished
    assert b.in_flight == 4 and b.queued == 2
    h.gates[1].set()
    await settle()
    assert futs[2].done() and not futs[0].done()
    assert h.batches[2] == [4, 5]
    h.gates[0].set()
    h.gates[2].set()
    await b.drain()
    assert [f.result() for f in futs] == [i * 10 for i in range(6)]


async def test_backpressure_submit_blocks_until_dispatch() -> None:
    clock, h = FakeClock(), Handler(gated=True)
    b = make(h, clock, max_batch_size=2, max_queue=2)
    for i in range(4):
        await b.submit(i)  # [0, 1] runs; [2, 3] waits for the only slot
    await settle()
    assert b.full and b.queued == 2 and b.try_submit(9) is None
    blocked = asyncio.create_task(b.submit(4))
    waiter = asyncio.create_task(b.room())
    await clock.advance(10.0)
    assert not blocked.done() and not waiter.done()
    h.gates[0].set()  # slot frees, [2, 3] dispatches, room appears
    await settle()
    assert blocked.done() and waiter.done()
    assert h.batches == [[0, 1], [2, 3]] and b.queued == 1
    h.gates[1].set()
    drain = asyncio.create_task(b.drain())
    await settle()
    h.gates[2].set()
    await drain
    assert blocked.result().result() == 40


async def test_full_queue_flushes_without_waiting_for_delay() -> None:
    clock, h = FakeClock(), Handler()
    b = make(h, clock, max_batch_size=10, max_queue=3)
    for i in range(3):
        await b.submit(i)
    await settle()
    assert h.batches == [[0, 1, 2]]  # more items cannot arrive; waiting adds only latency
    await b.drain()


async def test_expired_items_go_to_on_expired_and_take_no_batch_slot() -> None:
    clock, h = FakeClock(), Handler()
    expired_calls: list[list[tuple[int, float | None]]] = []

    async def on_expired(items: list[tuple[int, float | None]]) -> Sequence[str]:
        expired_calls.append(items)
        return ["expired"] * len(items)

    async def handler(items: list[tuple[int, float | None]]) -> Sequence[int]:
        return await h([v for v, _ in items])

    b: DynamicBatcher[tuple[int, float | None], Any] = DynamicBatcher(
        handler,
        max_batch_size=2,
        max_delay_s=1.0,
        max_queue=10,
        deadline_of=lambda it: it[1],
        on_expired=on_expired,
        clock=clock,
        sleep=clock.sleep,
    )
    clock.now = 10.0
    fa = b.try_submit((1, 20.0))
    fb = b.try_submit((2, 5.0))
    fc = b.try_submit((3, None))
    assert fa and fb and fc
    await settle()
    assert h.batches == [[1, 3]]
    assert expired_calls == [[(2, 5.0)]]
    assert (fa.result(), fb.result(), fc.result()) == (10, "expired", 30)
    await b.drain()


async def test_expired_without_on_expired_gets_deadline_exceeded() -> None:
    clock, h = FakeClock(), Handler()
    # Past its deadline on arrival (one due before the delay would make the batch leave
    # early instead: tests/unit/test_batch_deadlines.py).
    b = make(h, clock, deadline_of=lambda it: -0.5 if it == 2 else None)
    f1, f2 = await b.submit(1), await b.submit(2)
    await clock.advance(1.0)
    assert h.batches == [[1]] and f1.result() == 10
    with pytest.raises(DeadlineExceeded):
        f2.result()
    await b.drain()


async def test_output_count_mismatch_fails_only_that_batch() -> None:
    clock = FakeClock()

    async def handler(items: list[int]) -> Sequence[int]:
        return [0] if 0 in items else [i * 10 for i in items]

    b = make(handler, clock, max_batch_size=2)
    futs = [await b.submit(i) for i in range(4)]
    await settle()
    for f in futs[:2]:
        with pytest.raises(BatchOutputMismatch):
            f.result()
    assert [f.result() for f in futs[2:]] == [20, 30]
    await b.drain()


async def test_handler_exception_isolated_and_batcher_keeps_serving() -> None:
    clock = FakeClock()

    async def handler(items: list[int]) -> Sequence[int]:
        if 0 in items:
            raise ValueError("boom")
        return [i * 10 for i in items]

    b = make(handler, clock, max_batch_size=2)
    futs = [await b.submit(i) for i in range(4)]
    await settle()
    for f in futs[:2]:
        with pytest.raises(ValueError, match="boom"):
            f.result()
    assert [f.result() for f in futs[2:]] == [20, 30]
    later = await b.submit(9)
    await clock.advance(1.0)
    assert later.result() == 90
    await b.drain()


async def test_cancelled_futures_are_skipped() -> None:
    clock, h = FakeClock(), Handler()
    b = make(h, clock, max_batch_size=10)
    futs = [await b.submit(i) for i in range(4)]
    futs[0].cancel()
    futs[2].cancel()
    await clock.advance(1.0)
    assert h.batches == [[1, 3]]
    assert (futs[1].result(), futs[3].result()) == (10, 30)
    await b.drain()


async def test_drain_flushes_without_delay_and_waits_for_running() -> None:
    clock, h = FakeClock(), Handler(gated=True)
    b = make(h, clock, max_batch_size=2, max_delay_s=100.0)
    futs = [await b.submit(i) for i in range(5)]
    await settle()
    assert h.batches == [[0, 1]]
    drain = asyncio.create_task(b.drain())
    await settle()
    assert not drain.done() and clock.now == 0.0
    for i in range(3):
        h.gates[i].set()
        await settle()
    assert h.batches == [[0, 1], [2, 3], [4]]
    assert drain.done() and drain.result() is None
    assert [f.result() for f in futs] == [i * 10 for i in range(5)]
    assert b.queued == 0 and b.in_flight == 0


async def test_submit_after_drain_raises_batcher_closed() -> None:
    clock, h = FakeClock(), Handler(gated=True)
    b = make(h, clock, max_batch_size=1, max_queue=1)
    await b.submit(0)
    await b.submit(1)  # 0 runs, 1 fills the queue
    blocked = asyncio.create_task(b.submit(2))
    await settle()
    assert not blocked.done()
    drain = asyncio.create_task(b.drain())
    await settle()
    h.gates[0].set()
    await settle()
    h.gates[1].set()
    await drain
    with pytest.raises(BatcherClosed):
        await b.submit(3)
    with pytest.raises(BatcherClosed):
        b.try_submit(4)
    with pytest.raises(BatcherClosed):
        await blocked  # a submitter blocked by backpressure is released, not stranded
    await b.room()  # returns at once when closed


async def test_drain_timeout_fails_undispatched_and_leaves_running_alone() -> None:
    clock, h = FakeClock(), Handler(gated=True)
    b = make(h, clock, max_batch_size=2)
    futs = [await b.submit(i) for i in range(4)]
    await settle()
    drain = asyncio.create_task(b.drain(timeout=5.0))
    await clock.advance(5.0)
    assert drain.done()
    with pytest.raises(TimeoutError):
        drain.result()
    for f in futs[2:]:
        with pytest.raises(BatcherClosed):
            f.result()
    assert not futs[0].done() and b.in_flight == 2
    h.gates[0].set()
    await settle()
    assert [f.result() for f in futs[:2]] == [0, 10]
    await b.drain()


async def test_dispatcher_does_not_spin_while_idle() -> None:
    clock, h = FakeClock(), Handler()
    b = make(h, clock)
    await b.submit(1)
    await settle()
    assert clock.sleepers == 1  # one timer for the oldest item, not a poll loop
    await clock.advance(1.0)
    await settle()
    assert clock.sleepers == 0
    await b.drain()


def test_rejects_invalid_settings() -> None:
    async def handler(items: list[int]) -> Sequence[int]:
        return items

    for bad in (
        {"max_batch_size": 0},
        {"max_queue": 0},
        {"max_concurrent": 0},
        {"max_delay_s": -1.0},
    ):
        opts: dict[str, Any] = {"max_batch_size": 1, "max_delay_s": 0.0, "max_queue": 1}
        opts.update(bad)
        with pytest.raises(ValueError):
            DynamicBatcher(handler, **opts)


# ---- property test ------------------------------------------------------------------

_ops = st.lists(
    st.one_of(
        st.tuples(st.just("submit"), st.integers(1, 6)),
        st.tuples(st.just("advance"), st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0])),
    ),
    max_size=30,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=_ops,
    max_batch=st.integers(1, 5),
    max_queue=st.integers(1, 8),
    max_concurrent=st.integers(1, 3),
    delay=st.sampled_from([0.0, 0.5, 1.0]),
    work=st.sampled_from([0.0, 0.25, 1.0]),
)
def test_random_schedules_keep_invariants(
    ops: list[tuple[str, Any]],
    max_batch: int,
    max_queue: int,
    max_concurrent: int,
    delay: float,
    work: float,
) -> None:
    asyncio.run(_scenario(ops, max_batch, max_queue, max_concurrent, delay, work))


async def _scenario(
    ops: list[tuple[str, Any]],
    max_batch: int,
    max_queue: int,
    max_concurrent: int,
    delay: float,
    work: float,
) -> None:
    clock = FakeClock()
    batches: list[tuple[float, list[int]]] = []
    submitted_at: dict[int, float] = {}
    active = peak = 0
    draining = False

    async def handler(items: list[int]) -> Sequence[int]:
        nonlocal active, peak
        batches.append((clock.now, list(items)))
        # A batch leaves early only when it is big enough, the queue is full, or draining.
        assert (
            len(items) >= min(max_batch, max_queue)
            or draining
            or clock.now >= submitted_at[items[0]] + delay
        )
        active += 1
        peak = max(peak, active)
        await clock.sleep(work)
        active -= 1
        return [i * 10 for i in items]

    b = make(
        handler,
        clock,
        max_batch_size=max_batch,
        max_queue=max_queue,
        max_concurrent=max_concurrent,
        max_delay_s=delay,
    )
    accepted: list[tuple[int, asyncio.Future[int]]] = []
    seq = 0
    for op, arg in ops:
        if op == "submit":
            for _ in range(arg):
                submitted_at[seq] = clock.now
                fut = b.try_submit(seq)
                if fut is not None:
                    accepted.append((seq, fut))
                seq += 1
        else:
            await clock.advance(arg)
        assert b.queued <= max_queue
    draining = True
    drain = asyncio.create_task(b.drain())
    for _ in range(200):
        if drain.done():
            break
        await clock.advance(1.0)
    assert drain.done()
    drain.result()

    assert all(len(items) <= max_batch for _, items in batches)
    assert peak <= max_concurrent
    dispatched = [i for _, items in batches for i in items]
    assert dispatched == [i for i, _ in accepted]  # FIFO, each exactly once
    for i, fut in accepted:
        assert fut.result() == i * 10


async def test_competing_apps_share_batches_round_robin_by_weight() -> None:
    """A chatty app that queued 60 items first cannot starve a quiet one: the quiet app's
    items ride in the very next batch, and weights set the shares."""
    clock = FakeClock()
    batches: list[list[str]] = []
    gate = asyncio.Event()

    async def handler(items: list[str]) -> list[str]:
        batches.append(items)
        await gate.wait()
        return items

    weights = {"chatty": 1, "quiet": 1, "gold": 3}
    batcher: DynamicBatcher[str, str] = DynamicBatcher(
        handler,
        max_batch_size=8,
        max_delay_s=0.0,
        max_queue=1000,
        clock=clock,
        sleep=clock.sleep,
        key_of=lambda item: item.split("-")[0],
        weight_of=weights.__getitem__,
    )
    first = [await batcher.submit(f"chatty-{i}") for i in range(60)]
    await settle()  # the first batch (all chatty: nobody else was waiting) is now running
    later = [await batcher.submit(f"quiet-{i}") for i in range(4)]
    later += [await batcher.submit(f"gold-{i}") for i in range(9)]
    gate.set()
    await asyncio.gather(*first, *later)
    assert batches[0] == [f"chatty-{i}" for i in range(8)]
    second = batches[1]
    # Round-robin with weights 1 (chatty), 1 (quiet), 3 (gold): 1 + 1 + 3 per round.
    assert second == [
        "chatty-8",
        "quiet-0",
        "gold-0",
        "gold-1",
        "gold-2",
        "chatty-9",
        "quiet-1",
        "gold-3",
    ]
    # The rotation carries over: gold finishes its share, then the cycle goes on.
    assert batches[2] == [
        "gold-4", "gold-5", "chatty-10", "quiet-2", "gold-6", "gold-7", "gold-8", "chatty-11",
    ]  # fmt: skip
    quiet_done = max(i for i, b in enumerate(batches) if any(x.startswith("quiet") for x in b))
    assert quiet_done == 3, f"quiet finished in batch {quiet_done}; FIFO would take batch 8"


# ---- try_put: items nobody waits for -------------------------------------------------


async def test_put_items_batch_like_submitted_ones() -> None:
    """Put items batch, flush and keep their order as submitted ones do, mixed with them,
    and a full queue says so instead of growing."""
    clock, h = FakeClock(), Handler()
    b = make(h, clock, max_batch_size=3, max_queue=4)
    assert b.try_put(1) and b.try_put(2)
    fut = b.try_submit(3)
    assert fut is not None
    await settle()
    assert h.batches == [[1, 2, 3]] and fut.result() == 30
    h.gated = True
    assert b.try_put(4)
    await clock.advance(1.0)  # the delay flush takes the lone put item
    assert h.batches[-1] == [4]
    assert all(b.try_put(i) for i in range(10, 14)) and b.full  # the one slot is busy
    assert not b.try_put(99)
    h.gated = False
    h.gates[0].set()
    await b.drain()
    assert [i for batch in h.batches for i in batch] == [1, 2, 3, 4, 10, 11, 12, 13]


async def test_put_items_expire_to_on_expired_and_failures_stay_in_their_batch() -> None:
    clock = FakeClock()
    ran: list[list[int]] = []
    expired: list[list[int]] = []

    async def handler(items: list[int]) -> Sequence[int]:
        ran.append(items)
        if 0 in items:
            raise ValueError("boom")
        return items

    async def on_expired(items: list[int]) -> Sequence[int]:
        expired.append(items)
        return items

    b = make(
        handler, clock, max_batch_size=2, on_expired=on_expired,
        deadline_of=lambda it: -1.0 if it == 7 else None,
    )  # fmt: skip
    for i in (0, 1, 7, 2, 3):
        assert b.try_put(i)
    await clock.advance(1.0)
    assert expired == [[7]]
    assert ran == [[0, 1], [2, 3]]  # the failing batch did not stop the next one
    await b.drain()
    with pytest.raises(BatcherClosed):
        b.try_put(5)


async def test_drain_timeout_hands_back_put_items() -> None:
    clock, h = FakeClock(), Handler(gated=True)
    b = make(h, clock, max_batch_size=2)
    for i in range(4):
        assert b.try_put(i)
    await settle()
    drain = asyncio.create_task(b.drain(timeout=5.0))
    await clock.advance(5.0)
    with pytest.raises(DrainTimeout) as info:
        drain.result()
    assert info.value.left == [2, 3]
    h.gates[0].set()
    await settle()
    await b.drain()
