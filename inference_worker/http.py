"""The worker's HTTP endpoint: `/metrics`, `/healthz`, `/readyz` (design section 9).

A deliberately tiny HTTP/1.1 server on `asyncio.start_server` (no web framework): one
request per connection, `GET`/`HEAD` only, headers capped at 8 KiB and 5 s. It runs on the
worker's own event loop, so `/healthz` answering at all proves the loop is alive, and the
Prometheus gauges read batcher state from the thread that owns it.

- `/metrics`  the worker's registry in the Prometheus text format (version 0.0.4).
- `/healthz`  200 while the process loop runs (liveness: restart me only if this fails).
- `/readyz`   200 only when the models are loaded and warmed up, the broker is connected,
  the state store answers `ping()` and the worker is not draining; otherwise 503 with a
  JSON body naming each check (readiness: send me traffic / count me as capacity).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from inference_worker.state.base import StateStore
from inference_worker.transports.base import Transport

log = logging.getLogger("inference_worker.http")

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_MAX_HEADER_BYTES = 8192
_READ_TIMEOUT_S = 5.0
_PING_TIMEOUT_S = 2.0
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            503: "Service Unavailable"}  # fmt: skip


def broker_connected(transport: Transport) -> bool:
    """Whether the transport holds a live broker connection."""
    return transport.connected


class Readiness:
    """What `/readyz` checks; `run_worker` fills it in as startup progresses."""

    def __init__(self, draining: Callable[[], bool]) -> None:
        self._draining = draining
        self.models: list[str] = []  # set once every model is loaded and warmed up
        self.transport: Transport | None = None  # set once the broker connection is up
        self.state: StateStore | None = None  # set once the state store started
        # False once any stage of the request path (or a transport task) has ended
        # unexpectedly: the worker is then shutting down and must not look healthy.
        self.pipeline: Callable[[], bool] = lambda: True

    async def check(self) -> tuple[bool, dict[str, Any]]:
        checks: dict[str, Any] = {
            "models": bool(self.models),
            "broker": self.transport is not None and broker_connected(self.transport),
            "state": False,
            "draining": self._draining(),
            "pipeline": self.pipeline(),
        }
        if self.state is not None:
            try:
                checks["state"] = await asyncio.wait_for(self.state.ping(), _PING_TIMEOUT_S)
            except (TimeoutError, OSError, RuntimeError, ConnectionError):
                checks["state"] = False
        ready = (
            checks["models"] and checks["broker"] and checks["state"] and checks["pipeline"]
            and not checks["draining"]
        )  # fmt: skip
        body: dict[str, Any] = {"ready": ready, "checks": checks}
        if self.models:
            body["models"] = self.models
        if not ready:
            failing = [k for k in ("models", "broker", "state", "pipeline") if not checks[k]]
            body["not_ready"] = failing + (["draining"] if checks["draining"] else [])
        return ready, body


class HttpEndpoint:
    """The endpoint server; `port` is the bound port (useful with port 0)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        metrics: Callable[[], bytes],
        readiness: Readiness,
    ) -> None:
        self._host = host
        self._port = port
        self._metrics = metrics
        self._readiness = readiness
        self._server: asyncio.Server | None = None
        self._routes: dict[str, Callable[[], Awaitable[tuple[int, str, bytes]]]] = {
            "/metrics": self._get_metrics,
            "/healthz": self._get_healthz,
            "/readyz": self._get_readyz,
        }

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("HTTP endpoint not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self._host, self._port, reuse_address=True, limit=_MAX_HEADER_BYTES
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def _get_metrics(self) -> tuple[int, str, bytes]:
        return 200, METRICS_CONTENT_TYPE, self._metrics()

    async def _get_healthz(self) -> tuple[int, str, bytes]:
        return 200, "application/json", b'{"alive": true}\n'

    async def _get_readyz(self) -> tuple[int, str, bytes]:
        ready, body = await self._readiness.check()
        return (200 if ready else 503), "application/json", json.dumps(body).encode() + b"\n"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT_S)
            except asyncio.LimitOverrunError:
                await self._respond(writer, 400, "text/plain", b"headers too large\n", False)
                return
            except (asyncio.IncompleteReadError, TimeoutError):
                return
            if len(head) > _MAX_HEADER_BYTES:
                await self._respond(writer, 400, "text/plain", b"headers too large\n", False)
                return
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                await self._respond(writer, 400, "text/plain", b"bad request line\n", False)
                return
            method, target = parts[0], parts[1]
            path = target.split("?", 1)[0]
            route = self._routes.get(path)
            if route is None:
                await self._respond(writer, 404, "text/plain", b"not found\n", method == "HEAD")
                return
            if method not in ("GET", "HEAD"):
                await self._respond(writer, 405, "text/plain", b"GET or HEAD\n", False)
                return
            status, ctype, body = await route()
            await self._respond(writer, status, ctype, body, method == "HEAD")
        except (ConnectionError, OSError):
            pass
        except Exception:
            log.exception("HTTP endpoint failed a request")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    @staticmethod
    async def _respond(
        writer: asyncio.StreamWriter, status: int, ctype: str, body: bytes, head_only: bool
    ) -> None:
        header = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
            f"Content-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\n"
            "Connection: close\r\n\r\n"
        ).encode("latin-1")
        writer.write(header if head_only else header + body)
        await writer.drain()
