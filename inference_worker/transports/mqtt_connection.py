"""The MQTT transport's connection: one task that keeps one MQTT 5 session up.

The task opens TCP (and TLS) with `loop.create_connection` (non-blocking connect and
handshake; asyncio sets TCP_NODELAY), sends CONNECT, waits for CONNACK and SUBACK
(subscribing again on every connect: a clean session forgets them), keeps the session
alive (PINGREQ after `keepalive_s` without sending; the link is dropped when no
PINGRESP came within another `keepalive_s`) and, when the connection is lost,
reconnects with exponential backoff between `reconnect_min_s` and `reconnect_max_s`.

Bytes in: `Link.data_received` (mqtt_link.py) parses whole reads (`mqtt_packets.Reader`) and hands
each packet to the callbacks on the event loop. Bytes out: packets queued in one pass of
the loop go out in one `write()` at its end, so a group's PUBACKs and a batch's
responses cost one system call.

The task ends only with an error, so that the worker, which watches it, stops visibly
instead of serving nothing: an exception raised inside a packet callback (a bug), or
the broker refusing the subscriptions on a reconnect. A refusal at the first connect
fails `start()` instead. A malformed packet from the broker only drops the link (the
protocol's answer), and the task reconnects.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from inference_worker.transports import mqtt_packets as packets
from inference_worker.transports.base import TransportOptions
from inference_worker.transports.mqtt_link import Link

log = logging.getLogger(__name__)

_TICK_S = 1.0  # keepalive check period
# The SUBSCRIBE's packet id; publishes use 1..65534 (see `Connection.window`), so it is
# never in use when a reconnect resends them.
_SUBSCRIBE_ID = 65535


class Refused(ConnectionError):
    """The broker answered CONNACK with a failure reason code."""


class SubscriptionsRefused(Refused):
    """The broker answered SUBACK with a failure reason code."""


@dataclass(frozen=True)
class Credentials:
    """What CONNECT carries besides the options: user name, password, TLS."""

    username: str | None = None
    password: str | None = None
    ssl_context: ssl.SSLContext | None = None


@dataclass(frozen=True)
class Handlers:
    """The transport's side of the connection (all called on the event loop).

    `message`: a PUBLISH from the broker. `puback`: our publish's packet id and reason.
    `connected`: a session is up (CONNACK in; `window` is set), before the SUBACK.
    """

    message: Callable[[packets.Message], None]
    puback: Callable[[int, int], None]
    connected: Callable[[], None]


class Connection:
    """Owns the connection task, the current link and the connection generation.

    `generation` grows by one on every CONNACK; `connected` is true from CONNACK to the
    loss of that link; `window` is the publish window the broker allows. Event-loop
    thread only.
    """

    def __init__(
        self,
        host: str,
        port: int,
        options: TransportOptions,
        filters: list[str],
        *,
        credentials: Credentials,
        connect_timeout_s: float,
        handlers: Handlers,
    ) -> None:
        self.where = f"{host}:{port}"
        self._host, self._port = host, port
        self._options = options
        self._filters = filters
        self._credentials = credentials
        self._connect_timeout_s = connect_timeout_s
        self._handlers = handlers
        # QoS 1 publishes allowed in flight: max_inflight fitted to the broker (CONNACK);
        # below 65,535 so that a free packet id always exists.
        self._limit = min(options.max_inflight if options.max_inflight > 0 else 65534, 65534)
        self.window = self._limit
        self.generation = 0
        self.connected = False
        self.last_error = "no answer"
        self.task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._link: Link | None = None
        # Per attempt: `_up` when CONNACK and SUBACK are in. `_crash` once: an error
        # raised inside a callback. `_ready`: the first up.
        self._up: asyncio.Future[None] | None = None
        self._crash: asyncio.Future[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._ping_sent: float | None = None
        self._closing = False

    def start(self) -> asyncio.Future[None]:
        """Start the task; the future completes once the first connection is up (or
        fails with the broker's refusal)."""
        loop = self._loop = asyncio.get_running_loop()
        self._crash = loop.create_future()
        self._ready = loop.create_future()
        self.task = loop.create_task(self._run(), name=f"mqtt-connection {self.where}")
        return self._ready

    def send(self, packet: bytes) -> bool:
        """Queue a packet on the live session; False when there is none."""
        link = self._link
        if not self.connected or link is None:
            return False
        link.send(packet)
        return True

    def flush(self) -> None:
        """Write what is queued now instead of at the end of this loop pass (a group of
        publishes or acks is complete: waiting a pass would only delay it)."""
        if self._link is not None:
            self._link.flush()

    def drop(self) -> None:
        """Cut the current link now (no DISCONNECT); the task reconnects."""
        if self._link is not None:
            self._link.abort()

    async def close(self, within_s: float) -> None:
        """DISCONNECT (bounded by `within_s`), then end the task and the link."""
        self._closing = True
        self.connected = False
        link = self._link
        if link is not None and link.open:
            link.send(packets.DISCONNECT_PACKET)
            link.close()
            await asyncio.wait([link.lost], timeout=within_s)
        if link is not None:
            link.abort()
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        if self._ready is not None and not self._ready.done():
            self._ready.cancel()

    async def _run(self) -> None:
        """Connect, watch, reconnect with backoff; ends only with an error (or cancel)."""
        delay = self._options.reconnect_min_s
        try:
            while True:
                if await self._attempt():
                    delay = self._options.reconnect_min_s
                    await self._watch()
                    if not self._closing:
                        log.warning(
                            "disconnected from MQTT broker %s (%s); reconnecting",
                            self.where,
                            self.last_error,
                        )
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
        tls = self._credentials.ssl_context
        try:
            wire, link = await asyncio.wait_for(
                loop.create_connection(
                    lambda: Link(self, loop),
                    self._host,
                    self._port,
                    ssl=tls,
                    server_hostname=self._host if tls is not None else None,
                ),
                self._connect_timeout_s,
            )
        except (OSError, TimeoutError) as exc:
            self.last_error = f"cannot connect: {exc or type(exc).__name__}"
            up.cancel()
            return False
        if _self_connected(wire):
            # A broker port in the ephemeral range with nothing listening: the kernel may
            # pick that very port as ours (TCP simultaneous open), and the socket talks to
            # itself — and holds the port the restarted broker needs.
            wire.close()
            self.last_error = "cannot connect: the socket connected to itself (no broker)"
            up.cancel()
            return False
        self._link = link
        self._ping_sent = None
        persistent = self._options.session_expiry_s > 0
        link.send(
            packets.connect_packet(
                self._options.client_id,
                keepalive_s=self._options.keepalive_s,
                # Resume a persistent session (same client id) instead of discarding it.
                clean_start=not persistent,
                receive_maximum=self._options.receive_maximum,
                session_expiry_s=self._options.session_expiry_s,
                username=self._credentials.username,
                password=self._credentials.password,
            )
        )
        await self._until(up, self._connect_timeout_s)
        if not up.done():
            self.last_error = "no CONNACK/SUBACK in time"
            link.abort()
            up.cancel()
            return False
        error = up.exception()
        if error is None:
            if not ready.done():
                ready.set_result(None)
            return True
        self.last_error = str(error)
        link.abort()
        if isinstance(error, Refused) and not ready.done():
            ready.set_exception(error)  # start() fails now, naming the broker's reason
        elif isinstance(error, SubscriptionsRefused):
            raise error  # refused after a reconnect: nothing left to serve, end visibly
        return False

    async def _watch(self) -> None:
        """While connected: keepalive every tick until the link is lost."""
        link = self._link
        assert link is not None
        keepalive = self._options.keepalive_s
        while not link.lost.done():
            await self._until(link.lost, _TICK_S)
            if link.lost.done() or keepalive <= 0:
                continue
            now = time.monotonic()
            if self._ping_sent is not None:
                if now - self._ping_sent > keepalive:
                    self.last_error = f"no PINGRESP within {keepalive}s"
                    log.warning("MQTT broker %s: %s", self.where, self.last_error)
                    link.abort()
            elif now - link.last_sent >= keepalive:
                self._ping_sent = now
                link.send(packets.PINGREQ_PACKET)

    async def _until(self, future: asyncio.Future[None], within_s: float) -> None:
        """Wait for `future` (at most `within_s`); an error raised in a callback ends
        the task with that error."""
        assert self._crash is not None
        await asyncio.wait(
            {future, self._crash}, timeout=within_s, return_when=asyncio.FIRST_COMPLETED
        )
        if self._crash.done():
            self._crash.result()

    # --- from the link (on the event loop) ---------------------------------------------

    def crashed(self, exc: BaseException) -> None:
        if self._closing:
            log.error("MQTT I/O error while closing (%s)", self.where, exc_info=exc)
        elif self._crash is not None and not self._crash.done():
            self._crash.set_exception(exc)

    def link_lost(self, link: Link, exc: Exception | None) -> None:
        if link is not self._link:
            return
        self.connected = False
        if exc is not None:
            self.last_error = f"disconnected: {exc}"
        up = self._up
        if up is not None and not up.done():
            up.set_exception(
                ConnectionError(f"connection lost before CONNACK/SUBACK: {self.last_error}")
            )

    def received(self, link: Link, packet: packets.Message | packets.Ack | None) -> None:
        if link is not self._link:
            return
        if isinstance(packet, packets.Message):
            self._handlers.message(packet)
        elif packet is None:
            self._ping_sent = None
        elif packet.kind == packets.PUBACK:
            self._handlers.puback(packet.packet_id, packet.reasons[0])
        elif packet.kind == packets.CONNACK:
            self._on_connack(link, packet)
        elif packet.kind == packets.SUBACK:
            self._on_suback(packet)
        else:  # DISCONNECT from the broker
            self.last_error = f"disconnected: {self._reason(packet)}"
            log.warning("MQTT broker %s sent DISCONNECT: %s", self.where, self.last_error)
            link.abort()

    @staticmethod
    def _reason(packet: packets.Ack) -> str:
        name = packets.reason_name(packet.reasons[0])
        return f"{name} ({packet.reason_string})" if packet.reason_string else name

    def _on_connack(self, link: Link, packet: packets.Ack) -> None:
        up = self._up
        if packets.is_failure(packet.reasons[0]):
            message = f"MQTT broker {self.where} refused connection: {self._reason(packet)}"
            log.error("%s", message)
            if up is not None and not up.done():
                up.set_exception(Refused(message))
            return
        self.generation += 1
        self.connected = True
        # A client must not have more QoS 1 publishes in flight than the Receive Maximum
        # the broker announced (Mosquitto's default is 20): fit the window to it on every
        # connect, so excess publishes wait in the transport instead of being refused.
        window = self.window = min(self._limit, packet.receive_maximum)
        if window < self._limit:
            log.info(
                "broker %s accepts %d in-flight publishes; using that instead of max_inflight %d",
                self.where,
                packet.receive_maximum,
                self._options.max_inflight,
            )
        self._handlers.connected()
        if not self._filters:
            if up is not None and not up.done():
                up.set_result(None)
            return
        link.send(packets.subscribe_packet(_SUBSCRIBE_ID, self._filters, self._options.qos))

    def _on_suback(self, packet: packets.Ack) -> None:
        up = self._up
        if packet.packet_id != _SUBSCRIBE_ID or up is None or up.done():
            return
        granted = zip(self._filters, packet.reasons, strict=False)
        refused = [f"{f}: {packets.reason_name(r)}" for f, r in granted if packets.is_failure(r)]
        if refused:
            message = f"MQTT broker {self.where} refused subscriptions: {'; '.join(refused)}"
            log.error("%s", message)
            up.set_exception(SubscriptionsRefused(message))
        else:
            up.set_result(None)


def _self_connected(wire: asyncio.BaseTransport) -> bool:
    sock = wire.get_extra_info("socket")
    try:
        return sock is not None and sock.getsockname() == sock.getpeername()
    except OSError:
        return False
