"""MQTT 5 transport on the asyncio event loop, with its own small packet codec.

Threads. None of its own: the connection is an asyncio protocol (`mqtt_connection`),
packets are parsed and built by `mqtt_packets`, and every callback (messages, PUBACKs,
connect, disconnect) runs on the loop. `publish()` and `ack()` only queue a packet; the
packets queued in one pass of the loop go out in one write. So nothing here takes a
lock or hops threads. (paho-mqtt, which the client library uses, is not on the worker's
path: its per-byte reads and per-message objects cost a quarter of the loop's time.)

Connection. One task (`background()`, see `mqtt_connection`) keeps the session up:
non-blocking connect, CONNACK and SUBACK, keepalive, reconnect with backoff and
resubscribe. It ends only with an error, and the worker watches it.

Acks and connections. A PUBACK names a packet id, not a connection: after a reconnect
an old id would ack whatever the broker now sends with that id. Every delivery's acker
captures the connection generation (incremented on each CONNACK) and acks only while
that generation is still connected; otherwise the ack is dropped and counted in
`stale_acks` (the broker redelivers the message, or drops it for a shared subscription).
Deliveries of a lost connection that are still buffered stay in the buffer and are
yielded; their acks are stale.

Backpressure. The worker acks only after its Redis claim, and the client sends MQTT 5
Receive Maximum = `options.receive_maximum`, so the broker keeps at most about that many
unacked QoS 1 messages out to us. `pause()` only stops the deliveries iterator: what was
received stays in our buffer unacked, and once `receive_maximum` are outstanding the
broker stops sending. Mosquitto 2.0.11 stops exactly at the limit before any ack, but
once acks interleave with its queue it was seen to overshoot slightly (7 outstanding with
a limit of 5): treat the bound as approximate. QoS 0 is not flow controlled by MQTT:
beyond `options.buffer` queued deliveries QoS 0 messages are dropped (at most once).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from inference_worker.transports import mqtt_packets as packets
from inference_worker.transports import topics
from inference_worker.transports.base import Delivery, Outgoing, TransportOptions
from inference_worker.transports.memory import DeliveryBuffer
from inference_worker.transports.mqtt_connection import Connection, Credentials, Handlers

log = logging.getLogger(__name__)


class MqttTransport:
    """A `Transport` over MQTT 5 (see the module docstring for threads, acks, flow control).

    `where` (host:port) is what error messages name; the password never appears in them.
    """

    def __init__(
        self,
        host: str,
        port: int,
        options: TransportOptions,
        *,
        username: str | None = None,
        password: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        connect_timeout_s: float = 10.0,
        close_timeout_s: float = 5.0,
    ) -> None:
        self.where = f"{host}:{port}"
        self._options = options
        self._username, self._password = username, password
        self._ssl_context = ssl_context
        self._connect_timeout_s = connect_timeout_s
        self._close_timeout_s = close_timeout_s
        group = options.shared_group
        filters = [topics.shared(group, f) if group else f for f in options.subscriptions]
        for topic_filter in filters:
            topics.split_shared(topic_filter)
        self._conn = Connection(
            host,
            port,
            options,
            filters,
            credentials=Credentials(username, password, ssl_context),
            connect_timeout_s=connect_timeout_s,
            handlers=Handlers(self._on_message, self._on_puback, self._on_connected),
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._buffer = DeliveryBuffer()
        # QoS 1 publishes in flight, by packet id, until their PUBACK (at most the
        # window; resent on a reconnect), and those held back because the window is
        # full, in order.
        self._pending: dict[int, _InFlight] = {}
        self._held: deque[tuple[Outgoing, asyncio.Future[None]]] = deque()
        self._next_id = 0
        # Unacked QoS 1 deliveries of connection `_counted`; another generation has none.
        self._counted = 0
        self._unacked = 0
        self._stale_acks = 0
        self._started = False
        self._closed = False

    @property
    def generation(self) -> int:
        """How many times the client has connected; deliveries are tied to one value."""
        return self._conn.generation

    @property
    def unacked(self) -> int:
        """QoS 1 deliveries of the live connection not yet acked (≤ receive_maximum)."""
        live = self.connected and self._counted == self._conn.generation
        return self._unacked if live else 0

    @property
    def stale_acks(self) -> int:
        """Acks dropped because the delivering connection was gone (broker redelivers)."""
        return self._stale_acks

    @property
    def connected(self) -> bool:
        """Between CONNACK and disconnect (the connection task reconnects in between)."""
        return self._conn.connected and not self._closed

    async def start(self) -> None:
        """Start the connection task; return once connected and every SUBACK granted."""
        if self._started or self._closed:
            raise RuntimeError("start() may be called once, before close()")
        self._started = True
        self._loop = asyncio.get_running_loop()
        ready = self._conn.start()
        task = self._conn.task
        assert task is not None
        try:
            await asyncio.wait(
                {ready, task}, timeout=self._connect_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
            if ready.done():
                ready.result()  # raises a refusal
            elif task.done():
                task.result()  # raises the task's error
                raise ConnectionError(f"MQTT connection task for {self.where} ended")
            else:
                raise ConnectionError(
                    f"MQTT broker {self.where} not ready within {self._connect_timeout_s}s "
                    f"(last error: {self._conn.last_error})"
                )
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Wait (bounded) for pending publishes, disconnect, end the task. Idempotent."""
        if self._closed:
            return
        self._closed = True  # from here on every ack is stale
        self._buffer.close()
        waiting = [*(p.future for p in self._pending.values()), *(f for _, f in self._held)]
        if waiting:
            await asyncio.wait(waiting, timeout=self._close_timeout_s)
        await self._conn.close(min(1.0, self._close_timeout_s))
        self._fail_pending(ConnectionError(f"MQTT transport to {self.where} closed"))

    def deliveries(self) -> AsyncIterator[Delivery]:
        return self._buffer.iterate()

    def background(self) -> Sequence[asyncio.Task[None]]:
        """The connection task (see `mqtt_connection`); empty before `start()`."""
        task = self._conn.task
        return () if task is None else (task,)

    def check_topic(self, topic: str) -> None:
        """MQTT topic-name rules for publishing (no wildcards, no `$`, ≤ 65,535 bytes)."""
        topics.validate_publish_topic(topic)

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        reply_to: str | None = None,
        correlation: bytes | None = None,
    ) -> None:
        """Publish; with QoS 1, return when the PUBACK arrives (after a reconnect if need be)."""
        future = self._queue(Outgoing(topic, payload, reply_to, correlation, headers))
        if future is not None:
            await future

    async def publish_many(self, messages: Sequence[Outgoing]) -> list[BaseException | None]:
        """Queue one PUBLISH per message, write them at once (not a loop pass later: the
        answers leave now), then wait once for all PUBACKs."""
        results: list[BaseException | None] = [None] * len(messages)
        waiting: list[tuple[int, asyncio.Future[None]]] = []
        for i, message in enumerate(messages):
            try:
                future = self._queue(message)
            except (ValueError, ConnectionError) as exc:
                results[i] = exc
                continue
            if future is not None:
                waiting.append((i, future))
        self._conn.flush()
        if waiting:
            outcomes = await asyncio.gather(*(f for _, f in waiting), return_exceptions=True)
            for (i, _), outcome in zip(waiting, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    results[i] = outcome
        return results

    def ack_many(self, deliveries: Iterable[Delivery]) -> None:
        """Ack each: the PUBACKs are written together, now."""
        for delivery in deliveries:
            delivery.ack()
        self._conn.flush()

    def pause(self) -> None:
        """Stop yielding deliveries; the broker stops at receive_maximum unacked."""
        self._buffer.pause()

    def resume(self) -> None:
        self._buffer.resume()

    # --- publishing --------------------------------------------------------------------

    def _queue(self, message: Outgoing) -> asyncio.Future[None] | None:
        """Send one PUBLISH, or hold it while the window is full; the future (QoS 1)
        completes with its PUBACK.

        Raises ValueError for a topic no broker accepts (wildcards, NUL, over 65,535
        bytes) and ConnectionError when closed (or, at QoS 0, not connected).
        """
        loop = self._loop
        if loop is None or self._closed:
            raise ConnectionError(f"MQTT transport to {self.where} is not started or closed")
        topics.validate_topic(message.topic)
        if self._options.qos == 0:
            if not self._conn.send(self._packet(message, 0)):
                raise ConnectionError(f"MQTT transport to {self.where} is not connected")
            return None
        future: asyncio.Future[None] = loop.create_future()
        if self._held or len(self._pending) >= self._conn.window:
            self._held.append((message, future))
        else:
            self._send(message, future)
        return future

    def _packet(self, message: Outgoing, packet_id: int) -> bytes:
        headers = message.headers
        return packets.publish_packet(
            message.topic,
            message.payload,
            qos=self._options.qos,
            packet_id=packet_id,
            retain=message.retain,
            response_topic=message.reply_to,
            correlation=message.correlation,
            user_properties=[(str(k), str(v)) for k, v in headers.items()] if headers else (),
        )

    def _send(self, message: Outgoing, future: asyncio.Future[None]) -> None:
        """Give a QoS 1 publish a free packet id and send it; without a connection it
        waits in `_pending` and goes out after the reconnect (`_on_connected`)."""
        pending, packet_id = self._pending, self._next_id
        while True:
            packet_id = packet_id % 65534 + 1
            if packet_id not in pending:
                break
        self._next_id = packet_id
        packet = self._packet(message, packet_id)
        sent = self._conn.send(packet)
        pending[packet_id] = _InFlight(future, packet, sent)

    def _release(self) -> None:
        """Send held publishes while the window has room (after a PUBACK or a CONNACK)."""
        held, pending = self._held, self._pending
        while held and len(pending) < self._conn.window and not self._closed:
            message, future = held.popleft()
            if not future.done():  # else its caller gave up
                self._send(message, future)

    def _on_connected(self) -> None:
        """A new session: resend what was in flight (DUP where it went out before),
        then what was held."""
        for flight in self._pending.values():
            packet = packets.as_duplicate(flight.packet) if flight.sent else flight.packet
            flight.sent = self._conn.send(packet)
        self._release()

    def _on_puback(self, packet_id: int, reason: int) -> None:
        flight = self._pending.pop(packet_id, None)
        if flight is None:
            return  # not ours (a PUBACK for a publish of an earlier session)
        future = flight.future
        if not future.done():
            if packets.is_failure(reason):
                name = packets.reason_name(reason)
                future.set_exception(ConnectionError(f"MQTT broker {self.where} rejected: {name}"))
            else:
                future.set_result(None)
        if self._held:
            self._release()

    def _fail_pending(self, error: Exception) -> None:
        pending, self._pending = self._pending, {}
        held, self._held = self._held, deque()
        for future in [*(p.future for p in pending.values()), *(f for _, f in held)]:
            if not future.done():
                future.set_exception(error)

    # --- from the connection (on the event loop) ---------------------------------------

    def _on_message(self, msg: packets.Message) -> None:
        defect = None
        try:
            topic = msg.topic.decode("utf-8")
        except UnicodeDecodeError:
            # Brokers check topic UTF-8; if one does not, answer it as a bad request.
            topic = msg.topic.decode("utf-8", "replace")
            defect = "topic is not valid UTF-8"
        acker: Callable[[], None] | None = None
        if msg.qos > 0:
            generation = self._conn.generation
            if self._counted != generation:
                self._counted, self._unacked = generation, 0
            self._unacked += 1
            acker = self._acker(generation, msg.packet_id)
        elif len(self._buffer) >= self._options.buffer:
            log.warning("buffer full: dropping a QoS 0 message on %s", topic)
            return
        self._buffer.put(
            Delivery(
                payload=msg.payload,
                topic=topic,
                received_at=time.monotonic(),
                headers=dict(msg.user_properties) if msg.user_properties else _NO_HEADERS,
                reply_to=msg.response_topic,
                correlation=msg.correlation,
                acker=acker,
                defect=defect,
            )
        )

    def _acker(self, generation: int, packet_id: int) -> Callable[[], None]:
        done = False

        def ack() -> None:
            nonlocal done
            if done:
                return
            done = True
            if not self.connected or generation != self._conn.generation:
                self._stale_acks += 1
                return
            self._unacked -= 1
            self._conn.send(packets.puback_packet(packet_id))

        return ack


@dataclass(slots=True)
class _InFlight:
    """A QoS 1 publish awaiting its PUBACK: the encoded packet (resent after a
    reconnect) and whether it went out on the current session."""

    future: asyncio.Future[None]
    packet: bytes
    sent: bool


_NO_HEADERS: Mapping[str, str] = MappingProxyType({})
