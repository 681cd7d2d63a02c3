"""Adaptive batching: the learned batch cost, the latency-target policy, and the batcher
driven by both under an open-loop load — all on a fake clock (nothing sleeps)."""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import pytest

from inference_worker.batchcost import BatchCost
from inference_worker.batching import DynamicBatcher
from inference_worker.batchpolicy import FixedDelay, LatencyTarget, policy_for
from tests.unit.test_batching import FakeClock


def learned(a: float, b: float, sizes: Sequence[int], noise: float = 0.0) -> BatchCost:
    rng = random.Random(7)
    cost = BatchCost()
    for n in sizes:
        cost.observe(n, (a + b * n) * (1.0 + rng.uniform(-noise, noise)))
    return cost


def test_cost_learns_overhead_and_per_row_cost() -> None:
    cost = learned(0.002, 0.0005, [1, 8, 64, 3, 32, 16] * 10)
    assert cost.fixed_s == pytest.approx(0.002, rel=1e-6)
    assert cost.per_row_s == pytest.approx(0.0005, rel=1e-6)
    assert cost.mean(10) == pytest.approx(0.007)
    assert cost.tail == pytest.approx(1.0)
    assert cost.max_rows == 64


def test_cost_of_one_batch_size_is_per_row_and_over_not_under_estimates() -> None:
    cost = learned(0.002, 0.0005, [8] * 20)
    assert cost.fixed_s == 0.0
    assert cost.mean(8) == pytest.approx(0.006)
    assert cost.mean(16) >= 0.002 + 0.0005 * 16  # a larger batch is not underestimated


def test_cost_follows_a_model_that_got_slower() -> None:
    cost = learned(0.002, 0.0005, [1, 8, 64, 3, 32, 16] * 10)
    for n in [1, 8, 64, 3, 32, 16] * 20:
        cost.observe(n, 2 * (0.002 + 0.0005 * n))
    assert cost.mean(32) == pytest.approx(2 * 0.018, rel=0.02)


def test_cost_tail_covers_the_slow_batches() -> None:
    cost = BatchCost()
    rng = random.Random(3)
    for i in range(400):
        n = rng.choice([4, 16, 32])
        slow = 3.0 if i % 50 == 0 else 1.0  # 2% of batches take 3x
        cost.observe(n, (0.001 + 0.0002 * n) * slow)
    assert cost.tail >= 2.5
    assert cost.high(16) >= 2.5 * cost.mean(16)


def test_cost_ignores_what_cannot_be_a_batch() -> None:
    cost = BatchCost()
    cost.observe(0, 1.0)
    cost.observe(4, float("nan"))
    cost.observe(4, -1.0)
    assert cost.batches == 0 and cost.mean(4) == 0.0


def test_target_takes_the_rows_whose_p99_fits_half_the_budget_and_waits_the_rest() -> None:
    cost = learned(0.001, 0.001, [1, 2, 4, 8, 16, 32, 64] * 5)
    policy = LatencyTarget(0.040, 64, cost)  # budget 36 ms, half 18 ms
    assert policy.target_rows() == 17  # 1 + 17 = 18 ms
    assert policy.row_limit(0.0) == 17
    assert policy.wait_s() == pytest.approx(0.036 - 0.018)


def test_a_late_backlog_grows_batches_only_where_batching_pays() -> None:
    overhead = learned(0.001, 0.00001, [1, 2, 4, 8, 16, 32, 64] * 5)
    policy = LatencyTarget(0.002, 64, overhead)  # half budget 0.9 ms: 1 row
    assert policy.row_limit(0.0) == 1
    assert policy.row_limit(0.010) == 59  # 95% of a full batch's rows per second
    per_row = learned(0.0, 0.001, [1, 2, 4, 8, 16, 32, 64] * 5)
    policy = LatencyTarget(0.010, 64, per_row)
    assert policy.row_limit(0.0) == policy.row_limit(1.0) == 4  # no gain: stays small


def test_a_cold_start_grows_the_batch_by_doubling() -> None:
    cost = BatchCost()
    policy = LatencyTarget(1.0, 64, cost)
    limits = []
    for _ in range(8):
        n = policy.row_limit(0.0)
        limits.append(n)
        cost.observe(n, 0.0001 * n)
    assert limits == [1, 2, 4, 8, 16, 32, 64, 64]


