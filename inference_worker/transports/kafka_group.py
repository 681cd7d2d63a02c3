"""Consumer-side helpers of the Kafka transport: the rebalance listener, where a private
group starts reading, finding a record aiokafka cannot decode, and the guard that keeps a
background task's crash visible."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

log = logging.getLogger(__name__)

OnChange = Callable[[set[TopicPartition]], Awaitable[None]]


class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Forwards aiokafka's rebalance callbacks (they run inside the consumer's poll)."""

    def __init__(self, revoked: OnChange, assigned: OnChange) -> None:
        self._revoked, self._assigned = revoked, assigned

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._assigned(assigned)


async def pin_start_positions(
    consumer: AIOKafkaConsumer, assigned: set[TopicPartition], *, first: bool
) -> None:
    """Private group: start partitions without a committed offset at the end (`first`
    assignment: what is already there came before we subscribed) or at the beginning
    (topics that appeared later), and commit that, so no rebalance resets past it."""
    fresh = [tp for tp in assigned if await consumer.committed(tp) is None]
    if not fresh:
        return
    if first:
        starts = await consumer.end_offsets(fresh)
    else:
        starts = await consumer.beginning_offsets(fresh)
    for tp, offset in starts.items():
        consumer.seek(tp, offset)
    try:
        await consumer.commit(dict(starts))
    except KafkaError as exc:
        log.warning("Kafka commit of start positions failed: %r", exc)


async def logged(what: str, body: Coroutine[Any, Any, None]) -> None:
    """Run a background task's body; an unexpected exception is logged and then ends the
    task with that exception, so whoever watches the task sees it (never swallowed)."""
    try:
        await body
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("Kafka %s task died", what)
        raise


async def isolate_unreadable(
    consumer: AIOKafkaConsumer,
    partitions: Iterable[TopicPartition],
    on_record: Callable[[TopicPartition, Any], None],
    *,
    limit: int,
    wait_ms: int = 500,
) -> tuple[TopicPartition, int] | None:
    """After aiokafka itself failed to decode a fetch (a header key that is not UTF-8
    raises UnicodeDecodeError inside `getmany`, and would again on every retry), find the
    record: read each partition one record at a time, handing the readable ones to
    `on_record`, until one raises. Returns its partition and offset (the consumer's
    position there: aiokafka had not consumed it), or None if nothing raised again.

    Nothing is lost by the failed fetch: aiokafka had not moved its position, and it
    discards the failed result. At most `limit` records are read here.
    """
    for tp in partitions:
        for _ in range(max(limit, 1)):
            try:
                batch = await consumer.getmany(tp, timeout_ms=wait_ms, max_records=1)
            except UnicodeError:
                return tp, await consumer.position(tp)
            records = batch.get(tp, [])
            if not records:
                break
            for record in records:
                on_record(tp, record)
                limit -= 1
            if limit <= 0:
                return None
    return None
