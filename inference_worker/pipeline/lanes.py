"""Lanes: one per served model version — its batcher, its pool, its metrics.

A lane never blocks the stage that feeds it: a claimed job goes straight into the
batcher while it has room, and waits in the lane's own backlog otherwise (claimed,
counted against the worker's byte budget). So one saturated model does not stall intake
for the others (no head-of-line blocking); only the byte budget, shared by all, makes
intake wait.

Hot reload swaps lanes (serving.ModelHost). A retired lane drains within
`drain_timeout_s`; whatever it could not dispatch by then, and a job that reaches a lane
already retired, goes to `orphaned` (the pipeline parks it for another attempt), so no
lease is held by a lane that will never run it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

from inference_worker.batchcost import BatchCost
from inference_worker.batching import DrainTimeout, DynamicBatcher
from inference_worker.batchpolicy import policy_for
from inference_worker.gcpause import collect_retired
from inference_worker.inputs import InputCheck
from inference_worker.metrics import Metrics
from inference_worker.models import ModelRepository
from inference_worker.pipeline.jobs import Job
from inference_worker.pipeline.observe import LaneMetrics
from inference_worker.pipeline.placement import CallPlacement
from inference_worker.protocol.envelope import PRIORITY_DEFAULT
from inference_worker.serving import ModelHost, ServedModel
from inference_worker.settings import ModelsSettings

log = logging.getLogger("inference_worker.pipeline")

BatchHandler = Callable[["Lane", list[Job]], Awaitable[None]]
JobsHandler = Callable[[list[Job]], Awaitable[None]]


class Lane:
    def __init__(
        self,
        served: ServedModel,
        observe: LaneMetrics,
        handle_batch: BatchHandler,
        handle_expired: JobsHandler,
        *,
        clock: Callable[[], float],
        weight_of: Callable[[str], int],
        placement: CallPlacement,
    ) -> None:
        cfg = served.config
        self.served = served
        self.check_inputs = InputCheck(cfg)  # admission's per-request check, compiled once
        self.observe = observe
        self.placement = placement  # where this version's model calls run
        self.executor = ThreadPoolExecutor(cfg.instances, thread_name_prefix=f"iw-{cfg.name}")
        self._handle_batch = handle_batch
        self._handle_expired = handle_expired
        cost = BatchCost()  # learned from this version's own batches
        target_ms = cfg.latency_target_ms
        target_s = None if target_ms is None else target_ms / 1000.0
        self.batcher: DynamicBatcher[Job, None] = DynamicBatcher(
            self._run,
            max_batch_size=cfg.max_batch_size,
            max_delay_s=cfg.max_delay_ms / 1000.0,
            max_queue=cfg.max_queue,
            max_concurrent=cfg.instances,
            deadline_of=lambda job: job.deadline,
            on_expired=self._expired,
            clock=clock,
            name=f"{cfg.name}:{served.version}",
            key_of=lambda job: job.request.app,  # fairness between apps inside a batch
            weight_of=weight_of,
            size_of=lambda job: job.rows,
            priority_of=_priority,  # orders a request within its app
            arrived_of=lambda job: job.received_at,  # a latency target counts from receipt
            cost=cost,
            policy=policy_for(cfg.max_delay_ms / 1000.0, target_s, cfg.max_batch_size, cost),
        )
        observe.follow(self.batcher, cfg.max_batch_size)
        self._backlog: deque[Job] = deque()
        self._more = asyncio.Event()
        self._feeder: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return self.served.config.name

    @property
    def waiting(self) -> int:
        """Jobs queued here and not yet in a running batch."""
        return len(self._backlog) + self.batcher.queued

    @property
    def busy(self) -> int:
        return self.waiting + self.batcher.in_flight

    def submit(self, job: Job) -> bool:
        """Queue `job` without waiting; False when this lane is retired."""
        if self.batcher.closed:
            return False
        if not self._backlog and self.batcher.try_put(job):
            return True
        self._backlog.append(job)
        self._more.set()
        if self._feeder is None:
            self._feeder = asyncio.create_task(self._feed(), name=f"iw-lane-{self.name}")
        return True

    async def _feed(self) -> None:
        while True:
            while not self._backlog:
                self._more.clear()
                await self._more.wait()
            await self.batcher.room()
            while self._backlog and not self.batcher.closed:
                if not self.batcher.try_put(self._backlog[0]):
                    break
                self._backlog.popleft()
            if self.batcher.closed:
                return

    async def _run(self, jobs: list[Job]) -> list[None]:
        await self._reported("batch step", self._handle_batch(self, jobs))
        return [None] * len(jobs)

    async def _expired(self, jobs: list[Job]) -> list[None]:
        await self._reported("expired jobs step", self._handle_expired(jobs))
        return [None] * len(jobs)

    async def _reported(self, step: str, work: Awaitable[None]) -> None:
        """Jobs go in by `try_put`, so nobody awaits a job's result: a failed step is
        logged here, once per batch, and then raised for the batcher to see as well."""
        try:
            await work
        except Exception:
            log.error("%s failed", step, exc_info=True, extra={"model": self.name})
            raise

    async def drain(self, within_s: float) -> list[Job]:
        """Stop taking jobs, run what is queued within `within_s`; returns what was left."""
        if self._feeder is not None:
            self._feeder.cancel()
        left = list(self._backlog)
        self._backlog.clear()
        try:
            await self.batcher.drain(within_s)
        except DrainTimeout as exc:
            left.extend(job for job in exc.left if isinstance(job, Job))
            log.warning("lane did not drain in time", extra={"model": self.name, "left": len(left)})
        return left

    def close(self) -> None:
        """Release the pool threads (a hung model call keeps its thread; not waited for)."""
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.served.runner.close()


class LaneSet:
    """The lanes of every served version, with hot reload and retirement."""

    def __init__(
        self,
        models: Sequence[ServedModel],
        metrics: Metrics,
        handle_batch: BatchHandler,
        handle_expired: JobsHandler,
        orphaned: JobsHandler,
        *,
        drain_timeout_s: float,
        clock: Callable[[], float],
        weights: Mapping[str, int],
        loop_compute_max_s: float,
    ) -> None:
        self._metrics = metrics
        self._loop_compute_max_s = loop_compute_max_s
        self._handle_batch = handle_batch
        self._handle_expired = handle_expired
        self._orphaned = orphaned
        self._drain_timeout_s = drain_timeout_s
        self._clock = clock
        self._weights = dict(weights)
        self._observers: dict[str, LaneMetrics] = {}
        self.host: ModelHost[Lane] = ModelHost(models, self._make, self._retire)

    def _make(self, served: ServedModel) -> Lane:
        name = served.config.name
        observe = self._observers.get(name)
        if observe is None:
            observe = self._observers[name] = LaneMetrics(self._metrics, name)
            self._metrics.inflight.labels(name).set_function(
                lambda: sum(lane.busy for lane in self.lanes() if lane.name == name)
            )
        return Lane(
            served,
            observe,
            self._handle_batch,
            self._handle_expired,
            clock=self._clock,
            weight_of=lambda app: self._weights.get(app, 1),
            placement=CallPlacement(self._loop_compute_max_s),
        )

    async def _retire(self, lane: Lane) -> None:
        left = await lane.drain(self._drain_timeout_s)
        if left:
            await self._orphaned(left)
        lane.close()
        # Later, when this coroutine's frame no longer holds the lane (see gcpause).
        asyncio.get_running_loop().call_later(1.0, collect_retired)

    def lanes(self) -> list[Lane]:
        return self.host.lanes()

    def served_names(self) -> frozenset[str]:
        return frozenset(self.host.names)

    @property
    def waiting(self) -> int:
        return sum(lane.waiting for lane in self.lanes())

    def resolve(self, model: str, version: int | None) -> Lane:
        """Raises ProtocolError(UNKNOWN_MODEL) for what is not served here."""
        return self.host.resolve(model, version)

    async def submit(self, jobs: Sequence[Job]) -> None:
        """Each job to its lane; a job whose lane retired meanwhile goes to the version
        that serves now, or (a pinned version that is gone) to `orphaned`."""
        orphans: list[Job] = []
        for job in jobs:
            if job.lane.submit(job):
                continue
            try:
                lane = self.resolve(job.request.model, job.request.version)
            except Exception:
                orphans.append(job)
                continue
            if not lane.submit(_moved(job, lane)):
                orphans.append(job)
        if orphans:
            await self._orphaned(orphans)

    async def reload(self, repo: ModelRepository, settings: ModelsSettings) -> None:
        await self.host.reload(repo, settings, self._refused)

    def _refused(self, model: str, version: int) -> None:
        self._metrics.model_load_failures.labels(model).inc()

    async def drain(self, within_s: float) -> list[Job]:
        """Shutdown: every lane at once, within `within_s`; returns the jobs left."""
        results = await asyncio.gather(*(lane.drain(within_s) for lane in self.lanes()))
        await self.host.wait_retired()
        return [job for left in results for job in left]

    def close(self) -> None:
        for lane in self.lanes():
            lane.close()


def _priority(job: Job) -> int:
    p = job.request.priority
    return PRIORITY_DEFAULT if p is None else p


def _moved(job: Job, lane: Lane) -> Job:
    return dataclasses.replace(job, lane=lane)
