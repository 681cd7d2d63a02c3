"""Running a batch: the model call in the lane's pool, bounded in time, then the outbox.

The model call is awaited with `worker.compute_timeout_s`: a call that has not returned
by then counts as a failed attempt of every job in the batch (retried with backoff, or
`exhausted`), and is counted in `iw_compute_timeouts_total`; its pool thread cannot be
interrupted and finishes on its own.

Storing and publishing run in the background (bounded by `_completing`), so the batcher's
slot is free for the next batch as soon as the model is done: otherwise the model would
idle through two network round trips per batch. Take-overs run alone and wait for their
completion (`run_alone`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from inference_worker.metrics import Metrics, WorkerStats
from inference_worker.pipeline.compute import BatchComputer, Computed
from inference_worker.pipeline.jobs import Job
from inference_worker.pipeline.outbox import Outbox
from inference_worker.protocol import ErrorCode

if TYPE_CHECKING:
    from inference_worker.pipeline.lanes import Lane
    from inference_worker.pipeline.recovery import Recovery

log = logging.getLogger("inference_worker.pipeline")


class Batches:
    def __init__(
        self,
        computer: BatchComputer,
        outbox: Outbox,
        stats: WorkerStats,
        metrics: Metrics,
        *,
        compute_timeout_s: float,
        clock: Callable[[], float],
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        max_completing: int = 64,
    ) -> None:
        self.computer = computer
        self._outbox = outbox
        self._stats = stats
        self._metrics = metrics
        self._timeout = compute_timeout_s
        self._clock = clock
        self._spawn = spawn
        self._completing = asyncio.Semaphore(max_completing)
        self.recovery: Recovery | None = None  # set by the assembly (they call each other)

    async def run(self, lane: Lane, jobs: list[Job]) -> None:
        """The batcher's handler: compute, then complete in the background."""
        computed = await self._compute(lane, jobs)
        if computed is None:
            return
        await self._completing.acquire()  # bounded: a slow Redis slows the batcher down
        self._spawn(self._complete_then_release(jobs, computed))

    async def run_alone(self, job: Job) -> None:
        """A take-over: compute and complete before returning."""
        computed = await self._compute(job.lane, [job])
        if computed is not None:
            await self._outbox.complete([job], computed.payloads, "ok")

    async def expired(self, jobs: list[Job]) -> None:
        """Past-deadline requests: answered (and cached) without compute."""
        await self.answer_deadline(jobs, "deadline passed before compute")

    async def answer_deadline(self, jobs: list[Job], message: str) -> None:
        code = ErrorCode.DEADLINE_EXCEEDED
        payloads = [self._outbox.error_payload(j.to, code, message) for j in jobs]
        self._stats.errors[code.value] += len(jobs)
        await self._outbox.complete(jobs, payloads, code.value)

    async def _compute(self, lane: Lane, jobs: list[Job]) -> Computed | None:
        dispatched = self._clock()
        served = lane.served
        loop = asyncio.get_running_loop()
        call = loop.run_in_executor(lane.executor, self.computer, served, jobs, dispatched)
        assert self.recovery is not None
        try:
            computed = await asyncio.wait_for(call, self._timeout)
        except TimeoutError:
            self._metrics.compute_timeouts.labels(lane.name).inc()
            log.error(
                "model call timed out",
                extra={"model": lane.name, "batch": len(jobs), "timeout_s": self._timeout},
            )
            await self.recovery.retry_later(jobs, f"model call exceeded {self._timeout}s")
            return None
        except Exception as exc:
            log.exception("inference failed", extra={"model": lane.name, "batch": len(jobs)})
            await self.recovery.retry_later(jobs, f"inference failed: {type(exc).__name__}: {exc}")
            return None
        stats = self._stats
        stats.batches += 1
        stats.batch_sizes[len(jobs)] += 1
        stats.inferences += len(jobs)
        stats.inferred_rows += sum(j.rows for j in jobs)
        observe = lane.observe
        observe.batch_size.observe(len(jobs))
        observe.compute_seconds.observe(computed.compute_s)
        for job in jobs:
            observe.queue_seconds.observe(dispatched - job.received_at)
        return computed

    async def _complete_then_release(self, jobs: list[Job], computed: Computed) -> None:
        try:
            await self._outbox.complete(jobs, computed.payloads, "ok")
        finally:
            self._completing.release()
