"""Where a lane's model calls run: on the event loop while they are known to be tiny, in
the lane's pool otherwise.

A call in the pool costs two thread hand-offs (the loop's wake-up and a `wait_for` task
each way) and makes the pool thread compete with the loop for the GIL: for a model that
computes in 0.1-0.3 ms that is several times the call itself (benchmarks/RESULTS.md).
So a lane runs a call on the loop when, of its last `window` calls (the model call alone,
as `compute.infer` times it; at least `learn` of them seen — the first calls of a new
version always run in the pool), at most one in ten took longer than `max_s` and none
took longer than ten times that. A rare slow call (the host preempted the thread, or a
pool call waited for the GIL on its way back) does not send the lane back to the pool;
a model that is often slow, or once very slow, goes back at once.

What a call on the loop gives up: it cannot be timed out (`worker.compute_timeout_s`
applies to pool calls only). A call that turns slow is seen when it returns and sends the
next `window` calls back to the pool; a call that never returns stops the loop, which
the worker's liveness probe (`/healthz` is served by the same loop) then reports, and
the request's lease expires so another worker takes it over (and, after
`state.max_attempts`, gives it up). Take-overs and due retries never run on the loop
(`Batches.run_alone`): they are the requests suspected of hanging a call. A call that
raises counts with the time it took. Set `worker.loop_compute_max_ms: 0` to keep every
call in the pool when a model may hang.

The window does not tell batch sizes apart: a lane that learned on small batches at
light load runs the first large batch of a burst on the loop, and only its return sends
the lane back to the pool if it was slow. For the models this is meant for (digits: 0.14
ms for a batch of 64) the difference is within the limit.
"""

from __future__ import annotations

from collections import deque

FAR = 10.0  # a call this many times `max_s`: back to the pool for a whole window


class CallPlacement:
    """Per lane; event-loop thread only."""

    def __init__(self, max_s: float, *, learn: int = 16, window: int = 64) -> None:
        self._max_s = max_s
        self._far_s = max_s * FAR
        self._learn = learn
        self._recent: deque[float] = deque(maxlen=window)
        self._slow = 0  # calls in `_recent` over `max_s`
        self._far = 0  # ... over `FAR` times it

    def on_loop(self) -> bool:
        return (
            self._max_s > 0
            and len(self._recent) >= self._learn
            and self._slow * 10 <= len(self._recent)  # at most 1 in 10 of those seen
            and not self._far
        )

    def observe(self, seconds: float) -> None:
        """A call's duration (a timed-out call counts as its timeout)."""
        recent = self._recent
        if len(recent) == recent.maxlen:
            self._count(recent[0], -1)
        recent.append(seconds)
        self._count(seconds, 1)

    def _count(self, seconds: float, delta: int) -> None:
        if seconds > self._max_s:
            self._slow += delta
            if seconds > self._far_s:
                self._far += delta
