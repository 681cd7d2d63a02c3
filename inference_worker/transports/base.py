"""The transport boundary: publish, an async iterator of deliveries, lifecycle.

A transport knows nothing about the wire format, Redis or models. Ack belongs to the
delivery (not to the transport) so that the worker can ack exactly the messages whose
claim is durable, and so that an ack can be tied to the connection that delivered it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from inference_worker_client.frozen import quick_init

from inference_worker.security import TransportSecurity


@quick_init
@dataclass(frozen=True)
class Delivery:
    """One message as received; nothing is acked until `ack()` is called.

    `reply_to` and `correlation` carry MQTT 5 Response Topic / Correlation Data (or the
    Kafka headers of the same meaning); they take precedence over the envelope's
    `reply_to`. `received_at` is `time.monotonic()` at receipt. `headers` are the
    message's other headers / user properties (untrusted; UTF-8 with replacement); the
    worker echoes `traceparent`. `defect` is set when the transport found the message
    itself unusable (e.g. a Kafka header with no value, oversized headers): the worker
    answers it `bad_request` and dead-letters it instead of decoding it, and consumption
    goes on.
    """

    payload: bytes
    topic: str
    received_at: float
    headers: Mapping[str, str] = field(default_factory=dict)
    reply_to: str | None = None
    correlation: bytes | None = None
    acker: Callable[[], None] | None = field(default=None, repr=False, compare=False)
    defect: str | None = None

    def ack(self) -> None:
        """Acknowledge to the source. Idempotent; a no-op for a stale connection."""
        if self.acker is not None:
            self.acker()


@quick_init
@dataclass(frozen=True)
class Outgoing:
    """One message to publish (see `Transport.publish_many`).

    `retain` asks the broker to keep the message as the topic's last value for later
    subscribers (MQTT retained message; an empty retained payload clears it). Transports
    without retained messages map it to their nearest equivalent or ignore it (see each).
    """

    topic: str
    payload: bytes
    reply_to: str | None = None
    correlation: bytes | None = None
    headers: Mapping[str, str] | None = None
    retain: bool = False


@dataclass(frozen=True)
class TransportOptions:
    """What a transport needs beyond its URL.

    `subscriptions` are plain topic filters; `shared_group`, when set, makes every
    subscription a shared one (`$share/<group>/<filter>` on MQTT, a consumer group on
    Kafka) so replicas split the load.
    """

    client_id: str
    subscriptions: tuple[str, ...] = ()
    # Topics the configuration names for publishing (default response topic, dead-letter
    # topic): created at start where the transport creates topics (Kafka), nothing else.
    topics: tuple[str, ...] = ()
    # Those of `topics` that keep the last message per key (Kafka: created with
    # cleanup.policy=compact; the retained model metadata). Others ignore it.
    compacted: tuple[str, ...] = ()
    shared_group: str | None = None
    qos: int = 1
    # Upper bound on unacked messages the broker may push to us (MQTT 5 Receive Maximum).
    receive_maximum: int = 256
    # Upper bound on our own unacknowledged QoS 1 publishes in flight.
    max_inflight: int = 1000
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    keepalive_s: int = 30
    # MQTT 5 session expiry. 0: a fresh session on every connect. >0 with a stable
    # client_id: the broker keeps subscriptions, queued and unacked QoS 1 messages for
    # that long while we are away, and hands them back when the same id reconnects.
    session_expiry_s: int = 0
    # Deliveries buffered inside the transport before the consumer pulls them.
    buffer: int = 1024
    # Credentials and TLS (mqtts://, Kafka SSL/SASL); the default adds none.
    security: TransportSecurity = field(default_factory=TransportSecurity)


@runtime_checkable
class Transport(Protocol):
    """A pub/sub connection. Built by `inference_worker.transports.connect(url, ...)`."""

    async def start(self) -> None:
        """Connect and subscribe; returns once subscriptions are active."""

    async def close(self) -> None:
        """Flush pending publishes (bounded) and disconnect. Idempotent."""

    def deliveries(self) -> AsyncIterator[Delivery]:
        """Messages from the subscriptions, in arrival order; ends after `close()`."""
        ...

    def background(self) -> Sequence[asyncio.Task[None]]:
        """The transport's own long-running tasks (network driver, fetch, commit).

        They run from `start()` to `close()`. The worker watches them: one that ends
        before `close()` (crashed or returned) fails readiness and stops the worker, so
        a dead consumer never leaves a worker serving nothing while looking healthy.
        """
        ...

    def check_topic(self, topic: str) -> None:
        """Raise ValueError when `topic` cannot be published on this transport (its own
        name rules: MQTT length and characters, Kafka's legal names once mapped).

        Called at admission for reply topics, so an answer is never addressed to a
        topic the broker would refuse.
        """

    def ack_many(self, deliveries: Iterable[Delivery]) -> None:
        """Ack a group of deliveries (each idempotent, fenced by its connection)."""

    async def publish_many(self, messages: Sequence[Outgoing]) -> list[BaseException | None]:
        """Publish a group; wait until the broker accepted each (QoS 1 / acks=all).

        Never raises for a message it could not publish: the result, in the order of
        `messages`, holds None for each accepted message and the exception for each
        refused or failed one, so one bad topic cannot fail the rest of a batch.
        """
        ...

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        reply_to: str | None = None,
        correlation: bytes | None = None,
    ) -> None:
        """Publish at the configured QoS; returns once the broker has accepted it."""

    @property
    def connected(self) -> bool:
        """Started, not closed, and (where the protocol has one) the session is up."""
        ...

    def pause(self) -> None:
        """Stop taking new messages from the broker (backpressure)."""

    def resume(self) -> None:
        """Undo `pause()`."""
