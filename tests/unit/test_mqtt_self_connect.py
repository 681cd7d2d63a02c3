"""A connect to a free local port can land on itself (TCP simultaneous open): the kernel
may choose the broker's port as the socket's own. Such a socket must not count as a
broker connection (it would read its own CONNECT back and hold the port a restarting
broker needs)."""

from __future__ import annotations

import asyncio
import socket

from inference_worker.transports.mqtt_connection import _self_connected


async def test_a_socket_connected_to_itself_is_not_a_broker() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.connect(sock.getsockname())  # Linux completes this as a self-connection
    sock.setblocking(False)
    wire, _ = await asyncio.get_running_loop().create_connection(asyncio.Protocol, sock=sock)
    try:
        assert _self_connected(wire)
    finally:
        wire.close()


async def test_a_connection_to_a_listener_is_a_peer() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    wire, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
    try:
        assert not _self_connected(wire)
    finally:
        wire.close()
        server.close()
        await server.wait_closed()
