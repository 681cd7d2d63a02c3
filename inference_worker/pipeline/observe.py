"""Metric children bound once per model, and label values kept to a bounded set.

Model names in requests are client-chosen: a label made from them would let any client
create Prometheus series without limit (50k junk names made `/metrics` take 677 ms on
the event loop). Labels therefore come only from served models; every other name is
counted under `OTHER`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

from inference_worker.metrics import Metrics

if TYPE_CHECKING:
    from inference_worker.batching import DynamicBatcher

OTHER = "other"


def curve_rows(max_rows: int) -> list[int]:
    """The row counts the learned cost curve is reported at: powers of two, and the max
    (a bounded label set: at most 11 values for a max_batch_size of 1024)."""
    rows = [1 << k for k in range(max_rows.bit_length()) if 1 << k < max_rows]
    return [*rows, max_rows]


class LaneMetrics:
    """One model's metric children, looked up once, so the hot path does no label work."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        self._metrics = metrics
        self._model = model
        self.request_seconds = metrics.request_seconds.labels(model)
        self.queue_seconds = metrics.queue_seconds.labels(model)
        self.compute_seconds = metrics.compute_seconds.labels(model)
        self.batch_size = metrics.batch_size.labels(model)
        self.isolation_calls = metrics.isolation_calls.labels(model)
        self.isolated = metrics.isolated.labels(model)
        self._status: dict[str, Any] = {}
        self._batcher: DynamicBatcher[Any, Any] | None = None
        self._curve: set[int] = set()

    def follow(self, batcher: DynamicBatcher[Any, Any], max_rows: int) -> None:
        """Report `batcher`'s chosen wait, row limit and learned cost curve from now on
        (the newest lane of the model: a reloaded version takes over). Read at scrape
        time, so the batcher does no metric work per batch."""
        first = self._batcher is None
        self._batcher = batcher
        m, model = self._metrics, self._model
        if first:
            m.batch_wait_seconds.labels(model).set_function(lambda: self._now().policy.wait_s())
            m.batch_rows_limit.labels(model).set_function(lambda: self._now().policy.row_limit(0.0))
        for rows in curve_rows(max_rows):
            if rows in self._curve:
                continue
            self._curve.add(rows)
            label = str(rows)
            m.batch_cost_seconds.labels(model, label, "mean").set_function(self._mean_at(rows))
            m.batch_cost_seconds.labels(model, label, "p99").set_function(self._high_at(rows))

    def _mean_at(self, rows: int) -> Callable[[], float]:
        return lambda: self._now().cost.mean(rows)

    def _high_at(self, rows: int) -> Callable[[], float]:
        return lambda: self._now().cost.high(rows)

    def _now(self) -> DynamicBatcher[Any, Any]:
        assert self._batcher is not None
        return self._batcher

    def answered(self, status: str, seconds: float, count: int = 1) -> None:
        self.count(status, count)
        for _ in range(count):
            self.request_seconds.observe(seconds)

    def count(self, status: str, count: int = 1) -> None:
        child = self._status.get(status)
        if child is None:
            child = self._status[status] = self._metrics.requests.labels(self._model, status)
        child.inc(count)


class Labels:
    """Maps a client-given model name to a bounded label value."""

    def __init__(self, served: Callable[[], Collection[str]]) -> None:
        self._served = served

    def model(self, name: str | None) -> str:
        return name if name and name in self._served() else OTHER
