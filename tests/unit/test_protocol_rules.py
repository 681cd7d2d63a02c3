"""Envelope rules added with the protocol package: depth over the whole message, the
relative deadline ``ttl_ms``, errors built about a request, the batch entry points and
the one dtype table."""

from __future__ import annotations

import json
from typing import Any

import msgpack
import numpy as np
import pytest
import zstandard

from inference_worker.protocol import (
    DTYPE_NAMES,
    DTYPES,
    Codec,
    ErrorCode,
    ErrorInfo,
    Limits,
    ProtocolError,
    Request,
    Response,
    Timing,
    WireCodec,
    dtype_name,
    fingerprint,
)


@pytest.fixture
def wire() -> WireCodec:
    return WireCodec()


def nested(n: int) -> Any:
    """``n`` lists, one inside the other."""
    value: Any = 1
    for _ in range(n):
        value = [value]
    return value


def envelope(**over: Any) -> dict[str, Any]:
    x = np.arange(4, dtype=np.float32)
    obj: dict[str, Any] = {
        "id": "r1",
        "model": "m",
        "inputs": {"x": {"dtype": "float32", "shape": [4], "data": x.tobytes()}},
    }
    return obj | over


def encoded(obj: dict[str, Any], codec: Codec) -> bytes:
    if codec is Codec.JSON:
        return json.dumps(obj).encode()
    packed = msgpack.packb(obj, use_bin_type=True)
    return zstandard.ZstdCompressor().compress(packed) if codec is Codec.ZSTD else packed


def jsonable_inputs(obj: dict[str, Any]) -> dict[str, Any]:
    obj["inputs"] = {"x": {"dtype": "float32", "shape": [4], "data": [0, 1, 2, 3]}}
    return obj


