"""Running a batch: the model call, then the outbox.

The call runs in the lane's pool, bounded in time, or — while the lane's recent calls were
all tiny (`worker.loop_compute_max_ms`, pipeline/placement.py) — on the event loop, where
two thread hand-offs would cost more than the call. The responses are encoded on the
loop when the outputs are small, in the pool when they are large
(`worker.loop_codec_max_bytes`, see pipeline/compute.py).

A model call that raises does not fail its batch: the batch is split and re-run within
the same attempt until the requests that fail alone are found (`pipeline.poison`);
everything else is answered at once, and only those take the retry path. The extra
calls are counted in `iw_isolation_calls_total`, the culprits in `iw_isolated_total`.

A pool call is awaited with `worker.compute_timeout_s`: a call that has not returned
by then counts as a failed attempt of every job in it that is not answered yet (retried
with backoff, or `exhausted`), and is counted in `iw_compute_timeouts_total`; its pool
thread cannot be interrupted and finishes on its own, so a timeout is never split.

Storing and publishing run in the background (bounded by `_completing`), so the batcher's
slot is free for the next batch as soon as the model is done: otherwise the model would
idle through two network round trips per batch. Take-overs and due retries run alone,
always in the pool with the timeout (they are the requests suspected of crashing or
hanging a call), and wait for their completion (`run_alone`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from inference_worker.metrics import Metrics, WorkerStats
from inference_worker.pipeline.compute import BatchComputer, Computed, Inferred
from inference_worker.pipeline.jobs import Job
from inference_worker.pipeline.outbox import Outbox
from inference_worker.pipeline.poison import Failed, isolate
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
        loop_codec_max_bytes: int,
        clock: Callable[[], float],
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        max_completing: int = 64,
    ) -> None:
        self.computer = computer
        self._outbox = outbox
        self._stats = stats
        self._metrics = metrics
        self._timeout = compute_timeout_s
        self._loop_max = loop_codec_max_bytes
        self._clock = clock
        self._spawn = spawn
        self._completing = asyncio.Semaphore(max_completing)
        self.recovery: Recovery | None = None  # set by the assembly (they call each other)

    async def run(self, lane: Lane, jobs: list[Job]) -> None:
        """The batcher's handler: compute, then complete in the background; a failed
        call is isolated down to the requests that fail it."""
        outcome = await self._call(lane, jobs)
        if isinstance(outcome, Computed):
            await self._answer(jobs, outcome)
            return
        assert self.recovery is not None
        if len(jobs) == 1 or not outcome.splittable:
            await self.recovery.retry_later(jobs, outcome.reason)
            return
        found = await isolate(jobs, outcome, lambda group: self._attempt(lane, group))
        lane.observe.isolation_calls.inc(found.calls)
        lane.observe.isolated.inc(len(found.culprits))
        log.warning(
            "batch failed; isolated the requests that fail it",
            extra={
                "model": lane.name,
                "batch": len(jobs),
                "culprits": [job.request.id for job, _ in found.culprits][:16],
                "unresolved": len(found.unresolved),
                "extra_calls": found.calls,
            },
        )
        by_reason: dict[str, list[Job]] = {}
        for job, reason in found.culprits:
            by_reason.setdefault(reason, []).append(job)
        if found.unresolved:
            by_reason.setdefault(found.reason or outcome.reason, []).extend(found.unresolved)
        for reason, failed in by_reason.items():
            await self.recovery.retry_later(failed, reason)

    async def run_alone(self, job: Job) -> None:
        """A take-over or a due retry: compute (always in the pool, bounded by
        `compute_timeout_s`: these are the requests suspected of crashing or hanging a
        call) and complete before returning."""
        outcome = await self._call_in_pool(job.lane, [job])
        if isinstance(outcome, Computed):
            await self._outbox.complete([job], outcome.payloads, "ok")
            return
        assert self.recovery is not None
        await self.recovery.retry_later([job], outcome.reason)

    async def _attempt(self, lane: Lane, jobs: list[Job]) -> Failed | None:
        """One isolation step: answer `jobs`, or say how their call failed."""
        outcome = await self._call(lane, jobs)
        if isinstance(outcome, Computed):
            await self._answer(jobs, outcome)
            return None
        return outcome

    async def _answer(self, jobs: list[Job], computed: Computed) -> None:
        await self._completing.acquire()  # bounded: a slow Redis slows the batcher down
        self._spawn(self._complete_then_release(jobs, computed))

    async def expired(self, jobs: list[Job]) -> None:
        """Past-deadline requests: answered (and cached) without compute."""
        await self.answer_deadline(jobs, "deadline passed before compute")

    async def answer_deadline(self, jobs: list[Job], message: str) -> None:
        code = ErrorCode.DEADLINE_EXCEEDED
        payloads = [self._outbox.error_payload(j.to, code, message) for j in jobs]
        self._stats.errors[code.value] += len(jobs)
        await self._outbox.complete(jobs, payloads, code.value)

    async def _call(self, lane: Lane, jobs: list[Job]) -> Computed | Failed:
        """A batch's model call, on the loop or in the lane's pool (`lane.placement`)."""
        if lane.placement.on_loop():
            return await self._attempt_call(lane, jobs, self._compute_here)
        return await self._attempt_call(lane, jobs, self._compute_timed)

    async def _call_in_pool(self, lane: Lane, jobs: list[Job]) -> Computed | Failed:
        return await self._attempt_call(lane, jobs, self._compute_timed)

    async def _attempt_call(
        self,
        lane: Lane,
        jobs: list[Job],
        compute: Callable[[Lane, list[Job], float], Awaitable[Computed]],
    ) -> Computed | Failed:
        """Run `compute`; a failure is returned, not handled."""
        dispatched = self._clock()
        try:
            computed = await compute(lane, jobs, dispatched)
        except TimeoutError:
            lane.placement.observe(self._timeout)
            self._metrics.compute_timeouts.labels(lane.name).inc()
            log.error(
                "model call timed out",
                extra={"model": lane.name, "batch": len(jobs), "timeout_s": self._timeout},
            )
            return Failed(f"model call exceeded {self._timeout}s", splittable=False)
        except Exception as exc:
            lane.placement.observe(self._clock() - dispatched)  # a slow failure is slow
            log.warning(
                "inference failed",
                extra={"model": lane.name, "batch": len(jobs), "error": f"{exc!r}"[:500]},
            )
            return Failed(f"inference failed: {type(exc).__name__}: {exc}")
        lane.placement.observe(computed.compute_s)  # once per call, as the failures are
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

    async def _compute_here(self, lane: Lane, jobs: list[Job], dispatched: float) -> Computed:
        """A call known to be tiny, on the loop: no thread hand-off for it."""
        inferred = self.computer.infer(lane.served, jobs)
        return await self._encoded(lane, jobs, inferred, dispatched)

    async def _compute_timed(self, lane: Lane, jobs: list[Job], dispatched: float) -> Computed:
        return await asyncio.wait_for(self._compute_in_pool(lane, jobs, dispatched), self._timeout)

    async def _compute_in_pool(self, lane: Lane, jobs: list[Job], dispatched: float) -> Computed:
        loop = asyncio.get_running_loop()
        inferred = await loop.run_in_executor(lane.executor, self.computer.infer, lane.served, jobs)
        return await self._encoded(lane, jobs, inferred, dispatched)

    async def _encoded(
        self, lane: Lane, jobs: list[Job], inferred: Inferred, dispatched: float
    ) -> Computed:
        """Small outputs encoded here (no suspension), large ones in the pool."""
        computer, served = self.computer, lane.served
        if inferred.nbytes <= self._loop_max:
            return computer.encode(served, jobs, inferred, dispatched)
        return await asyncio.get_running_loop().run_in_executor(
            lane.executor, computer.encode, served, jobs, inferred, dispatched
        )

    async def _complete_then_release(self, jobs: list[Job], computed: Computed) -> None:
        try:
            await self._outbox.complete(jobs, computed.payloads, "ok")
        finally:
            self._completing.release()
