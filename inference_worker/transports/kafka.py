"""Kafka transport on aiokafka: consumer groups, commits of acked records only, backpressure.

Topic names. The worker speaks MQTT-style names; Kafka topics cannot hold `/`, so `/` maps
to `.` on the way out (topics and the `reply_to` header) and `.` to `/` on the way in:
MQTT `request_message/digits` is Kafka `request_message.digits`. Names that are not
`[A-Za-z0-9._-]` once mapped are refused. A wildcard filter becomes a regex subscription:
`+` is one level, `a/#` is `^a([.].*)?$` (the parent `a` is created on start). Patterns never
match a last level `dlq`: MQTT `request_message/#` does not match `request_message.dlq`, and
a worker must not take its own dead letters for requests. New topics show up on metadata
refresh (`metadata_max_age_ms`).

Groups. With `options.shared_group` the consumer joins that group, and a new group starts
at the earliest offset (no request sent before the fleet's first start is skipped).
Without it the transport acts as a plain subscription: a group of its own (unique per
instance) starting at the end of its first partitions ("latest"), and at the beginning of
topics that appear later (all of that came after we subscribed). Those start positions are
committed at once so that a rebalance of the private group cannot reset them and skip.

Commits. Auto-commit is off. A partition's commit point is the highest offset below which
every delivered record was acked, plus one (acks come in any order). It is committed every
`commit_interval_s`, on revocation (rebalance listener) and on close; `CommitFailedError` is
logged only (the new owner reprocesses, the Redis ledger dedupes). An ack from an earlier
assignment generation of its partition is ignored, like the MQTT connection generation.

Backpressure. Beyond `options.receive_maximum` unacked records, `options.buffer` waiting
ones, or while `pause()` holds, all assigned partitions are paused; the consumer keeps
polling (poll interval and heartbeats stay alive) and the event loop never blocks.

Producer. `acks="all"`; the idempotent producer is feature-detected at start (Tansu refuses
InitProducerId: warn and go on without). Key: the `correlation` bytes when given (replies
to one request stay in one partition), else None, so unkeyed requests spread over
partitions and a group splits them; order holds per partition only. `reply_to` and
`correlation_id` are Kafka headers (reserved names) beside the caller's UTF-8 headers.

Security. `options.security` gives `security_protocol` (PLAINTEXT, SSL, SASL_PLAINTEXT,
SASL_SSL), the SASL mechanism (SCRAM-SHA-256/512, PLAIN) with username and password, and
the TLS files (an `ssl_context` from `aiokafka.helpers.create_ssl_context`, TLS ≥ 1.2,
hostname checked); the same keyword arguments (`security_kwargs`) go to the admin client,
the producer and the consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import CommitFailedError, KafkaError, TopicAlreadyExistsError, for_code

from inference_worker.transports import topics
from inference_worker.transports.base import Delivery, TransportOptions
from inference_worker.transports.memory import DeliveryBuffer

log = logging.getLogger(__name__)

DEFAULT_TOPICS = ("request_message", "response_message", "request_message.dlq")
RESERVED_HEADERS = frozenset({"reply_to", "correlation_id"})
_LEGAL = re.compile(r"[A-Za-z0-9._-]{1,249}")
_TOPIC_EXISTS = 36  # Kafka error code TOPIC_ALREADY_EXISTS


def kafka_topic(name: str) -> str:
    """The Kafka name of an MQTT-style topic name (`a/b` → `a.b`); ValueError if illegal."""
    topics.validate_topic(name)
    mapped = name.replace("/", ".")
    if not _LEGAL.fullmatch(mapped) or mapped in (".", ".."):
        raise ValueError(f"topic {name!r} is not a legal Kafka topic name once mapped")
    return mapped


def mqtt_topic(name: str) -> str:
    """The MQTT-style name the worker sees for a Kafka topic (`a.b` → `a/b`)."""
    return name.replace(".", "/")


def subscription_pattern(topic_filter: str) -> str | None:
    """A regex for a wildcard filter (see the module docstring), None for a plain topic."""
    topics.validate_filter(topic_filter)
    levels = topic_filter.split("/")
    if "+" not in levels and "#" not in levels:
        return None
    multi = levels[-1] == "#"
    parts = ["[^.]*" if lv == "+" else re.escape(lv) for lv in (levels[:-1] if multi else levels)]
    if not multi:
        body = r"\.".join(parts)
    elif parts:
        body = r"\.".join(parts) + r"(?:\..*)?"
    else:
        body = ".*"
    return rf"(?!.*\.dlq$){body}"


@dataclass
class _Partition:
    """Ack bookkeeping for one assigned partition in one assignment generation."""

    generation: int
    delivered: deque[int] = field(default_factory=deque)  # offsets above the commit point
    acked: set[int] = field(default_factory=set)
    commit_to: int | None = None
    committed: int | None = None


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, transport: KafkaTransport) -> None:
        self._transport = transport

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._transport._revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._transport._assigned(assigned)


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
        self._ensure = [*dict.fromkeys([*ensure_topics, *plain])]
        self._known: set[str] = set()
        self._topic_lock = asyncio.Lock()
        self._admin: AIOKafkaAdminClient | None = None
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._buffer = DeliveryBuffer()
        self._parts: dict[TopicPartition, _Partition] = {}
        self._generation = 0
        self._first_assignment = True
        self._assigned_once = asyncio.Event()
        self._commit_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._paused = self._started = self._closed = False
        self._stale_acks = 0
        self.idempotent = False  # whether the broker granted the idempotent producer

    @property
    def connected(self) -> bool:
        """Started and not closed (aiokafka reconnects by itself in between)."""
        return self._started and not self._closed

    @property
    def unacked(self) -> int:
        """Delivered records of current assignments not yet acked (≤ receive_maximum)."""
        return sum(len(p.delivered) - len(p.acked) for p in self._parts.values())

    @property
    def stale_acks(self) -> int:
        """Acks ignored because their partition was revoked (or reassigned) since delivery."""
        return self._stale_acks

    def assignment(self) -> frozenset[tuple[str, int]]:
        """The (Kafka topic, partition) pairs this member holds now."""
        return frozenset((tp.topic, tp.partition) for tp in self._parts)

    async def start(self) -> None:
        """Create missing topics, start the producer and, with subscriptions, the consumer;
        return once the consumer holds its first assignment.

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
        await self._create_topics(self._ensure)
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
        listener = _Listener(self)
        if self._patterns:
            alternatives = [re.escape(t) for t in self._plain] + self._patterns
            self._consumer.subscribe(pattern=f"^(?:{'|'.join(alternatives)})$", listener=listener)
        else:
            self._consumer.subscribe(topics=self._plain, listener=listener)
        self._tasks = [
            asyncio.create_task(self._fetch_loop(self._consumer)),
            asyncio.create_task(self._commit_loop()),
        ]

    async def _start_producer(self) -> AIOKafkaProducer:
        """Feature-detect the idempotent producer: the broker may refuse InitProducerId."""
        common: dict[str, Any] = {
            "bootstrap_servers": self.where,
            "acks": "all",
            "max_request_size": self._max_message_bytes,
            **self.security_kwargs,
        }
        producer = AIOKafkaProducer(enable_idempotence=True, **common)
        try:
            await producer.start()
            self.idempotent = True
            return producer
        except KafkaError as exc:
            await producer.stop()
            log.warning(
                "Kafka at %s refused the idempotent producer (%r): falling back to acks=all "
                "without idempotence; a retried send may duplicate a response",
                self.where,
                exc,
            )
        producer = AIOKafkaProducer(**common)
        await producer.start()
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
                await asyncio.wait_for(self._commit(consumer), self._close_timeout_s)
            # The listener's revocation commit finds no consumer now and does nothing.
            self._parts.clear()
            await consumer.stop()
        with contextlib.suppress(Exception):
            if self._producer is not None:
                await self._producer.stop()
        with contextlib.suppress(Exception):
            if self._admin is not None:
                await self._admin.close()

    def deliveries(self) -> AsyncIterator[Delivery]:
        return self._buffer.iterate()

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        reply_to: str | None = None,
        correlation: bytes | None = None,
    ) -> None:
        """Send and wait for the broker's acks=all answer; create the topic on first use."""
        producer = self._producer
        if producer is None or self._closed:
            raise ConnectionError(f"Kafka transport to {self.where} is not started or closed")
        name = kafka_topic(topic)
        if name not in self._known:
            async with self._topic_lock:  # one CreateTopics per new name, not one per send
                await self._create_topics([name])
        record_headers = [(k, str(v).encode()) for k, v in (headers or {}).items()]
        record_headers = [(k, v) for k, v in record_headers if k not in RESERVED_HEADERS]
        if reply_to is not None:
            record_headers.append(("reply_to", kafka_topic(reply_to).encode()))
        if correlation is not None:
            record_headers.append(("correlation_id", bytes(correlation)))
        key = None if correlation is None else bytes(correlation)
        await producer.send_and_wait(name, bytes(payload), key=key, headers=record_headers)

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

    # --- topics ----------------------------------------------------------------------

    async def _create_topics(self, names: Iterable[str]) -> None:
        """Create the topics that do not exist yet; an existing topic is never touched."""
        admin = self._admin
        if admin is None:
            raise ConnectionError(f"Kafka transport to {self.where} is not started or closed")
        wanted = [n for n in dict.fromkeys(names) if n not in self._known]
        if not wanted:
            return
        existing = set(await admin.list_topics())
        missing = [n for n in wanted if n not in existing]
        if missing:
            new = [NewTopic(n, self._partitions, 1) for n in missing]
            try:
                response = await admin.create_topics(new)
            except TopicAlreadyExistsError:
                response = None
            for name, code, *_ in getattr(response, "topic_errors", ()):
                if code not in (0, _TOPIC_EXISTS):
                    raise for_code(code)(f"cannot create Kafka topic {name!r}")
        self._known.update(wanted)

    # --- consumer side ---------------------------------------------------------------

    async def _fetch_loop(self, consumer: AIOKafkaConsumer) -> None:
        """Poll for records within the flow limits; paused partitions keep the poll alive."""
        while not self._closed:
            room = min(
                self._options.receive_maximum - self.unacked,
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
            for tp, records in batches.items():
                part = self._parts.get(tp)
                if part is None:
                    continue  # revoked while the fetch was in flight: the new owner reads it
                for record in records:
                    self._deliver(tp, part, record)

    def _deliver(self, tp: TopicPartition, part: _Partition, record: Any) -> None:
        reply_to: str | None = None
        correlation: bytes | None = None
        headers: dict[str, str] = {}
        for name, value in record.headers or ():
            if name == "reply_to":
                reply_to = mqtt_topic(bytes(value).decode("utf-8", "replace"))
            elif name == "correlation_id":
                correlation = bytes(value)
            else:
                headers[name] = bytes(value or b"").decode("utf-8", "replace")
        part.delivered.append(record.offset)
        self._buffer.put(
            Delivery(
                payload=bytes(record.value or b""),
                topic=mqtt_topic(tp.topic),
                received_at=time.monotonic(),
                headers=headers,
                reply_to=reply_to,
                correlation=correlation,
                acker=_once(partial(self._ack, tp, part.generation, record.offset)),
            )
        )

    def _ack(self, tp: TopicPartition, generation: int, offset: int) -> None:
        part = self._parts.get(tp)
        if part is None or part.generation != generation:
            self._stale_acks += 1
            return
        part.acked.add(offset)
        while part.delivered and part.delivered[0] in part.acked:
            done = part.delivered.popleft()
            part.acked.discard(done)
            part.commit_to = done + 1

    async def _commit_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self._commit_interval_s)
            consumer = self._consumer
            if consumer is not None:
                await self._commit(consumer)

    async def _commit(
        self, consumer: AIOKafkaConsumer, only: set[TopicPartition] | None = None
    ) -> None:
        """Commit every partition's commit point that moved; failures are logged only."""
        async with self._commit_lock:
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
                log.warning("Kafka commit to %s failed: %r; will retry", self.where, exc)
                return
            for tp, offset in offsets.items():
                part = self._parts.get(tp)
                if part is not None:
                    part.committed = offset

    async def _revoked(self, revoked: set[TopicPartition]) -> None:
        consumer = self._consumer
        if consumer is not None:
            await self._commit(consumer, revoked)
        for tp in revoked:
            self._parts.pop(tp, None)

    async def _assigned(self, assigned: set[TopicPartition]) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        self._generation += 1
        for tp in assigned:
            self._parts[tp] = _Partition(self._generation)
        if self._paused:
            consumer.pause(*assigned)
        try:
            if self._options.shared_group is None:
                await self._pin_start_positions(consumer, assigned)
        finally:
            self._first_assignment = False
            self._assigned_once.set()

    async def _pin_start_positions(
        self, consumer: AIOKafkaConsumer, assigned: set[TopicPartition]
    ) -> None:
        """Private group: start new partitions at the end (first assignment) or beginning
        (topics that appeared later) and commit that, so no rebalance resets past it."""
        fresh = [tp for tp in assigned if await consumer.committed(tp) is None]
        if not fresh:
            return
        if self._first_assignment:
            starts = await consumer.end_offsets(fresh)
        else:
            starts = await consumer.beginning_offsets(fresh)
        for tp, offset in starts.items():
            consumer.seek(tp, offset)
        try:
            await consumer.commit(dict(starts))
        except KafkaError as exc:
            log.warning("Kafka commit of start positions failed: %r", exc)


def _once(ack: Callable[[], None]) -> Callable[[], None]:
    """Wrap `ack` so that only its first call counts (Delivery.ack is idempotent)."""
    done = False

    def call() -> None:
        nonlocal done
        if not done:
            done = True
            ack()

    return call
