"""Wire format v1: envelope + tensor codec, limits and error codes (pure, no I/O).

A message is one zstd frame holding one msgpack map; bare msgpack and JSON objects are
accepted too (told apart by their first bytes). A zstd frame always holds msgpack.

Every cap is checked before the work it protects (DESIGN.md section 11). Memory held by
one decode with the default :class:`Limits`: the raw message (<= 4 MiB), the decompressed
payload (<= 64 MiB + 8.2 MiB overshoot for frames without a declared size; freed after
unpacking), the unpacked bin/str objects (<= 64 MiB; tensors are views of them) and at
most ``max_json_elements + 64 Ki`` container slots (~100 B each): ~250 MiB worst case.
zstd window rule: see :func:`inference_worker.tensors.decompress_frame`.
"""

from __future__ import annotations

import contextlib
import enum
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, NoReturn

import msgpack
import zstandard

from inference_worker.tensors import (
    Array,
    TensorError,
    WireError,
    check_tree,
    decode_tensor,
    decompress_frame,
    encode_tensor_bin,
    encode_tensor_json,
    fingerprint,
    jsonable,
    load_json,
    unpack_msgpack,
)


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


@dataclass(frozen=True)
class Limits:
    """Hard caps on one message. ``max_array_len``: one msgpack array, and the element
    count of one list-form tensor. ``max_json_elements``: array items + map entries +
    containers materialised from one message (+64 Ki for the envelope), in either codec,
    because small wire items become large Python objects."""

    max_compressed_bytes: int = 4 * 1024 * 1024
    max_decompressed_bytes: int = 64 * 1024 * 1024
    max_window_bytes: int = 8 * 1024 * 1024
    max_str_len: int = 64 * 1024
    max_bin_len: int = 64 * 1024 * 1024
    max_array_len: int = 1_000_000
    max_map_len: int = 1024
    max_depth: int = 32
    max_meta_bytes: int = 4096
    max_id_len: int = 128
    max_inputs: int = 64
    max_json_elements: int = 1_000_000


class ProtocolError(Exception):
    """A message that cannot be served, with whatever addressing fields could be read so
    the worker can still send an error response (attributes may be filled in later)."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        id: str | None = None,
        app: str | None = None,
        model: str | None = None,
        reply_to: str | None = None,
        meta: Mapping[str, Any] | None = None,
        codec: Codec | None = None,
        retry_after_ms: int | None = None,
    ) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
        self.id = id
        self.app = app
        self.model = model
        self.reply_to = reply_to
        self.meta = meta
        self.codec = codec
        self.retry_after_ms = retry_after_ms

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE_CODES


@dataclass(frozen=True)
class Request:
    id: str
    model: str
    inputs: Mapping[str, Array]
    app: str = ""
    key: str | None = field(default=None, repr=False)  # a secret: never in logs or reprs
    version: int | None = None
    reply_to: str | None = None
    deadline_ms: int | None = None
    meta: Mapping[str, Any] | None = None
    v: int = 1
    codec: Codec = Codec.ZSTD
    fingerprint: str = ""

    def rows(self) -> int:
        """Batch size this request contributes: the first input's leading dimension."""
        first = next(iter(self.inputs.values()), None)
        return 1 if first is None or first.ndim == 0 else int(first.shape[0])


@dataclass(frozen=True)
class ErrorInfo:
    code: ErrorCode
    message: str
    retryable: bool = False
    retry_after_ms: int | None = None  # `overloaded`: when the app may send again


@dataclass(frozen=True)
class Timing:
    queue_ms: float
    compute_ms: float
    batch_size: int


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


_CODES = frozenset(c.value for c in ErrorCode)
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_JSON_START = re.compile(rb"[ \t\r\n]*\{")
_ENVELOPE_SLOTS = 64 * 1024
_INT63 = 2**63 - 1


def detect_codec(raw: bytes) -> Codec:
    """Codec of a message from its first bytes; a zstd frame is assumed to hold msgpack."""
    if raw[:4] == _ZSTD_MAGIC:
        return Codec.ZSTD
    if raw and (0x80 <= raw[0] <= 0x8F or raw[0] in (0xDE, 0xDF)):
        return Codec.MSGPACK
    if _JSON_START.match(raw):
        return Codec.JSON
    raise ProtocolError(ErrorCode.BAD_REQUEST, "not a zstd frame, msgpack map or JSON object")


