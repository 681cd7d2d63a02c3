"""MQTT 5 transport on paho-mqtt 2.x, driven from the asyncio event loop.

Threads. There is no paho network thread: `mqtt_loop.Driver` registers paho's socket
with the event loop and every paho callback (messages, PUBACKs, connect, disconnect)
runs on the loop. `publish()` and `ack()` only queue a packet and register the socket
for writing; the packets queued in one pass of the loop go out in the next
`loop_write()`. So nothing here takes a lock or hops threads.

Connection. One task (`background()`) owns the connection: it opens the socket without
blocking (`mqtt_socket`), hands it to paho, waits for CONNACK and SUBACK (subscribing
again on every connect), calls `loop_misc()` once a second for keepalive and, when the
connection is lost, reconnects itself with exponential backoff between
`reconnect_min_s` and `reconnect_max_s` (paho's own automatic reconnect belongs to its
threaded loops). The task ends only with an error: an exception inside paho's callbacks,
or the broker refusing the subscriptions on a reconnect; the worker watches it.

Acks and connections. paho's `ack(mid)` is not tied to a connection: after a reconnect
an old mid would ack whatever the broker now sends with that mid. Every delivery's acker
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
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from inference_worker.transports import topics
from inference_worker.transports.base import Delivery, Outgoing, TransportOptions
from inference_worker.transports.memory import DeliveryBuffer
from inference_worker.transports.mqtt_loop import Driver, LoopClient
from inference_worker.transports.mqtt_socket import open_socket

log = logging.getLogger(__name__)

_TICK_S = 1.0  # loop_misc() period: keepalive pings and their timeout (paho's own loop: 1 s)


class _Refused(ConnectionError):
    """The broker answered CONNACK with a failure reason code."""


class _SubscriptionsRefused(_Refused):
    """The broker answered SUBACK with a failure reason code."""


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
        self._host, self._port = host, port
        self.where = f"{host}:{port}"
        self._options = options
        self._username, self._password = username, password
        self._ssl_context = ssl_context
        self._connect_timeout_s = connect_timeout_s
        self._close_timeout_s = close_timeout_s
        group = options.shared_group
        self._filters = [topics.shared(group, f) if group else f for f in options.subscriptions]
        for topic_filter in self._filters:
            topics.split_shared(topic_filter)
        self._client: LoopClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._buffer = DeliveryBuffer()
        self._pending: dict[int, asyncio.Future[None]] = {}
        # Per connection attempt: `_up` when CONNACK and SUBACK are in, `_link` when the
        # connection ends. `_crash` once for the transport: an error inside paho's I/O.
        self._up: asyncio.Future[None] | None = None
        self._link: asyncio.Future[None] | None = None
        self._crash: asyncio.Future[None] | None = None
        self._ready: asyncio.Future[None] | None = None  # the first connection is up
        self._ever_up = False
        self._suback_mid: int | None = None
        self._last_error = "no answer"
        self._generation = 0
        self._connected = False
        self._unacked = 0
        self._stale_acks = 0
        self._closed = False

    @property
    def generation(self) -> int:
        """How many times the client has connected; deliveries are tied to one value."""
        return self._generation

    @property
    def unacked(self) -> int:
        """QoS 1 deliveries of the live connection not yet acked (≤ receive_maximum)."""
        return self._unacked

    @property
    def stale_acks(self) -> int:
        """Acks dropped because the delivering connection was gone (broker redelivers)."""
        return self._stale_acks

    @property
    def connected(self) -> bool:
        """Between CONNACK and disconnect (the connection task reconnects in between)."""
        return self._connected and not self._closed

    @property
    def publish_window(self) -> int:
        """QoS 1 publishes allowed in flight now: max_inflight fitted to the broker's
        Receive Maximum (the broker-limits test checks that the window follows it)."""
        client = self._client
        return client._max_inflight_messages if client is not None else self._options.max_inflight

    async def start(self) -> None:
        """Start the connection task; return once connected and every SUBACK granted."""
        if self._client is not None or self._closed:
            raise RuntimeError("start() may be called once, before close()")
        loop = self._loop = asyncio.get_running_loop()
        self._crash = loop.create_future()
        ready = self._ready = loop.create_future()
        self._client = self._new_client(loop)
        task = self._task = loop.create_task(self._run(), name=f"mqtt-connection {self.where}")
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
                    f"(last error: {self._last_error})"
                )
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Wait (bounded) for pending publishes, disconnect, end the task. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._buffer.close()
        if self._pending:
            await asyncio.wait(list(self._pending.values()), timeout=self._close_timeout_s)
        self._connected = False  # from here on every ack is stale
        self._unacked = 0
        client, link = self._client, self._link
        if client is not None and link is not None and not link.done():
            client.disconnect()  # queued; paho closes the socket once it is written
            await asyncio.wait([link], timeout=min(1.0, self._close_timeout_s))
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if client is not None:
            client.drop()
        self._fail_pending(ConnectionError(f"MQTT transport to {self.where} closed"))

    def deliveries(self) -> AsyncIterator[Delivery]:
        return self._buffer.iterate()

    def background(self) -> Sequence[asyncio.Task[None]]:
        """The connection task (see the module docstring); empty before `start()`."""
        return () if self._task is None else (self._task,)

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
        """Queue one PUBLISH per message, then wait once for all PUBACKs."""
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
        if waiting:
            outcomes = await asyncio.gather(*(f for _, f in waiting), return_exceptions=True)
            for (i, _), outcome in zip(waiting, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    results[i] = outcome
        return results

    def ack_many(self, deliveries: Iterable[Delivery]) -> None:
        """Ack each (PUBACKs queued now, written together by the next loop_write())."""
        for delivery in deliveries:
            delivery.ack()

    def pause(self) -> None:
        """Stop yielding deliveries; the broker stops at receive_maximum unacked."""
        self._buffer.pause()

    def resume(self) -> None:
        self._buffer.resume()

    # --- publishing --------------------------------------------------------------------

    def _queue(self, message: Outgoing) -> asyncio.Future[None] | None:
        """Hand one PUBLISH to paho; the future (QoS 1) completes with its PUBACK.

        Raises ValueError for a topic paho refuses (wildcards, over 65,535 bytes) and
        ConnectionError when closed or paho refuses to queue it.
        """
        client, loop = self._client, self._loop
        if client is None or loop is None or self._closed:
            raise ConnectionError(f"MQTT transport to {self.where} is not started or closed")
        props = None  # most responses carry none: skip building a Properties object
        if message.reply_to is not None or message.correlation is not None or message.headers:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if message.reply_to is not None:
                props.ResponseTopic = message.reply_to
            if message.correlation is not None:
                props.CorrelationData = bytes(message.correlation)
            if message.headers:
                props.UserProperty = [(str(k), str(v)) for k, v in message.headers.items()]
        qos = self._options.qos
        info = client.publish(message.topic, message.payload, qos=qos, properties=props)
        # NO_CONN with QoS 1: paho keeps the message and sends it after reconnecting.
        queued = info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS
        if not queued and not (qos > 0 and info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise ConnectionError(
                f"publish to {message.topic[:200]!r} failed: {paho.error_string(info.rc)}"
            )
        if qos == 0:
            return None
        # The PUBACK can only arrive in a later loop_read(): register before returning.
        future = loop.create_future()
        self._pending[info.mid] = future
        return future

    def _on_publish(
        self, _client: paho.Client, _userdata: Any, mid: int, reason: ReasonCode, _p: Any
    ) -> None:
        future = self._pending.pop(mid, None)
        if future is None or future.done():
            return
        if reason.is_failure:
            future.set_exception(ConnectionError(f"MQTT broker {self.where} rejected: {reason}"))
        else:
            future.set_result(None)

    def _fail_pending(self, error: Exception) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)

    # --- the connection task -----------------------------------------------------------

    def _new_client(self, loop: asyncio.AbstractEventLoop) -> LoopClient:
        client = LoopClient(
            CallbackAPIVersion.VERSION2,
            client_id=self._options.client_id,
            protocol=paho.MQTTv5,
            manual_ack=True,
        )
        if self._username is not None:
            client.username_pw_set(self._username, self._password)
        client.max_inflight_messages_set(self._options.max_inflight)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        Driver(client, loop, self._on_io_error)
        connect_props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        connect_props.ReceiveMaximum = self._options.receive_maximum
        persistent = self._options.session_expiry_s > 0
        if persistent:
            connect_props.SessionExpiryInterval = self._options.session_expiry_s
        # Stores the parameters only; each attempt connects through `_attempt`.
        client.connect_async(
            self._host,
            self._port,
            keepalive=self._options.keepalive_s,
            # Resume a persistent session (same client id) instead of discarding it.
            clean_start=not persistent,
            properties=connect_props,
        )
        return client

    async def _run(self) -> None:
        """Connect, watch, reconnect with backoff; ends only with an error (or cancel)."""
        delay = self._options.reconnect_min_s
        try:
            while True:
                if await self._attempt():
                    delay = self._options.reconnect_min_s
                    await self._watch()
                    if not self._closed:
                        log.warning("disconnected from MQTT broker %s; reconnecting", self.where)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._options.reconnect_max_s)
        except asyncio.CancelledError:
            raise
        except BaseException:
            log.exception("MQTT connection task for %s failed", self.where)
            raise

    async def _attempt(self) -> bool:
        """One connection attempt: True once CONNACK and every SUBACK granted."""
        client, loop = self._client, self._loop
        assert client is not None and loop is not None
        up = self._up = loop.create_future()
        self._link = loop.create_future()
        try:
            client.next_socket = await asyncio.wait_for(
                open_socket(self._host, self._port, self._ssl_context), self._connect_timeout_s
            )
        except (OSError, TimeoutError) as exc:
            self._last_error = f"cannot connect: {exc or type(exc).__name__}"
            up.cancel()
            return False
        client.reconnect()  # socket registered with the loop, CONNECT queued
        await self._until(up, self._connect_timeout_s)
        if not up.done():
            self._last_error = "no CONNACK/SUBACK in time"
            client.drop()
            up.cancel()
            return False
        error = up.exception()
        ready = self._ready
        assert ready is not None
        if error is None:
            self._ever_up = True
            if not ready.done():
                ready.set_result(None)
            return True
        self._last_error = str(error)
        if isinstance(error, _Refused) and not ready.done():
            ready.set_exception(error)  # start() fails now, naming the broker's reason
        elif isinstance(error, _SubscriptionsRefused):
            raise error  # refused after a reconnect: nothing left to serve, end visibly
        return False

    async def _watch(self) -> None:
        """While connected: keepalive every tick until the connection ends."""
        client, link = self._client, self._link
        assert client is not None and link is not None
        while not link.done():
            await self._until(link, _TICK_S)
            if not link.done():
                client.loop_misc()

    async def _until(self, future: asyncio.Future[None], within_s: float) -> None:
        """Wait for `future` (at most `within_s`); an I/O error raised in paho ends the task."""
        assert self._crash is not None
        await asyncio.wait(
            {future, self._crash}, timeout=within_s, return_when=asyncio.FIRST_COMPLETED
        )
        if self._crash.done():
            self._crash.result()

    def _on_io_error(self, exc: BaseException) -> None:
        if self._closed:
            log.error("MQTT I/O error after close (%s)", self.where, exc_info=exc)
        elif self._crash is not None and not self._crash.done():
            self._crash.set_exception(exc)

    # --- paho callbacks (on the event loop, inside loop_read/loop_write) ---------------

    def _on_connect(
        self, client: paho.Client, _userdata: Any, _flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        up = self._up
        if reason.is_failure:
            message = f"MQTT broker {self.where} refused connection: {reason}"
            log.error("%s", message)
            if up is not None and not up.done():
                up.set_exception(_Refused(message))
            return
        self._generation += 1
        self._connected = True
        self._unacked = 0
        # The broker refuses QoS 1 publishes beyond its Receive Maximum (Mosquitto's
        # default is 20). paho's public setter refuses changes while connected, but its
        # window is a plain counter read on each publish: fit it to this broker on every
        # connect, so excess publishes wait in paho's queue instead of failing.
        server_max = int(getattr(props, "ReceiveMaximum", 65535)) or 65535
        window = min(self._options.max_inflight, server_max)
        client._max_inflight_messages = window
        if window < self._options.max_inflight:
            log.info(
                "broker %s accepts %d in-flight publishes; using that instead of max_inflight %d",
                self.where,
                server_max,
                self._options.max_inflight,
            )
        if not self._filters:
            if up is not None and not up.done():
                up.set_result(None)
            return
        qos = SubscribeOptions(qos=self._options.qos)
        rc, mid = client.subscribe([(f, qos) for f in self._filters])
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._last_error = f"subscribe failed: {paho.error_string(rc)}"
        self._suback_mid = mid

    def _on_disconnect(
        self, _client: paho.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _props: Any
    ) -> None:
        self._connected = False
        self._unacked = 0
        self._last_error = f"disconnected: {reason}"
        up, link = self._up, self._link
        if up is not None and not up.done():
            up.set_exception(ConnectionError(f"connection lost before CONNACK/SUBACK: {reason}"))
        if link is not None and not link.done():
            link.set_result(None)

    def _on_subscribe(
        self, _client: paho.Client, _userdata: Any, mid: int, reasons: list[ReasonCode], _p: Any
    ) -> None:
        up = self._up
        if mid != self._suback_mid or up is None or up.done():
            return
        granted = zip(self._filters, reasons, strict=False)
        refused = [f"{f}: {r}" for f, r in granted if r.is_failure]
        if refused:
            message = f"MQTT broker {self.where} refused subscriptions: {'; '.join(refused)}"
            log.error("%s", message)
            up.set_exception(_SubscriptionsRefused(message))
        else:
            up.set_result(None)

    def _on_message(self, _client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        defect = None
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            # Brokers check topic UTF-8; if one does not, answer it as a bad request.
            topic = bytes(msg._topic).decode("utf-8", "replace")
            defect = "topic is not valid UTF-8"
        props = msg.properties
        acker: Callable[[], None] | None = None
        if msg.qos > 0:
            self._unacked += 1
            acker = self._acker(self._generation, msg.mid, msg.qos)
        elif len(self._buffer) >= self._options.buffer:
            log.warning("buffer full: dropping a QoS 0 message on %s", topic)
            return
        self._buffer.put(
            Delivery(
                payload=bytes(msg.payload),
                topic=topic,
                received_at=time.monotonic(),
                headers=dict(getattr(props, "UserProperty", None) or ()),
                reply_to=getattr(props, "ResponseTopic", None),
                correlation=getattr(props, "CorrelationData", None),
                acker=acker,
                defect=defect,
            )
        )

    def _acker(self, generation: int, mid: int, qos: int) -> Callable[[], None]:
        done = False

        def ack() -> None:
            nonlocal done
            if done:
                return
            done = True
            client = self._client
            if client is None or not self._connected or generation != self._generation:
                self._stale_acks += 1
                return
            self._unacked -= 1
            client.ack(mid, qos)

        return ack
