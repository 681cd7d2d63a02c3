"""Which Kafka offsets may be committed: acked records only, acks in any order.

A partition's commit point is the highest offset below which every delivered record was
acked, plus one. Each assignment of a partition is a new generation: an ack from an
earlier generation (the partition was revoked, perhaps handed back since) is ignored and
counted, like an MQTT ack on a stale connection, because its record is the new owner's now.
`commit()` sends the points that moved; `CommitFailedError` (we lost the partition) and
other Kafka errors are logged only: the new owner reprocesses, the Redis ledger dedupes.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

log = logging.getLogger(__name__)


@dataclass
class _Partition:
    """Ack bookkeeping for one assigned partition in one assignment generation."""

    generation: int
    delivered: deque[int] = field(default_factory=deque)  # offsets above the commit point
    acked: set[int] = field(default_factory=set)
    commit_to: int | None = None
    committed: int | None = None


class CommitLedger:
    """Delivered and acked offsets per assigned partition; the commit points they allow."""

    def __init__(self, where: str) -> None:
        self._where = where
        self._parts: dict[TopicPartition, _Partition] = {}
        self._generation = 0
        self._lock = asyncio.Lock()
        self.stale_acks = 0

    @property
    def unacked(self) -> int:
        return sum(len(p.delivered) - len(p.acked) for p in self._parts.values())

    def partitions(self) -> frozenset[TopicPartition]:
        return frozenset(self._parts)

    def holds(self, tp: TopicPartition) -> bool:
        return tp in self._parts

    def assign(self, assigned: Iterable[TopicPartition]) -> None:
        self._generation += 1
        for tp in assigned:
            self._parts[tp] = _Partition(self._generation)

    def revoke(self, revoked: Iterable[TopicPartition]) -> None:
        for tp in revoked:
            self._parts.pop(tp, None)

    def clear(self) -> None:
        self._parts.clear()

    def delivered(self, tp: TopicPartition, offset: int) -> Callable[[], None]:
        """Record a delivery of an assigned partition; returns its (idempotent) acker."""
        part = self._parts[tp]
        part.delivered.append(offset)
        generation, done = part.generation, False

        def ack() -> None:
            nonlocal done
            if not done:
                done = True
                self._ack(tp, generation, offset)

        return ack

    def _ack(self, tp: TopicPartition, generation: int, offset: int) -> None:
        part = self._parts.get(tp)
        if part is None or part.generation != generation:
            self.stale_acks += 1
            return
        part.acked.add(offset)
        while part.delivered and part.delivered[0] in part.acked:
            done = part.delivered.popleft()
            part.acked.discard(done)
            part.commit_to = done + 1

    async def commit(
        self, consumer: AIOKafkaConsumer, only: set[TopicPartition] | None = None
    ) -> None:
        """Commit every partition's commit point that moved; failures are logged only."""
        async with self._lock:
            offsets = {
                tp: p.commit_to
                for tp, p in self._parts.items()
                if p.commit_to is not None
                and p.commit_to != p.committed
                and (only is None or tp in only)
            }
            if not offsets:
                return
            try:
                await consumer.commit(offsets)
            except CommitFailedError as exc:
                log.warning("Kafka commit failed (%s); the new owner will reprocess", exc)
                return
            except KafkaError as exc:
                log.warning("Kafka commit to %s failed: %r; will retry", self._where, exc)
                return
            for tp, offset in offsets.items():
                part = self._parts.get(tp)
                if part is not None:
                    part.committed = offset
