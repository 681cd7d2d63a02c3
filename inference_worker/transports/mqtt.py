"""MQTT 5 transport on paho-mqtt 2.x, bridged to asyncio.

Threads. paho's network loop runs in its own thread (`loop_start()`); its callbacks hop
onto the event loop with `call_soon_threadsafe`, so the event loop never blocks on the
network. Calls into paho from the event loop (`publish`, `ack`) only enqueue a packet
under paho's own locks and wake the network thread through its socket pair (checked in
paho 2.2 `Client._packet_queue`: a `deque.append` plus a non-blocking write), so they are
safe from another thread; `ack()` takes the same path as `publish()`, the call paho
documents as thread-safe.

Acks and connections. paho's `ack(mid)` is not tied to a connection: after a reconnect an
old mid would ack whatever the broker now sends with that mid. Every delivery's acker
captures the connection generation (incremented in `on_connect`); under `_ack_lock` it
acks only while that generation is still connected. `on_disconnect` marks the connection
gone under the same lock before paho's `reconnect()` clears its outgoing packet queue, so
a PUBACK can neither be queued for a dead connection and sent on the next one, nor race
the reconnect.

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
import contextlib
import logging
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, cast

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from inference_worker.transports import topics
from inference_worker.transports.base import Delivery, TransportOptions
from inference_worker.transports.memory import DeliveryBuffer

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
        self._client: paho.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._buffer = DeliveryBuffer()
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._ready: asyncio.Future[None] | None = None
        self._suback_mid: int | None = None
        self._last_error = "no answer"
        # Guarded by _ack_lock: which connection is live, and its unacked deliveries.
        self._ack_lock = threading.Lock()
        self._inbox: deque[tuple[Callable[..., object], tuple[object, ...]]] = deque()
        self._inbox_lock = threading.Lock()
        self._drain_scheduled = False
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
        """Between CONNACK and disconnect (paho reconnects by itself in between)."""
        return self._connected and not self._closed

    @property
    def publish_window(self) -> int:
        """QoS 1 publishes allowed in flight now: max_inflight fitted to the broker's limit."""
        client = self._client
        return client._max_inflight_messages if client is not None else self._options.max_inflight

    async def start(self) -> None:
        """Connect in paho's thread and subscribe; return once every SUBACK granted."""
        if self._client is not None or self._closed:
            raise RuntimeError("start() may be called once, before close()")
        self._loop = asyncio.get_running_loop()
        self._ready = self._loop.create_future()
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self._options.client_id,
            protocol=paho.MQTTv5,
            manual_ack=True,
        )
        if self._username is not None:
            client.username_pw_set(self._username, self._password)
        if self._ssl_context is not None:
            client.tls_set_context(self._ssl_context)
        client.max_inflight_messages_set(self._options.max_inflight)
        # paho annotates these as int but only does float arithmetic with them.
        client.reconnect_delay_set(
            cast(int, self._options.reconnect_min_s), cast(int, self._options.reconnect_max_s)
        )
        client.on_connect = self._on_connect
        client.on_socket_open = _no_delay
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        connect_props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        connect_props.ReceiveMaximum = self._options.receive_maximum
        persistent = self._options.session_expiry_s > 0
        if persistent:
            connect_props.SessionExpiryInterval = self._options.session_expiry_s
        self._client = client
        client.connect_async(
            self._host,
            self._port,
            keepalive=self._options.keepalive_s,
            # Resume a persistent session (same client id) instead of discarding it.
            clean_start=not persistent,
            properties=connect_props,
        )
        client.loop_start()
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), self._connect_timeout_s)
        except TimeoutError:
            await self.close()
            raise ConnectionError(
                f"MQTT broker {self.where} not ready within {self._connect_timeout_s}s "
                f"(last error: {self._last_error})"
            ) from None
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Wait (bounded) for pending publishes, disconnect, stop paho's thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._buffer.close()
        if self._pending:
            await asyncio.wait(list(self._pending.values()), timeout=self._close_timeout_s)
        with self._ack_lock:
            self._connected = False
            self._unacked = 0
        client = self._client
        if client is not None:
            client.disconnect()
            # loop_stop() joins paho's thread: do it off the event loop.
            await asyncio.to_thread(client.loop_stop)
        self._fail_pending(ConnectionError(f"MQTT transport to {self.where} closed"))
        if self._ready is not None and not self._ready.done():
            self._ready.cancel()

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
        """Publish; with QoS 1, return when the PUBACK arrives (after a reconnect if need be)."""
        client, loop = self._client, self._loop
        if client is None or loop is None or self._closed:
            raise ConnectionError(f"MQTT transport to {self.where} is not started or closed")
        props = None  # most responses carry none: skip building a Properties object
        if reply_to is not None or correlation is not None or headers:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if reply_to is not None:
                props.ResponseTopic = reply_to
            if correlation is not None:
                props.CorrelationData = bytes(correlation)
            if headers:
                props.UserProperty = [(str(k), str(v)) for k, v in headers.items()]
        info = client.publish(topic, payload, qos=self._options.qos, properties=props)
        # NO_CONN: paho keeps the QoS 1 message and sends it after reconnecting.
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise ConnectionError(f"publish to {topic!r} failed: {paho.error_string(info.rc)}")
        if self._options.qos == 0:
            return
        # on_publish reaches us via call_soon_threadsafe, so it runs after this line
        # even when the PUBACK already arrived: no lock needed around the registration.
        future = loop.create_future()
        self._pending[info.mid] = future
        try:
            await future
        finally:
            if self._pending.get(info.mid) is future:
                del self._pending[info.mid]

    def pause(self) -> None:
        """Stop yielding deliveries; the broker stops at receive_maximum unacked."""
        self._buffer.pause()

    def resume(self) -> None:
        self._buffer.resume()

    # --- paho thread -----------------------------------------------------------------

    def _to_loop(self, callback: Callable[..., object], *args: object) -> None:
        """Hand work from paho's thread to the event loop, coalescing wake-ups.

        One `call_soon_threadsafe` per message and per PUBACK costs a self-pipe write
        and a loop wake-up each (seen at ~4% of a busy worker's samples); under load
        many hand-offs now share one wake-up, and FIFO order is kept.
        """
        loop = self._loop
        if loop is None:
            return
        self._inbox.append((callback, args))
        with self._inbox_lock:
            if self._drain_scheduled:
                return
            self._drain_scheduled = True
        with contextlib.suppress(RuntimeError):  # the event loop is already closed
            loop.call_soon_threadsafe(self._drain_inbox)

    def _drain_inbox(self) -> None:
        # Clear the flag before draining: an item appended meanwhile either is drained
        # here or schedules a drain of its own; it is never stranded.
        with self._inbox_lock:
            self._drain_scheduled = False
        inbox = self._inbox
        while inbox:
            callback, args = inbox.popleft()
            callback(*args)

    def _on_connect(
        self, client: paho.Client, _userdata: Any, _flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        if reason.is_failure:
            self._last_error = f"connection refused: {reason}"
            message = f"MQTT broker {self.where} refused connection: {reason}"
            log.error("%s", message)
            self._to_loop(self._fail_ready, message)
            return
        with self._ack_lock:
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
            self._to_loop(self._set_ready)
            return
        qos = SubscribeOptions(qos=self._options.qos)
        rc, mid = client.subscribe([(f, qos) for f in self._filters])
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._last_error = f"subscribe failed: {paho.error_string(rc)}"
        self._suback_mid = mid

    def _on_connect_fail(self, _client: paho.Client, _userdata: Any) -> None:
        self._last_error = "cannot connect (network error or broker down)"

    def _on_disconnect(
        self, _client: paho.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _props: Any
    ) -> None:
        with self._ack_lock:
            self._connected = False
            self._unacked = 0
        if not self._closed:
            log.warning("disconnected from MQTT broker %s: %s; reconnecting", self.where, reason)

    def _on_subscribe(
        self, _client: paho.Client, _userdata: Any, mid: int, reasons: list[ReasonCode], _p: Any
    ) -> None:
        if mid != self._suback_mid:
            return
        granted = zip(self._filters, reasons, strict=False)
        refused = [f"{f}: {r}" for f, r in granted if r.is_failure]
        if refused:
            message = f"MQTT broker {self.where} refused subscriptions: {'; '.join(refused)}"
            log.error("%s", message)
            self._to_loop(self._fail_ready, message)
        else:
            self._to_loop(self._set_ready)

    def _on_message(self, _client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            log.warning("dropping a message with a non-UTF-8 topic")
            return
        props = msg.properties
        acker: Callable[[], None] | None = None
        if msg.qos > 0:
            with self._ack_lock:
                self._unacked += 1
                acker = self._acker(self._generation, msg.mid, msg.qos)
        delivery = Delivery(
            payload=bytes(msg.payload),
            topic=topic,
            received_at=time.monotonic(),
            headers=dict(getattr(props, "UserProperty", None) or ()),
            reply_to=getattr(props, "ResponseTopic", None),
            correlation=getattr(props, "CorrelationData", None),
            acker=acker,
        )
        self._to_loop(self._deliver, delivery)

    def _on_publish(
        self, _client: paho.Client, _userdata: Any, mid: int, reason: ReasonCode, _p: Any
    ) -> None:
        self._to_loop(self._published, mid, reason)

    def _acker(self, generation: int, mid: int, qos: int) -> Callable[[], None]:
        done = False

        def ack() -> None:
            nonlocal done
            with self._ack_lock:
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

    # --- event loop thread -----------------------------------------------------------

    def _deliver(self, delivery: Delivery) -> None:
        if delivery.acker is None and len(self._buffer) >= self._options.buffer:
            log.warning("buffer full: dropping a QoS 0 message on %s", delivery.topic)
            return
        self._buffer.put(delivery)

    def _published(self, mid: int, reason: ReasonCode) -> None:
        future = self._pending.pop(mid, None)
        if future is None or future.done():
            return
        if reason.is_failure:
            future.set_exception(ConnectionError(f"MQTT broker {self.where} rejected: {reason}"))
        else:
            future.set_result(None)

    def _set_ready(self) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)

    def _fail_ready(self, message: str) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(ConnectionError(message))

    def _fail_pending(self, error: Exception) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)


def _no_delay(_client: paho.Client, _userdata: Any, sock: Any) -> None:
    """Turn Nagle's algorithm off on paho's socket (paho 2.2 leaves it on).

    With it on, a small write (a PUBACK, a response) waits for the ACK of the previous
    one, and delayed ACKs hold that for up to ~40 ms: the benchmark's open-loop p50 at
    half load was 73 ms for a 0.4 ms model. Mosquitto's `set_tcp_nodelay` fixes only the
    broker's side of the connection.
    """
    with contextlib.suppress(OSError, AttributeError):  # e.g. a unix socket
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
