"""Kafka transport on aiokafka: consumer groups, commits of acked records only, backpressure.

The details live beside the code that does them: topic names (`kafka_topics`: one-to-one
with MQTT-style names, wildcards as regex subscriptions that never match `dlq`), topic
creation and sends (`kafka_publish`: only configured topics are created; a publish to a
missing one fails fast), commits (`kafka_commits`: only the contiguous acked prefix, acks
fenced by assignment generation), headers (`kafka_headers`: untrusted; a bad record
becomes a `Delivery` with `defect`, so consumption goes on) and groups (`kafka_group`).

Groups. With `options.shared_group` the consumer joins that group, starting a new group
at the earliest offset. Without it the transport acts as a plain subscription: a group of
its own starting at the end of its first partitions and at the beginning of topics that
appear later, positions committed at once so a rebalance cannot skip.

The fetch and commit tasks are `background()`: an unexpected exception is logged and ends
the task (the worker watches them); a `KafkaError` while fetching is retried. Beyond
`options.receive_maximum` unacked records, `options.buffer` waiting ones, or while
`pause()` holds, all assigned partitions are paused while the consumer keeps polling.
The producer uses `acks="all"` (idempotent when the broker grants it), keyed by the
`correlation` bytes when given (retained messages: see `kafka_publish`). `options.security`
gives the same SASL/TLS keyword arguments (`security_kwargs`) to admin, producer, consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from inference_worker.transports.base import Delivery, Outgoing, TransportOptions
from inference_worker.transports.kafka_commits import CommitLedger
from inference_worker.transports.kafka_group import (
    Listener,
    isolate_unreadable,
    logged,
    pin_start_positions,
)
from inference_worker.transports.kafka_headers import (
    UNDECODABLE,
    ReadHeaders,
    read_headers,
    record_delivery,
)
from inference_worker.transports.kafka_publish import TopicDirectory, send_all, start_producer
from inference_worker.transports.kafka_topics import kafka_topic, mqtt_topic, subscription_pattern
from inference_worker.transports.memory import DeliveryBuffer

__all__ = ["DEFAULT_TOPICS", "KafkaTransport", "kafka_topic", "mqtt_topic", "subscription_pattern"]

log = logging.getLogger(__name__)

DEFAULT_TOPICS = ("request_message", "response_message", "request_message.dlq")


class KafkaTransport:
    """A `Transport` over Kafka (see the module docstring for mapping, commits, flow)."""

    def __init__(
        self,
        bootstrap: str,
        options: TransportOptions,
        *,
        partitions: int = 4,
        ensure_topics: Iterable[str] = DEFAULT_TOPICS,
        commit_interval_s: float = 0.1,
        metadata_max_age_ms: int = 5000,
        max_message_bytes: int = 8 * 1024 * 1024,
        connect_timeout_s: float = 30.0,
        close_timeout_s: float = 5.0,
        lookup_timeout_s: float = 5.0,
        fetch_max_wait_ms: int = 20,
        session_timeout_ms: int = 10_000,
    ) -> None:
        if partitions < 1:
            raise ValueError("partitions must be at least 1")
        self.where, self._options, self._partitions = bootstrap, options, partitions
        self._commit_interval_s, self._max_message_bytes = commit_interval_s, max_message_bytes
        self._metadata_max_age_ms = metadata_max_age_ms
        # How long the broker may hold a fetch that has no data yet. aiokafka's default
        # (500 ms) becomes latency on brokers that hold every fetch that long (Tansu:
        # measured ~128 requests per 0.28 s in the benchmark); real Kafka answers at once
        # when data is there, so a short wait only costs a few idle fetches per second.
        self._fetch_max_wait_ms = fetch_max_wait_ms
        # How long a dead member keeps its partitions before the group hands them on (and,
        # on Tansu, about twice how long each join waits for other members). aiokafka's
        # default; heartbeats every third of it, as aiokafka's defaults do.
        self._session_timeout_ms = session_timeout_ms
        # Built once (loads the TLS files now: a bad path fails here, not on start).
        self.security_kwargs = options.security.kafka_kwargs()
        self._connect_timeout_s, self._close_timeout_s = connect_timeout_s, close_timeout_s
        plain, patterns = [], []
        for topic_filter in options.subscriptions:
            pattern = subscription_pattern(topic_filter)
            if pattern is None:
                plain.append(kafka_topic(topic_filter))
            else:
                patterns.append(pattern)
                # The parent of `a/#` exists from the start, so the pattern matches something.
                head = topic_filter.split("/")
                if head[-1] == "#" and len(head) > 1 and "+" not in head:
                    plain.append(kafka_topic("/".join(head[:-1])))
        self._plain, self._patterns = plain, patterns
        wanted = [*ensure_topics, *options.topics]
        self._ensure = [*dict.fromkeys([*(kafka_topic(t) for t in wanted), *plain])]
        self._topics = TopicDirectory(
            bootstrap, partitions=partitions, lookup_timeout_s=lookup_timeout_s, options=options
        )
        self._admin: AIOKafkaAdminClient | None = None
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._buffer = DeliveryBuffer()
        self._ledger = CommitLedger(bootstrap)
        self._first_assignment = True
        self._assigned_once = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._paused = self._started = self._closed = False
        self.idempotent = False  # whether the broker granted the idempotent producer

    @property
    def connected(self) -> bool:
        """Started and not closed (aiokafka reconnects by itself in between)."""
        return self._started and not self._closed

    @property
    def unacked(self) -> int:
        """Delivered records of current assignments not yet acked (≤ receive_maximum)."""
        return self._ledger.unacked

    @property
    def stale_acks(self) -> int:
        """Acks ignored because their partition was revoked (or reassigned) since delivery."""
        return self._ledger.stale_acks

    def assignment(self) -> frozenset[tuple[str, int]]:
        """The (Kafka topic, partition) pairs this member holds now."""
        return frozenset((tp.topic, tp.partition) for tp in self._ledger.partitions())

    def background(self) -> Sequence[asyncio.Task[None]]:
        """The fetch and commit tasks (none without subscriptions); see the module doc."""
        return tuple(self._tasks)

    def check_topic(self, topic: str) -> None:
        """ValueError unless `topic` maps to a legal Kafka topic (`kafka_topics`)."""
        kafka_topic(topic)

    async def start(self) -> None:
        """Create the configured topics, start the producer and, with subscriptions, the
        consumer; return once the consumer holds its first assignment.

        Connecting must succeed within `connect_timeout_s`. The first assignment may take
        longer when the group is still evicting members that died (a session timeout
        plus a rebalance): a member of a shared group then starts anyway, with a warning,
        because its records wait for it in the group; a private consumer (it starts at
        the end of its topics) still fails, or it would miss what is sent meanwhile.
        """
        if self._started or self._closed:
            raise RuntimeError("start() may be called once, before close()")
        self._started = True
        try:
            await asyncio.wait_for(self._start(), self._connect_timeout_s)
        except BaseException as exc:
            await self.close()
            if isinstance(exc, TimeoutError | KafkaError | OSError):
                raise ConnectionError(
                    f"Kafka at {self.where} not ready within {self._connect_timeout_s}s: {exc!r}"
                ) from None
            raise
        if self._consumer is None:
            return
        try:
            await asyncio.wait_for(self._assigned_once.wait(), self._connect_timeout_s)
        except TimeoutError:
            if self._options.shared_group is None:
                await self.close()
                raise ConnectionError(
                    f"Kafka at {self.where}: no partitions assigned within "
                    f"{self._connect_timeout_s}s"
                ) from None
            log.warning(
                "Kafka group %r has not assigned partitions to %s yet (members still being "
                "evicted or rebalancing?); serving once it does",
                self._options.shared_group,
                self._options.client_id,
            )

    async def _start(self) -> None:
        self._admin = AIOKafkaAdminClient(bootstrap_servers=self.where, **self.security_kwargs)
        await self._admin.start()
        self._topics.admin = self._admin
        await self._topics.create(self._ensure)
        self._producer = await self._start_producer()
        if not self._plain and not self._patterns:
            return
        group = self._options.shared_group
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.where,
            client_id=self._options.client_id or None,
            group_id=group or f"iw-{self._options.client_id}-{uuid.uuid4().hex}",
            enable_auto_commit=False,
            auto_offset_reset="earliest" if group else "latest",
            metadata_max_age_ms=self._metadata_max_age_ms,
            max_partition_fetch_bytes=self._max_message_bytes,
            fetch_max_bytes=self._max_message_bytes * 2,
            fetch_max_wait_ms=self._fetch_max_wait_ms,
            session_timeout_ms=self._session_timeout_ms,
            heartbeat_interval_ms=max(100, self._session_timeout_ms // 3),
            **self.security_kwargs,
        )
        # Subscribe only after start(): aiokafka's start() waits for the first assignment
        # when a subscription already exists, and that wait (a dead member's session
        # timeout plus a rebalance) belongs to `start()` above, not to connecting.
        await self._consumer.start()
        listener = Listener(self._revoked, self._assigned)
        if self._patterns:
            alternatives = [re.escape(t) for t in self._plain] + self._patterns
            self._consumer.subscribe(pattern=f"^(?:{'|'.join(alternatives)})$", listener=listener)
        else:
            self._consumer.subscribe(topics=self._plain, listener=listener)
        self._tasks = [
            asyncio.create_task(logged("fetch", self._fetch_loop(self._consumer))),
            asyncio.create_task(logged("commit", self._commit_loop())),
        ]

    async def _start_producer(self) -> AIOKafkaProducer:
        producer, self.idempotent = await start_producer(
            self.where, self._max_message_bytes, self.security_kwargs
        )
        return producer

    async def close(self) -> None:
        """Stop fetching, commit what is acked (bounded), stop clients. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._buffer.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._ledger.commit(consumer), self._close_timeout_s)
            # The listener's revocation commit finds no consumer now and does nothing.
            self._ledger.clear()
            await consumer.stop()
        with contextlib.suppress(Exception):
            if self._producer is not None:
                await self._producer.stop()
        with contextlib.suppress(Exception):
            if self._admin is not None:
                await self._admin.close()

    def deliveries(self) -> AsyncIterator[Delivery]:
        return self._buffer.iterate()

    def ack_many(self, deliveries: Iterable[Delivery]) -> None:
        """Ack each (idempotent; an ack of an earlier assignment generation is ignored)."""
        for delivery in deliveries:
            delivery.ack()

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        reply_to: str | None = None,
        correlation: bytes | None = None,
    ) -> None:
        """Send and wait for the broker's acks=all answer; raise what `publish_many` gives."""
        self._producer_or_raise()
        message = Outgoing(topic, payload, reply_to, correlation, headers)
        (error,) = await self.publish_many([message])
        if error is not None:
            raise error

    async def publish_many(self, messages: Sequence[Outgoing]) -> list[BaseException | None]:
        """Send every record, then wait for all of their acks; errors returned, not raised.

        A message whose topic has no Kafka name gets a ValueError, one whose topic does
        not exist an `UnknownTopicOrPartitionError` (`kafka_publish`).
        """
        try:
            producer = self._producer_or_raise()
        except ConnectionError as exc:
            return [exc] * len(messages)
        return await send_all(producer, self._topics, messages)

    def pause(self) -> None:
        """Pause every assigned partition and the delivery iterator (backpressure)."""
        self._paused = True
        self._buffer.pause()
        if self._consumer is not None:
            self._consumer.pause(*self._consumer.assignment())

    def resume(self) -> None:
        self._paused = False
        self._buffer.resume()
        # The fetch loop resumes the partitions unless other limits still hold.

    def _producer_or_raise(self) -> AIOKafkaProducer:
        if self._producer is None or self._closed:
            raise ConnectionError(f"Kafka transport to {self.where} is not started or closed")
        return self._producer

    # --- consumer side ---------------------------------------------------------------

    async def _fetch_loop(self, consumer: AIOKafkaConsumer) -> None:
        """Poll for records within the flow limits; paused partitions keep the poll alive."""
        while not self._closed:
            room = min(
                self._options.receive_maximum - self._ledger.unacked,
                self._options.buffer - len(self._buffer),
            )
            assignment = consumer.assignment()
            if self._paused or room <= 0:
                consumer.pause(*assignment)
            else:
                consumer.resume(*(consumer.paused() & assignment))
            try:
                batches = await consumer.getmany(timeout_ms=100, max_records=max(room, 1))
            except KafkaError as exc:
                log.warning("Kafka fetch from %s failed: %r; retrying", self.where, exc)
                await asyncio.sleep(0.5)
                continue
            except UnicodeError:  # aiokafka could not decode a record (a header key)
                await self._skip_unreadable(consumer, max(room, 1))
                continue
            for tp, records in batches.items():
                for record in records:
                    self._deliver(tp, record)

    async def _skip_unreadable(self, consumer: AIOKafkaConsumer, limit: int) -> None:
        """Deliver the record aiokafka cannot decode as a defect (without payload: aiokafka
        gives none) and move past it; the readable ones before it are delivered as usual."""
        live = sorted(consumer.assignment() - consumer.paused())
        found = await isolate_unreadable(consumer, live, self._deliver, limit=limit)
        if found is not None:
            tp, offset = found
            log.warning("Kafka record %s[%d]@%d cannot be decoded", tp.topic, tp.partition, offset)
            consumer.seek(tp, offset + 1)
            self._put(tp, offset, b"", ReadHeaders(defect=UNDECODABLE))

    def _deliver(self, tp: TopicPartition, record: Any) -> None:
        value = record.value
        self._put(
            tp,
            record.offset,
            value if isinstance(value, bytes) else b"",
            read_headers(record.headers),
        )

    def _put(self, tp: TopicPartition, offset: int, payload: bytes, read: ReadHeaders) -> None:
        """Buffer one record as a Delivery (never raises); what it cannot use is a defect."""
        if not self._ledger.holds(tp):
            return  # revoked while the fetch was in flight: the new owner reads it
        acker = self._ledger.delivered(tp, offset)
        self._buffer.put(record_delivery(tp.topic, payload, read, acker))

    async def _commit_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self._commit_interval_s)
            consumer = self._consumer
            if consumer is not None:
                await self._ledger.commit(consumer)

    async def _revoked(self, revoked: set[TopicPartition]) -> None:
        consumer = self._consumer
        if consumer is not None:
            await self._ledger.commit(consumer, revoked)
        self._ledger.revoke(revoked)

    async def _assigned(self, assigned: set[TopicPartition]) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        self._ledger.assign(assigned)
        if self._paused:
            consumer.pause(*assigned)
        try:
            if self._options.shared_group is None:
                await pin_start_positions(consumer, assigned, first=self._first_assignment)
        finally:
            self._first_assignment = False
            self._assigned_once.set()
