"""Per-app request quotas: a token bucket per app (rate, burst), checked before claim.

Redis holds the buckets so that the whole fleet enforces one limit per app, and one
script call decides a whole claim group. A request over quota is answered `overloaded`
with `retry_after_ms` and costs no compute and no ledger entry.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from redis.exceptions import ResponseError

from inference_worker.state.base import StateFailed, StateUnavailable
from inference_worker.state.connect import OUTAGE, by_slot
from inference_worker.state.scripts import script_source


class Quota(Protocol):
    async def take(self, apps: Sequence[str]) -> list[int]:
        """Per request (in order): 0 if admitted, else milliseconds until it may retry."""
        ...


class RedisQuota:
    def __init__(self, client: Any, prefix: str, *, rate: float, burst: int) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("quota rate must be > 0 and burst >= 1")
        self._client = client
        self._prefix = prefix
        self._rate = rate
        self._burst = burst
        self._script = client.register_script(script_source("quota.lua"))

    async def take(self, apps: Sequence[str]) -> list[int]:
        if not apps:
            return []
        distinct = list(dict.fromkeys(apps))
        keys = [f"{self._prefix}quota:{len(app.encode())}:{app}" for app in distinct]
        # A Redis Cluster runs a script over keys of one slot only: one call per slot of
        # the group's apps, concurrently (one call for the group on a single Redis).
        calls = []
        for members in by_slot(self._client, keys):
            place = {distinct[i]: k + 1 for k, i in enumerate(members)}  # KEYS index
            mine = [j for j, app in enumerate(apps) if app in place]
            args = [self._rate, self._burst, *(place[apps[j]] for j in mine)]
            calls.append((mine, self._script(keys=[keys[i] for i in members], args=args)))
        results = await asyncio.gather(*(call for _, call in calls), return_exceptions=True)
        out = [0] * len(apps)
        for (mine, _), result in zip(calls, results, strict=True):
            if isinstance(result, OUTAGE):
                raise StateUnavailable(f"quota check: {result}") from result
            if isinstance(result, ResponseError):
                raise StateFailed(f"quota check: {result}") from None
            if isinstance(result, BaseException):
                raise result
            for j, value in zip(mine, result, strict=True):
                out[j] = int(value)
        return out


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
