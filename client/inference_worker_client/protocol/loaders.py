"""Size-capped loading of zstd frames, msgpack and JSON, and walks that bound a decoded
tree (pure, no I/O).

Knows nothing about envelopes or error codes: everything here raises
:class:`WireError` (malformed, or over a cap when ``too_large``), which the envelope
layer maps to ``bad_request`` / ``too_large``.
"""

from __future__ import annotations

import json
import math
from typing import Any, NoReturn

import msgpack
import zstandard

_SINGLE_SEGMENT = 0x20  # zstd frame header descriptor bit: window size == content size
_MIN_FEED = 256  # bytes fed per step; zstd expands <= 32 KiB per input byte (RLE blocks)


class WireError(ValueError):
    """Bytes that cannot be accepted; ``too_large`` separates caps from malformed data."""

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


def _fail(message: str, *, too_large: bool = False) -> NoReturn:
    raise WireError(message, too_large=too_large)


def decompress_frame(
    dctx: zstandard.ZstdDecompressor, raw: bytes, *, max_output: int, max_window: int
) -> bytes | bytearray:
    """Decompress exactly one zstd frame, holding at most ``max_output`` bytes (+ the
    overshoot bound of :func:`_stream_decompress`). ``dctx`` must have been built with
    ``max_window_size=max_window``.

    Window rule: a single-segment frame (declared size, window == content size) is
    decoded in one shot into an exactly sized buffer, so only the content cap applies to
    it; any other frame whose window exceeds ``max_window`` is too large.
    """
    try:
        params = zstandard.get_frame_parameters(raw)
        # not params.content_size: that reports "unknown" as 2**64 - 1, this as -1
        size = zstandard.frame_content_size(raw)
    except zstandard.ZstdError as exc:
        _fail(f"bad zstd frame header: {exc}")
    if size > max_output:
        _fail(f"zstd frame declares {size} bytes of content", too_large=True)
    if not raw[4] & _SINGLE_SEGMENT and params.window_size > max_window:
        _fail(f"zstd window of {params.window_size} bytes", too_large=True)
    try:
        if size >= 0:
            # libzstd fails when the content differs from the declared size, so the
            # output never exceeds ``size`` even for a frame that lies about it.
            return dctx.decompress(raw, allow_extra_data=False)
        return _stream_decompress(dctx, raw, max_output)
    except zstandard.ZstdError as exc:
        _fail(f"zstd: {exc}")


def _stream_decompress(dctx: zstandard.ZstdDecompressor, raw: bytes, cap: int) -> bytearray:
    """Frames without a declared size. Input is fed in steps small enough that one step
    overshoots the cap by at most ``_MIN_FEED * 32 KiB`` (8 MiB) + one 128 KiB block.
    ``decompressobj`` rather than ``stream_reader``: the latter (0.25) reads on into
    following frames even with ``read_across_frames=False``, hiding trailing data."""
    dobj = dctx.decompressobj()
    out = bytearray()
    view = memoryview(raw)
    pos = 0
    while pos < len(raw) and not dobj.eof:
        step = max(_MIN_FEED, (cap - len(out)) >> 16)
        out += dobj.decompress(view[pos : pos + step])
        pos += step
        if len(out) > cap:
            del out  # not kept alive by this frame in the error's traceback
            _fail(f"decompressed content over {cap} bytes", too_large=True)
    if not dobj.eof:
        _fail("truncated zstd frame")
    if dobj.unused_data or pos < len(raw):
        _fail("trailing data after the zstd frame")
    return out


class _TooMany(Exception):
    """Raised from inside msgpack's hooks to stop unpacking a too-large structure."""


class _ExtType(Exception):
    """Raised from msgpack's ext hook: the protocol has no ext types."""


class _Slots:
    """msgpack hooks counting container slots, so tiny wire items (``0x90`` = one empty
    list, 64 B in Python) cannot turn 64 MiB into gigabytes of objects."""

    def __init__(self, budget: int) -> None:
        self.left = budget

    def on_list(self, value: list[Any]) -> list[Any]:
        self.left -= len(value) + 1
        if self.left < 0:
            raise _TooMany
        return value

    def on_map(self, value: dict[str, Any]) -> dict[str, Any]:
        self.left -= len(value) + 1
        if self.left < 0:
            raise _TooMany
        return value


