"""The messages: :class:`Request`, :class:`Response` and their parts (frozen data)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from inference_worker_client.frozen import quick_init
from inference_worker_client.protocol.codes import Codec, ErrorCode
from inference_worker_client.protocol.errors import ProtocolError
from inference_worker_client.protocol.tensors import Array

PRIORITY_MAX = 9  # request priorities are 0..PRIORITY_MAX, higher first
PRIORITY_DEFAULT = 4  # the rank of a request that gives none (so clients can go below it)


@quick_init
@dataclass(frozen=True)
class Request:
    """One decoded request.

    ``deadline_ms`` (wire ``deadline``, epoch ms) trusts the client's wall clock;
    ``ttl_ms`` (milliseconds from receipt) does not, and is what a client without a
    synchronised clock should send. A request carries at most one of the two.
    ``priority`` (0..9, higher first) orders a request among its own app's queued
    requests; without one it ranks as ``PRIORITY_DEFAULT``.
    """

    id: str
    model: str
    inputs: Mapping[str, Array]
    app: str = ""
    key: str | None = field(default=None, repr=False)  # a secret: never in logs or reprs
    version: int | None = None
    reply_to: str | None = None
    deadline_ms: int | None = None
    ttl_ms: int | None = None
    meta: Mapping[str, Any] | None = None
    v: int = 1
    codec: Codec = Codec.ZSTD
    fingerprint: str = ""
    priority: int | None = None

    def with_app(self, app: str) -> Request:
        """This request under ``app``: what ``dataclasses.replace(self, app=app)`` gives,
        with the other fields copied as they are (no ``__init__`` call: ~10x cheaper, and
        admission does it for every request on an app's topic)."""
        new = object.__new__(Request)
        fields = new.__dict__
        fields.update(self.__dict__)
        fields["app"] = app
        return new

    def rows(self) -> int:
        """Batch size this request contributes: the first input's leading dimension."""
        first = next(iter(self.inputs.values()), None)
        return 1 if first is None or first.ndim == 0 else int(first.shape[0])


@quick_init
@dataclass(frozen=True)
class ErrorInfo:
    code: ErrorCode
    message: str
    retryable: bool = False
    retry_after_ms: int | None = None  # `overloaded`: when the app may send again


@quick_init
@dataclass(frozen=True)
class Timing:
    queue_ms: float
    compute_ms: float
    batch_size: int


@quick_init
@dataclass(frozen=True)
class Response:
    id: str
    status: str  # "ok" | "error"
    app: str = ""
    model: str = ""
    version: int | None = None
    outputs: Mapping[str, Array] | None = None
    error: ErrorInfo | None = None
    meta: Mapping[str, Any] | None = None
    timing: Timing | None = None
    worker: str | None = None
    v: int = 1


@quick_init
@dataclass(frozen=True)
class Answer:
    """One request's share of an `AnswerBatch`: what differs between its answers."""

    id: str
    app: str
    rows: int  # its rows of the batch's outputs, after the previous answers' rows
    queue_ms: float
    meta: Mapping[str, Any] | None
    codec: Codec


@quick_init
@dataclass(frozen=True)
class AnswerBatch:
    """The ok answers of one model call, encoded together (`WireCodec.encode_answers`):
    the same bytes as one `Response` each, without building them one by one."""

    model: str
    version: int | None
    worker: str | None
    compute_ms: float
    outputs: Mapping[str, Array]  # the whole batch's rows, in the answers' order
    answers: Sequence[Answer]

    def response(self, answer: Answer, offset: int) -> Response:
        """The `Response` that `answer` (its rows from `offset`) stands for."""
        end = offset + answer.rows
        return Response(
            id=answer.id,
            status="ok",
            app=answer.app,
            model=self.model,
            version=self.version,
            outputs={k: v[offset:end] for k, v in self.outputs.items()},
            meta=answer.meta,
            timing=Timing(answer.queue_ms, self.compute_ms, len(self.answers)),
            worker=self.worker,
        )


def error_response(err: ProtocolError, *, worker: str | None = None) -> Response:
    """The reply to a request that failed, addressed as far as the request could be read."""
    info = ErrorInfo(err.code, err.message, err.retryable, err.retry_after_ms)
    return Response(
        id=err.id or "",
        status="error",
        app=err.app or "",
        model=err.model or "",
        error=info,
        meta=err.meta,
        worker=worker,
    )
