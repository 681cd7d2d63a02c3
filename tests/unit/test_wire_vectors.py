"""The golden wire vectors (tests/vectors/, docs/wire.md) against the project's codec, and
against a worker (memory broker and state) for the answers the index promises.

What is compared, and why it is stable:
- Requests and responses are decoded from the files and compared field by field with
  `index.json` (the contract a client author reads).
- msgpack and JSON files are also compared byte for byte with what the codec encodes from
  the decoded message: both encodings are deterministic here (fixed key order, compact
  JSON, msgpack's shortest forms), so a change shows up as a diff a client author sees.
- zstd files are compared after decompression, with the msgpack file: the compressed bytes
  depend on the zstd library version and level, the content does not.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zstandard

from inference_worker.client import InferenceClient
from inference_worker.pipeline import Assembly, Worker
from inference_worker.protocol import (
    Codec,
    ErrorCode,
    ProtocolError,
    Request,
    Response,
    WireCodec,
    detect_codec,
)
from inference_worker.serving import load_models
from inference_worker.settings import load_settings
from inference_worker.state.memory import MemoryStateStore
from inference_worker.transports import connect
from inference_worker.transports.base import TransportOptions
from inference_worker.transports.memory import MemoryBroker

REPO = Path(__file__).resolve().parents[2]
VECTORS = REPO / "tests" / "vectors"
INDEX: dict[str, Any] = json.loads((VECTORS / "index.json").read_text())
EXT = {Codec.ZSTD: "zst", Codec.MSGPACK: "msgpack", Codec.JSON: "json"}
WIRE = WireCodec()


def _plain(value: Any) -> Any:
    """Decoded values in the index's JSON form (see tests/vectors/README.md)."""
    if isinstance(value, np.ndarray):
        return {"dtype": value.dtype.name, "shape": list(value.shape), "data": _j(value.tolist())}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _j(x: Any) -> Any:
    if isinstance(x, list):
        return [_j(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")
    return x


def _request_fields(r: Request) -> dict[str, Any]:
    fields = {
        "v": r.v,
        "id": r.id,
        "app": r.app,
        "model": r.model,
        "version": r.version,
        "inputs": _plain(dict(r.inputs)),
        "reply_to": r.reply_to,
        "deadline": r.deadline_ms,
        "ttl_ms": r.ttl_ms,
        "priority": r.priority,
        "meta": None if r.meta is None else dict(r.meta),
    }
    return {k: v for k, v in fields.items() if v not in (None, "")}


def _response_fields(r: Response) -> dict[str, Any]:
    error = None
    if r.error is not None:
        error = {"code": r.error.code.value, "message": r.error.message}
        error["retryable"] = r.error.retryable
        if r.error.retry_after_ms is not None:
            error["retry_after_ms"] = r.error.retry_after_ms
    timing = None
    if r.timing is not None:
        t = r.timing
        timing = {"queue_ms": t.queue_ms, "compute_ms": t.compute_ms, "batch_size": t.batch_size}
    fields = {
        "v": r.v,
        "id": r.id,
        "app": r.app,
        "model": r.model,
        "version": r.version,
        "status": r.status,
        "outputs": None if r.outputs is None else _plain(dict(r.outputs)),
        "error": error,
        "meta": None if r.meta is None else dict(r.meta),
        "timing": timing,
        "worker": r.worker,
    }
    return {k: v for k, v in fields.items() if v is not None}


def _read(name: str, codec: Codec) -> bytes:
    return (VECTORS / f"{name}.{EXT[codec]}").read_bytes()


def _cases(section: str) -> list[Any]:
    return [pytest.param(n, c, id=f"{n}.{EXT[c]}") for n in INDEX[section] for c in Codec]


def test_index_names_every_file_and_every_error_code() -> None:
    named = {"index.json", "README.md"}
    for section in ("requests", "malformed", "responses"):
        named |= {f"{n}.{e}" for n in INDEX[section] for e in EXT.values()}
    assert named == {p.name for p in VECTORS.iterdir()}
    assert {f"error-{c.value}" for c in ErrorCode} <= set(INDEX["responses"])
    assert {INDEX["malformed"][n]["error"] for n in INDEX["malformed"]} == {
        "bad_request",
        "invalid_input",
        "too_large",
    }


@pytest.mark.parametrize(("name", "codec"), _cases("requests"))
def test_request_vectors_decode_to_the_index(name: str, codec: Codec) -> None:
    raw = _read(name, codec)
    assert detect_codec(raw) is codec
    req = WIRE.decode_request(raw)
    assert req.codec is codec
    assert _request_fields(req) == INDEX["requests"][name]["decoded"]
    if codec is Codec.ZSTD:
        assert zstandard.ZstdDecompressor().decompress(raw) == _read(name, Codec.MSGPACK)
    else:
        assert WIRE.encode_request(req, codec) == raw


@pytest.mark.parametrize(("name", "codec"), _cases("malformed"))
def test_malformed_vectors_are_refused_with_their_code(name: str, codec: Codec) -> None:
    expected = INDEX["malformed"][name]
    with pytest.raises(ProtocolError) as caught:
        WIRE.decode_request(_read(name, codec))
    assert caught.value.code.value == expected["error"]
    assert caught.value.id == expected["id"]


@pytest.mark.parametrize(("name", "codec"), _cases("responses"))
def test_response_vectors_decode_and_encode(name: str, codec: Codec) -> None:
    raw = _read(name, codec)
    assert detect_codec(raw) is codec
    resp = WIRE.decode_response(raw)
    decoded = INDEX["responses"][name]["decoded"]
    assert _response_fields(resp) == decoded
    if resp.status == "error":  # the documented optional keys
        assert "version" not in decoded and "timing" not in decoded and "outputs" not in decoded
    if codec is Codec.ZSTD:
        assert zstandard.ZstdDecompressor().decompress(raw) == _read(name, Codec.MSGPACK)
    else:
        assert WIRE.encode_response(resp, codec) == raw


@pytest.mark.parametrize("codec", list(Codec), ids=[c.value for c in Codec])
async def test_a_worker_answers_each_request_vector_as_the_index_says(codec: Codec) -> None:
    """Every request vector, sent as its file's bytes to a worker on a memory broker and
    state (one worker per codec: a resend of an id is answered in the first one's codec)."""
    settings = load_settings(
        overrides={"models": {"root": str(REPO / "config" / "models"), "device": "cpu"}}
    )
    broker = MemoryBroker()
    options = TransportOptions(client_id="w", subscriptions=("request_message/#",))
    transport = connect("memory://", options, memory=broker)
    await transport.start()
    worker = Worker(
        Assembly(settings, transport, MemoryStateStore(), load_models(settings.models), "w")
    )
    stop = asyncio.Event()
    serving = asyncio.create_task(worker.serve(stop))
    clients = {
        # A request naming an app is answered only under response_message/<app>/ (the
        # default allow-list): the client of that app listens there.
        app: InferenceClient.connect(
            "memory://", memory=broker, app=app, resend_after_s=None, timeout_s=10
        )
        for app in ("", "sensor-7")
    }
    for c in clients.values():
        await c.start()
    client = clients[""]
    answers: dict[str, Response] = {}
    try:
        for name in INDEX["requests"]:
            decoded = INDEX["requests"][name]["decoded"]
            sender = clients[decoded.get("app", "")]
            reply = await sender.send_raw(decoded["id"], _read(name, codec))
            assert detect_codec(reply.raw) is codec
            answers[name] = reply.response
        for name, expected in INDEX["malformed"].items():
            # an error for an unreadable id is addressed to id "": awaited one at a time
            reply = await client.send_raw(expected["id"] or "", _read(name, codec))
            answers[name] = reply.response
    finally:
        for c in clients.values():
            await c.close()
        stop.set()
        await asyncio.wait_for(serving, 30)

    for name, case in INDEX["requests"].items():
        got, answer = answers[name], case["answer"]
        if "response" in answer:
            want = INDEX["responses"][answer["response"]]["decoded"]
            assert got.status == want["status"], (name, got.error)
            if want["status"] == "ok":
                assert got.outputs is not None
                assert _plain(dict(got.outputs))["label"] == want["outputs"]["label"], name
                assert {k for k in want if k != "worker"} <= set(_response_fields(got))
            else:
                assert got.error is not None and got.error.code.value == want["error"]["code"]
        elif "error" in answer:
            assert got.status == "error" and got.error is not None, name
            assert got.error.code.value == answer["error"], (name, got.error)
        else:
            assert got.status == answer["status"], (name, got.error)
        if got.status == "error":
            assert got.version is None and got.timing is None, name
    for name, expected in INDEX["malformed"].items():
        got = answers[name]
        assert got.status == "error" and got.error is not None, name
        assert got.error.code.value == expected["error"], (name, got.error)
        assert got.id == (expected["id"] or "")
