"""Outbox: everything the worker sends back, and the one place that acks.

Every path ends here: answered (stored, then published), cached, refused before claim,
given up. A delivery is settled exactly once on every path, whether or not its
best-effort reply could be published: a final answer that cannot go out is logged and
counted, and its dead letter is the record. Acking only after a successful publish
would leak one unacked slot per unpublishable reply (MQTT Receive Maximum, the Kafka
commit point) until the broker stops sending.

Dead letters go two ways at once: published to `broker.dlq_topic` for live observers,
and appended to the dead-letter store (a capped Redis stream, state/deadletters.py) that
`inference-worker dlq` reads and replays. A refused delivery is acked only after its
letter is stored (an outage is waited out: the broker keeps the delivery meanwhile); a
store that refuses the write (OOM, MISCONF) is logged and counted, and the topic copy is
then the only one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from inference_worker.journal import JournalEntry
from inference_worker.metrics import Metrics, WorkerStats
from inference_worker.pipeline.intake import ByteBudget
from inference_worker.pipeline.jobs import Address, Job, Refusal
from inference_worker.pipeline.leases import LeaseBook
from inference_worker.pipeline.observe import Labels
from inference_worker.pipeline.statecalls import StateCalls
from inference_worker.protocol import Codec, ErrorCode, ProtocolError, WireCodec, error_response
from inference_worker.settings import Settings
from inference_worker.state.base import Completion, StateStore
from inference_worker.state.deadletters import DeadLetterStore, NewDeadLetter
from inference_worker.transports.base import Delivery, Outgoing, Transport

log = logging.getLogger("inference_worker.pipeline")


@dataclass(frozen=True)
class DeadLetter:
    """Why a request ended without an answer it could use, with its raw bytes."""

    source: JournalEntry
    code: ErrorCode
    message: str
    app: str = ""
    id: str = ""
    model: str = ""
    attempts: int | None = None


class Outbox:
    def __init__(
        self,
        settings: Settings,
        transport: Transport,
        state: StateStore,
        calls: StateCalls,
        leases: LeaseBook,
        budget: ByteBudget,
        stats: WorkerStats,
        metrics: Metrics,
        labels: Labels,
        *,
        worker: str,
        wall_ms: Callable[[], int],
        clock: Callable[[], float],
        letters: DeadLetterStore,
    ) -> None:
        self._settings = settings
        self._transport = transport
        self._state = state
        self._calls = calls
        self._leases = leases
        self._budget = budget
        self._stats = stats
        self._metrics = metrics
        self._labels = labels
        self._worker = worker
        self._wall_ms = wall_ms
        self._clock = clock
        self.letters = letters
        self._limits = settings.limits.to_limits()
        self._fast_below = settings.worker.response_zstd_fast_below
        self._codec = self.new_codec()  # event-loop thread only
        self._pinned = settings.worker.response_codec

    # ---- building answers -------------------------------------------------------------

    def new_codec(self) -> WireCodec:
        """A codec for encoding answers (one per thread that encodes)."""
        return WireCodec(self._limits, zstd_fast_below=self._fast_below)

    def codec_for(self, request_codec: Codec) -> Codec:
        """The request's codec, unless settings pin one."""
        return request_codec if self._pinned == "request" else Codec(self._pinned)

    def error_payload(
        self, to: Address, code: ErrorCode, message: str, *, retry_after_ms: int | None = None
    ) -> bytes:
        """The one way every error answer is built (refusals, conflicts, give-ups)."""
        err = ProtocolError.about(to, code, message, retry_after_ms=retry_after_ms)
        return self._codec.encode_response(
            error_response(err, worker=self._worker), self.codec_for(to.codec)
        )

    # ---- settling ---------------------------------------------------------------------

    def settle(self, deliveries: Sequence[Delivery]) -> None:
        """Ack: the claim is durable (or the answer final), the broker may forget them."""
        self._transport.ack_many(deliveries)

    async def refuse(self, refusals: Sequence[Refusal]) -> None:
        """Answer deliveries that were never claimed; dead-letter them; ack every one."""
        if not refusals:
            return
        messages: list[Outgoing] = []
        letters: list[DeadLetter] = []
        for r in refusals:
            payload = self.error_payload(r.to, r.code, r.message, retry_after_ms=r.retry_after_ms)
            messages.append(_outgoing(r.to, payload))
            code = r.code.value
            self._stats.errors[code] += 1
            self._metrics.decode_errors.labels(code).inc()
            self._metrics.requests.labels(self._labels.model(r.to.model), code).inc()
            if r.dead_letter:
                d = r.delivery
                source = JournalEntry(d.payload, d.topic, d.reply_to, d.correlation)
                letters.append(DeadLetter(source, r.code, r.message, r.to.app, r.to.id, r.to.model))
            log.info(
                "request refused",
                extra={"request_id": r.to.id, "code": code, "reason": r.message},
            )
        try:
            kept = [self._kept(d) for d in letters]
            results, _ = await asyncio.gather(
                self._publish([*messages, *map(self._letter, kept)], "error answer"),
                self._keep(kept),
            )
            self._stats.responses += sum(e is None for e in results[: len(messages)])
            self._stats.dead_letters += len(letters)
            self._metrics.dead_letters.inc(len(letters))
        finally:
            self.settle([r.delivery for r in refusals])
            self._budget.release(sum(r.size for r in refusals))

    async def complete(self, jobs: Sequence[Job], payloads: Sequence[bytes], status: str) -> None:
        """Design step 7: store the answers and release the leases, then publish.

        A job whose lease was lost (expired and taken over elsewhere) is not published:
        the new holder answers it. When the store refuses the write with anything other
        than an outage (e.g. Redis MISCONF or OOM) nothing is published either: the
        leases are left to expire and the requests are re-run (or end `exhausted`) once
        the store takes writes again, so every request is still answered once, from one
        stored result. That is logged and counted.
        """
        ttl = self._settings.state.result_ttl_s
        items = [
            Completion(j.request.app, j.request.id, j.token, p)
            for j, p in zip(jobs, payloads, strict=True)
        ]
        try:
            held = await self._calls.retry(
                lambda: self._state.complete(items, result_ttl_s=ttl), "complete"
            )
        except Exception as exc:
            self._metrics.state_errors.labels("complete").inc()
            log.error(
                "answers not stored (leases left to expire, the requests will be re-run)",
                extra={"count": len(jobs), "error": f"{type(exc).__name__}: {exc}"},
            )
            self._leases.let_go(jobs)
            self.drop(jobs)
            return
        self._leases.let_go(jobs)
        out = [_outgoing(j.to, p) for j, p, ok in zip(jobs, payloads, held, strict=True) if ok]
        lost = len(jobs) - len(out)
        if lost:
            self._stats.lease_lost += lost
            log.warning("leases lost before completion", extra={"count": lost})
        try:
            results = await self._publish(out, "response")
            self._stats.responses += sum(e is None for e in results)
        finally:
            self._budget.release(sum(j.size for j in jobs))
        now = self._clock()
        for job, ok in zip(jobs, held, strict=True):
            if ok:
                job.lane.observe.answered(status, now - job.received_at)

    async def send_cached(self, jobs: Sequence[Job], payloads: Sequence[bytes]) -> None:
        """Resends of answered requests: the stored bytes again, nothing computed."""
        try:
            out = [_outgoing(j.to, p) for j, p in zip(jobs, payloads, strict=True)]
            results = await self._publish(out, "cached response")
            self._stats.responses += sum(e is None for e in results)
        finally:
            self._budget.release(sum(j.size for j in jobs))
        now = self._clock()
        for job in jobs:
            job.lane.observe.answered("cached", now - job.received_at)

    def drop(self, jobs: Sequence[Job]) -> None:
        """Jobs this worker will not answer now (someone else holds them, or they are
        parked for another attempt): free their bytes."""
        self.free(sum(j.size for j in jobs))

    def free(self, size: int) -> None:
        self._budget.release(size)

    async def dead_letter(self, letters: Sequence[DeadLetter]) -> None:
        """Publish to the dead-letter topic and keep in the store, both at once."""
        kept = [self._kept(d) for d in letters]
        await asyncio.gather(
            self._publish([self._letter(d) for d in kept], "dead letter"), self._keep(kept)
        )
        self._stats.dead_letters += len(letters)
        self._metrics.dead_letters.inc(len(letters))

    # ---- plumbing ---------------------------------------------------------------------

    def _kept(self, d: DeadLetter) -> NewDeadLetter:
        return NewDeadLetter(
            d.source,
            d.code.value,
            d.message,
            d.app,
            d.id,
            d.model,
            d.attempts,
            self._worker,
            self._wall_ms(),
        )

    async def _keep(self, letters: Sequence[NewDeadLetter]) -> None:
        """Append to the dead-letter store; an outage is waited out, a refusal logged."""
        if not letters:
            return
        try:
            length = await self._calls.retry(lambda: self.letters.add(letters), "dead_letter")
        except Exception as exc:
            self._metrics.dead_letter_store_failures.inc(len(letters))
            self._metrics.state_errors.labels("dead_letter").inc()
            log.error(
                "dead letters not stored (published to the topic only)",
                extra={"count": len(letters), "error": f"{type(exc).__name__}: {exc}"},
            )
            return
        self._metrics.dead_letter_entries.set(length)

    def _letter(self, d: NewDeadLetter) -> Outgoing:
        entry: dict[str, Any] = {
            "error": {"code": d.code, "message": d.message},
            "topic": d.source.topic,
            "payload": d.source.payload,
            "app": d.app,
            "id": d.id,
            "model": d.model,
            "worker": d.worker,
            "at_ms": d.at_ms,
        }
        if d.attempts is not None:
            entry["attempts"] = d.attempts
        packed: bytes = msgpack.packb(entry, use_bin_type=True)
        return Outgoing(self._settings.broker.dlq_topic, packed)

    async def _publish(self, messages: Sequence[Outgoing], what: str) -> list[BaseException | None]:
        """Publish a group; failures are logged and counted, never raised."""
        if not messages:
            return []
        results = await self._transport.publish_many(messages)
        failed = [(m, e) for m, e in zip(messages, results, strict=True) if e is not None]
        if failed:
            self._metrics.publish_failures.inc(len(failed))
            topic, exc = failed[0][0].topic, failed[0][1]
            log.error(
                "publish failed",
                extra={
                    "what": what,
                    "count": len(failed),
                    "topic": topic[:200],
                    "error": f"{type(exc).__name__}: {exc}",
                },
            )
        return results


def _outgoing(to: Address, payload: bytes) -> Outgoing:
    headers = {"traceparent": to.traceparent} if to.traceparent else None
    return Outgoing(to.reply_to, payload, correlation=to.correlation, headers=headers)
