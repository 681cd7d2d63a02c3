"""Where a lane's model calls run: on the event loop while they are known to be tiny, in
the lane's pool otherwise.

A call in the pool costs two thread hand-offs (the loop's wake-up and a `wait_for` task
each way) and makes the pool thread compete with the loop for the GIL: for a model that
computes in 0.1-0.3 ms that is several times the call itself (benchmarks/RESULTS.md).
So a lane runs a call on the loop when every one of its last `window` calls took at most
`max_s` (the model call alone, as `compute.infer` times it) and it has seen at least
`learn` of them; the first calls of a new version always run in the pool.

What a call on the loop gives up: it cannot be timed out (`worker.compute_timeout_s`
applies to pool calls only). A call that turns slow is seen when it returns and sends the
next `window` calls back to the pool; a call that never returns stops the loop, which
the worker's liveness probe (`/healthz` is served by the same loop) then reports, and
the request's lease expires so another worker takes it over (and, after
`state.max_attempts`, gives it up). Set `worker.loop_compute_max_ms: 0` to keep every
call in the pool when a model may hang.
"""

from __future__ import annotations

from collections import deque


class CallPlacement:
    """Per lane; event-loop thread only."""

    def __init__(self, max_s: float, *, learn: int = 16, window: int = 64) -> None:
        self._max_s = max_s
        self._learn = learn
        self._recent: deque[float] = deque(maxlen=window)
        self._slowest = 0.0  # of `_recent`, kept so that `on_loop` costs no scan

    def on_loop(self) -> bool:
        return self._max_s > 0 and len(self._recent) >= self._learn and self._slowest <= self._max_s

    def observe(self, seconds: float) -> None:
        """A call's duration (a timed-out call counts as its timeout)."""
        recent = self._recent
        leaving = recent[0] if len(recent) == recent.maxlen else None
        recent.append(seconds)
        if seconds >= self._slowest:
            self._slowest = seconds
        elif leaving is not None and leaving >= self._slowest:
            self._slowest = max(recent)
