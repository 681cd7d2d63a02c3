"""Request/response over pub/sub: publish a request, await the response with its id.

Each client listens on its own reply topic (`response_message/<app>/<client id>` by
default, `_` for no app: the worker's default `reply_to_allowed` admits only
`response_message/{app}/#`, so one app cannot send responses into another's topic) and
correlates by request id. An unanswered request is resent with the same id and the
same bytes: the worker's idempotency ledger turns a resend into a cached answer (or a
no-op while the first copy is being computed), so resending is always safe.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import Future as ThreadFuture
from dataclasses import dataclass
from typing import Any

import numpy as np

from inference_worker_client.protocol import (
    Codec,
    Limits,
    ProtocolError,
    Request,
    Response,
    WireCodec,
)
from inference_worker_client.tls import TlsOptions
from inference_worker_client.transport import ClientTransport, Credentials, open_transport


@dataclass(frozen=True)
class Reply:
    """A response as received: decoded, raw bytes, and what it took to get it."""

    response: Response
    raw: bytes
    latency_s: float  # first publish → response
    sends: int  # 1 + resends


def reply_address(client_id: str | None, response_topic: str, app: str | None) -> tuple[str, str]:
    """The client id (a fresh one when None) and the reply topic it listens on:
    `<response_topic>/<app or _>/<client id>`, inside the worker's default allow-list."""
    client_id = client_id or f"iw-client-{uuid.uuid4().hex[:12]}"
    return client_id, f"{response_topic}/{app or '_'}/{client_id}"


