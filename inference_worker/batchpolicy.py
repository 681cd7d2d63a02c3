"""How long a batch waits to fill, and how many rows it takes (see docs/batching.md).

A policy answers two questions for the batcher whenever a concurrency slot is free:
``wait_s()`` — how long the oldest queued item may wait for more to arrive — and
``row_limit(head_age_s)`` — how many rows the next batch takes (at most
``max_batch_size``). Both count from ``origin(enqueued_at, arrived_at)``: the fixed delay
from when the item reached the batcher, a latency target from when the request was
received (what a target covers includes the decode and claim before the batcher). While
every slot is busy the batcher does not ask: items accumulate and the next batch is as
large as the row limit allows.

- :class:`FixedDelay` is the model's ``max_delay_ms``: the same wait and
  ``max_batch_size`` rows, always.
- :class:`LatencyTarget` aims at ``latency_target_ms``, the p99 of queue + compute the
  operator wants, using the batcher's learned :class:`~inference_worker.batchcost.BatchCost`.
  It spends 90% of the target (the rest is headroom for what the model does not see:
  the event loop, encode, the hand-offs). Rows: the most whose p99 cost fits in half of
  that budget — a request that arrives just after a batch left waits one batch time for
  the slot and then its own, so two batch times must fit. Wait: whatever the budget leaves
  after that batch's p99 cost. When the oldest request has already missed the budget
  (the model cannot keep up at that size), batches grow to the size that gives 95% of the
  throughput of a full one, which drains a backlog fastest; a model whose cost is all
  per-row (no gain from batching) stays at the target's size (a model seen at one batch
  size only is tried larger, to find out). Until the cost of larger
  batches has been seen, the row limit grows by doubling (at most twice the largest
  batch observed), so a cold start never runs a batch the target cannot afford.
"""

from __future__ import annotations

import math
from typing import Protocol

from inference_worker.batchcost import BatchCost

HEADROOM = 0.9  # the share of the latency target the batcher spends
THROUGHPUT_SHARE = 0.95  # a late backlog: the smallest batch with this share of a full one's rate


class BatchPolicy(Protocol):
    def wait_s(self) -> float:
        """How long the oldest queued item may wait for the batch to fill."""
        ...

    def row_limit(self, head_age_s: float) -> int:
        """Rows the next batch may take; `head_age_s`: how long the oldest has waited."""
        ...

    def origin(self, enqueued_at: float, arrived_at: float) -> float:
        """Where an item's wait starts: batcher entry or receipt."""
        ...


class FixedDelay:
    def __init__(self, max_delay_s: float, max_rows: int) -> None:
        self._delay = max_delay_s
        self._rows = max_rows

    def wait_s(self) -> float:
        return self._delay

    def row_limit(self, head_age_s: float) -> int:
        return self._rows

    def origin(self, enqueued_at: float, arrived_at: float) -> float:
        return enqueued_at


class LatencyTarget:
    def __init__(self, target_s: float, max_rows: int, cost: BatchCost) -> None:
        if not target_s > 0 or max_rows < 1:
            raise ValueError("target_s must be > 0 and max_rows >= 1")
        self.target_s = target_s
        self._budget = HEADROOM * target_s
        self._max = max_rows
        self._cost = cost

    def _explored(self) -> int:
        """The largest batch whose cost the line may be trusted for (see module doc)."""
        return min(self._max, max(1, 2 * self._cost.max_rows))

    def target_rows(self) -> int:
        """The most rows whose p99 cost fits in half the budget (at least 1)."""
        c = self._cost
        a, b = c.fixed_s * c.tail, c.per_row_s * c.tail  # high(n) = a + b·n
        half = self._budget / 2.0
        if b <= 0.0:
            n = self._max if a <= half else 1
        else:
            n = max(1, min(self._max, math.floor((half - a) / b)))
        return min(n, self._explored())

    def throughput_rows(self) -> int:
        """The fewest rows that give THROUGHPUT_SHARE of a full batch's rows per second."""
        a, b, m = self._cost.fixed_s, self._cost.per_row_s, self._max
        if not self._cost.resolved:
            return m  # one size seen so far: whether batching pays is found out by trying
        if a <= 0.0:
            return 1  # all per-row: a larger batch is no faster per row
        q = THROUGHPUT_SHARE * m / (a + b * m)
        return max(1, min(m, math.ceil(q * a / (1.0 - q * b))))

    def wait_s(self) -> float:
        return max(0.0, self._budget - self._cost.high(self.target_rows()))

    def origin(self, enqueued_at: float, arrived_at: float) -> float:
        return min(enqueued_at, arrived_at)

    def row_limit(self, head_age_s: float) -> int:
        n = self.target_rows()
        if head_age_s + self._cost.high(n) > self._budget:
            n = max(n, min(self.throughput_rows(), self._explored()))
        return n


def policy_for(
    max_delay_s: float, latency_target_s: float | None, max_rows: int, cost: BatchCost
) -> BatchPolicy:
    """The policy a model's config asks for: a latency target when it sets one."""
    if latency_target_s is None:
        return FixedDelay(max_delay_s, max_rows)
    return LatencyTarget(latency_target_s, max_rows, cost)
