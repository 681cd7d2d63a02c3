"""Where a worker runs its model calls (pipeline/placement.py), seen from the runner:
the first calls of a version in the lane's pool, then — digits computes in well under
`worker.loop_compute_max_ms` — on the event loop; never on the loop when it is 0."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from inference_worker.pipeline.compute import BatchComputer
from inference_worker.pipeline.placement import CallPlacement
from inference_worker.runtimes.base import Runner
from tests.unit.test_worker_memory import FlakyRunner, _digits, _settings, pipeline


class Recording(FlakyRunner):
    """The real runner, noting the thread each call ran on."""

    def __init__(self, inner: Runner) -> None:
        super().__init__(inner)
        self.threads: list[str] = []

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.threads.append(threading.current_thread().name)
        return super().run(inputs)


async def _calls_one_by_one(settings_overrides: dict[str, object], n: int) -> list[str]:
    x, _ = _digits()
    async with pipeline(_settings(worker=settings_overrides)) as (_, client, runner, _):
        recording = Recording(runner.inner)
        runner.inner = recording
        for i in range(n):  # one at a time: one model call each
            row = x[i : i + 1]
            reply = await client.send(client.make_request("digits", {"pixels": row}))
            assert reply.response.outputs is not None, reply.response
            expected = recording.inner.run({"pixels": row})["label"]  # the same model, directly
            assert np.array_equal(reply.response.outputs["label"], expected)
    return recording.threads


async def test_tiny_calls_move_from_the_pool_to_the_loop() -> None:
    threads = await _calls_one_by_one({}, 40)
    main = threading.main_thread().name
    assert len(threads) == 40
    assert all(t != main for t in threads[:16]), threads[:16]  # learning: in the pool
    assert all(t == main for t in threads[20:]), threads[20:]  # then on the loop


async def test_zero_keeps_every_call_in_the_pool() -> None:
    threads = await _calls_one_by_one({"loop_compute_max_ms": 0}, 30)
    assert threads and all(t.startswith("iw-digits") for t in threads), threads


async def test_a_retry_runs_in_the_pool_even_when_the_lane_runs_on_the_loop() -> None:
    """A request that failed a call (or hung one) is re-run in the pool, bounded by
    compute_timeout_s, never on the loop."""
    x, _ = _digits()
    fast = {"state": {"retry_base_ms": 10, "reap_interval_s": 0.02}}
    async with pipeline(_settings(**fast)) as (worker, client, runner, _):
        recording = Recording(runner.inner)
        runner.inner = recording
        for i in range(24):
            await client.send(client.make_request("digits", {"pixels": x[i : i + 1]}))
        assert recording.threads[-1] == threading.main_thread().name  # on the loop now
        runner.fail_next = 1  # the next call raises (before reaching the model)
        reply = await client.send(client.make_request("digits", {"pixels": x[30:31]}, id="r"))
    assert reply.response.status == "ok"
    assert worker.stats.retries == 1
    assert recording.threads[-1].startswith("iw-digits"), recording.threads[-3:]


async def test_each_model_call_counts_once_even_when_its_encoding_times_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The placement learns from one time per call: a call whose encoding outlived
    compute_timeout_s counts as timed out, not also as the quick model call it was."""
    seen: list[float] = []
    observe = CallPlacement.observe

    def counting(self: CallPlacement, seconds: float) -> None:
        seen.append(seconds)
        observe(self, seconds)

    encode = BatchComputer.encode
    slow_once = [True]

    def slow_encode(self: BatchComputer, *args: Any) -> Any:
        if slow_once.pop() if slow_once else False:
            time.sleep(0.3)  # in the pool thread, past the 0.2 s timeout
        return encode(self, *args)

    monkeypatch.setattr(CallPlacement, "observe", counting)
    monkeypatch.setattr(BatchComputer, "encode", slow_encode)
    x, _ = _digits()
    quick = {
        "worker": {"compute_timeout_s": 0.2, "loop_codec_max_bytes": 0},  # encode in the pool
        # the retry (after 400-1200 ms, jittered) finds the pool thread free again
        "state": {"retry_base_ms": 800, "reap_interval_s": 0.02},
    }
    async with pipeline(_settings(**quick)) as (worker, client, runner, _):
        recording = Recording(runner.inner)
        runner.inner = recording
        reply = await client.send(client.make_request("digits", {"pixels": x[0:1]}, id="r"))
    assert reply.response.status == "ok"
    assert worker.stats.retries == 1  # the timed-out attempt, then the retry
    assert len(recording.threads) == 2
    assert len(seen) == 2, seen
    assert seen[0] == 0.2  # the timed-out call counts as the timeout
