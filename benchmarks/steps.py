"""Per-request steps of the request path, each against the code it replaced, same run.

    python -m benchmarks.steps [--calls 20000]

On a digits request (one 1x64 float32 input) and a 64-answer digits batch: the input
check (`validate_inputs` vs the compiled `InputCheck`), the fingerprint (the 12-07
implementation, kept below as the baseline, vs `fingerprint`), zstd of one short answer
(level 3 vs the fast level), encoding a batch's answers (one `Response` each vs
`encode_answers`), a request's app (`dataclasses.replace` vs `Request.with_app`) and a
job through the batcher (`try_submit` with a done callback vs `try_put`). Prints µs per
call (or per item), best of 5 repeats, and the ratio baseline / new.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import platform
import sys
import timeit
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zstandard
from inference_worker_client.protocol.dtypes import dtype_name
from inference_worker_client.protocol.tensors import _DTYPE_FIELD, wire_contiguous

from benchmarks.common import REPO
from inference_worker.batching import DynamicBatcher
from inference_worker.inputs import InputCheck, validate_inputs
from inference_worker.models import ModelRepository
from inference_worker.protocol import Answer, AnswerBatch, Codec, Request, WireCodec, fingerprint

ROWS = 64


def _old_fingerprint(model: str, version: int | None, inputs: Mapping[str, Any]) -> str:
    """`fingerprint` as it was before 2026-12-07 (the same bytes, hashed the plain way)."""

    def field(value: bytes) -> bytes:
        return len(value).to_bytes(8, "little") + value

    h = hashlib.sha256()
    head = [field(model.encode("utf-8", "surrogatepass"))]
    head.append(field(b"" if version is None else str(version).encode()))
    for name in sorted(inputs):
        arr = wire_contiguous(inputs[name])
        head += (
            field(name.encode("utf-8", "surrogatepass")),
            _DTYPE_FIELD[dtype_name(arr.dtype)],
            field(",".join(map(str, arr.shape)).encode()),
            arr.nbytes.to_bytes(8, "little"),
        )
        h.update(b"".join(head))
        h.update(arr.data)
        head.clear()
    return h.hexdigest()[:32]


def _us(fn: Callable[[], object], calls: int, per: int = 1) -> float:
    return min(timeit.repeat(fn, number=calls, repeat=5)) / calls / per * 1e6


def _batcher_item_us(put: bool, batches: int) -> float:
    """The batcher's whole cost per item for 64-item batches, by process time."""

    async def run() -> float:
        async def handler(items: list[int]) -> list[None]:
            return [None] * len(items)

        def quiet(fut: asyncio.Future[None]) -> None:
            if not fut.cancelled():
                fut.exception()

        b: DynamicBatcher[int, None] = DynamicBatcher(
            handler, max_batch_size=ROWS, max_delay_s=0.0, max_queue=100_000
        )
        start = timeit.default_timer()
        for _ in range(batches):
            for i in range(ROWS):
                if put:
                    b.try_put(i)
                else:
                    fut = b.try_submit(i)
                    assert fut is not None
                    fut.add_done_callback(quiet)
            for _ in range(3):
                await asyncio.sleep(0)
        await b.drain()
        return (timeit.default_timer() - start) / (batches * ROWS) * 1e6

    return min(asyncio.run(run()) for _ in range(5))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.steps")
    p.add_argument("--calls", type=int, default=20_000)
    args = p.parse_args(argv)
    n = args.calls
    config = ModelRepository(Path(REPO / "config" / "models")).config("digits")
    x = {"pixels": np.zeros((1, 64), np.float32)}
    req = Request(id="req-1", model="digits", inputs=x, fingerprint="f" * 32)
    outputs = {
        "label": np.arange(ROWS, dtype=np.int64),
        "probabilities": np.random.default_rng(0).random((ROWS, 10), np.float32),
    }
    answers = [Answer(f"req-{i}", "bench", 1, 1.234, None, Codec.ZSTD) for i in range(ROWS)]
    batch = AnswerBatch("digits", 1, "w1", 0.2, outputs, answers)
    fast = WireCodec(zstd_fast_below=4096)

    def per_response() -> list[bytes]:
        out, offset = [], 0
        for a in answers:
            out.append(fast.encode_response(batch.response(a, offset), a.codec))
            offset += a.rows
        return out

    assert per_response() == fast.encode_answers(batch)
    assert _old_fingerprint("digits", None, x) == fingerprint("digits", None, x)
    body = fast.encode_response(batch.response(answers[0], 0), Codec.MSGPACK)
    level3, level_fast = zstandard.ZstdCompressor(level=3), zstandard.ZstdCompressor(level=-1)
    check = InputCheck(config)
    rows: list[tuple[str, float, float]] = [
        ("input check", _us(lambda: validate_inputs(config, x), n), _us(lambda: check(x), n)),
        (
            "fingerprint",
            _us(lambda: _old_fingerprint("digits", None, x), n),
            _us(lambda: fingerprint("digits", None, x), n),
        ),
        (
            f"zstd, {len(body)}-byte answer",
            _us(lambda: level3.compress(body), n),
            _us(lambda: level_fast.compress(body), n),
        ),
        (
            "encode, per answer of 64",
            _us(per_response, max(1, n // ROWS), ROWS),
            _us(lambda: fast.encode_answers(batch), max(1, n // ROWS), ROWS),
        ),
        (
            "request's app",
            _us(lambda: dataclasses.replace(req, app="z"), n),
            _us(lambda: req.with_app("z"), n),
        ),
        (
            "batcher, per item of 64",
            _batcher_item_us(False, max(1, n // ROWS)),
            _batcher_item_us(True, max(1, n // ROWS)),
        ),
    ]
    print(f"python {platform.python_version()} on {platform.machine()}, {n} calls, best of 5")
    print(f"{'step':28s} {'before µs':>10s} {'after µs':>10s} {'ratio':>6s}")
    for name, before, after in rows:
        print(f"{name:28s} {before:10.2f} {after:10.2f} {before / after:6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
