"""The lease book: which leases this worker holds, and their renewal.

A request waiting in a long queue must not be taken over by another worker and computed
twice, so every held lease is renewed every `lease_ms / 3`, one round trip per 1000. A
lease is renewed for at most `state.max_lease_ms` (the store refuses past it): a request
stuck behind a hung model call, or whose completion keeps failing, then expires and is
re-run or ends `exhausted`, instead of being held for ever.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

from inference_worker.cancelling import raise_if_cancelled
from inference_worker.metrics import Metrics
from inference_worker.settings import StateSettings
from inference_worker.state.base import Renewal, StateStore, StateUnavailable

log = logging.getLogger("inference_worker.pipeline")

Key = tuple[str, str]  # (app, id)


class Leased(Protocol):
    @property
    def key(self) -> Key: ...
    @property
    def token(self) -> str: ...


class LeaseBook:
    def __init__(
        self,
        state: StateStore,
        settings: StateSettings,
        metrics: Metrics,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._state = state
        self._settings = settings
        self._metrics = metrics
        self._sleep = sleep
        self._held: dict[Key, str] = {}

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, key: Key, token: str) -> None:
        self._held[key] = token

    def let_go(self, jobs: Iterable[Leased]) -> None:
        """Stop renewing (answered, parked for retry, or left to expire)."""
        for job in jobs:
            if self._held.get(job.key) == job.token:
                del self._held[job.key]

    async def renew_forever(self) -> None:
        """Until cancelled (last, at shutdown: leases are kept while work finishes)."""
        s = self._settings
        while True:
            await self._sleep(s.lease_ms / 3000.0)
            await self.renew_once()
            raise_if_cancelled()  # each pass: a Redis call may have swallowed the cancel

    async def renew_once(self) -> None:
        held = list(self._held.items())
        s = self._settings
        for start in range(0, len(held), 1000):
            chunk = held[start : start + 1000]
            items = [Renewal(app, id_, token) for (app, id_), token in chunk]
            try:
                kept = await self._state.renew(
                    items, lease_ms=s.lease_ms, max_lease_ms=s.max_lease_ms
                )
            except StateUnavailable as exc:
                log.warning(
                    "lease renewal skipped: state store unavailable", extra={"error": str(exc)}
                )
                return
            except Exception as exc:
                self._metrics.state_errors.labels("renew").inc()
                log.error("lease renewal failed", extra={"error": f"{type(exc).__name__}: {exc}"})
                return
            lost = 0
            for (key, token), ok in zip(chunk, kept, strict=True):
                if not ok and self._held.get(key) == token:
                    del self._held[key]
                    lost += 1
            if lost:
                self._metrics.leases_expired.inc(lost)
                log.warning(
                    "leases not renewed (lost, or at state.max_lease_ms); left to expire",
                    extra={"count": lost},
                )
