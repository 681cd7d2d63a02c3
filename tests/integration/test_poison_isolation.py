"""Poison isolation on real Mosquitto and Redis: one request that makes the model raise
never fails the batch it was stacked into.

The model is the digits ONNX model behind a runner that raises whenever any row of a call
carries the poison marker (first pixel), and records the markers of every call and
whether it succeeded. So the test sees exactly which requests were computed how often.
Black-box otherwise: responses through a client, dead letters on the DLQ topic,
counters on `/metrics`.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from inference_worker.protocol import Request
from inference_worker.runtimes.onnx import OnnxRunner
from tests.integration.lifecycle_helpers import (
    Ledger,
    client_of,
    dead_letters,
    http_get,
    marked,
    model_repo,
    serving,
    wait_until,
    worker_settings,
)
from tests.servers import Server

pytestmark = pytest.mark.integration

POISON = -7.0
BATCH = 64
MAX_ATTEMPTS = 3


class PoisonModel:
    """Wraps OnnxRunner.run: raises for any call holding a POISON row; records calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._lock = threading.Lock()
        self.calls: list[tuple[tuple[float, ...], bool]] = []  # (markers, succeeded)
        real = OnnxRunner.run
        model = self

        def run(runner: OnnxRunner, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            first = next(iter(inputs.values()))
            if not first.any():
                return real(runner, inputs)  # warm-up
            markers = tuple(float(v) for v in first[:, 0])
            ok = POISON not in markers
            with model._lock:
                model.calls.append((markers, ok))
            if not ok:
                raise ValueError("poison row in the batch")
            return real(runner, inputs)

        monkeypatch.setattr(OnnxRunner, "run", run)

    def computed(self) -> Counter[float]:
        """Successful model calls per marker."""
        with self._lock:
            return Counter(m for markers, ok in self.calls if ok for m in markers)


async def _counter(port: int, name: str) -> float:
    status, body = await http_get(port, "/metrics")
    assert status == 200
    return sum(
        s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
        if s.name == name
    )


async def test_one_poison_row_in_64_fails_alone_and_63_are_answered_at_once(
    mosquitto: Server, redis: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A long max_delay: the batch leaves when it holds 64 rows, so it is exactly the 64.
    root = model_repo(
        tmp_path / "models", {"digits": {"max_batch_size": BATCH, "max_delay_ms": 30000}}
    )
    settings = worker_settings(
        mosquitto.url,
        redis.url,
        root,
        state={
            "max_attempts": MAX_ATTEMPTS,
            "retry_base_ms": 20,
            "retry_max_ms": 100,
            "reap_interval_s": 0.05,
        },
    )
    model = PoisonModel(monkeypatch)
    ledger = Ledger()
    markers = [float(i) for i in range(1, BATCH)] + [POISON]
    ids = {m: f"r{int(m)}" if m != POISON else "poison" for m in markers}
    async with (
        dead_letters(settings) as dead,
        serving(settings) as w,
        client_of(settings, timeout_s=60) as client,
    ):
        sends = [
            ledger.send(
                client,
                ids[m],
                client.encode(Request(ids[m], "digits", {"pixels": marked(m)})),
                "exhausted" if m == POISON else "ok",
            )
            for m in markers
        ]
        await asyncio.gather(*sends)
        await wait_until(lambda: any(d.get("id") == "poison" for d in dead), 30, "dead letter")
        await asyncio.sleep(0.3)  # a second dead letter, were there one, would be here now
        retries = await _counter(w.port, "iw_retries_total")
        extra = await _counter(w.port, "iw_isolation_calls_total")
        isolated = await _counter(w.port, "iw_isolated_total")
        _, body = await http_get(w.port, "/metrics")
        curve = {
            (s.labels["rows"], s.labels["estimate"]): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples
            if s.name == "iw_batch_cost_seconds" and s.labels["model"] == "digits"
        }
        rows_limit = await _counter(w.port, "iw_batch_rows_limit")
        wait_s = await _counter(w.port, "iw_batch_wait_seconds")

    assert ledger.lost == [] and ledger.wrong() == [], ledger.summary()
    first_call = model.calls[0][0]
    assert sorted(first_call) == sorted(markers), "the batch was not the 64 requests"
    # Every good request computed exactly once; the poison never.
    computed = model.computed()
    assert computed == Counter(m for m in markers if m != POISON)
    # The first attempt: the failed batch and its isolation calls, bounded by 2·log2(64);
    # the poison's last isolation call is the first time it ran alone, then one per retry.
    alone = [markers for markers, _ in model.calls if markers == (POISON,)]
    assert len(alone) == MAX_ATTEMPTS
    assert extra == len(model.calls) - 1 - (MAX_ATTEMPTS - 1)
    assert 0 < extra <= 2 * math.log2(BATCH), model.calls
    assert isolated == 1
    # Only the poison took the retry path: 63 answered in the first attempt.
    assert retries == MAX_ATTEMPTS - 1
    letters = [d for d in dead if d.get("id") == "poison"]
    assert len(dead) == 1 and len(letters) == 1, dead
    assert letters[0]["error"]["code"] == "exhausted"
    assert letters[0]["attempts"] == MAX_ATTEMPTS
    # The batching gauges: the fixed policy's choice, and the cost curve it learned from
    # the batches that ran (rows 1, 2, 4, ..., 64; mean and p99).
    assert (rows_limit, wait_s) == (BATCH, 30.0)
    assert sorted({int(r) for r, _ in curve}) == [1, 2, 4, 8, 16, 32, 64]
    assert curve[("32", "mean")] > 0 and curve[("32", "p99")] >= curve[("32", "mean")]
    reply = ledger.replies["poison"].response
    assert reply.error is not None and "poison row" in reply.error.message