def _fail(code: ErrorCode, message: str) -> NoReturn:
    raise ProtocolError(code, message)


class WireCodec:
    """Holds reusable zstd compressor/decompressor contexts. Not thread-safe: one per
    thread/event loop."""

    def __init__(self, limits: Limits = Limits(), *, zstd_level: int = 3) -> None:
        self.limits = limits
        self._cctx = zstandard.ZstdCompressor(level=zstd_level)
        self._dctx = zstandard.ZstdDecompressor(max_window_size=limits.max_window_bytes)
        self._slot_budget = limits.max_json_elements + _ENVELOPE_SLOTS
        self._zstd_caps = {
            "max_output": limits.max_decompressed_bytes,
            "max_window": limits.max_window_bytes,
        }
        self._msgpack_caps = {
            "max_bin_len": limits.max_bin_len,
            "max_str_len": limits.max_str_len,
            "max_array_len": limits.max_array_len,
            "max_map_len": limits.max_map_len,
        }

    # ---- decoding -------------------------------------------------------------------

    def decode_request(self, raw: bytes) -> Request:
        """Parse and validate one request. Raises only :class:`ProtocolError`."""
        try:
            codec, obj = self._load(raw)
            try:
                return self._request(obj, codec)
            except ProtocolError as exc:
                exc.codec = codec
                self._address(exc, obj)
                raise
        except ProtocolError:
            raise
        except Exception as exc:  # a bug or a library surprise must not kill the worker
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"undecodable ({exc!r:.80})") from exc

    def decode_response(self, raw: bytes) -> Response:
        """Parse one response (clients, tests). Raises only :class:`ProtocolError`."""
        try:
            return self._response(self._load(raw)[1])
        except ProtocolError:
            raise
        except Exception as exc:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"undecodable ({exc!r:.80})") from exc

    def _load(self, raw: bytes) -> tuple[Codec, dict[str, Any]]:
        if not isinstance(raw, bytes | bytearray | memoryview):
            _fail(ErrorCode.BAD_REQUEST, "payload must be bytes")
        if len(raw) > self.limits.max_compressed_bytes:
            _fail(ErrorCode.TOO_LARGE, f"message over {self.limits.max_compressed_bytes} bytes")
        raw = bytes(raw)
        codec = detect_codec(raw)
        try:
            if codec is Codec.JSON:
                obj = load_json(raw, max_slots=self._slot_budget)
            else:
                payload: bytes | bytearray = raw
                if codec is Codec.ZSTD:
                    payload = decompress_frame(self._dctx, raw, **self._zstd_caps)
                obj = unpack_msgpack(payload, max_slots=self._slot_budget, **self._msgpack_caps)
        except WireError as exc:
            code = ErrorCode.TOO_LARGE if exc.too_large else ErrorCode.BAD_REQUEST
            raise ProtocolError(code, str(exc), codec=codec) from None
        if not isinstance(obj, dict):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "message must be a map", codec=codec)
        return codec, obj

    # ---- validation -----------------------------------------------------------------

    @staticmethod
    def _str(
        obj: Mapping[str, Any], key: str, max_len: int, *, empty_ok: bool = True
    ) -> str | None:
        value = obj.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or len(value) > max_len or not (value or empty_ok):
            _fail(ErrorCode.BAD_REQUEST, f"{key!r} must be a string of <= {max_len} chars")
        try:
            value.encode()
        except UnicodeEncodeError:  # lone surrogates from JSON "\ud800" escapes
            _fail(ErrorCode.BAD_REQUEST, f"{key!r} is not valid unicode")
        return value

    def _required(self, obj: Mapping[str, Any], key: str) -> str:
        value = self._str(obj, key, self.limits.max_id_len, empty_ok=False)
        if value is None:
            _fail(ErrorCode.BAD_REQUEST, f"{key!r} is required")
        return value

    @staticmethod
    def _int(obj: Mapping[str, Any], key: str, lo: int) -> int | None:
        value = obj.get(key)
        if value is None:
            return None
        if type(value) is not int or not lo <= value <= _INT63:  # bools are not ints here
            _fail(ErrorCode.BAD_REQUEST, f"{key!r} must be an integer >= {lo}")
        return value

    def _meta(self, meta: object) -> dict[str, Any] | None:
        """Meta is echoed back verbatim, so it must be small, shallow and re-encodable."""
        if meta is None:
            return None
        if not isinstance(meta, dict):
            _fail(ErrorCode.BAD_REQUEST, "'meta' must be a map")
        lim = self.limits
        try:  # every item costs >= 1 encoded byte, so the walk is cheap
            check_tree(meta, max_items=lim.max_meta_bytes, max_depth=lim.max_depth)
        except WireError as exc:
            code = ErrorCode.TOO_LARGE if exc.too_large else ErrorCode.BAD_REQUEST
            _fail(code, f"'meta': {exc}")
        try:
            size = len(msgpack.packb(meta, use_bin_type=True))
        except (ValueError, TypeError, OverflowError, UnicodeEncodeError):
            _fail(ErrorCode.BAD_REQUEST, "'meta' cannot be re-encoded")
        if size > lim.max_meta_bytes:
            _fail(ErrorCode.TOO_LARGE, f"'meta' is {size} bytes, max {lim.max_meta_bytes}")
        return meta

    def _tensors(self, obj: object, what: str) -> dict[str, Array]:
        lim = self.limits
        if not isinstance(obj, dict) or not obj:
            _fail(ErrorCode.BAD_REQUEST, f"{what!r} must be a non-empty map name -> tensor")
        if len(obj) > lim.max_inputs:
            _fail(ErrorCode.TOO_LARGE, f"more than {lim.max_inputs} {what}")
        out: dict[str, Array] = {}
        for name, tensor in obj.items():
            if not isinstance(name, str) or not 0 < len(name) <= lim.max_id_len:
                _fail(ErrorCode.INVALID_INPUT, f"tensor names must be 1..{lim.max_id_len} chars")
            try:
                out[name] = decode_tensor(tensor, max_list_elements=lim.max_array_len)
            except TensorError as exc:
                code = ErrorCode.TOO_LARGE if exc.too_large else ErrorCode.INVALID_INPUT
                _fail(code, f"{what[:-1]} {name[:64]!r}: {exc}")
        return out

    def _request(self, obj: dict[str, Any], codec: Codec) -> Request:
        lim = self.limits
        if obj.get("v", 1) != 1 or type(obj.get("v", 1)) is not int:
            _fail(ErrorCode.BAD_REQUEST, "unsupported format version 'v'")
        rid, model = self._required(obj, "id"), self._required(obj, "model")
        version = self._int(obj, "version", 1)
        inputs = self._tensors(obj.get("inputs"), "inputs")
        return Request(
            id=rid,
            model=model,
            inputs=inputs,
            app=self._str(obj, "app", lim.max_id_len) or "",
            key=self._str(obj, "key", lim.max_str_len),
            version=version,
            reply_to=self._str(obj, "reply_to", lim.max_str_len) or None,
            deadline_ms=self._int(obj, "deadline", 0),
            meta=self._meta(obj.get("meta")),
            codec=codec,
            fingerprint=fingerprint(model, version, inputs),
        )

    def _address(self, exc: ProtocolError, obj: dict[str, Any]) -> None:
        """Copy into ``exc`` each addressing field that is itself valid."""
        for key in ("id", "app", "model", "reply_to"):
            max_len = self.limits.max_str_len if key == "reply_to" else self.limits.max_id_len
            with contextlib.suppress(ProtocolError):
                setattr(exc, key, self._str(obj, key, max_len, empty_ok=False))
        with contextlib.suppress(ProtocolError):
            exc.meta = self._meta(obj.get("meta"))

    def _response(self, obj: dict[str, Any]) -> Response:
        lim = self.limits
        if obj.get("v", 1) != 1 or type(obj.get("v", 1)) is not int:
            _fail(ErrorCode.BAD_REQUEST, "unsupported format version 'v'")
        status = obj.get("status")
        if status not in ("ok", "error"):
            _fail(ErrorCode.BAD_REQUEST, "'status' must be 'ok' or 'error'")
        outputs = None if obj.get("outputs") is None else self._tensors(obj["outputs"], "outputs")
        return Response(
            id=self._str(obj, "id", lim.max_id_len) or "",
            status=status,
            app=self._str(obj, "app", lim.max_id_len) or "",
            model=self._str(obj, "model", lim.max_id_len) or "",
            version=self._int(obj, "version", 1),
            outputs=outputs,
            error=_error_info(obj.get("error")),
            meta=self._meta(obj.get("meta")),
            timing=_timing(obj.get("timing")),
            worker=self._str(obj, "worker", lim.max_str_len),
        )

    # ---- encoding -------------------------------------------------------------------

    def encode_request(self, req: Request, codec: Codec = Codec.ZSTD) -> bytes:
        """Wire bytes of a request (clients, tests). ``ValueError`` for unsupported dtypes."""
        enc = encode_tensor_json if codec is Codec.JSON else encode_tensor_bin
        obj: dict[str, Any] = {
            "v": req.v,
            "id": req.id,
            "app": req.app or None,
            "key": req.key,
            "model": req.model,
            "version": req.version,
            "inputs": {k: enc(a) for k, a in req.inputs.items()},
            "reply_to": req.reply_to,
            "deadline": req.deadline_ms,
            "meta": req.meta,
        }
        return self._serialize(obj, codec)

    def encode_response(self, resp: Response, codec: Codec = Codec.ZSTD) -> bytes:
        """Wire bytes of a response. ``ValueError`` for output dtypes the wire cannot carry
        (validate model output specs at load time so this never happens in serving)."""
        enc = encode_tensor_json if codec is Codec.JSON else encode_tensor_bin
        obj: dict[str, Any] = {
            "v": resp.v,
            "id": resp.id,
            "app": resp.app,
            "model": resp.model,
            "version": resp.version,
            "status": resp.status,
            "outputs": None
            if resp.outputs is None
            else {k: enc(a) for k, a in resp.outputs.items()},
            "error": None if resp.error is None else _error_obj(resp.error),
            "meta": resp.meta,
            "timing": None if resp.timing is None else asdict(resp.timing),
            "worker": resp.worker,
        }
        return self._serialize(obj, codec)

    def _serialize(self, obj: dict[str, Any], codec: Codec) -> bytes:
        obj = {k: v for k, v in obj.items() if v is not None}
        if codec is Codec.JSON:
            if "meta" in obj:
                obj["meta"] = jsonable(obj["meta"])
            return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
        packed: bytes = msgpack.packb(obj, use_bin_type=True)
        return self._cctx.compress(packed) if codec is Codec.ZSTD else packed


