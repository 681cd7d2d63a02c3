"""Low-level wire codecs: size-capped zstd/msgpack/JSON loading, tensor <-> wire
conversion and the request fingerprint (pure, no I/O).

Kept apart from ``protocol.py`` so the envelope logic stays readable; this module knows
nothing about envelopes or error codes. It raises :class:`WireError` (malformed or over a
cap, told apart by ``too_large``) and its subclass :class:`TensorError`, which
``protocol`` maps to ``bad_request`` / ``invalid_input`` / ``too_large``.

Binary tensors are little-endian, C order. Decoded binary tensors are zero-copy,
read-only views (``np.frombuffer``) of the bytes the unpacker produced, so callers must
not write into them. List tensors (JSON, or msgpack arrays from simple clients) are
copied into fresh arrays.

JSON cannot carry non-finite floats, so float tensors encode NaN / +inf / -inf as the
strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` (JavaScript's ``Number(s)`` reads
them back); the decoder accepts those strings, ``null`` (as NaN) and the non-standard
``NaN`` / ``Infinity`` literals Python's ``json`` parses.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from itertools import chain
from types import MappingProxyType
from typing import Any, NoReturn

import msgpack
import numpy as np
import numpy.typing as npt
import zstandard

Array = npt.NDArray[Any]

#: Wire dtype name -> little-endian numpy dtype. The only dtypes the protocol accepts.
DTYPES: Mapping[str, np.dtype[Any]] = MappingProxyType(
    {
        name: np.dtype(name).newbyteorder("<")
        for name in (
            "bool",
            "int8",
            "int16",
            "int32",
            "int64",
            "uint8",
            "uint16",
            "uint32",
            "uint64",
            "float16",
            "float32",
            "float64",
        )
    }
)
#: numpy's own limit is 64; 32 keeps list flattening and error messages small.
MAX_NDIM = 32
#: Bounds one dimension so ``prod(shape)`` stays in int64 arithmetic inside numpy.
MAX_DIM = 2**31 - 1

_NONFINITE_IN: Mapping[object, float] = MappingProxyType(
    {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf, None: math.nan}
)
_NUMBER_TYPES = frozenset({int, float})


_SINGLE_SEGMENT = 0x20  # zstd frame header descriptor bit: window size == content size
_MIN_FEED = 256  # bytes fed per step; zstd expands <= 32 KiB per input byte (RLE blocks)


class WireError(ValueError):
    """Bytes that cannot be accepted; ``too_large`` separates caps from malformed data."""

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


class TensorError(WireError):
    """A tensor map whose dtype, shape or data cannot be accepted."""


def _fail(message: str, *, too_large: bool = False) -> NoReturn:
    raise WireError(message, too_large=too_large)


def dtype_name(dtype: np.dtype[Any]) -> str:
    """Wire name of a numpy dtype; ``ValueError`` for dtypes the protocol cannot carry."""
    name = dtype.name
    if name not in DTYPES or dtype.kind not in "biuf":
        raise ValueError(f"dtype {dtype!s} is not supported on the wire")
    return name


def _shape(obj: object) -> tuple[int, ...]:
    if type(obj) is not list or len(obj) > MAX_NDIM:
        raise TensorError(f"shape must be a list of at most {MAX_NDIM} integers")
    for dim in obj:
        if type(dim) is not int or not 0 <= dim <= MAX_DIM:
            raise TensorError(f"shape dimensions must be integers in [0, {MAX_DIM}]")
    return tuple(obj)


def decode_tensor(obj: object, *, max_list_elements: int) -> Array:
    """Build an array from a wire tensor map, validating dtype, shape and data length.

    ``max_list_elements`` caps list-form data only; binary data is already capped by the
    unpacker's ``max_bin_len``.
    """
    if not isinstance(obj, dict):
        raise TensorError("tensor must be a map with dtype, shape and data")
    name = obj.get("dtype")
    dtype = DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise TensorError(f"dtype must be one of {', '.join(DTYPES)}")
    shape = _shape(obj.get("shape"))
    count = math.prod(shape)
    data = obj.get("data")
    if isinstance(data, bytes):
        if len(data) != count * dtype.itemsize:
            raise TensorError(
                f"data has {len(data)} bytes, shape {list(shape)} of {name} needs "
                f"{count * dtype.itemsize}"
            )
        if dtype.kind == "b" and count and np.frombuffer(data, np.uint8).max() > 1:
            raise TensorError("bool data must be bytes 0 or 1")
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    if count > max_list_elements:
        raise TensorError(f"list data over {max_list_elements} elements", too_large=True)
    if count == 0:
        # A JSON [] cannot carry a shape like [0, 3]: trust ``shape`` for empty tensors.
        if not isinstance(data, list):
            raise TensorError("data must be binary or a (nested) list")
        return np.zeros(shape, dtype=dtype)
    return _from_leaves(_flatten(data, shape, count), dtype).reshape(shape)


def _flatten(data: object, shape: tuple[int, ...], count: int) -> list[Any]:
    """Leaves of nested-list ``data`` in C order, checking it matches ``shape``.

    A flat list of ``prod(shape)`` leaves is accepted as well, and a scalar may come bare.
    """
    if not shape:
        if type(data) is list:
            if len(data) != 1:
                raise TensorError("scalar data must be a number or a one-element list")
            return data
        return [data]
    if type(data) is not list:
        raise TensorError("data must be binary or a (nested) list")
    if len(data) == count and type(data[0]) is not list:
        return data
    level: list[Any] = [data]
    for dim in shape:
        for row in level:
            if type(row) is not list or len(row) != dim:
                raise TensorError(f"nested list data does not match shape {list(shape)}")
        level = list(chain.from_iterable(level))
    return level


def _from_leaves(leaves: list[Any], dtype: np.dtype[Any]) -> Array:
    kinds = set(map(type, leaves))
    if dtype.kind == "b":
        ok = kinds <= {bool}
    elif dtype.kind in "iu":
        ok = kinds <= {int}
    else:
        ok = kinds <= _NUMBER_TYPES
        if not ok and kinds <= {int, float, str, type(None)}:
            try:
                leaves = [x if type(x) in _NUMBER_TYPES else _NONFINITE_IN[x] for x in leaves]
            except KeyError:
                raise TensorError(
                    'float strings may only be "NaN", "Infinity" or "-Infinity"'
                ) from None
            ok = True
    if not ok:
        got = ", ".join(sorted(k.__name__ for k in kinds))
        raise TensorError(f"{dtype.name} data cannot hold values of type {got}")
    try:
        with np.errstate(over="ignore"):
            return np.array(leaves, dtype=dtype)
    except (OverflowError, ValueError, TypeError) as exc:
        raise TensorError(f"value out of range for {dtype.name}: {exc}") from None


def wire_contiguous(arr: Array) -> Array:
    """The same values as a C-contiguous little-endian array; no copy when already so."""
    target = DTYPES[dtype_name(arr.dtype)]
    if arr.dtype == target and arr.flags.c_contiguous:
        return arr
    return np.ascontiguousarray(arr, dtype=target)


def byte_view(arr: Array) -> memoryview:
    """Raw bytes of a wire-contiguous array without copying them."""
    return arr.reshape(-1).view(np.uint8).data


def encode_tensor_bin(arr: Array) -> dict[str, Any]:
    """msgpack form; ``data`` is a memoryview, which msgpack packs as bin without a copy."""
    arr = wire_contiguous(np.asarray(arr))
    return {"dtype": arr.dtype.name, "shape": list(arr.shape), "data": byte_view(arr)}


def encode_tensor_json(arr: Array) -> dict[str, Any]:
    """JSON form: nested lists; non-finite floats become strings (see module docstring)."""
    arr = np.asarray(arr)
    name = dtype_name(arr.dtype)
    data: Any
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        obj = arr.astype(object)
        obj[np.isnan(arr)] = "NaN"
        obj[np.isposinf(arr)] = "Infinity"
        obj[np.isneginf(arr)] = "-Infinity"
        data = obj.tolist()
    else:
        data = arr.tolist()
    return {"dtype": name, "shape": list(arr.shape), "data": data}


def fingerprint(model: str, version: int | None, inputs: Mapping[str, Array]) -> str:
    """Hash of what determines the result, independent of codec and compression.

    Every field is length-prefixed so that no two different requests share a byte stream.
    sha256 rather than blake2b: with SHA CPU extensions it hashes ~2.4x faster here
    (32 MiB: 23 ms vs 55 ms), and large tensors make this the costliest step of decode.
    """
    h = hashlib.sha256()

    def field(value: bytes | memoryview) -> None:
        h.update(len(value).to_bytes(8, "little"))
        h.update(value)

    field(model.encode("utf-8", "surrogatepass"))
    field(b"" if version is None else str(version).encode())
    for name in sorted(inputs):
        arr = wire_contiguous(inputs[name])
        field(name.encode("utf-8", "surrogatepass"))
        field(arr.dtype.name.encode())
        field(",".join(map(str, arr.shape)).encode())
        field(byte_view(arr))
    return h.hexdigest()[:32]


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
) -> Any:
    """``msgpack.unpackb`` with every limit explicit (its defaults scale with the input)
    and nesting bounded by msgpack's own stack (1024)."""
    slots = _Slots(max_slots)
    try:
        return msgpack.unpackb(
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


def load_json(raw: bytes, *, max_slots: int) -> Any:
    """``json.loads`` with the number of items and the nesting depth bounded."""
    # Items materialised <= commas + brackets; counting them runs at memchr speed and
    # bounds the Python objects json.loads can create before it runs.
    if raw.count(b",") + raw.count(b"[") + raw.count(b"{") > max_slots:
        _fail("too many JSON items", too_large=True)
    try:
        return json.loads(raw)
    except RecursionError:
        _fail("JSON nested too deeply")
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, int digit limit
        _fail(f"JSON: {str(exc)[:200]}")


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


def check_tree(value: object, *, max_items: int, max_depth: int) -> None:
    """Bound a decoded value (meta) in item count and depth, with string map keys only,
    so it can be echoed back in any codec; iterative, so depth cannot recurse."""
    stack: list[tuple[object, int]] = [(value, 1)]
    seen = 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if seen > max_items:
            _fail(f"more than {max_items} items", too_large=True)
        if depth > max_depth:
            _fail(f"nested deeper than {max_depth}")
        if isinstance(node, dict):
            if not all(isinstance(k, str) for k in node):
                _fail("map keys must be strings")
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
