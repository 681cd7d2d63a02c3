"""Example tests for the wire protocol: crafted hostile inputs and round trips."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import msgpack
import numpy as np
import pytest
import zstandard

from inference_worker.protocol import (
    RETRYABLE_CODES,
    Answer,
    AnswerBatch,
    Codec,
    ErrorCode,
    ErrorInfo,
    Limits,
    ProtocolError,
    Request,
    Response,
    Timing,
    WireCodec,
    detect_codec,
    error_response,
    fingerprint,
)

MiB = 1 << 20
LAST_EMPTY_RAW_BLOCK = b"\x01\x00\x00"


@pytest.fixture
def wire() -> WireCodec:
    return WireCodec()


def tensor(arr: np.ndarray[Any, Any]) -> dict[str, Any]:
    return {"dtype": arr.dtype.name, "shape": list(arr.shape), "data": arr.tobytes()}


def envelope(**over: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "id": "r1",
        "app": "app1",
        "model": "m",
        "inputs": {"x": tensor(np.arange(6, dtype=np.float32).reshape(2, 3))},
    }
    obj.update(over)
    return {k: v for k, v in obj.items() if v is not None}


def packz(obj: Any) -> bytes:
    return zstandard.ZstdCompressor().compress(msgpack.packb(obj, use_bin_type=True))


def stream_frame(data: bytes, **params: Any) -> bytes:
    """A frame without a declared content size, as streaming compressors write it."""
    if params:
        cctx = zstandard.ZstdCompressor(
            compression_params=zstandard.ZstdCompressionParameters.from_level(
                1, write_content_size=False, **params
            )
        )
    else:
        cctx = zstandard.ZstdCompressor(write_content_size=False)
    cobj = cctx.compressobj()
    return cobj.compress(data) + cobj.flush()


def patch_content_size(frame: bytes, size: int) -> bytes:
    """Rewrite the declared content size of a frame without changing its blocks."""
    fhd = frame[4]
    single, fcs_flag, did_flag = fhd & 0x20, fhd >> 6, fhd & 3
    offset = 5 + (0 if single else 1) + (0, 1, 2, 4)[did_flag]
    width = (1 if single else 0, 2, 4, 8)[fcs_flag]
    stored = size - 256 if width == 2 else size
    return frame[:offset] + stored.to_bytes(width, "little") + frame[offset + width :]


def deep(n: int) -> Any:
    value: Any = 1
    for _ in range(n):
        value = [value]
    return value


def code_of(wire: WireCodec, raw: bytes) -> ErrorCode:
    with pytest.raises(ProtocolError) as info:
        wire.decode_request(raw)
    return info.value.code


# ---- codec detection --------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "codec"),
    [
        (b"\x28\xb5\x2f\xfd\x00", Codec.ZSTD),
        (b"\x80", Codec.MSGPACK),
        (b"\xde\x00\x00", Codec.MSGPACK),
        (b" \n\t{}", Codec.JSON),
        (b"{", Codec.JSON),
    ],
)
def test_detect_codec(raw: bytes, codec: Codec) -> None:
    assert detect_codec(raw) is codec


@pytest.mark.parametrize("raw", [b"", b"\x90", b"[1]", b"\xef\xbb\xbf{}", b"hello"])
def test_detect_codec_rejects(raw: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        detect_codec(raw)
    assert info.value.code is ErrorCode.BAD_REQUEST


# ---- zstd -------------------------------------------------------------------------


def test_frame_declaring_one_tib_is_too_large(wire: WireCodec) -> None:
    # magic, FHD (8-byte FCS, single segment), FCS = 1 TiB, one empty last raw block.
    frame = b"\x28\xb5\x2f\xfd\xe0" + (1 << 40).to_bytes(8, "little") + LAST_EMPTY_RAW_BLOCK
    assert zstandard.frame_content_size(frame) == 1 << 40
    assert code_of(wire, frame) is ErrorCode.TOO_LARGE


def test_unknown_size_frame_beyond_cap_is_too_large() -> None:
    wire = WireCodec(Limits(max_decompressed_bytes=1 * MiB))
    frame = stream_frame(b"\x00" * (3 * MiB))
    assert zstandard.frame_content_size(frame) == -1
    assert code_of(wire, frame) is ErrorCode.TOO_LARGE


def test_unknown_size_frame_beyond_default_cap_is_too_large(wire: WireCodec) -> None:
    frame = stream_frame(b"\x00" * (80 * MiB))
    assert len(frame) < 64 * 1024
    assert code_of(wire, frame) is ErrorCode.TOO_LARGE


def test_unknown_size_frame_within_cap_decodes(wire: WireCodec) -> None:
    frame = stream_frame(msgpack.packb(envelope(), use_bin_type=True))
    assert wire.decode_request(frame).id == "r1"


def test_frame_lying_about_its_size_is_rejected() -> None:
    wire = WireCodec(Limits(max_decompressed_bytes=4000))
    payload = msgpack.packb(envelope(meta=None, junk="y" * 5000), use_bin_type=True)
    frame = zstandard.ZstdCompressor().compress(payload)
    for declared in (300, 3999):  # under the cap, content is more: never past the cap
        assert code_of(wire, patch_content_size(frame, declared)) is ErrorCode.BAD_REQUEST
    assert code_of(wire, frame) is ErrorCode.TOO_LARGE  # the honest frame is over the cap
    # declaring more than the content is caught too
    big_cap = WireCodec()
    assert code_of(big_cap, patch_content_size(frame, len(payload) + 1)) is ErrorCode.BAD_REQUEST
    assert big_cap.decode_request(patch_content_size(frame, len(payload))).id == "r1"


@pytest.mark.parametrize("tail", [b"junk", b"\x00", zstandard.ZstdCompressor().compress(b"\x80")])
def test_trailing_data_is_rejected(wire: WireCodec, tail: bytes) -> None:
    payload = msgpack.packb(envelope(), use_bin_type=True)
    assert code_of(wire, packz(envelope()) + tail) is ErrorCode.BAD_REQUEST
    assert code_of(wire, stream_frame(payload) + tail) is ErrorCode.BAD_REQUEST


def test_huge_window_is_too_large(wire: WireCodec) -> None:
    library_frame = stream_frame(msgpack.packb(envelope(), use_bin_type=True), window_log=27)
    assert zstandard.get_frame_parameters(library_frame).window_size == 1 << 27
    assert code_of(wire, library_frame) is ErrorCode.TOO_LARGE
    # hand-made: no FCS, window descriptor exponent 17 => 2**27, one empty block
    crafted = b"\x28\xb5\x2f\xfd\x00\x88" + LAST_EMPTY_RAW_BLOCK
    assert code_of(wire, crafted) is ErrorCode.TOO_LARGE


def test_single_segment_frame_with_large_declared_window_is_fine(wire: WireCodec) -> None:
    # A declared-size frame is decoded in one shot; its "window" is its content size.
    big = envelope(inputs={"x": tensor(np.ones((3, 1 << 20), np.float32))})
    params = zstandard.ZstdCompressionParameters.from_level(19, window_log=27)
    frame = zstandard.ZstdCompressor(compression_params=params).compress(
        msgpack.packb(big, use_bin_type=True)
    )
    assert zstandard.get_frame_parameters(frame).window_size > 8 * MiB
    assert wire.decode_request(frame).inputs["x"].shape == (3, 1 << 20)


@pytest.mark.parametrize(
    "raw",
    [
        b"\x28\xb5\x2f\xfd",
        b"\x28\xb5\x2f\xfd\xff\xff\xff",
        packz(envelope())[:-3],
        b"\x28\xb5\x2f\xfd\x00\x40\x07\x00\x00",
        stream_frame(b"\x80")[:-2],
    ],
)
def test_corrupt_frames_are_bad_requests(wire: WireCodec, raw: bytes) -> None:
    assert code_of(wire, raw) is ErrorCode.BAD_REQUEST


def test_oversized_message_is_rejected_before_work() -> None:
    wire = WireCodec(Limits(max_compressed_bytes=100))
    with pytest.raises(ProtocolError) as info:
        wire.decode_request(b"{" + b" " * 200)
    assert info.value.code is ErrorCode.TOO_LARGE and info.value.codec is None


# ---- msgpack ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"\x81\xa2id\xc6\xff\xff\xff\xff", ErrorCode.BAD_REQUEST),  # 4 GiB bin, truncated
        (b"\x81\xa2id\xdd\xff\xff\xff\xff", ErrorCode.TOO_LARGE),  # 4 G array, truncated
        (b"\x81\xa2id\xdb\x00\x10\x00\x00" + b"a" * MiB, ErrorCode.TOO_LARGE),  # str>64KiB
        (b"\x81\xa2id\xdb\x00\x10\x00\x00", ErrorCode.BAD_REQUEST),  # ...truncated
        (msgpack.packb({"id": msgpack.ExtType(1, b"ab")}), ErrorCode.BAD_REQUEST),
        (msgpack.packb({"id": msgpack.ExtType(1, b"")}), ErrorCode.BAD_REQUEST),
        (b"\x81\xa2id\xd6\xff\x00\x00\x00\x01", ErrorCode.BAD_REQUEST),  # timestamp ext
        (msgpack.packb({1: 2}), ErrorCode.BAD_REQUEST),
        (b"\x81\xa2id" + b"\x91" * 5000 + b"\xc0", ErrorCode.BAD_REQUEST),
        (b"\x81\xa1a" * 3000 + b"\xc0", ErrorCode.BAD_REQUEST),
        (msgpack.packb(envelope()) + b"\x00", ErrorCode.BAD_REQUEST),
        (b"\x81\xa2id\xa2\xff\xfe", ErrorCode.BAD_REQUEST),  # invalid utf-8
        (b"\x81\xc1", ErrorCode.BAD_REQUEST),  # reserved byte
        (b"\x80", ErrorCode.BAD_REQUEST),  # empty map: no id
    ],
)
def test_hostile_msgpack(wire: WireCodec, raw: bytes, code: ErrorCode) -> None:
    assert code_of(wire, raw) is code
    assert code_of(wire, zstandard.ZstdCompressor().compress(raw)) is code


def test_container_slots_are_bounded() -> None:
    wire = WireCodec(Limits(max_json_elements=100))
    obj = envelope(junk=[[]] * 70_000)  # 1 byte each on the wire, 64 B each in Python
    assert code_of(wire, msgpack.packb(obj)) is ErrorCode.TOO_LARGE
    assert code_of(wire, json.dumps(obj | {"inputs": {}}).encode()) is ErrorCode.TOO_LARGE


# ---- JSON ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b'{"id": "a", "x": ' + b"[" * 100_000,
        b'{"id": "a", "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        b"{}",
        b'{"id": 1e999999}',
        b'{"id": "r", "v": 1, ',
        b'{"a": "\\ud800"',
        b'{"id": "' + b"9" * 5000 + b'"}',
        b'{"id": ' + b"9" * 5000 + b"}",
    ],
)
def test_hostile_json(wire: WireCodec, raw: bytes) -> None:
    assert code_of(wire, raw) is ErrorCode.BAD_REQUEST


def jreq(**tensor_fields: Any) -> bytes:
    return json.dumps({"id": "j1", "model": "m", "inputs": {"x": tensor_fields}}).encode()


def test_json_tensor_forms(wire: WireCodec) -> None:
    cases: list[tuple[dict[str, Any], np.ndarray[Any, Any]]] = [
        ({"dtype": "int16", "shape": [0, 3], "data": []}, np.zeros((0, 3), np.int16)),
        ({"dtype": "float32", "shape": [], "data": 3.5}, np.array(3.5, np.float32)),
        ({"dtype": "float32", "shape": [], "data": [3.5]}, np.array(3.5, np.float32)),
        ({"dtype": "float32", "shape": [2], "data": [1, 2]}, np.array([1, 2], np.float32)),
        (
            {"dtype": "float64", "shape": [2, 2], "data": [1, 2.5, 3, 4]},
            np.array([[1, 2.5], [3, 4]]),
        ),
        ({"dtype": "bool", "shape": [1, 2], "data": [[True, False]]}, np.array([[1, 0]], bool)),
        ({"dtype": "uint64", "shape": [1], "data": [2**64 - 1]}, np.array([2**64 - 1], np.uint64)),
        (
            {"dtype": "float16", "shape": [3], "data": ["NaN", None, "-Infinity"]},
            np.array([np.nan, np.nan, -np.inf], np.float16),
        ),
    ]
    for fields, expected in cases:
        got = wire.decode_request(jreq(**fields)).inputs["x"]
        assert got.dtype == expected.dtype and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"dtype": "float32", "shape": [2], "data": [1, True]}, ErrorCode.INVALID_INPUT),
        ({"dtype": "int32", "shape": [2], "data": [1, "2"]}, ErrorCode.INVALID_INPUT),
        ({"dtype": "int32", "shape": [2], "data": [1, 2.5]}, ErrorCode.INVALID_INPUT),
        ({"dtype": "bool", "shape": [2], "data": [1, 0]}, ErrorCode.INVALID_INPUT),
        ({"dtype": "float32", "shape": [1], "data": ["1.5"]}, ErrorCode.INVALID_INPUT),
        ({"dtype": "uint8", "shape": [1], "data": [300]}, ErrorCode.INVALID_INPUT),
        ({"dtype": "uint64", "shape": [1], "data": [-1]}, ErrorCode.INVALID_INPUT),
        ({"dtype": "float64", "shape": [1], "data": [10**400]}, ErrorCode.INVALID_INPUT),
        ({"dtype": "float32", "shape": [2, 2], "data": [[1, 2], [3]]}, ErrorCode.INVALID_INPUT),
        ({"dtype": "float32", "shape": [1], "data": [[1]]}, ErrorCode.INVALID_INPUT),
        ({"dtype": "float32", "shape": [3], "data": [1, 2]}, ErrorCode.INVALID_INPUT),
        ({"dtype": "float32", "shape": [2], "data": {"a": 1}}, ErrorCode.INVALID_INPUT),
        ({"dtype": "float32", "shape": [-1], "data": []}, ErrorCode.INVALID_INPUT),
        ({"dtype": "float32", "shape": [1.0], "data": [1]}, ErrorCode.INVALID_INPUT),
        ({"dtype": "float32", "shape": [1] * 33, "data": [1]}, ErrorCode.INVALID_INPUT),
        ({"dtype": "float32", "shape": "2", "data": [1, 2]}, ErrorCode.INVALID_INPUT),
        ({"dtype": "complex64", "shape": [1], "data": [1]}, ErrorCode.INVALID_INPUT),
        ({"shape": [1], "data": [1]}, ErrorCode.INVALID_INPUT),
        ({"dtype": "float32", "shape": [1001, 1000], "data": [0]}, ErrorCode.TOO_LARGE),
    ],
)
def test_bad_json_tensors(wire: WireCodec, fields: dict[str, Any], code: ErrorCode) -> None:
    assert code_of(wire, jreq(**fields)) is code


# ---- binary tensors and envelope ------------------------------------------------------


@pytest.mark.parametrize(
    ("tensor_obj", "code"),
    [
        ({"dtype": "float32", "shape": [2], "data": b"\x00" * 7}, ErrorCode.INVALID_INPUT),
        ({"dtype": "float32", "shape": [0], "data": b"\x00"}, ErrorCode.INVALID_INPUT),
        ({"dtype": "float128", "shape": [1], "data": b"\x00" * 16}, ErrorCode.INVALID_INPUT),
        ({"dtype": "bool", "shape": [2], "data": b"\x01\x02"}, ErrorCode.INVALID_INPUT),
        ({"dtype": "uint8", "shape": [2**31, 2**31], "data": b""}, ErrorCode.INVALID_INPUT),
        ([1, 2], ErrorCode.INVALID_INPUT),
    ],
)
def test_bad_binary_tensors(wire: WireCodec, tensor_obj: Any, code: ErrorCode) -> None:
    assert code_of(wire, packz(envelope(inputs={"x": tensor_obj}))) is code


@pytest.mark.parametrize(
    ("over", "code"),
    [
        ({"id": True}, ErrorCode.BAD_REQUEST),
        ({"id": ""}, ErrorCode.BAD_REQUEST),
        ({"id": "x" * 129}, ErrorCode.BAD_REQUEST),
        ({"id": None}, ErrorCode.BAD_REQUEST),
        ({"model": None}, ErrorCode.BAD_REQUEST),
        ({"model": 3}, ErrorCode.BAD_REQUEST),
        ({"version": True}, ErrorCode.BAD_REQUEST),
        ({"version": 0}, ErrorCode.BAD_REQUEST),
        ({"version": 1.0}, ErrorCode.BAD_REQUEST),
        ({"v": 2}, ErrorCode.BAD_REQUEST),
        ({"v": True}, ErrorCode.BAD_REQUEST),
        ({"deadline": "soon"}, ErrorCode.BAD_REQUEST),
        ({"deadline": -1}, ErrorCode.BAD_REQUEST),
        ({"app": 5}, ErrorCode.BAD_REQUEST),
        ({"key": b"k"}, ErrorCode.BAD_REQUEST),
        ({"reply_to": ["t"]}, ErrorCode.BAD_REQUEST),
        ({"inputs": None}, ErrorCode.BAD_REQUEST),
        ({"inputs": {}}, ErrorCode.BAD_REQUEST),
        ({"inputs": [1]}, ErrorCode.BAD_REQUEST),
        ({"inputs": {f"i{i}": tensor(np.zeros(1)) for i in range(65)}}, ErrorCode.TOO_LARGE),
        ({"inputs": {b"x": tensor(np.zeros(1))}}, ErrorCode.INVALID_INPUT),
        ({"inputs": {"": tensor(np.zeros(1))}}, ErrorCode.INVALID_INPUT),
        ({"meta": [1]}, ErrorCode.BAD_REQUEST),
        ({"meta": {"a": "x" * 5000}}, ErrorCode.TOO_LARGE),
        ({"meta": {"a": list(range(5000))}}, ErrorCode.TOO_LARGE),
        ({"meta": {b"a": 1}}, ErrorCode.BAD_REQUEST),
        ({"meta": {"a": deep(40)}}, ErrorCode.BAD_REQUEST),
    ],
)
def test_bad_envelopes(wire: WireCodec, over: dict[str, Any], code: ErrorCode) -> None:
    obj = envelope()
    obj.update(over)
    obj = {k: v for k, v in obj.items() if v is not None}
    assert code_of(wire, packz(obj)) is code


def test_full_envelope_decodes(wire: WireCodec) -> None:
    obj = envelope(
        key="k",
        version=3,
        reply_to="response_message/app1",
        deadline=1_700_000,
        meta={"trace": "t", "n": [1, {"a": None}]},
        unknown={"ignored": [1]},
    )
    req = wire.decode_request(packz(obj))
    assert (req.id, req.app, req.key, req.model, req.version) == ("r1", "app1", "k", "m", 3)
    assert (req.reply_to, req.deadline_ms, req.v, req.codec) == (
        "response_message/app1",
        1_700_000,
        1,
        Codec.ZSTD,
    )
    assert req.meta == {"trace": "t", "n": [1, {"a": None}]}
    assert req.rows() == 2
    x = req.inputs["x"]
    assert x.dtype == np.float32 and not x.flags.writeable  # zero-copy view of the bin
    np.testing.assert_array_equal(x, np.arange(6, dtype=np.float32).reshape(2, 3))


def test_rows_of_scalar_input() -> None:
    assert Request(id="a", model="m", inputs={"s": np.array(1.0)}).rows() == 1


# ---- fingerprint ----------------------------------------------------------------------


def test_fingerprint_is_codec_independent_and_content_sensitive(wire: WireCodec) -> None:
    arr = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    req = Request(id="r", model="m", version=2, inputs={"b": arr, "a": np.arange(3)}, meta={"x": 1})
    prints = {wire.decode_request(wire.encode_request(req, c)).fingerprint for c in Codec}
    stream = stream_frame(wire.encode_request(req, Codec.MSGPACK))
    prints.add(wire.decode_request(stream).fingerprint)
    reordered = Request(
        id="other",
        model="m",
        version=2,
        app="z",
        inputs={"a": np.arange(3), "b": np.asfortranarray(arr)},
    )
    prints.add(wire.decode_request(wire.encode_request(reordered)).fingerprint)
    assert len(prints) == 1 and len(prints.pop()) == 32

    variants = [
        Request(id="r", model="m", version=2, inputs={"b": arr + 1, "a": np.arange(3)}),
        Request(id="r", model="m", version=3, inputs={"b": arr, "a": np.arange(3)}),
        Request(id="r", model="m", inputs={"b": arr, "a": np.arange(3)}),
        Request(id="r", model="n", version=2, inputs={"b": arr, "a": np.arange(3)}),
        Request(id="r", model="m", version=2, inputs={"b": arr.reshape(4, 3), "a": np.arange(3)}),
        Request(id="r", model="m", version=2, inputs={"b": arr, "a": np.arange(3, dtype=np.int32)}),
    ]
    base = wire.decode_request(wire.encode_request(req)).fingerprint
    got = {wire.decode_request(wire.encode_request(v)).fingerprint for v in variants}
    assert base not in got and len(got) == len(variants)


def _documented_fingerprint(model: str, version: int | None, inputs: dict[str, Any]) -> str:
    """The byte stream `fingerprint` documents, built the plain way: a fingerprint
    stored in Redis by one release must match the next release's."""

    def field(value: bytes) -> bytes:
        return len(value).to_bytes(8, "little") + value

    stream = field(model.encode("utf-8", "surrogatepass"))
    stream += field(b"" if version is None else str(version).encode())
    for name in sorted(inputs):
        arr = inputs[name].astype(inputs[name].dtype.newbyteorder("<"))  # keeps 0-d shapes
        stream += field(name.encode("utf-8", "surrogatepass"))
        stream += field(np.dtype(arr.dtype).name.encode())
        stream += field(",".join(map(str, arr.shape)).encode())
        stream += arr.nbytes.to_bytes(8, "little") + arr.tobytes(order="C")
    return hashlib.sha256(stream).hexdigest()[:32]


