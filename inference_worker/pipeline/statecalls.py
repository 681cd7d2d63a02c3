"""State-store calls that wait out an outage.

`StateUnavailable` (connection refused, reset, timeout) is retried with exponential
backoff for as long as it lasts: nothing is acked before a claim succeeds, so waiting is
safe, and the broker holds further messages back because they stay unacked.

`StateFailed` (the server answered with an error: OOM under `noeviction`, MISCONF,
READONLY) does not go away by itself, but it does go away once an operator fixes Redis.
Steps before anything is acked (claim, quota, key lookup) wait it out too (`persist`),
logged and counted on every try; steps after the ack handle it themselves (`retry`
raises it), typically by letting the lease expire so the request is re-run later.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from inference_worker.metrics import Metrics
from inference_worker.settings import StateSettings
from inference_worker.state.base import StateFailed, StateUnavailable

log = logging.getLogger("inference_worker.pipeline")
T = TypeVar("T")


class StateCalls:
    def __init__(
        self,
        settings: StateSettings,
        metrics: Metrics,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._metrics = metrics
        self._first = settings.reconnect_backoff_s
        self._max = settings.reconnect_backoff_max_s
        self._sleep = sleep

    async def persist(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        """Like `retry`, and through `StateFailed` as well (before anything is acked)."""
        delay = self._first
        while True:
            try:
                return await self.retry(call, what)
            except StateFailed as exc:
                self._metrics.state_errors.labels(what).inc()
                log.error(
                    "state store refused the call, retrying",
                    extra={"call": what, "error": str(exc), "in_s": delay},
                )
                await self._sleep(delay)
                delay = min(delay * 2, self._max)

    async def retry(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        """`call()` until it does not raise StateUnavailable; `what` names it in logs.

        The same call is repeated: callers make their calls replay-safe (a claim
        repeats its nonce, completions and renewals are token-checked).
        """
        delay = self._first
        while True:
            try:
                return await call()
            except StateUnavailable as exc:
                log.warning(
                    "state store unavailable, retrying",
                    extra={"call": what, "error": str(exc), "in_s": delay},
                )
                await self._sleep(delay)
                delay = min(delay * 2, self._max)
