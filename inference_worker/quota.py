"""Per-app request quotas: a token bucket per app (rate, burst), checked before claim.

Redis holds the buckets so that the whole fleet enforces one limit per app, and one
script call decides a whole claim group. A request over quota is answered `overloaded`
with `retry_after_ms` and costs no compute and no ledger entry.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from inference_worker.state.base import StateFailed, StateUnavailable
from inference_worker.state.scripts import script_source


class Quota(Protocol):
    async def take(self, apps: Sequence[str]) -> list[int]:
        """Per request (in order): 0 if admitted, else milliseconds until it may retry."""
        ...


class RedisQuota:
    def __init__(self, client: Any, prefix: str, *, rate: float, burst: int) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("quota rate must be > 0 and burst >= 1")
        self._prefix = prefix
        self._rate = rate
        self._burst = burst
        self._script = client.register_script(script_source("quota.lua"))

    async def take(self, apps: Sequence[str]) -> list[int]:
        if not apps:
            return []
        index: dict[str, int] = {}
        for app in apps:
            index.setdefault(app, len(index) + 1)
        keys = [f"{self._prefix}quota:{len(app.encode())}:{app}" for app in index]
        args = [self._rate, self._burst, *(index[app] for app in apps)]
        try:
            result = await self._script(keys=keys, args=args)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StateUnavailable(f"quota check: {exc}") from exc
        except ResponseError as exc:
            raise StateFailed(f"quota check: {exc}") from None
        return [int(v) for v in result]


class MemoryQuota:
    """The same buckets in-process (tests, single-process deployments)."""

    def __init__(
        self, *, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("quota rate must be > 0 and burst >= 1")
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # app -> (tokens, at)

    async def take(self, apps: Sequence[str]) -> list[int]:
        now = self._clock()
        out: list[int] = []
        for app in apps:
            tokens, at = self._buckets.get(app, (self._burst, now))
            tokens = min(self._burst, tokens + (now - at) * self._rate)
            if tokens >= 1:
                tokens -= 1
                out.append(0)
            else:
                out.append(max(1, math.ceil((1 - tokens) * 1000 / self._rate)))
            self._buckets[app] = (tokens, now)
        return out


def parse_weights(entries: Sequence[str]) -> dict[str, int]:
    """`["gold=3", "bronze=1"]` → {"gold": 3, "bronze": 1} (batch shares when apps compete)."""
    weights: dict[str, int] = {}
    for entry in entries:
        app, sep, value = entry.rpartition("=")
        if not sep or not value.isdigit() or int(value) < 1:
            raise ValueError(f"quota weight {entry!r}: expected app=N with N >= 1")
        weights[app] = int(value)
    return weights
