"""What the state store journals at claim time, so another attempt can re-run a request.

The raw payload alone is not enough: MQTT 5 Response Topic / Correlation Data (or Kafka
headers) arrive outside the payload and take precedence over the envelope's `reply_to`,
so they travel with it. msgpack, like the wire format; never pickle.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack


@dataclass(frozen=True)
class JournalEntry:
    payload: bytes
    topic: str
    reply_to: str | None
    correlation: bytes | None

    def encode(self) -> bytes:
        packed: bytes = msgpack.packb(
            {"p": self.payload, "t": self.topic, "r": self.reply_to, "c": self.correlation},
            use_bin_type=True,
        )
        return packed

    @classmethod
    def decode(cls, raw: bytes) -> JournalEntry:
        """Raises ValueError for bytes this module did not write."""
        try:
            body = msgpack.unpackb(raw, raw=False, max_ext_len=0, strict_map_key=True)
            payload, topic = body["p"], body["t"]
            reply_to, correlation = body.get("r"), body.get("c")
        except Exception as exc:  # msgpack raises a zoo of types; all mean "not ours"
            raise ValueError(f"not a journal entry: {exc}") from exc
        if not isinstance(payload, bytes) or not isinstance(topic, str):
            raise ValueError("not a journal entry: wrong field types")
        if reply_to is not None and not isinstance(reply_to, str):
            raise ValueError("not a journal entry: reply_to")
        if correlation is not None and not isinstance(correlation, bytes):
            raise ValueError("not a journal entry: correlation")
        return cls(payload, topic, reply_to, correlation)