class InferenceClient:
    """Async client. Use `InferenceClient.connect(url)` or pass a started-later transport
    (anything shaped like :class:`~inference_worker_client.transport.ClientTransport`)."""

    def __init__(
        self,
        transport: ClientTransport,
        *,
        reply_to: str,
        request_topic: str = "request_message",
        app: str = "",
        codec: Codec = Codec.ZSTD,
        limits: Limits | None = None,
        timeout_s: float = 30.0,
        resend_after_s: float | None = 5.0,
    ) -> None:
        self._transport = transport
        self.reply_to = reply_to
        self.request_topic = request_topic
        self.app = app
        self.codec = codec
        self._wire = WireCodec(limits or Limits())
        self.timeout_s = timeout_s
        self.resend_after_s = resend_after_s
        self._pending: dict[str, asyncio.Future[tuple[bytes, Response]]] = {}
        self._listener: asyncio.Task[None] | None = None
        self.duplicates = 0  # responses for ids nobody waits for any more
        self.undecodable = 0
        # Responses that could not be matched to a pending id (e.g. an error for a
        # request whose id was unreadable). Bounded so a noisy topic cannot grow memory.
        self.unmatched: collections.deque[Response] = collections.deque(maxlen=1000)

    @classmethod
    def connect(
        cls,
        url: str,
        *,
        client_id: str | None = None,
        response_topic: str = "response_message",
        username: str | None = None,
        password: str | None = None,
        tls_ca_file: str = "",
        tls_cert_file: str = "",
        tls_key_file: str = "",
        **kwargs: Any,
    ) -> InferenceClient:
        """A client on `url` (mqtt[s]://, kafka://), not started yet.

        Credentials and TLS: `username`/`password` (they win over the URL's) and the
        `tls_*` PEM files (mqtts:// and Kafka SSL: CA that signed the broker certificate,
        else the system CAs; client certificate + key for mutual TLS). On Kafka a
        username means SASL_SSL (SCRAM-SHA-512), TLS files alone SSL.
        """
        client_id, reply_to = reply_address(client_id, response_topic, kwargs.get("app"))
        credentials = Credentials(
            username, password, TlsOptions(tls_ca_file, tls_cert_file, tls_key_file)
        )
        transport = open_transport(
            url, client_id=client_id, reply_to=reply_to, credentials=credentials
        )
        return cls(transport, reply_to=reply_to, **kwargs)

    async def start(self) -> None:
        await self._transport.start()
        self._listener = asyncio.create_task(self._listen(), name="iw-client-listen")

    async def close(self) -> None:
        await self._transport.close()
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError("client closed"))
        self._pending.clear()

    async def __aenter__(self) -> InferenceClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def make_request(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        *,
        id: str | None = None,
        version: int | None = None,
        deadline_ms: int | None = None,
        meta: Mapping[str, Any] | None = None,
        key: str | None = None,
    ) -> Request:
        return Request(
            id=id or uuid.uuid4().hex,
            model=model,
            inputs=dict(inputs),
            app=self.app,
            key=key,
            version=version,
            deadline_ms=deadline_ms,
            meta=meta,
            codec=self.codec,
        )

    def encode(self, request: Request) -> bytes:
        return self._wire.encode_request(request, request.codec)

    async def infer(self, model: str, inputs: Mapping[str, np.ndarray], **kwargs: Any) -> Response:
        timeout_s = kwargs.pop("timeout_s", None)
        request = self.make_request(model, inputs, **kwargs)
        return (await self.send(request, timeout_s=timeout_s)).response

    async def send(self, request: Request, *, timeout_s: float | None = None) -> Reply:
        """Publish `request`, resending the same bytes until answered or timed out."""
        return await self.send_raw(request.id, self.encode(request), timeout_s=timeout_s)

    async def send_raw(
        self,
        request_id: str,
        payload: bytes,
        *,
        topic: str | None = None,
        timeout_s: float | None = None,
    ) -> Reply:
        """Send already-encoded request bytes whose envelope id is `request_id`."""
        loop = asyncio.get_running_loop()
        fut = self._pending.get(request_id)
        if fut is None:
            fut = self._pending[request_id] = loop.create_future()
        timeout = self.timeout_s if timeout_s is None else timeout_s
        started = time.monotonic()
        give_up = started + timeout
        sends = 0
        try:
            while True:
                await self._transport.publish(
                    topic or self.request_topic, payload, reply_to=self.reply_to
                )
                sends += 1
                remaining = give_up - time.monotonic()
                wait = (
                    remaining
                    if self.resend_after_s is None
                    else min(remaining, self.resend_after_s)
                )
                if wait <= 0:
                    raise TimeoutError(
                        f"no response for {request_id} after {timeout:.1f}s ({sends} sends)"
                    )
                try:
                    raw, response = await asyncio.wait_for(asyncio.shield(fut), wait)
                except TimeoutError:
                    if time.monotonic() >= give_up:
                        raise TimeoutError(
                            f"no response for {request_id} after {timeout:.1f}s ({sends} sends)"
                        ) from None
                    continue
                return Reply(response, raw, time.monotonic() - started, sends)
        finally:
            if self._pending.get(request_id) is fut:
                del self._pending[request_id]

    async def _listen(self) -> None:
        async for delivery in self._transport.deliveries():
            delivery.ack()
            try:
                response = self._wire.decode_response(delivery.payload)
            except ProtocolError:
                self.undecodable += 1
                continue
            fut = self._pending.get(response.id)
            if fut is None:
                if response.id:
                    self.duplicates += 1
                else:
                    self.unmatched.append(response)
            elif not fut.done():
                fut.set_result((delivery.payload, response))
            else:
                self.duplicates += 1


class SyncInferenceClient:
    """Blocking wrapper for scripts and notebooks: runs the async client on its own loop.

    `client_class` is the async client it builds with `client_class.connect(url, ...)`.
    """

    client_class: type[InferenceClient] = InferenceClient

    def __init__(self, url: str, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="iw-client-loop", daemon=True
        )
        self._thread.start()
        self._client = self._call(self._make(url, kwargs))

    async def _make(self, url: str, kwargs: dict[str, Any]) -> InferenceClient:
        client = self.client_class.connect(url, **kwargs)
        await client.start()
        return client

    def _call(self, coro: Any) -> Any:
        fut: ThreadFuture[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return fut.result()

    def infer(self, model: str, inputs: Mapping[str, np.ndarray], **kwargs: Any) -> Response:
        response: Response = self._call(self._client.infer(model, inputs, **kwargs))
        return response

    def send(self, request: Request, *, timeout_s: float | None = None) -> Reply:
        reply: Reply = self._call(self._client.send(request, timeout_s=timeout_s))
        return reply

    def close(self) -> None:
        self._call(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def __enter__(self) -> SyncInferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
