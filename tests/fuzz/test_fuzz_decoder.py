"""Runs the atheris decoder fuzzer for a bounded time, seeded with valid messages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from inference_worker.protocol import Codec, ErrorCode, ErrorInfo, Request, Response, WireCodec
from tests.servers import require_module

REPO = Path(__file__).resolve().parents[2]


def _seeds(corpus: Path) -> None:
    codec = WireCodec()
    tensors = {
        "pixels": np.arange(64, dtype=np.float32).reshape(1, 64),
        "mask": np.array([[True, False]]),
        "ids": np.array([[1, 2, 3]], dtype=np.int64),
    }
    n = 0
    for c in Codec:
        req = Request(
            id="seed",
            model="digits",
            inputs=tensors,
            app="a",
            meta={"k": [1, 2.5]},
            deadline_ms=1,
            reply_to="response_message/x",
            codec=c,
        )
        ok = Response(id="seed", status="ok", outputs=tensors, model="digits", version=1)
        err = Response(id="seed", status="error", error=ErrorInfo(ErrorCode.TOO_LARGE, "m"))
        timed = Request(id="seed", model="digits", inputs=tensors, ttl_ms=500, codec=c)
        for payload in (
            codec.encode_request(req, c),
            codec.encode_request(timed, c),
            codec.encode_response(ok, c),
            codec.encode_response(err, c),
        ):
            (corpus / f"seed-{n}").write_bytes(payload)
            n += 1


def test_decoder_survives_coverage_guided_fuzzing(tmp_path: Path) -> None:
    require_module("atheris", "it is in the dev extra")
    seconds = int(os.environ.get("IW_FUZZ_SECONDS", "20"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    _seeds(corpus)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.fuzz.fuzz_decode",
            f"-max_total_time={seconds}",
            "-rss_limit_mb=1536",
            "-max_len=65536",
            "-timeout=10",
            str(corpus),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=seconds + 120,
    )
    tail = out.stderr[-3000:]
    print(tail)
    # libFuzzer exits 0 when time ran out without a crash, leak, timeout or OOM.
    assert out.returncode == 0, tail
    assert "Done" in out.stderr
