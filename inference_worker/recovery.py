"""Design step 8: take over requests whose worker died, and re-run failed ones later.

Every worker runs this loop; the state store makes take-overs exclusive, so any number
of workers can reap at once. The retry policy (exponential backoff with jitter) lives
here too, so the whole "what happens on a second attempt" story is in one place.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

from inference_worker.settings import StateSettings
from inference_worker.state.base import Reclaimed, StateStore, StateUnavailable

log = logging.getLogger("inference_worker.recovery")


def retry_delay_ms(attempts: int, settings: StateSettings, rng: random.Random) -> int:
    """Delay before attempt `attempts + 1`: base * 2^(attempts-1), capped, jittered ±50%.

    Jitter spreads the retries of one failed batch so they do not fail together again.
    """
    base = min(settings.retry_base_ms * 2 ** max(0, attempts - 1), settings.retry_max_ms)
    return max(1, int(base * rng.uniform(0.5, 1.5)))


class RecoveryLoop:
    """Periodically reaps expired leases and collects due retries for `handle`."""

    def __init__(
        self,
        state: StateStore,
        settings: StateSettings,
        handle: Callable[[list[Reclaimed], bool], Awaitable[None]],
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._state = state
        self._settings = settings
        self._handle = handle
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
            if not busy:
                await self._sleep(self._settings.reap_interval_s)

    async def sweep(self) -> bool:
        """One round: at most one expired lease, then a page of due retries.

        Expired leases are taken over ONE AT A TIME and each is run to completion
        (`handle(..., exclusive=True)`) before the next is taken. A lease expires because
        its worker died or stalled, possibly because of that very request; were several
        taken at once, a poison request killing this worker too would charge every
        request taken with it an attempt, and good requests would end `exhausted`
        (seen in the fault suite). Due retries failed by raising, not by crashing, so a
        page of them runs concurrently. Returns whether there may be more work.
        """
        s = self._settings
        expired = await self._state.reap_expired(
            lease_ms=s.lease_ms, max_attempts=s.max_attempts, limit=1
        )
        if expired:
            log.warning("taking over an expired lease", extra={"request_id": expired[0].id})
            await self._handle(expired, True)
        due = await self._state.due_retries(
            lease_ms=s.lease_ms, max_attempts=s.max_attempts, limit=s.reap_batch
        )
        if due:
            await self._handle(due, False)
        return bool(expired) or len(due) == s.reap_batch
