"""What the state store journals at claim time, so another attempt can re-run a request.

The raw payload alone is not enough: MQTT 5 Response Topic / Correlation Data (or Kafka
headers) arrive outside the payload and take precedence over the envelope's `reply_to`,
so they travel with it. A store keeps each field as it is (Redis: fields of the request's
hash), never re-wrapped, so journaling costs no encoding and no copy of the payload.
"""

from __future__ import annotations

from dataclasses import dataclass

from inference_worker_client.frozen import quick_init


@quick_init
@dataclass(frozen=True)
class JournalEntry:
    payload: bytes  # the request bytes as received
    topic: str  # the topic it arrived on (the app and model may be named there)
    reply_to: str | None  # the transport's reply topic (MQTT 5 Response Topic), if any
    correlation: bytes | None  # the transport's correlation data, if any