def test_fingerprint_is_the_documented_stream() -> None:
    rng = np.random.default_rng(5)
    cases: list[tuple[str, int | None, dict[str, Any]]] = [
        ("digits", None, {"pixels": np.zeros((1, 64), np.float32)}),
        ("m", 3, {"b": np.arange(6).reshape(2, 3), "a": np.ones(2, ">f8")}),
        ("mødel", 12, {"ß": np.asfortranarray(rng.random((3, 4), np.float32)), "z": np.array(1)}),
        ("m", 0, {}),
        ("m", None, {"x": rng.integers(0, 9, (5, 2, 2)).astype(np.uint8)[:, ::2]}),
    ]
    for model, version, inputs in cases:
        for _ in range(2):  # the second time from the kept seeds and fields
            assert fingerprint(model, version, inputs) == _documented_fingerprint(
                model, version, inputs
            )
    x = {"x": np.zeros(2)}
    fingerprint("m", 1, x)  # kept under a key that True equals
    assert fingerprint("m", True, x) == _documented_fingerprint("m", True, x)  # type: ignore[arg-type]


# ---- responses and errors -------------------------------------------------------------


@pytest.mark.parametrize("codec", list(Codec))
def test_ok_response_round_trip(wire: WireCodec, codec: Codec) -> None:
    out = np.array([[np.nan, np.inf], [-np.inf, 0.5]], np.float32)
    resp = Response(
        id="r1",
        status="ok",
        app="a",
        model="m",
        version=2,
        outputs={"y": out, "n": np.arange(4, dtype=np.int64)[::2]},
        meta={"trace": "t"},
        timing=Timing(1.5, 2.25, 4),
        worker="w1",
    )
    raw = wire.encode_response(resp, codec)
    assert detect_codec(raw) is codec
    if codec is Codec.JSON:
        json.loads(raw, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    back = wire.decode_response(raw)
    assert (back.id, back.status, back.app, back.model, back.version, back.worker) == (
        "r1",
        "ok",
        "a",
        "m",
        2,
        "w1",
    )
    assert back.meta == {"trace": "t"} and back.timing == Timing(1.5, 2.25, 4)
    assert back.error is None and back.outputs is not None
    np.testing.assert_array_equal(back.outputs["y"], out)
    np.testing.assert_array_equal(back.outputs["n"], [0, 2])


@pytest.mark.parametrize("codec", list(Codec))
def test_error_response_round_trip(wire: WireCodec, codec: Codec) -> None:
    resp = Response(id="r1", status="error", error=ErrorInfo(ErrorCode.OVERLOADED, "busy", True))
    raw = wire.encode_response(resp, codec)
    obj = (
        json.loads(raw)
        if codec is Codec.JSON
        else msgpack.unpackb(
            zstandard.ZstdDecompressor().decompress(raw) if codec is Codec.ZSTD else raw
        )
    )
    assert set(obj) == {"v", "id", "app", "model", "status", "error"}  # None keys omitted
    assert wire.decode_response(raw) == resp


def test_error_addressing_from_partially_valid_request(wire: WireCodec) -> None:
    obj = envelope(
        reply_to="resp/app1",
        meta={"trace": 7},
        inputs={"x": {"dtype": "float32", "shape": [2], "data": b"\x00"}},
    )
    with pytest.raises(ProtocolError) as info:
        wire.decode_request(packz(obj))
    err = info.value
    assert err.code is ErrorCode.INVALID_INPUT and not err.retryable
    assert (err.id, err.app, err.model, err.reply_to, err.meta, err.codec) == (
        "r1",
        "app1",
        "m",
        "resp/app1",
        {"trace": 7},
        Codec.ZSTD,
    )
    resp = error_response(err, worker="w9")
    assert (resp.id, resp.app, resp.model, resp.status, resp.worker, resp.meta) == (
        "r1",
        "app1",
        "m",
        "error",
        "w9",
        {"trace": 7},
    )
    assert resp.error == ErrorInfo(ErrorCode.INVALID_INPUT, err.message, False)
    back = wire.decode_response(wire.encode_response(resp, Codec.JSON))
    assert back.error == resp.error and back.id == "r1"


def test_error_addressing_skips_invalid_fields(wire: WireCodec) -> None:
    raw = json.dumps(
        {"id": 5, "app": "a", "model": "m", "meta": {"a": "x" * 5000}, "inputs": {}}
    ).encode()
    with pytest.raises(ProtocolError) as info:
        wire.decode_request(raw)
    err = info.value
    assert (err.code, err.id, err.app, err.meta, err.codec) == (
        ErrorCode.BAD_REQUEST,
        None,
        "a",
        None,
        Codec.JSON,
    )
    assert error_response(err).id == ""


def test_error_codes_and_retryable() -> None:
    assert {c.value for c in ErrorCode} == {
        "bad_request",
        "unauthorized",
        "unknown_model",
        "invalid_input",
        "too_large",
        "conflict",
        "deadline_exceeded",
        "overloaded",
        "inference_failed",
        "exhausted",
    }
    assert frozenset({ErrorCode.OVERLOADED, ErrorCode.INFERENCE_FAILED}) == RETRYABLE_CODES
    assert ProtocolError(ErrorCode.OVERLOADED, "x").retryable
    assert str(ErrorCode.TOO_LARGE) == "too_large" and f"{Codec.JSON}" == "json"


def test_response_meta_from_msgpack_encodes_as_json(wire: WireCodec) -> None:
    resp = Response(id="r", status="ok", meta={"b": b"\x00\xff", "f": float("nan")})
    back = wire.decode_response(wire.encode_response(resp, Codec.JSON))
    assert back.meta == {"b": "\x00\xff", "f": "NaN"}


def test_unsupported_output_dtype_is_a_value_error(wire: WireCodec) -> None:
    resp = Response(id="r", status="ok", outputs={"s": np.array(["a"])})
    for codec in Codec:
        with pytest.raises(ValueError, match="not supported"):
            wire.encode_response(resp, codec)


@pytest.mark.parametrize(
    "obj",
    [
        {"id": "r", "status": "maybe"},
        {"id": "r", "status": "error", "error": {"code": "nope", "message": "m"}},
        {"id": "r", "status": "ok", "timing": {"queue_ms": "1"}},
        {"id": 3, "status": "ok"},
    ],
)
def test_bad_responses(wire: WireCodec, obj: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError) as info:
        wire.decode_response(msgpack.packb(obj))
    assert info.value.code is ErrorCode.BAD_REQUEST


def test_big_endian_and_strided_arrays_encode_correctly(wire: WireCodec) -> None:
    arr = np.arange(12, dtype=">i4").reshape(3, 4)[:, ::2]
    req = Request(id="r", model="m", inputs={"x": arr})
    for codec in Codec:
        got = wire.decode_request(wire.encode_request(req, codec)).inputs["x"]
        assert got.dtype == np.dtype("<i4")
        np.testing.assert_array_equal(got, arr)


def test_short_zstd_bodies_use_the_fast_level() -> None:
    """`zstd_fast_below`: a body under the bound is the fast level's frame, one at or
    over it the configured level's; both decode to the same response."""
    wire = WireCodec(zstd_fast_below=1024)
    small = Response(id="s", status="ok", outputs={"y": np.arange(4, dtype=np.float32)})
    large = Response(id="l", status="ok", outputs={"y": np.zeros(4096, np.float32)})
    for resp, level in ((small, -1), (large, 3)):
        body = WireCodec().encode_response(resp, Codec.MSGPACK)
        assert (len(body) < 1024) == (level == -1)
        frame = wire.encode_response(resp, Codec.ZSTD)
        assert frame == zstandard.ZstdCompressor(level=level).compress(body)
        assert wire.decode_response(frame).id == resp.id
    assert WireCodec().encode_response(small) == zstandard.ZstdCompressor(level=3).compress(
        WireCodec().encode_response(small, Codec.MSGPACK)
    )


@pytest.mark.parametrize("fast_below", [0, 4096])
def test_encode_answers_is_encode_response_byte_for_byte(fast_below: int) -> None:
    """A batch's answers encoded together equal each `Response` encoded alone, over
    mixed codecs, rows per answer, meta, worker and outputs that are not wire-ready."""
    wire = WireCodec(zstd_fast_below=fast_below)
    rng = np.random.default_rng(3)
    rows = [1, 3, 1, 2, 1]
    total = sum(rows)
    outputs: dict[str, Any] = {
        "label": np.arange(total, dtype=np.int64),
        "probs": np.asfortranarray(rng.random((total, 4), np.float32)),
        "big_endian": np.arange(total * 2, dtype=">f8").reshape(total, 2),
        "flag": np.arange(total) % 2 == 0,
    }
    codecs = [Codec.ZSTD, Codec.MSGPACK, Codec.JSON, Codec.ZSTD, Codec.MSGPACK]
    metas: list[dict[str, Any] | None] = [None, {"k": [1, 2]}, {"s": "x"}, None, {}]
    answers = [
        Answer(f"id-{i}", "app" if i % 2 else "", n, 1.25 * i, metas[i], codecs[i])
        for i, n in enumerate(rows)
    ]
    for worker, version in (("w-1", 7), (None, None)):
        batch = AnswerBatch("m", version, worker, 0.321, outputs, answers)
        got = wire.encode_answers(batch)
        offset, want = 0, []
        for answer in answers:
            want.append(wire.encode_response(batch.response(answer, offset), answer.codec))
            offset += answer.rows
        assert got == want
        back = [wire.decode_response(p) for p in got]
        assert [r.id for r in back] == [a.id for a in answers]
        assert [r.outputs["probs"].shape[0] for r in back if r.outputs] == rows


def test_with_app_is_replace_field_by_field() -> None:
    """`Request.with_app` copies the fields instead of calling `__init__`: it must equal
    `dataclasses.replace`, for every field (one added later included), and stay frozen."""
    values: dict[str, Any] = {f.name: object() for f in dataclasses.fields(Request)}
    req = Request(**values)
    moved = req.with_app("other")
    expected = dataclasses.replace(req, app="other")
    for f in dataclasses.fields(Request):
        assert getattr(moved, f.name) is getattr(expected, f.name), f.name
    assert req.app is values["app"]  # the original is untouched
    with pytest.raises(dataclasses.FrozenInstanceError):
        moved.app = "x"  # type: ignore[misc]
