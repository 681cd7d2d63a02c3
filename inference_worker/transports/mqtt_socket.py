"""Open the MQTT transport's TCP (and TLS) connection without blocking the event loop.

paho's own `reconnect()` connects with a blocking `socket.create_connection` and a
blocking TLS handshake (up to its connect timeout): fine in paho's network thread, not
on the event loop. So the connection is opened here, asynchronously, and handed to paho
already connected and handshaken (see `mqtt_loop.LoopClient`).

Name resolution: a numeric address is resolved in place (`AI_NUMERICHOST`, no lookup);
a host name goes through `loop.getaddrinfo`, which asyncio runs in its default executor
(a short-lived pool thread, asyncio's own, only for that lookup).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Sequence
from typing import Any


async def open_socket(
    host: str, port: int, ssl_context: ssl.SSLContext | None
) -> socket.socket | ssl.SSLSocket:
    """A connected, non-blocking socket to `host:port`, TLS-handshaken when a context
    is given (certificate and host name checked by the context), TCP_NODELAY set."""
    loop = asyncio.get_running_loop()
    errors: list[OSError] = []
    for family, kind, proto, _name, address in await _resolve(loop, host, port):
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            _no_delay(sock)
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            errors.append(exc)
            continue
        except BaseException:
            sock.close()
            raise
        if ssl_context is None:
            return sock
        try:
            return await _handshake(
                loop,
                ssl_context.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False),
            )
        except BaseException:
            sock.close()
            raise
    if errors:
        raise errors[0]
    raise OSError(f"no address for {host}")


async def _resolve(
    loop: asyncio.AbstractEventLoop, host: str, port: int
) -> Sequence[tuple[socket.AddressFamily, socket.SocketKind, int, str, Any]]:
    try:
        # Numeric hosts need no lookup: resolve them here rather than in a thread.
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except socket.gaierror:
        return await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)


async def _handshake(loop: asyncio.AbstractEventLoop, sock: ssl.SSLSocket) -> ssl.SSLSocket:
    """Drive a non-blocking TLS handshake from the loop's reader/writer callbacks."""
    while True:
        try:
            sock.do_handshake()
            return sock
        except ssl.SSLWantReadError:
            await _ready(loop, sock, write=False)
        except ssl.SSLWantWriteError:
            await _ready(loop, sock, write=True)


async def _ready(loop: asyncio.AbstractEventLoop, sock: ssl.SSLSocket, *, write: bool) -> None:
    waiter: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not waiter.done():
            waiter.set_result(None)

    fd = sock.fileno()
    if write:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await waiter
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


def _no_delay(sock: socket.socket) -> None:
    """Turn Nagle's algorithm off (paho leaves it on).

    With it on, a small write (a PUBACK, a response) waits for the ACK of the previous
    one, and delayed ACKs hold that for up to ~40 ms: the benchmark's open-loop p50 at
    half load was 73 ms for a 0.4 ms model. Mosquitto's `set_tcp_nodelay` fixes only the
    broker's side of the connection.
    """
    with contextlib.suppress(OSError):  # not a TCP socket
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