def _reject_ext(code: int, data: bytes) -> NoReturn:
    # max_ext_len=0 still lets zero-length ext values through; refuse every ext type.
    raise _ExtType


def unpack_msgpack(
    payload: bytes | bytearray,
    *,
    max_slots: int,
    max_bin_len: int,
    max_str_len: int,
    max_array_len: int,
    max_map_len: int,
) -> tuple[Any, int]:
    """``msgpack.unpackb`` with every limit explicit (its defaults scale with the input),
    and an upper bound on the maps and arrays in the result (the slots they use), so
    :func:`check_depth` can be skipped for a message too small to be deep. Nesting is
    bounded here only by msgpack's own stack (1024); the envelope layer holds the result
    to ``Limits.max_depth``."""
    slots = _Slots(max_slots)
    try:
        value = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_bin_len=max_bin_len,
            max_str_len=max_str_len,
            max_array_len=max_array_len,
            max_map_len=max_map_len,
            max_ext_len=0,
            ext_hook=_reject_ext,
            list_hook=slots.on_list,
            object_hook=slots.on_map,
        )
    except _TooMany:
        _fail("too many msgpack items", too_large=True)
    except _ExtType:
        _fail("msgpack ext types are not accepted")
    except ValueError as exc:  # msgpack's own errors all derive from ValueError
        text = str(exc)  # limits are told apart only by message; ext is not a size issue
        _fail(
            f"msgpack: {text[:200] or type(exc).__name__}",
            too_large="exceeds max_" in text and "max_ext_len" not in text,
        )
    except Exception as exc:
        _fail(f"msgpack: {type(exc).__name__}")
    return value, max_slots - slots.left


def load_json(raw: bytes, *, max_slots: int) -> tuple[Any, int]:
    """``json.loads`` with the number of items bounded before it runs, and an upper bound
    on the objects and arrays in the result (as :func:`unpack_msgpack`); nesting is
    bounded here only by the interpreter's recursion limit."""
    # Items materialised <= commas + brackets; counting them runs at memchr speed and
    # bounds the Python objects json.loads can create before it runs.
    containers = raw.count(b"[") + raw.count(b"{")
    if raw.count(b",") + containers > max_slots:
        _fail("too many JSON items", too_large=True)
    try:
        return json.loads(raw), containers
    except RecursionError:
        _fail("JSON nested too deeply")
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, int digit limit
        _fail(f"JSON: {str(exc)[:200]}")


def check_depth(root: object, *, max_depth: int) -> None:
    """Refuse a decoded tree whose maps and arrays nest deeper than ``max_depth`` (the
    root counting as 1). Walks one level at a time and skips, at C speed, the arrays
    that hold no containers, so a large list-form tensor costs one ``map(type, ...)``."""
    level: list[Any] = [root] if type(root) in (dict, list) else []
    depth = 0
    while level:
        depth += 1
        if depth > max_depth:
            _fail(f"nested deeper than {max_depth}")
        below: list[Any] = []
        for node in level:
            items = node.values() if type(node) is dict else node
            kinds = set(map(type, items))
            if dict in kinds or list in kinds:
                below.extend(x for x in items if type(x) is dict or type(x) is list)
        level = below


def check_tree(value: object, *, max_items: int, max_depth: int) -> None:
    """Bound a decoded value (meta) in item count and container depth (as
    :func:`check_depth`), with string map keys only, so it can be echoed back in any
    codec; iterative, so depth cannot recurse."""
    stack: list[tuple[object, int]] = [(value, 1)]
    seen = 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if seen > max_items:
            _fail(f"more than {max_items} items", too_large=True)
        if isinstance(node, dict):
            if depth > max_depth:
                _fail(f"nested deeper than {max_depth}")
            if not all(isinstance(k, str) for k in node):
                _fail("map keys must be strings")
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            if depth > max_depth:
                _fail(f"nested deeper than {max_depth}")
            stack.extend((v, depth + 1) for v in node)


def jsonable(value: Any) -> Any:
    """Meta that came in over msgpack may hold bytes or non-finite floats: make it JSON
    (bytes -> latin-1 text, non-finite floats -> the strings the tensor codec uses)."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("latin-1")
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")
    return value
