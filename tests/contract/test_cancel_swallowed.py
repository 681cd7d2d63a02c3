"""Loops that call Redis end when cancelled, even when redis-py swallows the cancel
(inference_worker/cancelling.py): a task cancelled while a reply is being read can get
the reply instead of CancelledError. Each loop is cancelled at many points of its Redis
call, against a real Redis; every cancel must end it. Before the fix a worker's heartbeat
kept beating after shutdown cancelled it, and the worker never exited on SIGTERM."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from inference_worker.fleet import Heartbeat
from inference_worker.metrics import Metrics
from inference_worker.pipeline.leases import LeaseBook
from inference_worker.settings import StateSettings
from tests.contract.state_support import redis_store
from tests.servers import Server

ROUNDS = 120


async def _cancel_at_many_points(start: Callable[[], Awaitable[None]]) -> list[int]:
    """Start the loop ROUNDS times, cancel it after 0..13 loop passes; the first round
    where it did not end within 2 s (it swallowed the cancel and went on), if any."""
    stuck = []
    for i in range(ROUNDS):
        task = asyncio.ensure_future(start())
        for _ in range(i % 14):
            await asyncio.sleep(0)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=2)
        if not done:
            stuck.append(i)
            task.cancel()  # and stop: one stuck round is the failure
            await asyncio.wait({task}, timeout=2)
            break
    return stuck


async def test_a_cancelled_heartbeat_ends(redis: Server) -> None:
    store = await redis_store(redis)
    stop = asyncio.Event()
    stop.set()  # draining: the loop that used to outlive its cancel
    beat = Heartbeat(
        store.client, prefix="tc:", name="w", interval_s=0.0, metrics=Metrics(),
        info={}, queue_depth=lambda: 0, draining=lambda: True,
    )  # fmt: skip
    try:
        assert await _cancel_at_many_points(lambda: beat.run(stop)) == []
    finally:
        await store.close()


async def test_a_cancelled_lease_renewal_ends(redis: Server) -> None:
    store = await redis_store(redis)
    book = LeaseBook(store, StateSettings(), Metrics(), sleep=lambda _s: asyncio.sleep(0))

    def start() -> Awaitable[None]:
        # Held anew each round: a renewal Redis refuses (no such lease) drops it from the
        # book, and a book with nothing held would make no Redis call to be cancelled in.
        book.hold(("app", "id"), "nonce:0")
        return book.renew_forever()

    calls = 0
    renew = store.renew

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return await renew(*args, **kwargs)

    store.renew = counted  # type: ignore[method-assign]
    try:
        assert await _cancel_at_many_points(start) == []
        assert calls >= ROUNDS // 2  # the rounds were cancelled around real Redis calls
    finally:
        await store.close()
