"""Second attempts (design step 8): retry with backoff, give up, take over.

Every worker runs the sweep; the state store makes take-overs exclusive, so any number
of workers can reap at once. The whole "what happens on a second attempt" story is here:
a retryable failure parks the request in the store's retry set with exponential backoff
and jitter; past `max_attempts` it is answered `exhausted` and dead-lettered; a lease
that expired (its worker died or stalled) or a retry that is due is re-run from the
journal — unless its deadline has passed, which is answered `deadline_exceeded` without
compute.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import Awaitable, Callable, Sequence

from inference_worker.cancelling import raise_if_cancelled
from inference_worker.metrics import Metrics, WorkerStats
from inference_worker.pipeline.admission import Admission
from inference_worker.pipeline.batches import Batches
from inference_worker.pipeline.jobs import Job, Refusal
from inference_worker.pipeline.leases import LeaseBook
from inference_worker.pipeline.outbox import DeadLetter, Outbox
from inference_worker.pipeline.statecalls import StateCalls
from inference_worker.protocol import ErrorCode
from inference_worker.settings import StateSettings
from inference_worker.state.base import (
    Completion,
    Reclaimed,
    RetryLater,
    StateStore,
    StateUnavailable,
)
from inference_worker.transports.base import Delivery

log = logging.getLogger("inference_worker.pipeline")


def retry_delay_ms(attempts: int, settings: StateSettings, rng: random.Random) -> int:
    """Delay before attempt `attempts + 1`: base * 2^(attempts-1), capped, jittered ±50%.

    Jitter spreads the retries of one failed batch so they do not fail together again.
    """
    base = min(settings.retry_base_ms * 2 ** max(0, attempts - 1), settings.retry_max_ms)
    return max(1, int(base * rng.uniform(0.5, 1.5)))


class Recovery:
    def __init__(
        self,
        state: StateStore,
        settings: StateSettings,
        calls: StateCalls,
        leases: LeaseBook,
        outbox: Outbox,
        batches: Batches,
        admission: Admission,
        stats: WorkerStats,
        metrics: Metrics,
        *,
        clock: Callable[[], float],
        rng: random.Random,
    ) -> None:
        self._state = state
        self._settings = settings
        self._calls = calls
        self._leases = leases
        self._outbox = outbox
        self._batches = batches
        self._admission = admission
        self._stats = stats
        self._metrics = metrics
        self._clock = clock
        self._rng = rng

    async def retry_later(self, jobs: Sequence[Job], reason: str) -> None:
        """A retryable failure: back off in the store's retry set, or give up."""
        s = self._settings
        final = [j for j in jobs if j.attempts >= s.max_attempts]
        again = [j for j in jobs if j.attempts < s.max_attempts]
        if again:
            items = [
                RetryLater(
                    j.request.app, j.request.id, j.token, retry_delay_ms(j.attempts, s, self._rng)
                )
                for j in again
            ]
            try:
                await self._calls.retry(lambda: self._state.schedule_retry(items), "retry")
            except Exception as exc:
                self._metrics.state_errors.labels("schedule_retry").inc()
                log.error(
                    "retry not scheduled (leases left to expire: re-run on take-over)",
                    extra={"count": len(again), "error": f"{type(exc).__name__}: {exc}"},
                )
            self._leases.let_go(again)
            self._outbox.drop(again)
            self._stats.retries += len(again)
            self._metrics.retries.inc(len(again))
        if final:
            await self.give_up(final, reason)

    async def orphaned(self, jobs: list[Job]) -> None:
        """Jobs whose model version was retired before they ran: another attempt."""
        await self.retry_later(jobs, "model version retired before the request ran")

    async def give_up(self, jobs: Sequence[Job], reason: str) -> None:
        """After max_attempts: store and publish `exhausted`, dead-letter the request."""
        code = ErrorCode.EXHAUSTED
        self._stats.exhausted += len(jobs)
        self._stats.errors[code.value] += len(jobs)
        message = f"gave up after {max(j.attempts for j in jobs)} attempts: {reason}"
        payloads = [self._outbox.error_payload(j.to, code, message) for j in jobs]
        letters = [
            DeadLetter(
                j.source,
                code,
                message,
                j.request.app,
                j.request.id,
                j.request.model,
                attempts=j.attempts,
            )
            for j in jobs
        ]
        await asyncio.gather(
            self._outbox.complete(jobs, payloads, code.value), self._outbox.dead_letter(letters)
        )

    # ---- take-overs -------------------------------------------------------------------

    async def take_over_expired(self, items: list[Reclaimed]) -> None:
        """Expired leases, one after another, each alone and to completion: a request
        that crashed its worker must not take good requests batched with it down again."""
        for item in items:
            job = await self._readmit(item)
            if job is not None:
                await self._run(job, item)

    async def run_due(self, items: list[Reclaimed]) -> None:
        """Due retries failed by raising, not by crashing: they run concurrently."""
        jobs = [await self._readmit(item) for item in items]
        await asyncio.gather(
            *(self._run(job, item) for job, item in zip(jobs, items, strict=True) if job)
        )

    async def _run(self, job: Job, item: Reclaimed) -> None:
        self._stats.taken_over += 1
        self._metrics.taken_over.inc()
        if item.exhausted:
            await self.give_up([job], "attempts exhausted (worker died or stalled)")
        elif job.deadline is not None and job.deadline < self._clock():
            await self._batches.answer_deadline([job], "deadline passed before another attempt")
        else:
            await self._batches.run_alone(job)

    async def _readmit(self, item: Reclaimed) -> Job | None:
        src = item.source
        delivery = Delivery(
            src.payload,
            src.topic,
            self._clock(),
            reply_to=src.reply_to,
            correlation=src.correlation,
        )
        outcome = await self._admission.readmit(delivery, app=item.app)
        if isinstance(outcome, Refusal):
            # Admitted once, refused now (e.g. the model is no longer served here): close
            # the record with the refusal so it is not taken over for ever.
            log.error(
                "cannot re-run request", extra={"request_id": item.id, "error": outcome.message}
            )
            await self._close_unrunnable(item, outcome)
            return None
        job = dataclasses.replace(outcome, token=item.token, attempts=item.attempts)
        self._leases.hold(job.key, job.token)
        return job

    async def _close_unrunnable(self, item: Reclaimed, refusal: Refusal) -> None:
        message = f"cannot re-run: {refusal.message}"
        payload = self._outbox.error_payload(refusal.to, refusal.code, message)
        done = Completion(item.app, item.id, item.token, payload)
        ttl = self._settings.result_ttl_s
        try:
            await self._calls.retry(
                lambda: self._state.complete([done], result_ttl_s=ttl), "complete"
            )
        except Exception:
            self._metrics.state_errors.labels("complete").inc()
        await self._outbox.dead_letter(
            [DeadLetter(item.source, refusal.code, message, item.app, item.id, refusal.to.model)]
        )
        self._outbox.free(refusal.size)


