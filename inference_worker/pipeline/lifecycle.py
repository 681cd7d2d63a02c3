"""The worker: builds the stages from an `Assembly`, runs them, watches them, and shuts
them down in order.

    transport ─▶ intake ─▶ admission ─▶ claims ─▶ lanes ─▶ batches/compute ─▶ outbox ─▶ transport
                                 └─ refusals ──────────────────────────────────▶ outbox
    recovery (take-over, retry, give-up) ─▶ lanes / outbox;  leases renewed beside them

Every long-running task — intake, the claim loop, recovery, lease renewal and the
transport's own tasks (`Transport.background()`) — is watched: when one ends (crashed, or
returned when it never should) the pipeline is marked unhealthy (`/readyz` 503), the
ordered shutdown runs, and `serve` raises what ended it. A worker never serves on
silently with a dead consumer.

Shutdown, in order, within `worker.drain_timeout_s` overall: stop intake (deliveries
not yet claimed stay unacked and go back to the broker) and recovery → the claim loop
finishes the groups it holds → lanes flush and run what is queued → background answers
(stores, publishes, acks) finish → pools released. What could not run in time gives up
its leases, which expire and are re-run elsewhere. Leases are renewed until the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from inference_worker.metrics import Metrics, WorkerStats
from inference_worker.models import ModelRepository
from inference_worker.pipeline.admission import Admission
from inference_worker.pipeline.assembly import Assembly
from inference_worker.pipeline.batches import Batches
from inference_worker.pipeline.claims import Claims
from inference_worker.pipeline.compute import BatchComputer
from inference_worker.pipeline.intake import ByteBudget, Intake
from inference_worker.pipeline.jobs import Job
from inference_worker.pipeline.lanes import LaneSet
from inference_worker.pipeline.leases import LeaseBook
from inference_worker.pipeline.observe import Labels
from inference_worker.pipeline.outbox import Outbox
from inference_worker.pipeline.recovery import Recovery, RecoveryLoop
from inference_worker.pipeline.statecalls import StateCalls
from inference_worker.routing import ReplyPolicy
from inference_worker.state.base import StateStore
from inference_worker.state.deadletters import dead_letters_for
from inference_worker.transports.base import Delivery

log = logging.getLogger("inference_worker.pipeline")


class PipelineFailed(RuntimeError):
    """A stage of the request path ended while the worker was serving."""


class Worker:
    def __init__(self, parts: Assembly) -> None:
        s = parts.settings
        self.settings = s
        self.name = parts.name
        self.stats = WorkerStats()
        self.metrics: Metrics = parts.metrics
        self.state: StateStore = parts.state
        self._transport = parts.transport
        self._clock = parts.clock
        self._background: set[asyncio.Task[Any]] = set()
        self.failure: BaseException | None = None
        budget = self.budget = ByteBudget(s.worker.inflight_max_bytes)
        calls = StateCalls(s.state, self.metrics)
        self.leases = LeaseBook(parts.state, s.state, self.metrics)
        self.intake = Intake(
            parts.transport,
            budget,
            max_count=s.worker.claim_group_max,
            max_bytes=s.worker.claim_group_max_bytes,
        )
        labels = Labels(lambda: self.lanes.served_names())
        self.outbox = Outbox(
            s,
            parts.transport,
            parts.state,
            calls,
            self.leases,
            budget,
            self.stats,
            self.metrics,
            labels,
            worker=parts.name,
            wall_ms=parts.wall_ms,
            clock=parts.clock,
            letters=dead_letters_for(parts.state, s.state.prefix, max_entries=s.dlq.max_entries),
        )
        limits = s.limits.to_limits()
        self.batches = Batches(
            BatchComputer(self.outbox.new_codec, parts.name, self.outbox.codec_for),
            self.outbox,
            self.stats,
            self.metrics,
            compute_timeout_s=s.worker.compute_timeout_s,
            loop_codec_max_bytes=s.worker.loop_codec_max_bytes,
            clock=parts.clock,
            spawn=self._spawn,
        )
        self.lanes = LaneSet(
            parts.models,
            self.metrics,
            self.batches.run,
            self.batches.expired,
            self._orphaned,
            drain_timeout_s=s.worker.drain_timeout_s,
            clock=parts.clock,
            weights=parts.weights,
            loop_compute_max_s=s.worker.loop_compute_max_ms / 1000.0,
        )
        # One decode thread for the groups too large to decode on the loop (admission.py):
        # one group at a time bounds what is being expanded at once, and the loop keeps
        # serving meanwhile.
        self._decoder = ThreadPoolExecutor(1, thread_name_prefix="iw-decode")
        self.admission = Admission(
            s.broker,
            self.lanes,
            ReplyPolicy(s.broker.reply_to_allowed, parts.transport.check_topic),
            parts.auth,
            calls,
            budget,
            limits=limits,
            decoder=self._decoder,
            wall_ms=parts.wall_ms,
            loop_max_bytes=s.worker.loop_codec_max_bytes,
        )
        self.recovery = Recovery(
            parts.state,
            s.state,
            calls,
            self.leases,
            self.outbox,
            self.batches,
            self.admission,
            self.stats,
            self.metrics,
            clock=parts.clock,
            rng=random.Random(),
        )
        self.batches.recovery = self.recovery
        self.claims = Claims(
            parts.state,
            s.state,
            calls,
            self.leases,
            self.outbox,
            self.lanes,
            self.recovery,
            parts.quota,
            self.stats,
            self.metrics,
            spawn=self._spawn,
        )

    @property
    def queue_depth(self) -> int:
        """Requests received and not yet in a running batch."""
        return self.intake.depth + self.lanes.waiting

    @property
    def served_versions(self) -> dict[str, list[int]]:
        """Model name → loaded versions (changes with hot reload)."""
        host = self.lanes.host
        return {name: host.versions(name) for name in host.names}

    @property
    def healthy(self) -> bool:
        return self.failure is None

    async def reload_models(self, repo: ModelRepository) -> None:
        """Load new versions, retire removed ones (hot reload; see serving.ModelHost)."""
        await self.lanes.reload(repo, self.settings.models)

    async def _orphaned(self, jobs: list[Job]) -> None:
        await self.recovery.orphaned(jobs)

    # ---- serving ----------------------------------------------------------------------

    async def serve(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set (or a stage ends), then shut down in order."""
        tasks: dict[asyncio.Task[Any], str] = {
            asyncio.create_task(self.intake.pull(), name="iw-intake"): "intake",
            asyncio.create_task(self._claim_loop(), name="iw-claims"): "claims",
            asyncio.create_task(
                RecoveryLoop(self.state, self.settings.state, self.recovery).run(),
                name="iw-recovery",
            ): "recovery",
        }
        for task in self._transport.background():
            tasks[task] = f"transport ({task.get_name()})"
        renew = asyncio.create_task(self.leases.renew_forever(), name="iw-leases")
        tasks[renew] = "lease renewal"
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({*tasks, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if stopper not in done:
            ended = next(iter(done))
            exc = None if ended.cancelled() else ended.exception()
            self.failure = exc or PipelineFailed(f"{tasks[ended]} ended while serving")
            log.error(
                "request path failed; shutting down",
                extra={"stage": tasks[ended], "error": repr(self.failure)},
                exc_info=exc,
            )
        stopper.cancel()
        try:
            await self._shutdown(
                [t for t, n in tasks.items() if n in ("intake", "recovery")],
                next(t for t, n in tasks.items() if n == "claims"),
            )
        finally:
            renew.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await renew
        if self.failure is not None:
            raise PipelineFailed(f"worker stopped: {self.failure!r}") from self.failure

    async def _claim_loop(self) -> None:
        """Groups from intake through admission and their claim, up to
        `claim_groups_in_flight` at once (a later group may reach its lane first: acks
        are per delivery, and the ledger settles a request id claimed twice). A group
        that fails ends the loop with its error once the others are done."""
        slots = asyncio.Semaphore(max(1, self.settings.worker.claim_groups_in_flight))
        try:
            async with asyncio.TaskGroup() as groups:
                while (group := await self.intake.next_group()) is not None:
                    await slots.acquire()
                    task = groups.create_task(self._claim_group(group))
                    task.add_done_callback(lambda _: slots.release())
        except BaseExceptionGroup as failed:  # the watcher names the first error itself
            raise failed.exceptions[0] from failed

    async def _claim_group(self, group: list[Delivery]) -> None:
        self.stats.received += len(group)
        admitted = await self.admission.admit(group)
        if admitted.refused:
            self._spawn(self.outbox.refuse(admitted.refused))
        if admitted.jobs:
            await self.claims.claim(admitted.jobs)

    async def _shutdown(self, first: list[asyncio.Task[Any]], claims: asyncio.Task[None]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.worker.drain_timeout_s

        def left() -> float:
            return max(0.0, deadline - loop.time())

        for task in first:  # 1. stop intake and take-overs
            task.cancel()
        await asyncio.gather(*first, return_exceptions=True)
        dropped = self.intake.drop_waiting()
        self.intake.end()
        if dropped:
            log.info("unclaimed deliveries left to the broker", extra={"count": dropped})
        if not claims.done():  # 2. the groups being claimed reach their lanes
            with contextlib.suppress(TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(claims), left())
            claims.cancel()
        unrun = await self.lanes.drain(left())  # 3. flush and finish batches
        if unrun:
            self.leases.let_go(unrun)
            self.outbox.drop(unrun)
            log.warning("requests left to expire and be re-run", extra={"count": len(unrun)})
        if self._background:  # 4. answers being stored, published, acked
            await asyncio.wait(set(self._background), timeout=left() or 0.01)
        self.lanes.close()  # 5. threads (a hung model call is not waited for)
        self._decoder.shutdown(wait=False, cancel_futures=True)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_log_failure)


def _log_failure(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("background step failed", exc_info=fut.exception())
