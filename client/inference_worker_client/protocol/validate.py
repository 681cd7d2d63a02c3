"""Decoded message maps -> :class:`Request` / :class:`Response`, every field checked
against :class:`Limits` (pure; raises only :class:`ProtocolError`)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, NoReturn

import msgpack

from inference_worker_client.protocol.codes import Codec, ErrorCode
from inference_worker_client.protocol.envelope import (
    PRIORITY_MAX,
    ErrorInfo,
    Request,
    Response,
    Timing,
)
from inference_worker_client.protocol.errors import ProtocolError
from inference_worker_client.protocol.limits import Limits
from inference_worker_client.protocol.loaders import WireError, check_depth, check_tree
from inference_worker_client.protocol.tensors import Array, TensorError, decode_tensor, fingerprint

_CODES = frozenset(c.value for c in ErrorCode)
_INT63 = 2**63 - 1
_ADDRESS_KEYS = ("id", "app", "model", "reply_to")


def _fail(code: ErrorCode, message: str) -> NoReturn:
    raise ProtocolError(code, message)


def _code(exc: WireError) -> ErrorCode:
    return ErrorCode.TOO_LARGE if exc.too_large else ErrorCode.BAD_REQUEST


class Validator:
    """Field rules of wire format v1 under one set of :class:`Limits` (stateless)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits

    # ---- fields -----------------------------------------------------------------------

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

    @staticmethod
    def _version(obj: Mapping[str, Any]) -> None:
        v = obj.get("v", 1)
        if type(v) is not int or v != 1:
            _fail(ErrorCode.BAD_REQUEST, "unsupported format version 'v'")

    def _depth(self, obj: dict[str, Any], containers: int) -> None:
        if containers <= self.limits.max_depth:
            return  # too few maps and arrays to nest that deep: skip the walk
        try:
            check_depth(obj, max_depth=self.limits.max_depth)
        except WireError as exc:
            _fail(ErrorCode.BAD_REQUEST, f"message {exc}")

    def meta(self, meta: object) -> dict[str, Any] | None:
        """Meta is echoed back verbatim, so it must be small, shallow and re-encodable."""
        if meta is None:
            return None
        if not isinstance(meta, dict):
            _fail(ErrorCode.BAD_REQUEST, "'meta' must be a map")
        lim = self.limits
        try:  # every item costs >= 1 encoded byte, so the walk is cheap
            check_tree(meta, max_items=lim.max_meta_bytes, max_depth=lim.max_depth)
        except WireError as exc:
            _fail(_code(exc), f"'meta': {exc}")
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

    # ---- messages ---------------------------------------------------------------------

    def request(self, obj: dict[str, Any], codec: Codec, containers: int) -> Request:
        """``containers``: an upper bound on the maps and arrays in ``obj``."""
        lim = self.limits
        self._depth(obj, containers)
        self._version(obj)
        rid, model = self._required(obj, "id"), self._required(obj, "model")
        version = self._int(obj, "version", 1)
        deadline_ms, ttl_ms = self._int(obj, "deadline", 0), self._int(obj, "ttl_ms", 0)
        if deadline_ms is not None and ttl_ms is not None:
            _fail(ErrorCode.BAD_REQUEST, "give 'deadline' or 'ttl_ms', not both")
        priority = obj.get("priority")
        if priority is not None and (
            type(priority) is not int or not 0 <= priority <= PRIORITY_MAX
        ):
            _fail(ErrorCode.BAD_REQUEST, f"'priority' must be an integer 0..{PRIORITY_MAX}")
        inputs = self._tensors(obj.get("inputs"), "inputs")
        return Request(
            id=rid,
            model=model,
            inputs=inputs,
            app=self._str(obj, "app", lim.max_id_len) or "",
            key=self._str(obj, "key", lim.max_str_len),
            version=version,
            reply_to=self._str(obj, "reply_to", lim.max_str_len) or None,
            deadline_ms=deadline_ms,
            ttl_ms=ttl_ms,
            meta=self.meta(obj.get("meta")),
            codec=codec,
            fingerprint=fingerprint(model, version, inputs),
            priority=priority,
        )

    def address(self, exc: ProtocolError, obj: dict[str, Any]) -> None:
        """Copy into ``exc`` each addressing field that is itself valid."""
        for key in _ADDRESS_KEYS:
            max_len = self.limits.max_str_len if key == "reply_to" else self.limits.max_id_len
            with contextlib.suppress(ProtocolError):
                setattr(exc, key, self._str(obj, key, max_len, empty_ok=False))
        with contextlib.suppress(ProtocolError):
            exc.meta = self.meta(obj.get("meta"))

    def response(self, obj: dict[str, Any], containers: int) -> Response:
        lim = self.limits
        self._depth(obj, containers)
        self._version(obj)
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
            meta=self.meta(obj.get("meta")),
            timing=_timing(obj.get("timing")),
            worker=self._str(obj, "worker", lim.max_str_len),
        )


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
