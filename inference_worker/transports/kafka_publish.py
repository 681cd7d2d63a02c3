"""Kafka producer side: which topics exist, and sending a group of records at once.

Topic creation. The transport creates the topics the configuration names at start and
nothing else. A publish to any other topic that does not exist fails fast, with
`UnknownTopicOrPartitionError` for that message: one bounded metadata lookup that lists
topics (a request the broker auto-creates nothing for), at most one per `TOPIC_RECHECK_S`,
so a flood of messages addressed to missing topics costs one request per interval. Such a
message is never handed to the producer, because the producer's own metadata request asks
the broker to auto-create the topic (Tansu does; Kafka does with
`auto.create.topics.enable`), and where the broker refuses it waits `request_timeout_ms`.
Topics found to exist are remembered for the transport's lifetime.

Retained messages (`Outgoing.retain`), Kafka's nearest equivalent: the topics named in
`TransportOptions.compacted` are created with `cleanup.policy=compact` (the broker keeps
the last record per key; the sender keys by `correlation`), and a retained message with an
empty payload is sent as a tombstone (null value), which drops the key as an empty
retained publish clears an MQTT topic. A topic that already existed is left as it is.

`send_all` gives the producer every record first (no waiting in between) and then waits
for all of their acknowledgements at once; each message's failure is its own result.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    KafkaError,
    TopicAlreadyExistsError,
    UnknownTopicOrPartitionError,
    for_code,
)

from inference_worker.transports.base import Outgoing, TransportOptions
from inference_worker.transports.kafka_headers import write_headers
from inference_worker.transports.kafka_topics import kafka_topic

log = logging.getLogger("inference_worker.transports.kafka")

TOPIC_RECHECK_S = 1.0
COMPACT = {"cleanup.policy": "compact"}  # the last record per key is kept (retained metadata)
_TOPIC_EXISTS = 36  # Kafka error code TOPIC_ALREADY_EXISTS


class TopicDirectory:
    """The topics known to exist; creates the configured ones, looks the others up."""

    def __init__(
        self,
        where: str,
        *,
        partitions: int,
        lookup_timeout_s: float,
        options: TransportOptions | None = None,
    ) -> None:
        self._where, self._partitions, self._timeout_s = where, partitions, lookup_timeout_s
        # The Kafka names of the topics created compacted.
        self._compacted = frozenset(kafka_topic(t) for t in (options.compacted if options else ()))
        self._existing: set[str] = set()
        self._looked_up_at = -TOPIC_RECHECK_S
        self._lock = asyncio.Lock()
        self.admin: AIOKafkaAdminClient | None = None

    async def create(self, names: Sequence[str]) -> None:
        """Create those of `names` (Kafka names) that do not exist; existing ones untouched."""
        admin = self._admin()
        existing = set(await admin.list_topics())
        missing = [n for n in names if n not in existing]
        if missing:
            configs = {n: COMPACT for n in self._compacted}
            new = [NewTopic(n, self._partitions, 1, topic_configs=configs.get(n)) for n in missing]
            try:
                response = await admin.create_topics(new)
            except TopicAlreadyExistsError:
                response = None
            for name, code, *_ in getattr(response, "topic_errors", ()):
                if code not in (0, _TOPIC_EXISTS):
                    raise for_code(code)(f"cannot create Kafka topic {name!r}")
        self._existing.update(names)

    async def absent(self, names: Iterable[str]) -> dict[str, BaseException]:
        """Those of `names` that do not exist or could not be looked up, each with the error
        its messages get."""
        unknown = set(names) - self._existing
        if not unknown:
            return {}
        async with self._lock:
            unknown -= self._existing  # a lookup that ran meanwhile may have found them
            if unknown and time.monotonic() - self._looked_up_at >= TOPIC_RECHECK_S:
                try:
                    listing = self._admin().list_topics()
                    listed = await asyncio.wait_for(listing, self._timeout_s)
                except (KafkaError, OSError, TimeoutError) as exc:
                    error = ConnectionError(f"Kafka topic lookup at {self._where} failed: {exc!r}")
                    return dict.fromkeys(unknown, error)
                self._looked_up_at = time.monotonic()
                found = unknown.intersection(listed)
                self._existing.update(found)
                unknown -= found
        return {
            name: UnknownTopicOrPartitionError(
                f"Kafka topic {name!r} does not exist (only configured topics are created)"
            )
            for name in unknown
        }

    def _admin(self) -> AIOKafkaAdminClient:
        if self.admin is None:
            raise ConnectionError(f"Kafka transport to {self._where} is not started or closed")
        return self.admin


async def send_all(
    producer: AIOKafkaProducer, directory: TopicDirectory, messages: Sequence[Outgoing]
) -> list[BaseException | None]:
    """Publish `messages`; the result holds None or the exception for each, in order."""
    results: list[BaseException | None] = [None] * len(messages)
    ready: list[tuple[int, str, list[tuple[str, bytes]]]] = []
    for i, message in enumerate(messages):
        try:
            name = kafka_topic(message.topic)
            headers = write_headers(message.headers, message.reply_to, message.correlation)
        except ValueError as exc:
            results[i] = exc
        else:
            ready.append((i, name, headers))
    absent = await directory.absent(name for _, name, _ in ready)
    sent: list[tuple[int, asyncio.Future[Any]]] = []
    for i, name, headers in ready:
        if name in absent:
            results[i] = absent[name]
            continue
        message = messages[i]
        key = None if message.correlation is None else bytes(message.correlation)
        try:
            # retain + empty payload: a tombstone (null value), as MQTT clears a retained one.
            value = None if message.retain and not message.payload else bytes(message.payload)
            future = await producer.send(name, value, key=key, headers=headers)
        except Exception as exc:  # too large, buffer full: this message only
            results[i] = exc
        else:
            sent.append((i, future))
    outcomes = await asyncio.gather(*(f for _, f in sent), return_exceptions=True)
    for (i, _), outcome in zip(sent, outcomes, strict=True):
        if isinstance(outcome, BaseException):
            results[i] = outcome
    return results


async def start_producer(
    where: str, max_message_bytes: int, security_kwargs: dict[str, Any]
) -> tuple[AIOKafkaProducer, bool]:
    """An `acks="all"` producer, idempotent when the broker grants it (feature-detected:
    Tansu refuses InitProducerId). Returns the producer and whether it is idempotent."""
    common: dict[str, Any] = {
        "bootstrap_servers": where,
        "acks": "all",
        "max_request_size": max_message_bytes,
        **security_kwargs,
    }
    producer = AIOKafkaProducer(enable_idempotence=True, **common)
    try:
        await producer.start()
        return producer, True
    except KafkaError as exc:
        await producer.stop()
        log.warning(
            "Kafka at %s refused the idempotent producer (%r): falling back to acks=all "
            "without idempotence; a retried send may duplicate a response",
            where,
            exc,
        )
    producer = AIOKafkaProducer(**common)
    await producer.start()
    return producer, False