class RecoveryLoop:
    """Periodically reaps expired leases and collects due retries."""

    def __init__(
        self,
        state: StateStore,
        settings: StateSettings,
        recovery: Recovery,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._state = state
        self._settings = settings
        self._recovery = recovery
        self._sleep = sleep

    async def run(self) -> None:
        """Until cancelled. While there is work, sweep again at once; else wait."""
        while True:
            try:
                busy = await self.sweep()
            except StateUnavailable as exc:
                log.warning(
                    "recovery sweep skipped: state store unavailable", extra={"error": str(exc)}
                )
                busy = False
            except Exception as exc:  # e.g. MISCONF: log, count, try again next round
                log.error("recovery sweep failed", extra={"error": f"{type(exc).__name__}: {exc}"})
                busy = False
            raise_if_cancelled()  # each pass: a Redis call may have swallowed the cancel
            if not busy:
                await self._sleep(self._settings.reap_interval_s)

    async def sweep(self) -> bool:
        """One round: at most one expired lease, then a page of due retries.

        Expired leases are taken over ONE AT A TIME and each is run to completion before
        the next is taken: were several taken at once, a poison request killing this
        worker too would charge every request taken with it an attempt, and good
        requests would end `exhausted` (seen in the fault suite). Returns whether there
        may be more work.
        """
        s = self._settings
        expired = await self._state.reap_expired(
            lease_ms=s.lease_ms, max_attempts=s.max_attempts, limit=1
        )
        if expired:
            log.warning("taking over an expired lease", extra={"request_id": expired[0].id})
            await self._recovery.take_over_expired(expired)
        due = await self._state.due_retries(
            lease_ms=s.lease_ms, max_attempts=s.max_attempts, limit=s.reap_batch
        )
        if due:
            await self._recovery.run_due(due)
        return bool(expired) or len(due) == s.reap_batch
