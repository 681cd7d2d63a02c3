"""`none://`: no idempotency at all. Every claim is new and nothing is remembered.

For measuring what the ledger costs (benchmarks' `nodedup_rps`) and for deployments that
truly do not care about duplicates. Resends are computed again, a worker that dies
loses what it held, and there are no retries: do not use it where that matters.
"""

from __future__ import annotations

from collections.abc import Sequence

from inference_worker.state.base import (
    Abandon,
    ClaimOutcome,
    ClaimRequest,
    ClaimResult,
    Completion,
    Reclaimed,
    Renewal,
    RetryLater,
)
from inference_worker.state.keys import check_nonce, claim_token


class NullStateStore:
    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def ping(self) -> bool:
        return True

    async def claim(
        self, items: Sequence[ClaimRequest], *, nonce: str, lease_ms: int, max_attempts: int
    ) -> list[ClaimResult]:
        # attempts = max_attempts: with nothing to bring a request back, a failure is
        # final, so the worker answers `exhausted` at once instead of scheduling a retry.
        # Tokens follow the contract (`{nonce}:{i}`) although nothing checks them.
        check_nonce(nonce)
        return [
            ClaimResult(ClaimOutcome.NEW, token=claim_token(nonce, i), attempts=max_attempts)
            for i in range(len(items))
        ]

    async def complete(self, items: Sequence[Completion], *, result_ttl_s: int) -> list[bool]:
        return [True] * len(items)

    async def abandon(self, items: Sequence[Abandon]) -> list[bool]:
        return [False] * len(items)

    async def renew(
        self, items: Sequence[Renewal], *, lease_ms: int, max_lease_ms: int
    ) -> list[bool]:
        # No lease exists to lose or to bound: the holder keeps working until it answers.
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
