"""The MQTT transport's connection: one task that keeps one MQTT 5 session up.

The task opens the socket without blocking (`mqtt_socket`), hands it to paho, waits for
CONNACK and SUBACK (subscribing again on every connect: a clean session forgets them),
calls `loop_misc()` once a second for keepalive and, when the connection is lost,
reconnects with exponential backoff between `reconnect_min_s` and `reconnect_max_s`
(paho's own automatic reconnect belongs to its threaded loops, which are not used).

It ends only with an error, so that the worker, which watches it, stops visibly instead
of serving nothing: an exception raised inside paho's I/O callbacks, or the broker
refusing the subscriptions on a reconnect. A refusal at the first connect fails
`start()` instead.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from inference_worker.transports.base import TransportOptions
from inference_worker.transports.mqtt_loop import Driver, LoopClient
from inference_worker.transports.mqtt_socket import open_socket

log = logging.getLogger(__name__)

_TICK_S = 1.0  # loop_misc() period: keepalive pings and their timeout (paho's own loop: 1 s)


class Refused(ConnectionError):
    """The broker answered CONNACK with a failure reason code."""


class SubscriptionsRefused(Refused):
    """The broker answered SUBACK with a failure reason code."""


class Connection:
    """Owns the paho client, its connection task and the connection generation.

    `generation` grows by one on every CONNACK; `connected` is true from CONNACK to the
    loss of that connection; `window` is the publish window the broker allows
    (`on_window` is called when a CONNACK sets it). Event-loop thread only.
    """

    def __init__(
        self,
        host: str,
        port: int,
        options: TransportOptions,
        filters: list[str],
        *,
        username: str | None,
        password: str | None,
        ssl_context: ssl.SSLContext | None,
        connect_timeout_s: float,
        on_message: Callable[[paho.Client, Any, paho.MQTTMessage], None],
        on_publish: Callable[[paho.Client, Any, int, ReasonCode, Any], None],
        on_window: Callable[[], None],
    ) -> None:
        self.where = f"{host}:{port}"
        self._host, self._port = host, port
        self._options = options
        self._filters = filters
        self._ssl_context = ssl_context
        self._connect_timeout_s = connect_timeout_s
        self.client = self._new_client(username, password, on_message, on_publish)
        self._on_window = on_window
        # QoS 1 publishes allowed in flight: max_inflight fitted to the broker (CONNACK).
        self._limit = options.max_inflight if options.max_inflight > 0 else 65535
        self.window = self._limit
        self.generation = 0
        self.connected = False
        self.last_error = "no answer"
        self.task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Per attempt: `_up` when CONNACK and SUBACK are in, `_link` when the connection
        # ends. `_crash` once: an error raised inside paho's I/O. `_ready`: the first up.
        self._up: asyncio.Future[None] | None = None
        self._link: asyncio.Future[None] | None = None
        self._crash: asyncio.Future[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._suback_mid: int | None = None
        self._closing = False

    def start(self) -> asyncio.Future[None]:
        """Start the task; the future completes once the first connection is up (or
        fails with the broker's refusal)."""
        loop = self._loop = asyncio.get_running_loop()
        self._crash = loop.create_future()
        self._ready = loop.create_future()
        Driver(self.client, loop, self._on_io_error)
        self.task = loop.create_task(self._run(), name=f"mqtt-connection {self.where}")
        return self._ready

    async def close(self, within_s: float) -> None:
        """DISCONNECT (bounded by `within_s`), then end the task and the socket."""
        self._closing = True
        self.connected = False
        link = self._link
        if self.task is not None and link is not None and not link.done():
            self.client.disconnect()  # queued; paho closes the socket once it is written
            await asyncio.wait([link], timeout=within_s)
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        self.client.drop()
        if self._ready is not None and not self._ready.done():
            self._ready.cancel()

    def _new_client(
        self,
        username: str | None,
        password: str | None,
        on_message: Callable[[paho.Client, Any, paho.MQTTMessage], None],
        on_publish: Callable[[paho.Client, Any, int, ReasonCode, Any], None],
    ) -> LoopClient:
        client = LoopClient(
            CallbackAPIVersion.VERSION2,
            client_id=self._options.client_id,
            protocol=paho.MQTTv5,
            manual_ack=True,
        )
        if username is not None:
            client.username_pw_set(username, password)
        # 0: paho's own window off. Its bookkeeping rescans every queued message on
        # each PUBACK (`_update_inflight`, 17-26% of a relay's CPU in a profile); the
        # transport keeps the window itself (`window`, see mqtt.py).
        client.max_inflight_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = on_message
        client.on_publish = on_publish
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
                    if not self._closing:
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
        loop, ready = self._loop, self._ready
        assert loop is not None and ready is not None
        up = self._up = loop.create_future()
        self._link = loop.create_future()
        try:
            self.client.next_socket = await asyncio.wait_for(
                open_socket(self._host, self._port, self._ssl_context), self._connect_timeout_s
            )
        except (OSError, TimeoutError) as exc:
            self.last_error = f"cannot connect: {exc or type(exc).__name__}"
            up.cancel()
            return False
        try:
            self.client.reconnect()  # socket registered with the loop, CONNECT queued
        except OSError as exc:
            self.last_error = f"cannot connect: {exc}"
            up.cancel()
            return False
        await self._until(up, self._connect_timeout_s)
        if not up.done():
            self.last_error = "no CONNACK/SUBACK in time"
            self.client.drop()
            up.cancel()
            return False
        error = up.exception()
        if error is None:
            if not ready.done():
                ready.set_result(None)
            return True
        self.last_error = str(error)
        if isinstance(error, Refused) and not ready.done():
            ready.set_exception(error)  # start() fails now, naming the broker's reason
        elif isinstance(error, SubscriptionsRefused):
            raise error  # refused after a reconnect: nothing left to serve, end visibly
        return False

    async def _watch(self) -> None:
        """While connected: keepalive every tick until the connection ends."""
        link = self._link
        assert link is not None
        while not link.done():
            await self._until(link, _TICK_S)
            if not link.done():
                self.client.loop_misc()

    async def _until(self, future: asyncio.Future[None], within_s: float) -> None:
        """Wait for `future` (at most `within_s`); an error raised in paho's I/O ends
        the task with that error."""
        assert self._crash is not None
        await asyncio.wait(
            {future, self._crash}, timeout=within_s, return_when=asyncio.FIRST_COMPLETED
        )
        if self._crash.done():
            self._crash.result()

    def _on_io_error(self, exc: BaseException) -> None:
        if self._closing:
            log.error("MQTT I/O error while closing (%s)", self.where, exc_info=exc)
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
                up.set_exception(Refused(message))
            return
        self.generation += 1
        self.connected = True
        # A client must not have more QoS 1 publishes in flight than the Receive Maximum
        # the broker announced (Mosquitto's default is 20): fit the window to it on every
        # connect, so excess publishes wait in the transport instead of being refused.
        server_max = int(getattr(props, "ReceiveMaximum", 65535)) or 65535
        window = self.window = min(self._limit, server_max)
        if window < self._limit:
            log.info(
                "broker %s accepts %d in-flight publishes; using that instead of max_inflight %d",
                self.where,
                server_max,
                self._options.max_inflight,
            )
        self._on_window()
        if not self._filters:
            if up is not None and not up.done():
                up.set_result(None)
            return
        qos = SubscribeOptions(qos=self._options.qos)
        rc, mid = client.subscribe([(f, qos) for f in self._filters])
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self.last_error = f"subscribe failed: {paho.error_string(rc)}"
        self._suback_mid = mid

    def _on_disconnect(
        self, _client: paho.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _props: Any
    ) -> None:
        self.connected = False
        self.last_error = f"disconnected: {reason}"
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
            up.set_exception(SubscriptionsRefused(message))
        else:
            up.set_result(None)
