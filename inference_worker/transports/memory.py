"""In-process pub/sub: `MemoryBroker` (the hub) and `MemoryTransport` (one client of it).

The memory transport exists so that the worker pipeline and the transport contract suite
run without a network, and it is meant to behave like Mosquitto where the worker can
tell the difference:

- routing follows MQTT topic-filter rules (`topics.py`), `$`-topics included;
- a shared group (`options.shared_group`) receives each message once, round-robin
  between members, like `$share/<group>/<filter>`; plain subscribers each get a copy;
- at most `options.receive_maximum` QoS 1 deliveries are outstanding (handed out and not
  acked) per transport; the rest wait in a broker-side backlog, exactly the flow control
  that MQTT 5 Receive Maximum gives the MQTT transport;
- unacked messages of a closed member are dropped, not handed to another member, as
  Mosquitto 2.0 does (design section 11), so tests cannot come to rely on redelivery;
- retained messages (`Outgoing.retain`): the broker keeps the last one per topic and
  hands it to each later plain subscription whose filter matches (shared subscriptions
  get none, MQTT 5 section 4.8.2); an empty retained payload removes it. Live
  subscribers get every retained publish, the empty one included, as from Mosquitto.

There is no module-level hub: whoever needs one creates a `MemoryBroker` and passes it
to every transport that should share it.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

from inference_worker.transports import topics
from inference_worker.transports.base import Delivery, Outgoing, TransportOptions


class DeliveryBuffer:
    """Deliveries waiting for the consumer, with pause and close; event-loop thread only.

    Shared by the memory and MQTT transports so that both pause and end the same way:
    while paused the iterator yields nothing (items stay here, unacked); `close()` ends
    the iterator at once and drops what is left (it was never acked, so a real broker
    redelivers it or, for Mosquitto shared subscriptions, drops it).
    """

    def __init__(self) -> None:
        self._items: deque[Delivery] = deque()
        self._wake = asyncio.Event()
        self._paused = False
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, delivery: Delivery) -> None:
        if not self._closed:
            self._items.append(delivery)
            self._wake.set()

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self._wake.set()

    def close(self) -> None:
        self._closed = True
        self._items.clear()
        self._wake.set()

    def iterate(self) -> AsyncIterator[Delivery]:
        """Deliveries in arrival order until `close()`.

        A plain iterator class rather than an async generator: cancelling a pending
        `__anext__` (e.g. `asyncio.wait_for(anext(it), 1)`) must not end the iteration,
        which it would for a generator.
        """
        return _BufferIterator(self)

    async def next(self) -> Delivery:
        while not self._closed and (self._paused or not self._items):
            self._wake.clear()
            await self._wake.wait()
        if self._closed:
            raise StopAsyncIteration
        return self._items.popleft()


class _BufferIterator:
    def __init__(self, buffer: DeliveryBuffer) -> None:
        self._buffer = buffer

    def __aiter__(self) -> _BufferIterator:
        return self

    async def __anext__(self) -> Delivery:
        return await self._buffer.next()


@dataclass(frozen=True)
class _Message:
    topic: str
    payload: bytes
    qos: int
    headers: Mapping[str, str]
    reply_to: str | None
    correlation: bytes | None
    retain: bool = False


@dataclass(frozen=True)
class _Subscription:
    topic_filter: str
    group: str | None
    transport: MemoryTransport


class MemoryBroker:
    """The in-process hub. Create one per test (or per demo) and share it."""

    def __init__(self) -> None:
        self._subscriptions: list[_Subscription] = []
        # Round-robin position per shared group, keyed like Mosquitto: (group, filter).
        self._next_member: dict[tuple[str, str], int] = {}
        self._retained: dict[str, _Message] = {}

    @property
    def retained(self) -> dict[str, bytes]:
        """Topic -> payload of the retained messages held now."""
        return {topic: m.payload for topic, m in self._retained.items()}

    def attach(
        self, transport: MemoryTransport, filters: tuple[str, ...], group: str | None
    ) -> None:
        for topic_filter in filters:
            topics.validate_filter(topic_filter)
        self._subscriptions.extend(_Subscription(f, group, transport) for f in filters)
        if group is None:
            for topic, message in sorted(self._retained.items()):
                if any(topics.matches(f, topic) for f in filters):
                    transport.offer(message)

    def detach(self, transport: MemoryTransport) -> None:
        self._subscriptions = [s for s in self._subscriptions if s.transport is not transport]

    def publish(self, message: _Message) -> None:
        """Route `message` to every matching plain subscriber and one member per group."""
        topics.validate_topic(message.topic)
        if message.retain and message.payload:
            self._retained[message.topic] = message
        elif message.retain:
            self._retained.pop(message.topic, None)
        plain: dict[int, MemoryTransport] = {}
        groups: dict[tuple[str, str], list[MemoryTransport]] = {}
        for sub in self._subscriptions:
            if not topics.matches(sub.topic_filter, message.topic):
                continue
            if sub.group is None:
                # A client with overlapping plain subscriptions gets one copy.
                plain.setdefault(id(sub.transport), sub.transport)
            else:
                groups.setdefault((sub.group, sub.topic_filter), []).append(sub.transport)
        targets = list(plain.values())
        for key, members in groups.items():
            position = self._next_member.get(key, 0)
            targets.append(members[position % len(members)])
            self._next_member[key] = position + 1
        for transport in targets:
            transport.offer(message)


class MemoryTransport:
    """A `Transport` on a `MemoryBroker`; see the module docstring for its semantics."""

    def __init__(self, broker: MemoryBroker, options: TransportOptions) -> None:
        if options.receive_maximum < 1:
            raise ValueError("receive_maximum must be at least 1")
        self._broker = broker
        self._options = options
        self._buffer = DeliveryBuffer()
        self._backlog: deque[_Message] = deque()
        self._unacked: set[int] = set()
        self._ids = itertools.count()
        self._started = False
        self._closed = False

    @property
    def connected(self) -> bool:
        return self._started and not self._closed

    @property
    def unacked(self) -> int:
        """QoS 1 deliveries handed out and not yet acked (at most receive_maximum)."""
        return len(self._unacked)

    @property
    def backlog(self) -> int:
        """Messages held back because receive_maximum deliveries are outstanding."""
        return len(self._backlog)

    async def start(self) -> None:
        if self._closed:
            raise ConnectionError("transport is closed")
        if not self._started:
            self._broker.attach(self, self._options.subscriptions, self._options.shared_group)
            self._started = True

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._broker.detach(self)
        self._backlog.clear()
        self._unacked.clear()
        self._buffer.close()

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
        self._send(Outgoing(topic, payload, reply_to, correlation, headers))

    def _send(self, m: Outgoing) -> None:
        if not self._started or self._closed:
            raise ConnectionError("memory transport is not started or already closed")
        message = _Message(
            topic=m.topic,
            payload=bytes(m.payload),
            qos=self._options.qos,
            headers=dict(m.headers or {}),
            reply_to=m.reply_to,
            correlation=None if m.correlation is None else bytes(m.correlation),
            retain=m.retain,
        )
        self._broker.publish(message)

    async def publish_many(self, messages: Sequence[Outgoing]) -> list[BaseException | None]:
        results: list[BaseException | None] = []
        for m in messages:
            try:
                topics.validate_publish_topic(m.topic)
                self._send(m)
            except (ConnectionError, ValueError) as exc:
                results.append(exc)
            else:
                results.append(None)
        return results

    def ack_many(self, deliveries: Iterable[Delivery]) -> None:
        for delivery in deliveries:
            delivery.ack()

    def check_topic(self, topic: str) -> None:
        topics.validate_publish_topic(topic)

    def background(self) -> Sequence[asyncio.Task[None]]:
        return ()  # everything happens in the callers' tasks

    def pause(self) -> None:
        self._buffer.pause()

    def resume(self) -> None:
        self._buffer.resume()

    def offer(self, message: _Message) -> None:
        """Called by the broker: queue a routed message, subject to receive_maximum."""
        if self._closed:
            return
        if min(message.qos, self._options.qos) == 0:
            self._buffer.put(self._delivery(message, None))
            return
        self._backlog.append(message)
        self._pump()

    def _pump(self) -> None:
        while self._backlog and len(self._unacked) < self._options.receive_maximum:
            message = self._backlog.popleft()
            token = next(self._ids)
            self._unacked.add(token)
            self._buffer.put(self._delivery(message, token))

    def _delivery(self, message: _Message, token: int | None) -> Delivery:
        return Delivery(
            payload=message.payload,
            topic=message.topic,
            received_at=time.monotonic(),
            headers=dict(message.headers),
            reply_to=message.reply_to,
            correlation=message.correlation,
            acker=None if token is None else partial(self._ack, token),
        )

    def _ack(self, token: int) -> None:
        # Idempotent: a second ack, or an ack after close(), finds nothing to remove.
        if token in self._unacked:
            self._unacked.discard(token)
            self._pump()