def test_no_target_is_the_fixed_delay() -> None:
    policy = policy_for(0.002, None, 64, BatchCost())
    assert isinstance(policy, FixedDelay)
    assert (policy.wait_s(), policy.row_limit(5.0)) == (0.002, 64)
    with pytest.raises(ValueError):
        LatencyTarget(0.0, 64, BatchCost())


async def _open_loop(
    target_s: float | None, *, gap_s: float, n: int, a: float, b: float
) -> tuple[list[float], list[int], DynamicBatcher[int, int]]:
    """`n` items arriving every `gap_s` (fake time) at a model costing a + b·rows;
    returns each item's queue + compute time and the batch sizes."""
    clock = FakeClock()
    finished: dict[int, float] = {}
    sizes: list[int] = []

    async def handler(items: list[int]) -> list[int]:
        sizes.append(len(items))
        await clock.sleep(a + b * len(items))
        for i in items:
            finished[i] = clock.now
        return items

    cost = BatchCost()
    policy = policy_for(0.005, target_s, 64, cost)
    batcher: DynamicBatcher[int, int] = DynamicBatcher(
        handler,
        max_batch_size=64,
        max_delay_s=0.005,
        max_queue=10_000,
        clock=clock,
        sleep=clock.sleep,
        cost=cost,
        policy=policy,
    )
    arrived: dict[int, float] = {}
    for i in range(n):
        arrived[i] = clock.now
        batcher.try_submit(i)
        await clock.advance(gap_s)
    for _ in range(100):  # let the backlog finish, in fake time (bounded)
        if len(finished) == n:
            break
        await clock.advance(0.1)
    assert len(finished) == n, f"{n - len(finished)} items never ran"
    await batcher.drain()
    return [finished[i] - arrived[i] for i in range(n)], sizes, batcher


async def test_open_loop_holds_the_target_with_batches_as_large_as_it_allows() -> None:
    """1000 arrivals/s at a model costing 2 ms + 0.2 ms/row (capacity ~4000/s at 64 rows):
    after the cold start every item's queue + compute stays within a 20 ms target, and
    batches are much larger than the 1-2 rows a dispatch-at-once policy would make."""
    latency, sizes, batcher = await _open_loop(0.020, gap_s=0.001, n=600, a=0.002, b=0.0002)
    steady = latency[100:]
    assert max(steady) <= 0.020, max(steady)
    assert np.mean(sizes[20:]) >= 8
    assert batcher.policy.wait_s() > 0.0


async def test_open_loop_near_capacity_keeps_up() -> None:
    """At ~80% of a full batch's capacity the target cannot hold with small batches; the
    batcher grows them and keeps up (no unbounded queue): the last arrivals wait no
    longer than the first after warm-up."""
    latency, sizes, _ = await _open_loop(0.010, gap_s=0.00045, n=1500, a=0.004, b=0.0003)
    assert max(sizes) > 20
    assert max(latency[-200:]) <= 2 * max(latency[200:400]) + 0.01


@pytest.mark.parametrize(("target", "expect"), [(1.0, 0.5), (None, 0.8)])
async def test_a_target_counts_from_receipt_a_fixed_delay_from_the_batcher(
    target: float | None, expect: float
) -> None:
    """An item received 0.3 s before it reached the batcher: with a 1 s target (budget
    0.9 s, learned cost 0.1 s) it leaves 0.5 s after it was queued; with a fixed 0.8 s
    delay, 0.8 s after."""
    clock = FakeClock()
    clock.now = 10.0
    started: list[float] = []

    async def handler(items: list[int]) -> list[int]:
        started.append(clock.now)
        return items

    cost = learned(0.1, 0.0, [1, 2, 4, 8, 16, 32, 64])
    batcher: DynamicBatcher[int, int] = DynamicBatcher(
        handler,
        max_batch_size=64,
        max_delay_s=0.8,
        max_queue=10,
        clock=clock,
        sleep=clock.sleep,
        arrived_of=lambda _item: 9.7,
        cost=cost,
        policy=policy_for(0.8, target, 64, cost),
    )
    batcher.try_submit(1)
    await clock.advance(2.0)
    assert started == [pytest.approx(10.0 + expect)], target
    await batcher.drain()
