"""Kafka record headers in and out: untrusted on the way in, never an exception.

A record's headers are input from whoever could produce to the topic, like its payload.
`read_headers` turns them into what a `Delivery` carries and, where they are unusable, a
`defect` message instead of an exception: a null header value (aiokafka gives `None`), a
`reply_to` that is not UTF-8 or has no MQTT-side name, an oversized `correlation_id`, or
more than `MAX_HEADER_BYTES` of headers in all. The worker answers such a record
`bad_request`, dead-letters it and acks it, so one bad record can neither stop the fetch
loop nor freeze its partition's commit point. Other header values are decoded as UTF-8
with replacement (the worker echoes `traceparent`); the reserved names `reply_to` and
`correlation_id` never come from the caller's `headers` on the way out.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from inference_worker.transports.base import Delivery
from inference_worker.transports.kafka_topics import kafka_topic, mqtt_topic

RESERVED_HEADERS = frozenset({"reply_to", "correlation_id"})
# Headers in all (names and values): far above what a reply topic, a correlation id and a
# traceparent need, far below a size that costs memory.
MAX_HEADER_BYTES = 64 * 1024
MAX_CORRELATION_BYTES = 1024
# aiokafka itself raises on a header name that is not UTF-8 (before we see the record).
UNDECODABLE = "Kafka record cannot be decoded (a header name that is not UTF-8?)"


@dataclass(frozen=True)
class ReadHeaders:
    """What a record's headers give a `Delivery`; `defect` says why they are unusable."""

    headers: Mapping[str, str] = field(default_factory=dict)
    reply_to: str | None = None
    correlation: bytes | None = None
    defect: str | None = None


def read_headers(raw: Any) -> ReadHeaders:
    """Parse a record's `headers` (a sequence of `(str, bytes | None)`); never raises."""
    try:
        return _read(raw)
    except Exception as exc:  # anything a malformed record could still trip
        return ReadHeaders(defect=f"unreadable Kafka headers: {type(exc).__name__}")


def _read(raw: Any) -> ReadHeaders:
    pairs: Iterable[tuple[Any, Any]] = raw or ()
    headers: dict[str, str] = {}
    reply_to: str | None = None
    correlation: bytes | None = None
    total = 0
    for name, value in pairs:
        key = name if isinstance(name, str) else bytes(name).decode("utf-8", "replace")
        total += len(key.encode("utf-8", "replace")) + (0 if value is None else len(value))
        if total > MAX_HEADER_BYTES:
            return ReadHeaders(defect=f"Kafka headers exceed {MAX_HEADER_BYTES} bytes")
        if value is None:
            return ReadHeaders(defect=f"Kafka header {key[:100]!r} has a null value")
        data = bytes(value)
        if key == "reply_to":
            try:
                reply_to = mqtt_topic(data.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                return ReadHeaders(defect="Kafka header 'reply_to' is not a legal topic name")
        elif key == "correlation_id":
            if len(data) > MAX_CORRELATION_BYTES:
                return ReadHeaders(
                    defect=f"Kafka header 'correlation_id' is over {MAX_CORRELATION_BYTES} bytes"
                )
            correlation = data
        else:
            headers[key] = data.decode("utf-8", "replace")
    return ReadHeaders(headers, reply_to, correlation)


def write_headers(
    headers: Mapping[str, str] | None, reply_to: str | None, correlation: bytes | None
) -> list[tuple[str, bytes]]:
    """Record headers for a publish; ValueError if `reply_to` has no Kafka name."""
    out = [(k, str(v).encode()) for k, v in (headers or {}).items() if k not in RESERVED_HEADERS]
    if reply_to is not None:
        out.append(("reply_to", kafka_topic(reply_to).encode()))
    if correlation is not None:
        out.append(("correlation_id", bytes(correlation)))
    return out


def record_delivery(
    kafka_name: str, payload: bytes, read: ReadHeaders, acker: Callable[[], None]
) -> Delivery:
    """One record as a Delivery (never raises): a topic with no MQTT-style name is a
    defect too, so the record is still answered and acked, not left to stall."""
    defect = read.defect
    try:
        topic = mqtt_topic(kafka_name)
    except ValueError as exc:
        topic, defect = kafka_name, defect or str(exc)
    return Delivery(
        payload=payload,
        topic=topic,
        received_at=time.monotonic(),
        headers=read.headers,
        reply_to=read.reply_to,
        correlation=read.correlation,
        defect=defect,
        acker=acker,
    )
