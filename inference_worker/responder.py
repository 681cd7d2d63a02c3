"""Everything the worker sends back: responses, error responses and dead letters.

Kept apart from the pipeline so that "which topic, which codec, what is counted" is
decided in one place for every path (fresh, cached, rejected, exhausted).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from inference_worker.journal import JournalEntry
from inference_worker.metrics import Metrics, WorkerStats
from inference_worker.protocol import Codec, ErrorCode, ProtocolError, WireCodec, error_response
from inference_worker.routing import check_reply_topic
from inference_worker.settings import BrokerSettings
from inference_worker.transports.base import Delivery, Transport

log = logging.getLogger("inference_worker.responder")


@dataclass(frozen=True)
class Address:
    """Where and how one request is answered."""

    id: str
    app: str
    model: str
    meta: Mapping[str, Any] | None
    reply_to: str
    correlation: bytes | None
    codec: Codec


class Responder:
    def __init__(
        self,
        transport: Transport,
        broker: BrokerSettings,
        stats: WorkerStats,
        metrics: Metrics,
        *,
        worker: str,
        codec: WireCodec,
        response_codec: str,
        wall_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self._transport = transport
        self._broker = broker
        self._stats = stats
        self._metrics = metrics
        self._worker = worker
        self._codec = codec  # event-loop thread only
        self._response_codec = response_codec
        self._wall_ms = wall_ms

    def codec_for(self, request_codec: Codec) -> Codec:
        """The request's codec, unless settings pin one."""
        choice = self._response_codec
        return request_codec if choice == "request" else Codec(choice)

    def error_payload(
        self, to: Address, code: ErrorCode, message: str, *, retry_after_ms: int | None = None
    ) -> bytes:
        err = ProtocolError(
            code,
            message,
            id=to.id,
            app=to.app,
            model=to.model,
            meta=to.meta,
            retry_after_ms=retry_after_ms,
        )
        response = error_response(err, worker=self._worker)
        return self._codec.encode_response(response, self.codec_for(to.codec))

    async def send(self, to: Address, payload: bytes) -> None:
        await self._transport.publish(to.reply_to, payload, correlation=to.correlation)
        self._stats.responses += 1

    async def reject(self, delivery: Delivery, err: ProtocolError) -> None:
        """A request that can never succeed: error response, dead letter, then ack."""
        self._stats.errors[err.code.value] += 1
        self._metrics.decode_errors.labels(err.code.value).inc()
        self._metrics.requests.labels(err.model or "", err.code.value).inc()
        log.info(
            "request rejected",
            extra={"request_id": err.id, "code": err.code.value, "reason": err.message},
        )
        topic = self._broker.response_topic
        candidate = delivery.reply_to or err.reply_to
        if candidate:
            # A bad reply topic is itself the error: then answer on the default topic.
            with contextlib.suppress(ProtocolError):
                topic = check_reply_topic(
                    candidate, self._broker.reply_to_allowed, app=err.app or ""
                )
        # Undetectable bytes get a JSON answer: the most likely reader is a person.
        payload = self._codec.encode_response(
            error_response(err, worker=self._worker), err.codec or Codec.JSON
        )
        source = JournalEntry(
            delivery.payload, delivery.topic, delivery.reply_to, delivery.correlation
        )
        await asyncio.gather(
            self._transport.publish(topic, payload, correlation=delivery.correlation),
            self.dead_letter(source, err.code, err.message),
        )
        self._stats.responses += 1
        delivery.ack()

    async def dead_letter(
        self, source: JournalEntry, code: ErrorCode, message: str, *, attempts: int | None = None
    ) -> None:
        """The raw request and why it failed, on the dead-letter topic (msgpack map)."""
        entry: dict[str, Any] = {
            "error": {"code": code.value, "message": message},
            "topic": source.topic,
            "payload": source.payload,
            "worker": self._worker,
            "at_ms": self._wall_ms(),
        }
        if attempts is not None:
            entry["attempts"] = attempts
        await self._transport.publish(
            self._broker.dlq_topic, msgpack.packb(entry, use_bin_type=True)
        )
        self._stats.dead_letters += 1
        self._metrics.dead_letters.inc()
