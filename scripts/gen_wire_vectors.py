"""Regenerate the golden wire vectors in tests/vectors/ (docs/wire.md, "Golden vectors").

    python scripts/gen_wire_vectors.py            # rewrite tests/vectors/
    python scripts/gen_wire_vectors.py --check    # exit 1 if the msgpack/JSON files differ

Each case is written in every codec it applies to: ``<case>.zst`` (a zstd frame holding
msgpack), ``<case>.msgpack`` and ``<case>.json``; ``index.json`` says, per case, what the
bytes decode to (tensors as nested lists of values), and, for requests, which answer the
worker gives (a response case, or just the error code). Valid messages are encoded by the
project's codec (``inference_worker_client.protocol.WireCodec``); the malformed requests
are built by hand, since no correct encoder produces them. The zstd frames depend on the
zstd library's version, so ``--check`` compares only msgpack and JSON bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zstandard
from inference_worker_client.protocol import (
    Codec,
    ErrorCode,
    ErrorInfo,
    Request,
    Response,
    Timing,
    WireCodec,
)

OUT = Path(__file__).resolve().parents[1] / "tests" / "vectors"
EXT = {Codec.ZSTD: "zst", Codec.MSGPACK: "msgpack", Codec.JSON: "json"}

# One real held-out digit (label 1) from config/models/digits/heldout.npz, values 0..16.
DIGIT = [0, 0, 0, 0, 11, 14, 3, 0, 0, 0, 0, 2, 16, 16, 2, 0, 0, 0, 0, 11, 16, 14, 0, 0,
         0, 0, 3, 16, 16, 15, 0, 0, 0, 1, 13, 16, 16, 13, 0, 0, 0, 6, 16, 9, 15, 13, 0, 0,
         0, 0, 0, 0, 12, 16, 1, 0, 0, 0, 0, 0, 9, 14, 1, 0]  # fmt: skip
PIXELS = np.array([DIGIT], np.float32)
# Exactly representable in float32, summing to 1: what a digits answer looks like.
PROBS = np.array([[0, 0.875, 0, 0, 0.0625, 0, 0, 0.0625, 0, 0]], np.float32)


DIGITS_REQUEST = Request(id="", model="digits", inputs={"pixels": PIXELS})


REQUESTS: dict[str, tuple[Request, dict[str, Any]]] = {
    # name: (request, what the worker answers)
    "request-minimal": (replace(DIGITS_REQUEST, id="vec-min"), {"response": "response-ok"}),
    "request-all-fields": (
        replace(
            DIGITS_REQUEST,
            id="vec-all",
            app="sensor-7",
            version=1,
            reply_to="response_message/sensor-7/dev-1",
            ttl_ms=5000,
            priority=7,
            meta={"device": "sensor-7", "seq": 42},
        ),
        {"response": "response-ok-with-app-and-meta"},
    ),
    "request-deadline": (
        replace(DIGITS_REQUEST, id="vec-deadline", deadline_ms=1),  # epoch ms 1: long past
        {"error": "deadline_exceeded"},
    ),
    "request-batch-of-two": (
        Request(
            id="vec-batch",
            model="digits",
            inputs={"pixels": np.concatenate([PIXELS, PIXELS[:, ::-1]])},
        ),
        {"status": "ok"},
    ),
    "request-unknown-model": (
        Request(id="vec-nomodel", model="no-such-model", inputs={"pixels": PIXELS}),
        {"response": "error-unknown_model"},
    ),
    "request-wrong-shape": (
        Request(id="vec-shape", model="digits", inputs={"pixels": PIXELS[:, :63]}),
        {"error": "invalid_input"},
    ),
    "request-every-dtype": (
        Request(
            id="vec-dtypes",
            model="any",
            inputs={
                "b": np.array([True, False]),
                "i8": np.array([-128, 127], np.int8),
                "u16": np.array([[0, 65535]], np.uint16),
                "i64": np.array([-(2**53), 2**53], np.int64),
                "f16": np.array([0.5, -2.0], np.float16),
                "f64": np.array([math.pi, -0.0]),
                "nonfinite": np.array([math.nan, math.inf, -math.inf], np.float32),
                "scalar": np.array(3.5, np.float32),
                "empty": np.zeros((0, 3), np.float32),
            },
        ),
        {"error": "unknown_model"},
    ),
}

_TENSOR = {"dtype": "float32", "shape": [1, 64], "data": DIGIT}


def _bin_tensor(values: list[float], shape: list[int]) -> dict[str, Any]:
    return {"dtype": "float32", "shape": shape, "data": np.array(values, "<f4").tobytes()}


# Malformed requests: name -> (map as a JSON/msgpack client would send it, error code, id
# the error can still be addressed to). The msgpack forms carry binary tensor data.
MALFORMED: dict[str, tuple[Callable[[bool], Any], ErrorCode, str | None]] = {
    "bad-missing-id": (
        lambda b: {"model": "digits", "inputs": {"pixels": _t(b)}},
        ErrorCode.BAD_REQUEST,
        None,
    ),
    "bad-missing-model": (
        lambda b: {"id": "vec-bad-1", "inputs": {"pixels": _t(b)}},
        ErrorCode.BAD_REQUEST,
        "vec-bad-1",
    ),
    "bad-no-inputs": (
        lambda b: {"id": "vec-bad-2", "model": "digits", "inputs": {}},
        ErrorCode.BAD_REQUEST,
        "vec-bad-2",
    ),
    "bad-format-version": (
        lambda b: {"v": 2, "id": "vec-bad-3", "model": "digits", "inputs": {"pixels": _t(b)}},
        ErrorCode.BAD_REQUEST,
        "vec-bad-3",
    ),
    "bad-deadline-and-ttl": (
        lambda b: {
            "id": "vec-bad-4",
            "model": "digits",
            "inputs": {"pixels": _t(b)},
            "deadline": 1,
            "ttl_ms": 10,
        },
        ErrorCode.BAD_REQUEST,
        "vec-bad-4",
    ),
    "bad-priority": (
        lambda b: {
            "id": "vec-bad-5",
            "model": "digits",
            "inputs": {"pixels": _t(b)},
            "priority": 10,
        },
        ErrorCode.BAD_REQUEST,
        "vec-bad-5",
    ),
    "bad-dtype": (
        lambda b: {
            "id": "vec-bad-6",
            "model": "digits",
            "inputs": {"pixels": dict(_t(b), dtype="float128")},
        },
        ErrorCode.INVALID_INPUT,
        "vec-bad-6",
    ),
    "bad-data-length": (
        lambda b: {
            "id": "vec-bad-7",
            "model": "digits",
            "inputs": {
                "pixels": _bin_tensor(DIGIT[:63], [1, 64])
                if b
                else {"dtype": "float32", "shape": [1, 64], "data": DIGIT[:63]}
            },
        },
        ErrorCode.INVALID_INPUT,
        "vec-bad-7",
    ),
    "bad-meta-too-large": (
        lambda b: {
            "id": "vec-bad-8",
            "model": "digits",
            "inputs": {"pixels": _t(b)},
            "meta": {"blob": "x" * 5000},
        },
        ErrorCode.TOO_LARGE,
        "vec-bad-8",
    ),
    "bad-not-a-map": (lambda b: [1, 2, 3], ErrorCode.BAD_REQUEST, None),
}


def _t(binary: bool) -> dict[str, Any]:
    return _bin_tensor(DIGIT, [1, 64]) if binary else dict(_TENSOR)


_ERRORS: dict[ErrorCode, tuple[str, bool, int | None]] = {
    ErrorCode.BAD_REQUEST: ("'id' is required", False, None),
    ErrorCode.UNAUTHORIZED: ("missing or unknown API key", False, None),
    ErrorCode.UNKNOWN_MODEL: ("unknown model 'no-such-model'", False, None),
    ErrorCode.INVALID_INPUT: ("model 'digits': input 'pixels' has shape [1, 63]", False, None),
    ErrorCode.TOO_LARGE: ("message over 4194304 bytes", False, None),
    ErrorCode.CONFLICT: ("id 'vec-err' was used for a different request", False, None),
    ErrorCode.DEADLINE_EXCEEDED: ("deadline passed before compute", False, None),
    ErrorCode.OVERLOADED: ("app 'sensor-7' is over its quota", True, 250),
    ErrorCode.INFERENCE_FAILED: ("runtime error (will be retried)", True, None),
    ErrorCode.EXHAUSTED: ("gave up after 5 attempts", False, None),
}

RESPONSES: dict[str, Response] = {
    "response-ok": Response(
        id="vec-min",
        status="ok",
        model="digits",
        version=1,
        outputs={"label": np.array([1], np.int64), "probabilities": PROBS},
        timing=Timing(queue_ms=0.25, compute_ms=0.5, batch_size=3),
        worker="worker-1",
    ),
    "response-ok-with-app-and-meta": Response(
        id="vec-all",
        status="ok",
        app="sensor-7",
        model="digits",
        version=1,
        outputs={"label": np.array([1], np.int64), "probabilities": PROBS},
        meta={"device": "sensor-7", "seq": 42},
        timing=Timing(queue_ms=1.5, compute_ms=0.75, batch_size=1),
        worker="worker-1",
    ),
}
for _code, (_message, _retryable, _after) in _ERRORS.items():
    RESPONSES[f"error-{_code.value}"] = Response(
        id="vec-err",
        status="error",
        app="sensor-7" if _code in (ErrorCode.OVERLOADED, ErrorCode.UNAUTHORIZED) else "",
        model="no-such-model" if _code is ErrorCode.UNKNOWN_MODEL else "digits",
        error=ErrorInfo(_code, _message, _retryable, _after),
        worker="worker-1",
    )


def plain(value: Any) -> Any:
    """JSON form of a decoded value: arrays as {dtype, shape, data: nested values},
    non-finite floats as the strings the JSON codec uses."""
    if isinstance(value, np.ndarray):
        data = _finite(value.tolist())
        return {"dtype": value.dtype.name, "shape": list(value.shape), "data": data}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def _finite(x: Any) -> Any:
    if isinstance(x, list):
        return [_finite(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")
    return x


def request_fields(req: Request) -> dict[str, Any]:
    fields = {
        "v": req.v,
        "id": req.id,
        "app": req.app,
        "model": req.model,
        "version": req.version,
        "inputs": plain(dict(req.inputs)),
        "reply_to": req.reply_to,
        "deadline": req.deadline_ms,
        "ttl_ms": req.ttl_ms,
        "priority": req.priority,
        "meta": req.meta,
    }
    return {k: v for k, v in fields.items() if v not in (None, "")}


def response_fields(resp: Response) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "v": resp.v,
        "id": resp.id,
        "app": resp.app,
        "model": resp.model,
        "version": resp.version,
        "status": resp.status,
        "outputs": None if resp.outputs is None else plain(dict(resp.outputs)),
        "error": None
        if resp.error is None
        else {
            k: v
            for k, v in {
                "code": resp.error.code.value,
                "message": resp.error.message,
                "retryable": resp.error.retryable,
                "retry_after_ms": resp.error.retry_after_ms,
            }.items()
            if v is not None
        },
        "meta": resp.meta,
        "timing": None
        if resp.timing is None
        else {
            "queue_ms": resp.timing.queue_ms,
            "compute_ms": resp.timing.compute_ms,
            "batch_size": resp.timing.batch_size,
        },
        "worker": resp.worker,
    }
    return {k: v for k, v in fields.items() if v is not None}


def build() -> tuple[dict[str, bytes], dict[str, Any]]:
    """File name -> bytes, and the index."""
    wire = WireCodec()
    files: dict[str, bytes] = {}
    index: dict[str, Any] = {"format": 1, "requests": {}, "malformed": {}, "responses": {}}
    for name, (req, answer) in REQUESTS.items():
        for codec, ext in EXT.items():
            files[f"{name}.{ext}"] = wire.encode_request(req, codec)
        index["requests"][name] = {"decoded": request_fields(req), "answer": answer}
    packer = msgpack.Packer(use_bin_type=True)
    for name, (make, code, rid) in MALFORMED.items():
        packed = packer.pack(make(True))
        files[f"{name}.msgpack"] = packed
        files[f"{name}.zst"] = zstandard.ZstdCompressor(level=3).compress(packed)
        files[f"{name}.json"] = json.dumps(make(False), separators=(",", ":")).encode()
        index["malformed"][name] = {"error": code.value, "id": rid}
    for name, resp in RESPONSES.items():
        for codec, ext in EXT.items():
            files[f"{name}.{ext}"] = wire.encode_response(resp, codec)
        index["responses"][name] = {"decoded": response_fields(resp)}
    files["index.json"] = (json.dumps(index, indent=1, sort_keys=False) + "\n").encode()
    return files, index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, write nothing")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    files, _ = build()
    if args.check:
        stale = [
            n
            for n, data in files.items()
            if not n.endswith(".zst")
            and (not (args.out / n).exists() or (args.out / n).read_bytes() != data)
        ]
        for n in stale:
            print(f"stale: {n}")
        return 1 if stale else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for n, data in files.items():
        (args.out / n).write_bytes(data)
    print(f"wrote {len(files)} files to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
