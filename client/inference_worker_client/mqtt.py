"""The light MQTT transport: paho-mqtt (MQTT 5, QoS 1) on paho's own network thread.

A client publishes requests and reads its own reply topic, nothing more, so this trades
the worker transport's event-loop integration (``inference_worker.transports.mqtt``) for
brevity: paho runs its network loop in its thread (``loop_start``) and every callback
hands its result to the event loop with ``call_soon_threadsafe``; nothing here blocks
the event loop except paho's own short, lock-guarded ``publish`` call.

Every connect is a clean start that subscribes to the reply topic again, so a broker
restart costs the answers published while the client was away; the client's resend
(same id, answered from the worker's ledger) covers them. Publishes wait for their
PUBACK. Received messages are acked by paho on receipt.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from inference_worker_client.transport import Received

_CLOSED = object()


class MqttClientTransport:
    """One MQTT 5 connection subscribed to one reply topic (see the module docstring)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        client_id: str,
        reply_to: str,
        username: str | None = None,
        password: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        keepalive_s: int = 30,
        connect_timeout_s: float = 30.0,
        publish_timeout_s: float = 30.0,
        max_inflight: int = 1000,
        buffer: int = 10_000,
    ) -> None:
        self.host, self.port = host, port
        self.reply_to = reply_to
        self.keepalive_s = keepalive_s
        self.connect_timeout_s = connect_timeout_s
        self.publish_timeout_s = publish_timeout_s
        self.dropped = 0  # messages that found the receive buffer full
        self._buffer = buffer
        self._paho = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5
        )
        if username is not None:
            self._paho.username_pw_set(username, password)
        if ssl_context is not None:
            self._paho.tls_set_context(ssl_context)
        # paho's default of 20 unacked publishes would cap a pipelining client.
        self._paho.max_inflight_messages_set(max_inflight)
        self._paho.reconnect_delay_set(1, 30)
        self._paho.on_connect = self._on_connect
        self._paho.on_subscribe = self._on_subscribe
        self._paho.on_publish = self._on_publish
        self._paho.on_message = self._on_message
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._ready: asyncio.Future[None] | None = None
        self._acks: dict[int, asyncio.Future[None]] = {}
        self._started = self._closed = False

    # ---- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._paho.connect_async(self.host, self.port, self.keepalive_s, clean_start=True)
        self._paho.loop_start()
        self._started = True
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), self.connect_timeout_s)
        except TimeoutError:
            await self.close()
            raise ConnectionError(
                f"MQTT broker {self.host}:{self.port} not reached within "
                f"{self.connect_timeout_s:.0f}s"
            ) from None
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._started:
            self._paho.disconnect()
            await asyncio.to_thread(self._paho.loop_stop)  # joins paho's thread
        for fut in self._acks.values():
            if not fut.done():
                fut.set_exception(ConnectionError("transport closed"))
        self._acks.clear()
        self._queue.put_nowait(_CLOSED)

    # ---- messages -----------------------------------------------------------------------

    async def deliveries(self) -> AsyncIterator[Received]:
        while True:
            item = await self._queue.get()
            if item is _CLOSED:
                self._queue.put_nowait(_CLOSED)  # for any other reader
                return
            yield item

    async def publish(self, topic: str, payload: bytes, *, reply_to: str | None = None) -> None:
        if self._loop is None or self._closed:
            raise ConnectionError("transport not started or closed")
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if reply_to is not None:
            props.ResponseTopic = reply_to
        # The PUBACK callback reaches this loop through call_soon_threadsafe, so it cannot
        # run before the future below is registered (no yield in between).
        info = self._paho.publish(topic, payload, qos=1, properties=props)
        fut = self._acks[info.mid] = self._loop.create_future()
        try:
            await asyncio.wait_for(fut, self.publish_timeout_s)
        except TimeoutError:
            raise TimeoutError(f"no PUBACK within {self.publish_timeout_s:.0f}s") from None
        finally:
            self._acks.pop(info.mid, None)

    # ---- paho callbacks (paho's thread) -----------------------------------------------

    def _call(self, fn: Any, *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(fn, *args)

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            self._call(self._fail_start, f"MQTT connect refused: {reason}")
            return
        client.subscribe(self.reply_to, qos=1)

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, reasons: list[Any], _p: Any) -> None:
        if any(r.is_failure for r in reasons):
            self._call(self._fail_start, f"MQTT subscribe to {self.reply_to!r} refused")
        else:
            self._call(self._set_ready)

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        self._call(self._acked, mid, None if not reason.is_failure else str(reason))

    def _on_message(self, _c: Any, _u: Any, message: paho.MQTTMessage) -> None:
        self._call(self._received, Received(bytes(message.payload), message.topic))

    # ---- on the event loop --------------------------------------------------------------

    def _set_ready(self) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)

    def _fail_start(self, why: str) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(ConnectionError(why))

    def _acked(self, mid: int, refused: str | None) -> None:
        fut = self._acks.get(mid)
        if fut is None or fut.done():
            return
        if refused is None:
            fut.set_result(None)
        else:
            fut.set_exception(ConnectionError(f"publish refused by the broker: {refused}"))

    def _received(self, delivery: Received) -> None:
        if self._queue.qsize() >= self._buffer:
            self.dropped += 1
            return
        self._queue.put_nowait(delivery)
