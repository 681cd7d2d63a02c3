"""Metric children bound once per model, and label values kept to a bounded set.

Model names in requests are client-chosen: a label made from them would let any client
create Prometheus series without limit (50k junk names made `/metrics` take 677 ms on
the event loop). Labels therefore come only from served models; every other name is
counted under `OTHER`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from inference_worker.metrics import Metrics

OTHER = "other"


class LaneMetrics:
    """One model's metric children, looked up once, so the hot path does no label work."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        self._metrics = metrics
        self._model = model
        self.request_seconds = metrics.request_seconds.labels(model)
        self.queue_seconds = metrics.queue_seconds.labels(model)
        self.compute_seconds = metrics.compute_seconds.labels(model)
        self.batch_size = metrics.batch_size.labels(model)
        self._status: dict[str, Any] = {}

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
