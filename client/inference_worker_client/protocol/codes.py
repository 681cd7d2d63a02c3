"""The wire's two enumerations: error codes and message codecs (DESIGN.md section 5)."""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    UNKNOWN_MODEL = "unknown_model"
    INVALID_INPUT = "invalid_input"
    TOO_LARGE = "too_large"
    CONFLICT = "conflict"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    OVERLOADED = "overloaded"
    INFERENCE_FAILED = "inference_failed"
    EXHAUSTED = "exhausted"


#: Codes for which the same request may succeed if the client sends it again later.
RETRYABLE_CODES: frozenset[ErrorCode] = frozenset(
    {ErrorCode.OVERLOADED, ErrorCode.INFERENCE_FAILED}
)


class Codec(enum.StrEnum):
    ZSTD = "zstd"  # a zstd frame containing msgpack
    MSGPACK = "msgpack"
    JSON = "json"