def failure(wire: WireCodec, raw: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        wire.decode_request(raw)
    return info.value


# ---- depth over the whole envelope ----------------------------------------------------


@pytest.mark.parametrize("codec", list(Codec))
@pytest.mark.parametrize(
    "over",
    [
        {"unknown": nested(40)},
        {"unknown": {"a": {"b": nested(35)}}},
        {"inputs": {"x": {"dtype": "float32", "shape": [1], "data": [1.0], "x": nested(40)}}},
        {"inputs": {"x": {"dtype": "float32", "shape": [1], "data": nested(40)}}},
    ],
    ids=["unknown key", "unknown map", "inside a tensor", "tensor data"],
)
def test_max_depth_bounds_the_whole_envelope(
    wire: WireCodec, codec: Codec, over: dict[str, Any]
) -> None:
    obj = envelope(**over)
    if codec is Codec.JSON and "inputs" not in over:
        obj = jsonable_inputs(obj)
    err = failure(wire, encoded(obj, codec))
    assert err.code is ErrorCode.BAD_REQUEST and "deeper than 32" in err.message
    assert (err.id, err.model, err.codec) == ("r1", "m", codec)  # still addressed


@pytest.mark.parametrize("codec", list(Codec))
def test_depth_up_to_the_limit_is_accepted(wire: WireCodec, codec: Codec) -> None:
    obj = envelope(unknown=nested(31))  # 1 (the envelope) + 31 lists = 32
    if codec is Codec.JSON:
        obj = jsonable_inputs(obj)
    assert wire.decode_request(encoded(obj, codec)).id == "r1"
    assert failure(wire, encoded(obj | {"unknown": nested(32)}, codec)).code is (
        ErrorCode.BAD_REQUEST
    )


def test_list_tensor_dimensions_count_towards_depth() -> None:
    wire = WireCodec(Limits(max_depth=5))  # envelope, inputs, tensor, data + 1 level
    two_d = {"dtype": "int8", "shape": [1, 2], "data": [[1, 2]]}
    three_d = {"dtype": "int8", "shape": [1, 1, 2], "data": [[[1, 2]]]}
    ok = json.dumps(envelope(inputs={"x": two_d})).encode()
    assert wire.decode_request(ok).inputs["x"].shape == (1, 2)
    deep = json.dumps(envelope(inputs={"x": three_d})).encode()
    assert failure(wire, deep).code is ErrorCode.BAD_REQUEST


def test_max_depth_bounds_responses(wire: WireCodec) -> None:
    raw = encoded({"id": "r1", "status": "ok", "junk": nested(40)}, Codec.MSGPACK)
    with pytest.raises(ProtocolError) as info:
        wire.decode_response(raw)
    assert info.value.code is ErrorCode.BAD_REQUEST


# ---- relative deadline ----------------------------------------------------------------


@pytest.mark.parametrize("codec", list(Codec))
def test_ttl_ms_round_trips(wire: WireCodec, codec: Codec) -> None:
    req = Request(id="t", model="m", inputs={"x": np.zeros(2, np.int8)}, ttl_ms=250)
    back = wire.decode_request(wire.encode_request(req, codec))
    assert (back.ttl_ms, back.deadline_ms) == (250, None)
    zero = wire.decode_request(encoded(envelope(ttl_ms=0), Codec.MSGPACK))
    assert zero.ttl_ms == 0


@pytest.mark.parametrize("ttl", [-1, 1.5, True, "100", 2**63])
def test_bad_ttl_ms_is_a_bad_request(wire: WireCodec, ttl: object) -> None:
    assert failure(wire, encoded(envelope(ttl_ms=ttl), Codec.MSGPACK)).code is (
        ErrorCode.BAD_REQUEST
    )


def test_deadline_and_ttl_ms_together_are_a_bad_request(wire: WireCodec) -> None:
    err = failure(wire, encoded(envelope(deadline=1, ttl_ms=1), Codec.ZSTD))
    assert err.code is ErrorCode.BAD_REQUEST and "not both" in err.message
    assert err.id == "r1"


def test_ttl_ms_does_not_change_the_fingerprint(wire: WireCodec) -> None:
    plain = wire.decode_request(encoded(envelope(), Codec.ZSTD))
    timed = wire.decode_request(encoded(envelope(ttl_ms=5), Codec.ZSTD))
    assert plain.fingerprint == timed.fingerprint


# ---- errors about a request ------------------------------------------------------------


def test_error_about_a_request_carries_its_address() -> None:
    req = Request(
        id="r9",
        model="m",
        inputs={},
        app="a",
        reply_to="response_message/a",
        meta={"k": 1},
        codec=Codec.JSON,
    )
    err = ProtocolError.about(req, ErrorCode.OVERLOADED, "busy", retry_after_ms=30)
    assert (err.id, err.app, err.model, err.meta, err.codec) == ("r9", "a", "m", {"k": 1}, "json")
    assert err.reply_to is None  # a claimed topic is only used when the caller says so
    assert (err.code, err.message, err.retry_after_ms, err.retryable) == (
        ErrorCode.OVERLOADED,
        "busy",
        30,
        True,
    )
    routed = ProtocolError.about(req, ErrorCode.UNAUTHORIZED, "no", reply_to=req.reply_to)
    assert routed.reply_to == "response_message/a" and routed.retry_after_ms is None


# ---- batch entry points ------------------------------------------------------------------


def test_decode_requests_never_raises(wire: WireCodec) -> None:
    good = encoded(envelope(), Codec.ZSTD)
    bad: list[Any] = [b"", b"\xc1", None, b"{", encoded(envelope(id=""), Codec.MSGPACK)]
    results = wire.decode_requests([good, *bad, good])
    assert isinstance(results[0], Request) and isinstance(results[-1], Request)
    errors = results[1:-1]
    assert all(isinstance(e, ProtocolError) for e in errors)
    assert all(e.__traceback__ is None for e in errors if isinstance(e, ProtocolError))
    assert wire.decode_requests([]) == []


def test_encode_responses_matches_one_by_one(wire: WireCodec) -> None:
    resps = [
        Response(
            id=f"r{i}",
            status="ok",
            model="m",
            version=1,
            outputs={"y": np.full((1, 3), i, np.float32)},
            timing=Timing(0.5, 1.0, 2),
        )
        for i in range(3)
    ] + [Response(id="e", status="error", error=ErrorInfo(ErrorCode.EXHAUSTED, "x"))]
    codecs = [Codec.ZSTD, Codec.MSGPACK, Codec.JSON, Codec.ZSTD]
    batch = wire.encode_responses(resps, codecs)
    assert batch == [wire.encode_response(r, c) for r, c in zip(resps, codecs, strict=True)]
    assert wire.encode_responses(resps, Codec.MSGPACK) == [
        wire.encode_response(r, Codec.MSGPACK) for r in resps
    ]
    assert wire.decode_response(batch[2]).timing == Timing(0.5, 1.0, 2)
    with pytest.raises(ValueError, match="codecs"):
        wire.encode_responses(resps, codecs[:2])


def test_codec_is_reusable_after_failures(wire: WireCodec) -> None:
    req = Request(id="a", model="m", inputs={"x": np.arange(3, dtype=np.int16)})
    before = wire.encode_request(req)
    with pytest.raises(TypeError):  # the packer fails midway through a map
        wire.encode_request(Request(id="b", model="m", inputs={}, meta={"o": object()}))
    with pytest.raises(ProtocolError):
        wire.decode_request(before[:-3])
    assert wire.encode_request(req) == before
    assert wire.decode_request(before).id == "a"


# ---- fingerprint and dtypes --------------------------------------------------------------


def test_fingerprint_is_stable_across_releases(wire: WireCodec) -> None:
    # Values computed by the previous implementation: dedupe records in Redis outlive a
    # deploy, so the same request must keep its fingerprint.
    inputs = {
        "pixels": np.arange(64, dtype=np.float32).reshape(1, 64),
        "mask": np.array([[True, False]]),
    }
    for version, want in (
        (None, "d2bfdf70c4fa938dd67ae9f39f90215d"),
        (2, "3a290547d2be8eed7fb66b586a8dffa7"),
    ):
        req = Request(id="g", model="digits", version=version, inputs=inputs)
        assert fingerprint("digits", version, inputs) == want
        for codec in Codec:
            assert wire.decode_request(wire.encode_request(req, codec)).fingerprint == want
    swapped = {k: v.astype(v.dtype.newbyteorder(">")) for k, v in inputs.items()}
    assert fingerprint("digits", None, swapped) == "d2bfdf70c4fa938dd67ae9f39f90215d"


def test_one_dtype_table() -> None:
    assert tuple(DTYPES) == DTYPE_NAMES
    for name in DTYPE_NAMES:
        assert dtype_name(np.dtype(name)) == name
        assert dtype_name(np.dtype(name).newbyteorder(">")) == name
        assert DTYPES[name].byteorder in "<|"
    for other in ("complex64", "U3", "S2", "O", "M8[ns]", "V4"):
        with pytest.raises(ValueError):
            dtype_name(np.dtype(other))