def _error_obj(error: ErrorInfo) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "code": error.code.value,
        "message": error.message,
        "retryable": error.retryable,
    }
    if error.retry_after_ms is not None:
        obj["retry_after_ms"] = error.retry_after_ms
    return obj


def _error_info(obj: object) -> ErrorInfo | None:
    if obj is None:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("message"), str):
        _fail(ErrorCode.BAD_REQUEST, "'error' must be a map with code and message")
    code = obj.get("code")
    if code not in _CODES:
        _fail(ErrorCode.BAD_REQUEST, "unknown error code")
    after = obj.get("retry_after_ms")
    if after is not None and (isinstance(after, bool) or not isinstance(after, int) or after < 0):
        _fail(ErrorCode.BAD_REQUEST, "'retry_after_ms' must be a non-negative integer")
    return ErrorInfo(ErrorCode(code), obj["message"], obj.get("retryable") is True, after)


def _timing(obj: object) -> Timing | None:
    if obj is None:
        return None
    if not isinstance(obj, dict):
        _fail(ErrorCode.BAD_REQUEST, "'timing' must be a map")
    q, c, b = obj.get("queue_ms"), obj.get("compute_ms"), obj.get("batch_size")
    if not (isinstance(q, int | float) and isinstance(c, int | float) and type(b) is int):
        _fail(ErrorCode.BAD_REQUEST, "'timing' needs numeric queue_ms, compute_ms, batch_size")
    return Timing(float(q), float(c), b)
