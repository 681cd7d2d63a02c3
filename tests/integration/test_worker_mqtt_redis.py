"""The whole pipeline against real Mosquitto and Redis started by fixtures.

Every test keeps a ledger of what it sent and states its pass condition: lost,
duplicated and wrong responses are counted, never assumed.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zstandard

from inference_worker.protocol import Codec, Request
from inference_worker.transports import connect
from inference_worker.transports.base import TransportOptions
from tests.integration.harness import (
    REPO,
    WorkerProcess,
    client_for,
    heldout,
    isolated_settings,
    worker_in_loop,
)
from tests.servers import Server

pytestmark = pytest.mark.integration


async def test_500_requests_accuracy_and_resends_cost_no_inference(
    mosquitto: Server, redis: Server
) -> None:
    settings = isolated_settings(mosquitto.url, redis.url)
    x, y = heldout()
    n = 500
    async with worker_in_loop(settings) as worker, client_for(settings) as client:
        requests = [
            client.make_request("digits", {"pixels": x[i : i + 1]}, id=f"r{i}") for i in range(n)
        ]
        payloads = [client.encode(r) for r in requests]
        replies = await asyncio.gather(
            *(client.send_raw(r.id, p) for r, p in zip(requests, payloads, strict=True))
        )
        inferences_before = worker.stats.inferences
        # 100 of them again with the same id (and bytes): answered from the ledger.
        again = await asyncio.gather(
            *(client.send_raw(requests[i].id, payloads[i]) for i in range(0, n, 5))
        )
        inferences_after = worker.stats.inferences

    assert len(replies) == n
    assert [r.response.id for r in replies] == [r.id for r in requests]  # nothing lost or crossed
    assert all(r.response.status == "ok" for r in replies)
    labels = np.array([int(r.response.outputs["label"][0]) for r in replies])  # type: ignore[index]
    accuracy = float((labels == y[:n]).mean())
    print(f"accuracy on {n} held-out digits through mosquitto+redis: {accuracy:.4f}")
    assert accuracy >= 0.95
    assert inferences_before == n
    assert inferences_after == n, "a resend of a completed id must not run the model"
    assert len(again) == 100
    assert all(a.raw == replies[i * 5].raw for i, a in enumerate(again)), (
        "cached bytes must be identical"
    )
    assert worker.stats.dedup["done"] == 100


async def test_same_id_different_payload_is_conflict(mosquitto: Server, redis: Server) -> None:
    settings = isolated_settings(mosquitto.url, redis.url)
    x, _ = heldout()
    async with (
        worker_in_loop(settings) as worker,
        client_for(settings, resend_after_s=None) as client,
    ):
        first = await client.send(client.make_request("digits", {"pixels": x[0:1]}, id="same"))
        second = await client.send(client.make_request("digits", {"pixels": x[1:2]}, id="same"))
        # Another app may use the same id: namespaced, so it is computed, not a conflict.
        other = await client.send(
            Request(id="same", model="digits", inputs={"pixels": x[1:2]}, app="other-app")
        )
    assert first.response.status == "ok"
    assert second.response.status == "error"
    assert second.response.error is not None and second.response.error.code.value == "conflict"
    assert other.response.status == "ok" and other.response.app == "other-app"
    assert worker.stats.inferences == 2


def _zstd_bomb(size: int) -> bytes:
    return zstandard.ZstdCompressor().compress(b"\x00" * size)


async def test_bad_input_gets_error_codes_dead_letters_and_worker_keeps_serving(
    mosquitto: Server, redis: Server
) -> None:
    settings = isolated_settings(
        mosquitto.url,
        redis.url,
        limits={"max_compressed_bytes": 256 * 1024, "max_decompressed_bytes": 1024 * 1024},
    )
    x, y = heldout()
    good = x[0:1]

    def env(id_: str, **overrides: object) -> bytes:
        body: dict[str, object] = {
            "id": id_,
            "model": "digits",
            "inputs": {"pixels": {"dtype": "float32", "shape": [1, 64], "data": good.tobytes()}},
        }
        body.update(overrides)
        return msgpack.packb(body, use_bin_type=True)

    cases: list[tuple[str, bytes, str]] = [
        ("", b"\x00\x01 definitely not a request", "bad_request"),
        ("", _zstd_bomb(2 * 1024 * 1024), "too_large"),  # 200-odd bytes that inflate past the cap
        ("", b"{" + b" " * (300 * 1024) + b"}", "too_large"),  # over the compressed cap
        (
            "shape",
            env(
                "shape",
                inputs={
                    "pixels": {"dtype": "float32", "shape": [1, 63], "data": good[:, :63].tobytes()}
                },
            ),
            "invalid_input",
        ),
        (
            "dtype",
            env(
                "dtype",
                inputs={
                    "pixels": {
                        "dtype": "float64",
                        "shape": [1, 64],
                        "data": good.astype(np.float64).tobytes(),
                    }
                },
            ),
            "invalid_input",
        ),
        (
            "bytes",
            env(
                "bytes",
                inputs={
                    "pixels": {"dtype": "float32", "shape": [1, 64], "data": good.tobytes()[:-4]}
                },
            ),
            "invalid_input",
        ),
        ("model", env("model", model="no-such-model"), "unknown_model"),
        ("noinputs", env("noinputs", inputs={}), "bad_request"),
        (
            "json",
            json.dumps(
                {
                    "id": "json",
                    "model": "digits",
                    "inputs": {
                        "pixels": {"dtype": "float32", "shape": [1, 64], "data": [[1.0] * 63]}
                    },
                }
            ).encode(),
            "invalid_input",
        ),
    ]
    dlq = connect(
        settings.broker.url,
        TransportOptions(client_id="dlq-reader", subscriptions=(settings.broker.dlq_topic,)),
    )
    await dlq.start()
    dead: list[dict[str, object]] = []

    async def read_dlq() -> None:
        async for d in dlq.deliveries():
            d.ack()
            dead.append(msgpack.unpackb(d.payload, raw=False))

    reader = asyncio.create_task(read_dlq())
    try:
        async with (
            worker_in_loop(settings) as worker,
            client_for(settings, resend_after_s=None) as client,
        ):
            got: dict[str, str] = {}
            for id_, payload, _ in cases:
                reply = await client.send_raw(id_, payload, timeout_s=15)
                assert reply.response.status == "error"
                assert reply.response.error is not None
                got[id_ or payload[:8].hex()] = reply.response.error.code.value
            # The worker is still serving after all of that.
            ok = await client.send(client.make_request("digits", {"pixels": x[3:4]}, id="after"))
            for _ in range(100):
                if len(dead) >= len(cases):
                    break
                await asyncio.sleep(0.05)
    finally:
        await dlq.close()
        reader.cancel()
    expected = {(id_ or payload[:8].hex()): code for id_, payload, code in cases}
    assert got == expected
    assert ok.response.status == "ok"
    assert int(ok.response.outputs["label"][0]) == int(y[3])  # type: ignore[index]
    assert worker.stats.dead_letters == len(cases)
    assert len(dead) == len(cases)
    assert Counter(str(e["error"]["code"]) for e in dead) == Counter(c for _, _, c in cases)  # type: ignore[index]
    assert sum(worker.stats.errors.values()) == len(cases)


async def test_two_worker_processes_share_the_load_exactly_once(
    mosquitto: Server, redis: Server, tmp_path: Path
) -> None:
    settings = isolated_settings(mosquitto.url, redis.url)
    x, y = heldout()
    n = 400
    workers = [WorkerProcess(settings, f"w{i}", tmp_path / f"w{i}.log") for i in range(2)]
    try:
        await asyncio.gather(*(w.wait_ready() for w in workers))
        async with client_for(settings, resend_after_s=None) as client:
            reqs = [
                client.make_request(
                    "digits", {"pixels": x[i % len(x) : i % len(x) + 1]}, id=f"s{i}"
                )
                for i in range(n)
            ]
            replies = await asyncio.gather(*(client.send(r) for r in reqs))
            await asyncio.sleep(0.5)  # let any stray duplicate arrive before counting
            duplicates = client.duplicates
    finally:
        codes = [w.stop() for w in workers]
    ids = Counter(r.response.id for r in replies)
    lost = n - len(ids)
    wrong = sum(
        1
        for i, r in enumerate(replies)
        if r.response.status != "ok"
        or int(r.response.outputs["label"][0])
        != int(  # type: ignore[index]
            heldout_label(y, i)
        )
    )
    by_worker = Counter(r.response.worker for r in replies)
    print(
        f"two workers: sent {n}, lost {lost}, duplicates {duplicates}, per worker {dict(by_worker)}"
    )
    assert lost == 0 and duplicates == 0
    assert set(by_worker) == {"w0", "w1"}, "both workers must have done work"
    assert wrong <= n * 0.05  # the model's own error rate, not the pipeline's
    assert codes == [0, 0]
    # Each worker's own count (logged at shutdown) adds up to the requests sent.
    computed = sum(_logged_stats(w.log_path)["inferences"] for w in workers)
    assert computed == n


def heldout_label(y: np.ndarray, i: int) -> int:
    return int(y[i % len(y)])


def _logged_stats(path: Path) -> dict[str, int]:
    for line in path.read_text().splitlines():
        if '"worker stopped"' in line:
            return json.loads(line)["stats"]  # type: ignore[no-any-return]
    raise AssertionError(f"no shutdown stats in {path}")


def test_demo_against_real_servers(mosquitto: Server, redis: Server) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "inference_worker.cli",
            "demo",
            "--broker",
            mosquitto.url,
            "--state",
            redis.url,
            "--json",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(out.stdout)
    assert result["requests"] == result["responses"] > 0
    assert result["accuracy"] >= 0.95
    assert result["resends"] > 0 and result["resend_identical"] == result["resends"]
    assert result["inferences"] == result["requests"]  # distinct ids; resends computed nothing


async def test_zstd_msgpack_json_codecs_answer_in_kind(mosquitto: Server, redis: Server) -> None:
    settings = isolated_settings(mosquitto.url, redis.url)
    x, y = heldout()
    async with worker_in_loop(settings), client_for(settings, resend_after_s=None) as client:
        for codec in Codec:
            req = Request(
                id=f"codec-{codec.value}", model="digits", inputs={"pixels": x[5:6]}, codec=codec
            )
            reply = await client.send(req)
            assert reply.response.status == "ok"
            assert int(reply.response.outputs["label"][0]) == int(y[5])  # type: ignore[index]
            first = reply.raw[:4]
            if codec is Codec.ZSTD:
                assert first == b"\x28\xb5\x2f\xfd"
            elif codec is Codec.JSON:
                assert reply.raw.lstrip()[:1] == b"{"
