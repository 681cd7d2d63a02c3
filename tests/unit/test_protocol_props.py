"""Property tests: round trips for every dtype/shape/codec, and hostile bytes never
escape as anything but ProtocolError.

JSON note: Python's ``json`` keeps int64/uint64 exact, so no range restriction is needed
here; JavaScript clients lose integers beyond 2**53 (a documented limitation).
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import msgpack
import numpy as np
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from inference_worker.protocol import (
    DTYPES,
    Codec,
    ErrorCode,
    Limits,
    ProtocolError,
    Request,
    Response,
    Timing,
    WireCodec,
)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WIRE = WireCodec()  # module level in tests only: hypothesis forbids function fixtures
SMALL = WireCodec(Limits(max_decompressed_bytes=64 * 1024, max_json_elements=2000))

shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)
arrays = st.sampled_from(sorted(DTYPES)).flatmap(lambda name: hnp.arrays(np.dtype(name), shapes))
names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=8)


def assert_same(got: np.ndarray[Any, Any], want: np.ndarray[Any, Any], exact: bool) -> None:
    assert got.dtype == want.dtype.newbyteorder("<") and got.shape == want.shape
    if exact:
        assert got.tobytes() == np.ascontiguousarray(want).tobytes()
    else:  # JSON: NaN payloads collapse to one NaN
        np.testing.assert_array_equal(got, want)


@FAST
@given(
    inputs=st.dictionaries(names, arrays, min_size=1, max_size=3),
    codec=st.sampled_from(list(Codec)),
    version=st.none() | st.integers(1, 2**40),
)
def test_request_round_trip(inputs: dict[str, Any], codec: Codec, version: int | None) -> None:
    req = Request(id="r", model="m", inputs=inputs, version=version, meta={"k": [1, "x"]})
    back = WIRE.decode_request(WIRE.encode_request(req, codec))
    assert (back.id, back.model, back.version, back.codec) == ("r", "m", version, codec)
    assert back.meta == {"k": [1, "x"]} and list(back.inputs) == list(inputs)
    for name, arr in inputs.items():
        assert_same(back.inputs[name], arr, exact=codec is not Codec.JSON)
    # Fingerprints hash raw bytes, and JSON cannot carry NaN payloads: compare JSON only
    # when there is no NaN.
    has_nan = any(a.dtype.kind == "f" and np.isnan(a).any() for a in inputs.values())
    other = Codec.MSGPACK if codec is not Codec.MSGPACK else Codec.ZSTD
    if codec is not Codec.JSON or not has_nan:
        again = WIRE.decode_request(WIRE.encode_request(req, other))
        assert again.fingerprint == back.fingerprint


@FAST
@given(
    outputs=st.dictionaries(names, arrays, min_size=0, max_size=3),
    codec=st.sampled_from(list(Codec)),
)
def test_response_round_trip(outputs: dict[str, Any], codec: Codec) -> None:
    resp = Response(
        id="r",
        status="ok",
        model="m",
        outputs=outputs or None,
        timing=Timing(0.5, 1.0, 2),
        worker="w",
    )
    back = WIRE.decode_response(WIRE.encode_response(resp, codec))
    assert (back.id, back.status, back.timing, back.worker) == ("r", "ok", resp.timing, "w")
    for name, arr in outputs.items():
        assert back.outputs is not None
        assert_same(back.outputs[name], arr, exact=codec is not Codec.JSON)


def only_protocol_errors(raw: bytes) -> None:
    for wire in (WIRE, SMALL):
        try:
            wire.decode_request(raw)
        except ProtocolError as exc:
            assert isinstance(exc.code, ErrorCode)
            assert not exc.message.startswith("undecodable"), exc.__cause__  # no catch-all
        try:
            wire.decode_response(raw)
        except ProtocolError as exc:
            assert not exc.message.startswith("undecodable"), exc.__cause__


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=256))
def test_random_bytes(raw: bytes) -> None:
    only_protocol_errors(raw)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_random_bytes_after_zstd_magic(tail: bytes) -> None:
    only_protocol_errors(b"\x28\xb5\x2f\xfd" + tail)


scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.floats()
    | st.text(max_size=5)
    | st.binary(max_size=8)
)
values = st.recursive(
    scalars,
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=4), kids, max_size=4)
    ),
    max_leaves=20,
)
tensor_like = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from([*DTYPES, "complex64", ""]) | values,
        "shape": st.lists(st.integers(-2, 4), max_size=3) | values,
        "data": st.binary(max_size=32) | values,
    },
)
envelopes = st.fixed_dictionaries(
    {},
    optional={
        "v": st.sampled_from([1, 2, True]) | values,
        "id": st.text(max_size=4) | values,
        "app": values,
        "key": values,
        "model": st.just("m") | values,
        "version": st.integers(-1, 3) | values,
        "reply_to": values,
        "deadline": values,
        "meta": values,
        "inputs": st.dictionaries(st.text(max_size=3), tensor_like, max_size=3) | values,
        "status": st.sampled_from(["ok", "error"]),
        "outputs": values,
        "error": values,
        "timing": values,
        "worker": values,
    },
)


def frames(obj: Any) -> list[bytes]:
    try:
        packed = msgpack.packb(obj, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        packed = b"\x80"
    out = [packed, zstandard.ZstdCompressor().compress(packed), packed[: len(packed) // 2]]
    with contextlib.suppress(TypeError, ValueError):
        out.append(json.dumps(obj, default=lambda b: list(b)).encode())
    return out


@settings(max_examples=300, deadline=None)
@given(envelopes | values)
def test_random_structures(obj: Any) -> None:
    for raw in frames(obj):
        only_protocol_errors(raw)
