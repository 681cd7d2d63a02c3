"""`none://`: no idempotency at all. Every claim is new and nothing is remembered.

For measuring what the ledger costs (benchmarks' `nodedup_rps`) and for deployments that
truly do not care about duplicates. Resends are computed again, a worker that dies
loses what it held, and there are no retries: do not use it where that matters.
"""

from __future__ import annotations

from collections.abc import Sequence

from inference_worker.state.base import (
    ClaimOutcome,
    ClaimRequest,
    ClaimResult,
    Completion,
    Reclaimed,
    Release,
    Renewal,
    RetryLater,
)


class NullStateStore:
    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def ping(self) -> bool:
        return True

    async def claim(
        self, items: Sequence[ClaimRequest], *, lease_ms: int, max_attempts: int
    ) -> list[ClaimResult]:
        # attempts = max_attempts: with nothing to bring a request back, a failure is
        # final, so the worker answers `exhausted` at once instead of scheduling a retry.
        return [ClaimResult(ClaimOutcome.NEW, token="-", attempts=max_attempts) for _ in items]

    async def complete(self, items: Sequence[Completion], *, result_ttl_s: int) -> list[bool]:
        return [True] * len(items)

    async def release(self, items: Sequence[Release]) -> list[bool]:
        return [True] * len(items)

    async def renew(self, items: Sequence[Renewal], *, lease_ms: int) -> list[bool]:
        return [True] * len(items)

    async def schedule_retry(self, items: Sequence[RetryLater]) -> list[bool]:
        return [False] * len(items)  # unreachable: claims are always final attempts

    async def reap_expired(
        self, *, lease_ms: int, max_attempts: int, limit: int = 100
    ) -> list[Reclaimed]:
        return []

    async def due_retries(
        self, *, lease_ms: int, max_attempts: int, limit: int = 100
    ) -> list[Reclaimed]:
        return []
