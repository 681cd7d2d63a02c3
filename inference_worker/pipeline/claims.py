"""Claims: one ledger call per admitted group, and each outcome turned into its action.

The group's claim is one Redis round trip under one nonce (item i's lease token is
`nonce:i`); retried through an outage with the same nonce, so a claim whose reply was
lost comes back as ours (a replay), never `in_progress` against itself. Once the claim
is durable the deliveries are acked (design step 4): Redis owns the requests from here.

Quota runs after the claim, on new requests only: a resend of an answered request gets
its cached bytes whatever the app's quota says. A new request over quota gives its lease
back (the record is dropped, so the client's resend is computed afresh) and is answered
`overloaded` with when to send again.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from inference_worker.metrics import Metrics, WorkerStats
from inference_worker.pipeline.jobs import Job, Refusal
from inference_worker.pipeline.lanes import LaneSet
from inference_worker.pipeline.leases import LeaseBook
from inference_worker.pipeline.outbox import Outbox
from inference_worker.pipeline.statecalls import StateCalls
from inference_worker.protocol import ErrorCode
from inference_worker.quota import Quota
from inference_worker.settings import StateSettings
from inference_worker.state.base import Abandon, ClaimOutcome, ClaimRequest, StateStore

if TYPE_CHECKING:
    from inference_worker.pipeline.recovery import Recovery


class Claims:
    def __init__(
        self,
        state: StateStore,
        settings: StateSettings,
        calls: StateCalls,
        leases: LeaseBook,
        outbox: Outbox,
        lanes: LaneSet,
        recovery: Recovery,
        quota: Quota | None,
        stats: WorkerStats,
        metrics: Metrics,
        *,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
    ) -> None:
        self._state = state
        self._settings = settings
        self._calls = calls
        self._leases = leases
        self._outbox = outbox
        self._lanes = lanes
        self._recovery = recovery
        self._quota = quota
        self._stats = stats
        self._metrics = metrics
        self._spawn = spawn

    async def claim(self, jobs: list[Job]) -> None:
        s = self._settings
        nonce = uuid.uuid4().hex
        items = [
            ClaimRequest(j.request.app, j.request.id, j.request.fingerprint, j.source) for j in jobs
        ]
        results = await self._calls.persist(
            lambda: self._state.claim(
                items, nonce=nonce, lease_ms=s.lease_ms, max_attempts=s.max_attempts
            ),
            "claim",
        )
        self._outbox.settle([j.delivery for j in jobs if j.delivery is not None])
        new: list[Job] = []
        cached: list[tuple[Job, bytes]] = []
        conflicts: list[Refusal] = []
        exhausted: list[Job] = []
        dropped: list[Job] = []
        outcomes: Counter[str] = Counter()
        for job, result in zip(jobs, results, strict=True):
            outcomes[result.outcome.value] += 1
            if result.outcome is ClaimOutcome.NEW or result.outcome is ClaimOutcome.EXHAUSTED:
                assert result.token is not None
                job = job.claimed(result.token, result.attempts)
                self._leases.hold(job.key, job.token)
                (new if result.outcome is ClaimOutcome.NEW else exhausted).append(job)
            elif result.outcome is ClaimOutcome.DONE:
                assert result.response is not None
                cached.append((job, result.response))
            elif result.outcome is ClaimOutcome.CONFLICT:
                assert job.delivery is not None
                conflicts.append(
                    Refusal(
                        job.delivery,
                        ErrorCode.CONFLICT,
                        "id reused with a different payload",
                        job.to,
                        size=job.size,
                    )
                )
            else:  # IN_PROGRESS: the holder of the live lease answers it
                dropped.append(job)
        for outcome, count in outcomes.items():
            self._stats.dedup[outcome] += count
            self._metrics.dedup.labels(outcome).inc(count)
        if new and self._quota is not None:
            new = await self._within_quota(new)
        await self._lanes.submit(new)
        if cached:
            self._spawn(self._outbox.send_cached([j for j, _ in cached], [p for _, p in cached]))
        if conflicts:
            self._spawn(self._outbox.refuse(conflicts))
        if exhausted:
            self._spawn(self._recovery.give_up(exhausted, "attempts exhausted"))
        self._outbox.drop(dropped)

    async def _within_quota(self, jobs: list[Job]) -> list[Job]:
        quota = self._quota
        assert quota is not None
        apps = [j.request.app for j in jobs]
        waits = await self._calls.persist(lambda: quota.take(apps), "quota")
        kept = [j for j, wait in zip(jobs, waits, strict=True) if wait == 0]
        over = [(j, wait) for j, wait in zip(jobs, waits, strict=True) if wait != 0]
        if not over:
            return kept
        self._leases.let_go(j for j, _ in over)
        releases = [Abandon(j.request.app, j.request.id, j.token) for j, _ in over]
        try:
            await self._calls.retry(lambda: self._state.abandon(releases), "abandon")
        except Exception:
            self._metrics.state_errors.labels("abandon").inc()  # the leases just expire
        refusals = []
        for job, wait in over:
            assert job.delivery is not None
            refusals.append(
                Refusal(
                    job.delivery,
                    ErrorCode.OVERLOADED,
                    f"app {job.request.app!r} is over its quota",
                    job.to,
                    size=job.size,
                    retry_after_ms=wait,
                    dead_letter=False,
                )
            )
        self._spawn(self._outbox.refuse(refusals))
        return kept
