"""paho-mqtt driven by the asyncio event loop: no paho network thread.

paho 2.x documents an external-loop mode: the application watches `socket()` and calls
`loop_read()` when it is readable, `loop_write()` when it is writable and paho has
something to send (`on_socket_register_write` / `on_socket_unregister_write` say when),
and `loop_misc()` about once a second for keepalive (paho ships this as
`examples/loop_asyncio.py`; aiomqtt wraps paho the same way). Every paho callback then
runs on the event loop, inside one of those calls, so nothing in the transport needs a
lock or a thread hop.

Two paho details this module owns:

- `LoopClient` connects from a socket opened without blocking (`mqtt_socket`): paho's
  `reconnect()` would connect and handshake with blocking calls.
- TLS: decrypted bytes can wait inside the SSL object while the file descriptor is not
  readable, so after each `loop_read()` the reader keeps reading while `pending()` says
  there is more (the same check paho's own `loop()` makes).

An exception raised inside `loop_read()`/`loop_write()` (a bug in a callback) would be
logged and forgotten by the event loop's callback runner; `Driver` hands it to
`on_error` instead, so that the connection task ends with it and the worker sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho


class LoopClient(paho.Client):
    """paho's Client, connected through a socket the transport opened itself.

    `reconnect()` asks `_create_socket()` for a connected socket; this override returns
    the one set in `next_socket` (paho then sets it non-blocking, calls
    `on_socket_open` and queues CONNECT), so paho never blocks in connect or handshake.
    """

    next_socket: Any = None

    def _create_socket(self) -> Any:
        sock, self.next_socket = self.next_socket, None
        if sock is None:
            raise ConnectionError("no connected socket prepared for paho")
        return sock

    def drop(self) -> None:
        """Close the socket now without an MQTT DISCONNECT (a dead or abandoned attempt);
        `on_socket_close` unregisters it from the loop. `on_disconnect` is not called."""
        self._sock_close()


class Driver:
    """Registers a `LoopClient`'s socket with the event loop and turns readiness into
    `loop_read()` / `loop_write()` calls. Event-loop thread only."""

    def __init__(
        self,
        client: LoopClient,
        loop: asyncio.AbstractEventLoop,
        on_error: Callable[[BaseException], None],
    ) -> None:
        self._client = client
        self._loop = loop
        self._on_error = on_error
        self._fd = -1
        client.on_socket_open = self._opened
        client.on_socket_close = self._closed
        client.on_socket_register_write = self._want_write
        client.on_socket_unregister_write = self._wrote

    def _opened(self, _client: paho.Client, _userdata: Any, sock: Any) -> None:
        self._fd = sock.fileno()
        self._loop.add_reader(self._fd, self._readable)

    def _closed(self, _client: paho.Client, _userdata: Any, _sock: Any) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            self._loop.remove_writer(self._fd)
            self._fd = -1

    def _want_write(self, _client: paho.Client, _userdata: Any, _sock: Any) -> None:
        if self._fd >= 0:
            self._loop.add_writer(self._fd, self._writable)

    def _wrote(self, _client: paho.Client, _userdata: Any, _sock: Any) -> None:
        if self._fd >= 0:
            self._loop.remove_writer(self._fd)

    def _readable(self) -> None:
        client = self._client
        try:
            client.loop_read()
            sock = client.socket()
            while isinstance(sock, ssl.SSLSocket) and sock.pending() > 0:
                client.loop_read()
                sock = client.socket()
        except BaseException as exc:  # handed to the connection task, never swallowed
            self._fail(exc)

    def _writable(self) -> None:
        try:
            self._client.loop_write()
        except BaseException as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        with contextlib.suppress(Exception):
            self._client.drop()
        self._on_error(exc)
