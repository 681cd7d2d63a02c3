"""The one table of tensor dtypes the wire carries (DESIGN.md section 5).

Whatever needs to know which dtypes exist (model config checks, the runtimes' maps to
their own dtype types) is meant to derive its set from :data:`DTYPE_NAMES`, so that a
dtype is added or removed in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np

#: Wire dtype names, in the order error messages list them.
DTYPE_NAMES: tuple[str, ...] = (
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

#: Wire dtype name -> the little-endian numpy dtype its bytes are read as.
DTYPES: Mapping[str, np.dtype[Any]] = MappingProxyType(
    {name: np.dtype(name).newbyteorder("<") for name in DTYPE_NAMES}
)

# numpy computes ``dtype.name`` in Python (~4 us); a dict keyed by dtype is ~0.1 us and
# this lookup runs for every tensor encoded and fingerprinted.
_NAME_OF: Mapping[np.dtype[Any], str] = MappingProxyType(
    {dtype: name for name, dtype in DTYPES.items()}
)


def dtype_name(dtype: np.dtype[Any]) -> str:
    """Wire name of a numpy dtype of either byte order; ``ValueError`` for dtypes the
    protocol cannot carry."""
    name = _NAME_OF.get(dtype)
    if name is None:
        name = _NAME_OF.get(dtype.newbyteorder("<")) if dtype.kind in "biuf" else None
        if name is None:
            raise ValueError(f"dtype {dtype!s} is not supported on the wire")
    return name


def wire_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The little-endian dtype the wire uses for ``dtype`` (``ValueError`` as above)."""
    return DTYPES[dtype_name(dtype)]
