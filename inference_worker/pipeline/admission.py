"""Admission: from deliveries to admitted jobs and refusals. Sends nothing itself.

Per group: the transport's own defects first; decode the whole group in one call; then
route, validate, authenticate (one key lookup for the group, retried through outages
like claims) and apply the reply-topic policy for the final app.

Where a group is decoded. A group whose payloads declare at most
`worker.loop_codec_max_bytes` of decoded content in all (a zstd frame's declared content
size, which libzstd holds it to; a plain payload's own length, JSON's weighted) is
decoded on the event loop: for small requests the hand-off to a thread and back costs
more than the decode (~0.1 ms of CPU and ~1 ms of latency per group, and the thread's
Python competes with the loop for the GIL; measured in benchmarks/RESULTS.md). Any other
group — large content, or a zstd frame that does not declare its size, such as a
decompression bomb (a 60 MiB one takes ~90 ms to expand) — is decoded in the decode
thread, one group at a time, where zstd releases the GIL and the loop keeps serving.

Who may be answered where. The app a reply topic is checked against is the *established*
one: the topic's `<app>` segment (bound to the publisher by the broker ACL) or the app of
a valid API key; with authentication off and no topic binding, the envelope's own app is
all there is. An error for a request whose app could not be established, or whose
requested reply topic is refused, goes only to the default response topic: never to a
topic derived from an unauthenticated claim, so no device can push errors carrying its
own id and meta into another app's topic.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import zstandard
from inference_worker_client.frozen import quick_init

from inference_worker.auth import Authenticator, AuthMode, Verdict
from inference_worker.journal import JournalEntry
from inference_worker.pipeline.intake import ByteBudget
from inference_worker.pipeline.jobs import Address, Job, Refusal
from inference_worker.pipeline.lanes import LaneSet
from inference_worker.pipeline.statecalls import StateCalls
from inference_worker.protocol import (
    Codec,
    ErrorCode,
    Limits,
    ProtocolError,
    Request,
    WireCodec,
    detect_codec,
)
from inference_worker.routing import ReplyPolicy, parse_request_topic
from inference_worker.settings import BrokerSettings
from inference_worker.transports.base import Delivery


@quick_init
@dataclass(frozen=True)
class Admitted:
    jobs: list[Job]
    refused: list[Refusal]


@quick_init
@dataclass(frozen=True)
class _Draft:
    """A decoded, routed, validated request before its app is final."""

    delivery: Delivery
    request: Request
    route_app: str | None
    reply_to: str
    rows: int


class Admission:
    def __init__(
        self,
        broker: BrokerSettings,
        lanes: LaneSet,
        replies: ReplyPolicy,
        auth: Authenticator | None,
        calls: StateCalls,
        budget: ByteBudget,
        *,
        limits: Limits,
        decoder: Executor,
        wall_ms: Callable[[], int],
        loop_max_bytes: int,
    ) -> None:
        self._broker = broker
        self._lanes = lanes
        self._replies = replies
        self._auth = auth if auth is not None and auth.mode is not AuthMode.OFF else None
        self._calls = calls
        self._budget = budget
        # One codec per thread that decodes: the loop's, and the decode thread's (one thread).
        self._loop_codec = WireCodec(limits)
        self._thread_codec = WireCodec(limits)
        self._decoder = decoder
        self._wall_ms = wall_ms
        self._loop_max = loop_max_bytes

    async def admit(self, group: Sequence[Delivery]) -> Admitted:
        refused: list[Refusal] = []
        payloads = [d.payload for d in group]
        decoded = await self._decoded(payloads)
        drafts: list[_Draft] = []
        for d, result in zip(group, decoded, strict=True):
            if d.defect is not None:
                # The transport found the message itself unusable (e.g. a header with no
                # value): refused, addressed with what its payload says, answered only on
                # the default topic (its headers, reply topic included, are not trusted).
                refused.append(self._defect_refusal(d, result))
                continue
            if isinstance(result, ProtocolError):
                refused.append(self._decode_refusal(d, result))
                continue
            try:
                drafts.append(self._route(d, result))
            except ProtocolError as err:
                app = self._established(d, result.app)
                refused.append(self._refusal(d, result, err.code, err.message, app=app))
        verdicts = await self._verdicts(drafts)
        jobs: list[Job] = []
        for draft, verdict in zip(drafts, verdicts, strict=True):
            outcome = self._finish(draft, verdict)
            (jobs if isinstance(outcome, Job) else refused).append(outcome)  # type: ignore[arg-type]
        return Admitted(jobs, refused)

    async def readmit(self, d: Delivery, *, app: str) -> Job | Refusal:
        """A journaled request for another attempt. The ledger's app is final (an API key
        may have named it at claim time), so no key is looked up again."""
        await self._budget.acquire(len(d.payload))
        [result] = await self._decoded([d.payload])
        if isinstance(result, ProtocolError):
            return self._decode_refusal(d, result)
        try:
            draft = self._route(d, result)
        except ProtocolError as err:
            return self._refusal(d, result, err.code, err.message, app=app)
        draft = dataclasses.replace(draft, request=draft.request.with_app(app))
        return self._finish(draft, None)

    # ---- steps ------------------------------------------------------------------------

    async def _decoded(self, payloads: list[bytes]) -> list[Request | ProtocolError]:
        """The group decoded on the loop when it is small, else in the decode thread."""
        left = self._loop_max
        for raw in payloads:
            left -= _declared_size(raw)
            if left < 0:
                loop = asyncio.get_running_loop()
                decode = self._thread_codec.decode_requests
                return await loop.run_in_executor(self._decoder, decode, payloads)
        return self._loop_codec.decode_requests(payloads)

    def _route(self, d: Delivery, req: Request) -> _Draft:
        route = parse_request_topic(self._broker.request_topic, d.topic)
        if route.model is not None and route.model != req.model:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST,
                f"topic names model {route.model!r} but the request names {req.model!r}",
            )
        if route.app is not None and req.app and req.app != route.app:
            raise ProtocolError(
                ErrorCode.UNAUTHORIZED, f"app {req.app!r} may not publish on {d.topic!r}"
            )
        lane = self._lanes.resolve(req.model, req.version)
        rows = lane.check_inputs(req.inputs)
        if route.app is not None and req.app != route.app:
            req = req.with_app(route.app)
        reply_to = d.reply_to or req.reply_to or self._broker.response_topic
        return _Draft(d, req, route.app, reply_to, rows)

    async def _verdicts(self, drafts: list[_Draft]) -> list[Verdict | None]:
        auth = self._auth
        if auth is None or not drafts:
            return [None] * len(drafts)
        keys = [dr.request.key for dr in drafts]
        return list(await self._calls.persist(lambda: auth.check(keys), "api key lookup"))

    def _finish(self, draft: _Draft, verdict: Verdict | None) -> Job | Refusal:
        req, d = draft.request, draft.delivery
        if verdict is not None:
            error = verdict.error
            if error is None and verdict.app is not None and req.app and req.app != verdict.app:
                error = f"the API key belongs to another app than {req.app!r}"
            if error is not None:
                return self._refusal(d, req, ErrorCode.UNAUTHORIZED, error, app=draft.route_app)
            if verdict.app is not None and req.app != verdict.app:
                req = req.with_app(verdict.app)
        try:
            reply_to = self._replies.check(draft.reply_to, app=req.app)
        except ProtocolError as err:
            return self._refusal(d, req, err.code, err.message, app=None)  # refused: default
        lane = self._lanes.resolve(req.model, req.version)
        size = _decoded_size(req)
        self._budget.adjust(size - len(d.payload))
        now = d.received_at
        deadline = None
        if req.ttl_ms is not None:
            deadline = now + req.ttl_ms / 1000.0
        elif req.deadline_ms is not None:
            # Trusts the client's wall clock (documented); `ttl_ms` does not.
            deadline = now + (req.deadline_ms - self._wall_ms()) / 1000.0
        to = Address(
            req.id,
            req.app,
            req.model,
            req.meta,
            reply_to,
            d.correlation,
            req.codec,
            d.headers.get("traceparent"),
        )
        source = JournalEntry(d.payload, d.topic, d.reply_to, d.correlation)
        return Job(req, lane, to, source, now, deadline, draft.rows, size, d)

    # ---- refusals ---------------------------------------------------------------------

    def _defect_refusal(self, d: Delivery, decoded: Request | ProtocolError) -> Refusal:
        assert d.defect is not None
        default = self._broker.response_topic
        if isinstance(decoded, Request):
            req = decoded
            to = Address(req.id, req.app, req.model, req.meta, default, None, req.codec)
        else:
            err = decoded
            codec = err.codec or Codec.JSON
            to = Address(
                err.id or "", err.app or "", err.model or "", err.meta, default, None, codec
            )
        return Refusal(d, ErrorCode.BAD_REQUEST, d.defect, to, size=len(d.payload))

    def _decode_refusal(self, d: Delivery, err: ProtocolError) -> Refusal:
        app = self._established(d, err.app or "")
        to = Address(
            err.id or "",
            err.app or "",
            err.model or "",
            err.meta,
            self._answer_topic(d.reply_to or err.reply_to, app),
            d.correlation,
            err.codec or Codec.JSON,  # undetectable bytes: the likely reader is a person
            d.headers.get("traceparent"),
        )
        return Refusal(d, err.code, err.message, to, size=len(d.payload))

    def _refusal(
        self,
        d: Delivery,
        req: Request | None,
        code: ErrorCode,
        message: str,
        *,
        app: str | None = None,
    ) -> Refusal:
        """`app`: the established app, if any; only then may a requested topic be used."""
        candidate = d.reply_to or (req.reply_to if req is not None else None)
        to = Address(
            req.id if req else "",
            req.app if req else "",
            req.model if req else "",
            req.meta if req else None,
            self._answer_topic(candidate, app),
            d.correlation,
            req.codec if req else Codec.JSON,
            d.headers.get("traceparent"),
        )
        return Refusal(d, code, message, to, size=len(d.payload))

    def _established(self, d: Delivery, envelope_app: str) -> str | None:
        """The app an error may be addressed for before authentication: the topic's
        (broker-bound) app; with authentication off, the envelope's (all there is)."""
        route_app = parse_request_topic(self._broker.request_topic, d.topic).app
        if route_app is not None:
            return route_app
        return envelope_app if self._auth is None else None

    def _answer_topic(self, candidate: str | None, app: str | None) -> str:
        """The requested topic if `app` (established) may be answered there, else the
        default response topic."""
        default = self._broker.response_topic
        if not candidate or app is None:
            return default
        try:
            return self._replies.check(candidate, app=app)
        except ProtocolError:
            return default


def _decoded_size(req: Request) -> int:
    """Bytes a request holds once decoded: its tensors (the journal keeps the wire bytes)."""
    return sum(int(getattr(a, "nbytes", 0)) for a in req.inputs.values()) + 256


_UNKNOWN = 1 << 62  # larger than any loop limit
_JSON_WEIGHT = 8


def _declared_size(raw: bytes) -> int:
    """The decoded bytes a payload declares: a zstd frame's content size (libzstd fails a
    frame whose content differs from it), a plain payload's own length (JSON's times
    `_JSON_WEIGHT`: parsing it and building arrays from lists costs several times what
    msgpack does per byte); `_UNKNOWN` for a zstd frame without a declared size. A
    payload of no codec, or a malformed zstd header, counts its own length: it fails at
    once."""
    try:
        codec = detect_codec(raw)
    except ProtocolError:
        return len(raw)
    if codec is Codec.JSON:
        return len(raw) * _JSON_WEIGHT
    if codec is not Codec.ZSTD:
        return len(raw)
    try:
        size = zstandard.frame_content_size(raw)
    except zstandard.ZstdError:
        return len(raw)
    return _UNKNOWN if size < 0 else size
