"""A failed decode keeps no buffer alive: the error a decoder hands out (raised or
returned) references no frame whose locals hold the decompressed payload or its tensors,
so an error kept while its reply is published pins kilobytes, not tens of MiB."""

from __future__ import annotations

import tracemalloc
import types
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
import zstandard

from inference_worker.protocol import ErrorCode, ProtocolError, Request, WireCodec

MiB = 1 << 20
BIG = 60 * MiB
KEPT_AT_MOST = 4 * MiB  # the tiny frames and error objects; far below any one buffer


def _declared(body: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=1).compress(body)


def _streamed(body: bytes) -> bytes:
    cobj = zstandard.ZstdCompressor(level=1, write_content_size=False).compressobj()
    return cobj.compress(body) + cobj.flush()


def _garbage() -> bytes:
    # A map header, then bytes msgpack refuses ("\xc1" is reserved): fails after the
    # whole payload was decompressed.
    return b"\x81\xa2id" + b"\xc1" * BIG


def _big_then_bad_tensor() -> bytes:
    # Valid msgpack whose first tensor (a view of a 60 MiB bin) decodes before the
    # second one fails validation.
    big = {"dtype": "uint8", "shape": [BIG], "data": b"\x00" * BIG}
    bad = {"dtype": "complex64", "shape": [1], "data": b"\x00" * 8}
    obj = {"id": "r1", "model": "m", "inputs": {"a": big, "b": bad}}
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


FRAMES: dict[str, tuple[Callable[[], bytes], ErrorCode]] = {
    "garbage, declared size": (lambda: _declared(_garbage()), ErrorCode.BAD_REQUEST),
    "garbage, streamed": (lambda: _streamed(_garbage()), ErrorCode.BAD_REQUEST),
    "over the content cap": (lambda: _streamed(b"\x00" * (70 * MiB)), ErrorCode.TOO_LARGE),
    "invalid tensor after a big one": (
        lambda: _declared(_big_then_bad_tensor()),
        ErrorCode.INVALID_INPUT,
    ),
}


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        exc = todo.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        yield exc
        todo += [exc.__context__, exc.__cause__]


def _big_locals(err: BaseException) -> list[str]:
    """Every buffer over 1 MiB reachable from the error's frames, as 'function:name'."""
    found = []
    for exc in _chain(err):
        tb: types.TracebackType | None = exc.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            for name, value in frame.f_locals.items():
                size = value.nbytes if isinstance(value, np.ndarray | memoryview) else None
                if isinstance(value, bytes | bytearray):
                    size = len(value)
                if size is not None and size > MiB:
                    found.append(f"{frame.f_code.co_name}:{name}")
            tb = tb.tb_next
    return found


def _retained(decode: Callable[[], Any]) -> tuple[Any, int]:
    """What ``decode`` returns (or raises) and the traced bytes still held with it."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        try:
            kept = decode()
        except ProtocolError as exc:
            kept = exc
        return kept, tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def frames() -> dict[str, bytes]:
    return {name: build() for name, (build, _) in FRAMES.items()}


@pytest.mark.parametrize("case", list(FRAMES))
def test_raised_decode_error_pins_no_buffer(frames: dict[str, bytes], case: str) -> None:
    wire = WireCodec()
    raw = frames[case]
    assert len(raw) < MiB  # a small frame that expands to tens of MiB
    err, held = _retained(lambda: wire.decode_request(raw))
    assert isinstance(err, ProtocolError) and err.code is FRAMES[case][1]
    assert held < KEPT_AT_MOST, f"{held / MiB:.1f} MiB still reachable from the error"
    assert _big_locals(err) == []
    assert err.__context__ is None and err.__cause__ is None


def test_batch_decode_returns_errors_that_pin_no_buffer(frames: dict[str, bytes]) -> None:
    wire = WireCodec()
    good = wire.encode_request(
        Request(id="ok", model="m", inputs={"x": np.zeros((1, 4), np.float32)})
    )
    payloads = [*frames.values(), good]
    results, held = _retained(lambda: wire.decode_requests(payloads))
    assert [type(r) for r in results] == [ProtocolError] * len(frames) + [Request]
    assert [r.code for r in results[:-1]] == [code for _, code in FRAMES.values()]
    for err in results[:-1]:
        assert err.__traceback__ is None and _big_locals(err) == []
    assert held < KEPT_AT_MOST, f"{held / MiB:.1f} MiB still reachable from the results"
