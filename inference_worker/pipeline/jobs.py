"""The values that flow through the request path, stage to stage (all frozen).

A `Delivery` becomes either a `Job` (admitted: decoded, routed, validated, addressed) or a
`Refusal` (a final error answer). A claimed Job carries its lease token and attempt count
from then on; every stage passes Jobs along and never mutates them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from inference_worker_client.frozen import quick_init

from inference_worker.journal import JournalEntry
from inference_worker.protocol import Codec, ErrorCode, Request
from inference_worker.transports.base import Delivery

if TYPE_CHECKING:
    from inference_worker.pipeline.lanes import Lane


@quick_init
@dataclass(frozen=True)
class Address:
    """Where and how one request is answered (responses and error responses alike)."""

    id: str
    app: str
    model: str
    meta: Mapping[str, Any] | None
    reply_to: str
    correlation: bytes | None
    codec: Codec
    # Echoed W3C trace context (MQTT user property / Kafka header `traceparent`).
    traceparent: str | None = None


@quick_init
@dataclass(frozen=True)
class Job:
    """One admitted request on its way through claim, batcher, model and completion."""

    request: Request
    lane: Lane  # the model version it was admitted to
    to: Address
    source: JournalEntry  # what is journaled: enough to re-run or dead-letter it
    received_at: float  # monotonic
    deadline: float | None  # monotonic; None = no deadline
    rows: int
    size: int  # bytes held against the worker's byte budget while the job lives
    delivery: Delivery | None = field(default=None, repr=False, compare=False)
    token: str = ""
    attempts: int = 1

    @property
    def key(self) -> tuple[str, str]:
        return (self.request.app, self.request.id)

    def claimed(self, token: str, attempts: int) -> Job:
        """This job under a lease (built directly: `dataclasses.replace` costs ~2 % of
        the worker's CPU at full load, once per request)."""
        return Job(
            self.request, self.lane, self.to, self.source, self.received_at, self.deadline,
            self.rows, self.size, self.delivery, token, attempts,
        )  # fmt: skip


@quick_init
@dataclass(frozen=True)
class Refusal:
    """A delivery answered with an error and never run (nothing claimed).

    `to` is where admission decided the answer may go (see pipeline.admission: never a
    topic derived from an unauthenticated claim). `dead_letter` is False only for answers
    that are not the request's end (`overloaded`: the client is told when to send again).
    """

    delivery: Delivery
    code: ErrorCode
    message: str
    to: Address
    size: int = 0
    retry_after_ms: int | None = None
    dead_letter: bool = True
