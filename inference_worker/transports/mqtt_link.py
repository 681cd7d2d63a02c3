"""One TCP/TLS connection to the MQTT broker: asyncio's protocol side of `Connection`.

Reads are parsed whole (`mqtt_packets.Reader`) and each packet handed to the connection;
packets queued in one pass of the loop are written with one `write()` at its end, or at
once by `flush()` (a group of publishes or acks that is complete). A
malformed packet from the broker drops this link only; an exception from a packet
callback (a bug) ends the connection task with it (`Connection.crashed`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from inference_worker.transports import mqtt_packets as packets

if TYPE_CHECKING:
    from inference_worker.transports.mqtt_connection import Connection

log = logging.getLogger("inference_worker.transports.mqtt_connection")


class Link(asyncio.Protocol):
    """One TCP/TLS connection to the broker (asyncio's protocol side)."""

    def __init__(self, conn: Connection, loop: asyncio.AbstractEventLoop) -> None:
        self._conn = conn
        self._loop = loop
        self._reader = packets.Reader()
        self._out: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = loop.create_future()
        self.last_sent = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            for packet in self._reader.feed(data):
                self._conn.received(self, packet)
        except packets.MalformedPacket as exc:
            self._conn.last_error = str(exc)
            log.warning("MQTT broker %s: %s; dropping the connection", self._conn.where, exc)
            self.abort()
        except BaseException as exc:  # a bug in a callback: the task ends with it
            self.abort()
            self._conn.crashed(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._out.clear()
        if not self.lost.done():
            self.lost.set_result(None)
        self._conn.link_lost(self, exc)

    @property
    def open(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def send(self, packet: bytes) -> None:
        """Queue `packet`; everything queued in this pass of the loop is written once."""
        if self._transport is None:
            return
        if not self._out:
            self._loop.call_soon(self.flush)
        self._out.append(packet)

    def flush(self) -> None:
        transport = self._transport
        if self._out and transport is not None and not transport.is_closing():
            transport.write(b"".join(self._out))
            self.last_sent = time.monotonic()
        self._out.clear()

    def close(self) -> None:
        """Write what is queued, then close."""
        self.flush()
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()
