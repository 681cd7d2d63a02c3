"""Where a worker runs its model calls (pipeline/placement.py), seen from the runner:
the first calls of a version in the lane's pool, then — digits computes in well under
`worker.loop_compute_max_ms` — on the event loop; never on the loop when it is 0."""

from __future__ import annotations

import threading
from collections.abc import Mapping

import numpy as np

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
