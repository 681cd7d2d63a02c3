"""Intake: pull deliveries off the transport and form claim groups.

Memory is bounded in bytes, not in message counts: every delivery takes its wire size
from the worker's `ByteBudget` before it is queued here, and a job keeps holding bytes
(its decoded size) until it is answered. While the budget is spent this stage stops
pulling, the transport's own window fills (MQTT Receive Maximum, Kafka pause) and the
broker holds the rest. A group is bounded by count and by bytes, so one Redis call never
carries more than `claim_group_max_bytes` of journal.
"""

from __future__ import annotations

import asyncio
from collections import deque

from inference_worker.transports.base import Delivery, Transport


class ByteBudget:
    """Bytes held by requests between receipt and answer; event-loop thread only.

    `acquire` waits while the budget is spent; one request may overshoot it by its own
    size (otherwise a request larger than the budget could never be served).
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the byte budget must be at least 1 byte")
        self.limit = limit
        self._used = 0
        self._room = asyncio.Event()
        self._room.set()

    @property
    def used(self) -> int:
        return self._used

    async def acquire(self, n: int) -> None:
        while self._used >= self.limit:
            self._room.clear()
            await self._room.wait()
        self._used += n

    def adjust(self, delta: int) -> None:
        """Change what a held request counts (wire size → decoded size) without waiting."""
        self._used += delta
        self._signal()

    def release(self, n: int) -> None:
        self._used -= n
        self._signal()

    def _signal(self) -> None:
        if self._used < self.limit:
            self._room.set()


class Intake:
    """Deliveries pulled and waiting for admission, handed out as bounded groups."""

    def __init__(
        self, transport: Transport, budget: ByteBudget, *, max_count: int, max_bytes: int
    ) -> None:
        self._transport = transport
        self._budget = budget
        self._max_count = max(1, max_count)
        self._max_bytes = max(1, max_bytes)
        self._waiting: deque[Delivery] = deque()
        self._arrived = asyncio.Event()
        self._ended = False

    @property
    def depth(self) -> int:
        return len(self._waiting)

    async def pull(self) -> None:
        """Until the transport's iterator ends (close) or this task is cancelled."""
        try:
            async for delivery in self._transport.deliveries():
                await self._budget.acquire(len(delivery.payload))
                self._waiting.append(delivery)
                self._arrived.set()
        finally:
            self.end()

    def end(self) -> None:
        """No more groups after what is queued; `next_group` returns None once empty."""
        self._ended = True
        self._arrived.set()

    def drop_waiting(self) -> int:
        """Forget unclaimed deliveries (shutdown): never acked, the broker still has them."""
        dropped = 0
        while self._waiting:
            dropped += 1
            self._budget.release(len(self._waiting.popleft().payload))
        return dropped

    async def next_group(self) -> list[Delivery] | None:
        """The next group: at least one delivery, at most max_count / max_bytes."""
        while not self._waiting:
            if self._ended:
                return None
            self._arrived.clear()
            await self._arrived.wait()
        group = [self._waiting.popleft()]
        size = len(group[0].payload)
        while self._waiting and len(group) < self._max_count:
            nxt = len(self._waiting[0].payload)
            if size + nxt > self._max_bytes:
                break
            group.append(self._waiting.popleft())
            size += nxt
        return group
