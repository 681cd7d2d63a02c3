"""Tensor <-> wire conversion and the request fingerprint (pure, no I/O).

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

import functools
import hashlib
import math
from collections.abc import Mapping
from itertools import chain
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt

from inference_worker_client.protocol.dtypes import DTYPES, dtype_name, wire_dtype
from inference_worker_client.protocol.loaders import WireError

Array = npt.NDArray[Any]

#: numpy's own limit is 64; 32 keeps list flattening and error messages small.
MAX_NDIM = 32
#: Bounds one dimension so ``prod(shape)`` stays in int64 arithmetic inside numpy.
MAX_DIM = 2**31 - 1

_NONFINITE_IN: Mapping[object, float] = MappingProxyType(
    {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf, None: math.nan}
)
_NUMBER_TYPES = frozenset({int, float})
_DTYPE_CHOICES = ", ".join(DTYPES)
# The dtype field of the fingerprint, length prefix included, per wire dtype.
_DTYPE_FIELD: Mapping[str, bytes] = MappingProxyType(
    {name: len(name).to_bytes(8, "little") + name.encode() for name in DTYPES}
)


class TensorError(WireError):
    """A tensor map whose dtype, shape or data cannot be accepted."""


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
        raise TensorError(f"dtype must be one of {_DTYPE_CHOICES}")
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
    target = wire_dtype(arr.dtype)
    if arr.dtype == target and arr.flags.c_contiguous:
        return arr
    return np.ascontiguousarray(arr, dtype=target)


def encode_tensor_bin(arr: Array) -> dict[str, Any]:
    """msgpack form; ``data`` is the array's own memoryview (``len`` counts rows, not
    bytes), which msgpack packs as bin without a copy."""
    arr = wire_contiguous(np.asarray(arr))
    return {"dtype": dtype_name(arr.dtype), "shape": list(arr.shape), "data": arr.data}


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

    Every field is length-prefixed so that no two different requests share a byte stream:
    model, version, then per input in name order its name, dtype, shape and byte count,
    then its data. Decoded binary tensors are already wire-contiguous views of the
    received bytes, so they are hashed in place, without a copy. sha256 rather than
    blake2b: with SHA CPU extensions it hashes ~2x faster here (32 MiB: 23 ms vs 44 ms),
    and large tensors make this the costliest step of decode. For small requests the
    fixed part dominates, so the hash of the model and version fields is kept and copied,
    and each name's and shape's field is made once (bounded caches: names are at most
    ``max_id_len`` characters and shapes ``max_depth`` dimensions, ~3 MiB at most with
    the default limits, whatever a sender cycles through).
    """
    h = _seeded(model, version).copy()
    for name in sorted(inputs) if len(inputs) > 1 else inputs:
        arr = wire_contiguous(inputs[name])
        h.update(  # the small fields in one call, the data in place
            _name_field(name)
            + _DTYPE_FIELD[dtype_name(arr.dtype)]
            + _shape_field(arr.shape)
            + arr.nbytes.to_bytes(8, "little")
        )
        h.update(arr.data)
    digest: str = h.hexdigest()
    return digest[:32]


@functools.lru_cache(maxsize=256, typed=True)  # typed: True and 1 hash differently
def _seeded(model: str, version: int | None) -> Any:
    """sha256 fed the model and version fields (`fingerprint` copies it, never updates it)."""
    version_bytes = b"" if version is None else str(version).encode()
    return hashlib.sha256(_field(model.encode("utf-8", "surrogatepass")) + _field(version_bytes))


@functools.lru_cache(maxsize=1024)
def _name_field(name: str) -> bytes:
    return _field(name.encode("utf-8", "surrogatepass"))


@functools.lru_cache(maxsize=1024)
def _shape_field(shape: tuple[int, ...]) -> bytes:
    return _field(",".join(map(str, shape)).encode())


def _field(value: bytes) -> bytes:
    return len(value).to_bytes(8, "little") + value
