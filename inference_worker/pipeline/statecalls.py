"""State-store calls that wait out an outage.

`StateUnavailable` (connection refused, reset, timeout) is retried with exponential
backoff for as long as it lasts: nothing is acked before a claim succeeds, so waiting is
safe, and the broker holds further messages back because they stay unacked. Any other
error is the caller's to handle (it is not going to go away by itself).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from inference_worker.settings import StateSettings
from inference_worker.state.base import StateUnavailable

log = logging.getLogger("inference_worker.pipeline")
T = TypeVar("T")


class StateCalls:
    def __init__(
        self,
        settings: StateSettings,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._first = settings.reconnect_backoff_s
        self._max = settings.reconnect_backoff_max_s
        self._sleep = sleep

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
