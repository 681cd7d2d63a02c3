"""In-process twin of the Redis state store (tests, single-process demos, `memory://`).

It implements the same contract as `RedisStateStore` (design sections 2 and 6) with
plain dicts so the whole worker can run without Redis, and so the contract suite can
check the two against each other. Lease deadlines are wall-clock milliseconds, like
Redis `TIME`, from an injectable clock; expired responses (and their done records) are
treated as absent lazily, when next touched, as Redis does. Nothing survives the process.
Each method runs without awaiting, so on one event loop every call is atomic, like a
Lua script.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from inference_worker.journal import JournalEntry
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
from inference_worker.state.keys import (
    check_claim_args,
    check_delay,
    check_nonce,
    check_renew_args,
    check_takeover_args,
    check_ttl,
    claim_token,
    member,
    new_token,
)

__all__ = ["MemoryStateStore"]

_Key = tuple[str, str]


@dataclass
class _Record:
    """Mirror of the `req` hash plus the `resp` string of one (app, id)."""

    state: str  # "pending" | "done"
    fp: str
    token: str
    attempts: int
    lease_until: int = 0  # ms; meaningful while pending
    lease_ms: int = 0  # length of the current lease (schedule_retry extends by it)
    taken_at: int = 0  # ms; when the current token took the lease (bounds renewals)
    exhausted: bool = False  # the current lease was handed out to close it as exhausted
    source: JournalEntry | None = None  # the journal; dropped on completion
    response: bytes | None = None  # set when done
    expires_at: int | None = None  # ms; set when done (response TTL)


def _oldest(zset: dict[_Key, int], now: int, limit: int) -> list[_Key]:
    """`ZRANGEBYSCORE zset -inf now LIMIT 0 limit`: by score, then member bytes."""
    due = [k for k, score in zset.items() if score <= now]
    due.sort(key=lambda k: (zset[k], member(*k).encode()))
    return due[:limit]


class MemoryStateStore:
    """Dict-backed `StateStore`; `clock` returns seconds since the epoch (`time.time`)."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._records: dict[_Key, _Record] = {}
        self._leases: dict[_Key, int] = {}  # mirror of the `leases` zset
        self._retry: dict[_Key, int] = {}  # mirror of the `retry` zset

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _live(self, key: _Key, now: int) -> _Record | None:
        """The record for `key`, or None when absent or its response has expired."""
        rec = self._records.get(key)
        if rec is not None and rec.expires_at is not None and now >= rec.expires_at:
            del self._records[key]
            return None
        return rec

    def _unlist(self, key: _Key) -> None:
        self._leases.pop(key, None)
        self._retry.pop(key, None)

    def _lease(self, key: _Key, rec: _Record, token: str, now: int, lease_ms: int) -> None:
        """Hand `rec` a fresh lease under `token` (in the leases set only)."""
        rec.token, rec.lease_until, rec.lease_ms = token, now + lease_ms, lease_ms
        rec.taken_at = now
        self._retry.pop(key, None)
        self._leases[key] = rec.lease_until

    async def start(self) -> None:
        """Nothing to connect to."""

    async def close(self) -> None:
        """Nothing to release; state stays readable until the object is dropped."""

    async def ping(self) -> bool:
        return True

    async def claim(
        self, items: Sequence[ClaimRequest], *, nonce: str, lease_ms: int, max_attempts: int
    ) -> list[ClaimResult]:
        check_claim_args(lease_ms, max_attempts)
        check_nonce(nonce)
        now = self._now_ms()  # one "now" per call, like one TIME per script run
        out: list[ClaimResult] = []
        for i, item in enumerate(items):
            key = (item.app, item.id)
            token = claim_token(nonce, i)
            rec = self._live(key, now)
            if rec is None:
                out.append(self._take(key, item, token, now, lease_ms, 1))
            elif rec.fp != item.fingerprint:
                out.append(ClaimResult(ClaimOutcome.CONFLICT, attempts=rec.attempts))
            elif rec.state == "done":
                out.append(
                    ClaimResult(ClaimOutcome.DONE, response=rec.response, attempts=rec.attempts)
                )
            elif rec.token == token:  # this call replayed (a retry after a lost reply)
                outcome = ClaimOutcome.EXHAUSTED if rec.exhausted else ClaimOutcome.NEW
                out.append(ClaimResult(outcome, token=token, attempts=rec.attempts))
            elif rec.lease_until > now:  # also covers a record waiting for its retry
                out.append(ClaimResult(ClaimOutcome.IN_PROGRESS, attempts=rec.attempts))
            elif rec.attempts + 1 > max_attempts:  # take the lease only to close it
                rec.exhausted = True
                self._lease(key, rec, token, now, lease_ms)
                out.append(ClaimResult(ClaimOutcome.EXHAUSTED, token=token, attempts=rec.attempts))
            else:
                out.append(self._take(key, item, token, now, lease_ms, rec.attempts + 1))
        return out

    def _take(
        self, key: _Key, item: ClaimRequest, token: str, now: int, lease_ms: int, attempts: int
    ) -> ClaimResult:
        rec = _Record(
            state="pending",
            fp=item.fingerprint,
            token=token,
            attempts=attempts,
            source=item.source,
        )
        self._records[key] = rec
        self._lease(key, rec, token, now, lease_ms)
        return ClaimResult(ClaimOutcome.NEW, token=token, attempts=attempts)

    async def complete(self, items: Sequence[Completion], *, result_ttl_s: int) -> list[bool]:
        check_ttl(result_ttl_s)
        now = self._now_ms()
        out: list[bool] = []
        for item in items:
            key = (item.app, item.id)
            rec = self._live(key, now)
            if rec is None or rec.token != item.token:
                out.append(False)
            elif rec.state == "pending":
                rec.state = "done"
                rec.response = item.response
                rec.source = None
                rec.lease_until = 0
                rec.expires_at = now + result_ttl_s * 1000
                self._unlist(key)
                out.append(True)
            else:  # done under this token: a replay of our own completion
                out.append(True)
        return out

    async def abandon(self, items: Sequence[Abandon]) -> list[bool]:
        now = self._now_ms()
        out: list[bool] = []
        for item in items:
            key = (item.app, item.id)
            rec = self._live(key, now)
            if rec is None or rec.state != "pending" or rec.token != item.token:
                out.append(False)
                continue
            self._unlist(key)
            del self._records[key]
            out.append(True)
        return out

    async def reap_expired(
        self, *, lease_ms: int, max_attempts: int, limit: int = 100
    ) -> list[Reclaimed]:
        return self._takeover(self._leases, lease_ms, max_attempts, limit)

    async def due_retries(
        self, *, lease_ms: int, max_attempts: int, limit: int = 100
    ) -> list[Reclaimed]:
        return self._takeover(self._retry, lease_ms, max_attempts, limit)

    def _takeover(
        self, source: dict[_Key, int], lease_ms: int, max_attempts: int, limit: int
    ) -> list[Reclaimed]:
        check_takeover_args(lease_ms, max_attempts, limit)
        now = self._now_ms()
        out: list[Reclaimed] = []
        for key in _oldest(source, now, limit):
            source.pop(key)
            rec = self._live(key, now)
            if rec is None or rec.state != "pending" or rec.source is None:
                continue  # stale member: dropped, as the script does
            rec.exhausted = rec.attempts + 1 > max_attempts
            if not rec.exhausted:
                rec.attempts += 1
            token = new_token()
            self._lease(key, rec, token, now, lease_ms)
            out.append(Reclaimed(*key, token, rec.attempts, rec.source, rec.exhausted))
        return out

    async def renew(
        self, items: Sequence[Renewal], *, lease_ms: int, max_lease_ms: int
    ) -> list[bool]:
        check_renew_args(lease_ms, max_lease_ms)
        now = self._now_ms()
        out: list[bool] = []
        for item in items:
            key = (item.app, item.id)
            rec = self._live(key, now)
            if (
                rec is None
                or rec.state != "pending"
                or rec.token != item.token
                or key not in self._leases
            ):
                out.append(False)
                continue
            until = min(now + lease_ms, rec.taken_at + max_lease_ms)
            if until <= now:  # at its maximum: left to run out (take-over or exhausted)
                out.append(False)
                continue
            rec.lease_until = until
            self._leases[key] = until
            out.append(True)
        return out

    async def schedule_retry(self, items: Sequence[RetryLater]) -> list[bool]:
        for item in items:
            check_delay(item.delay_ms)
        now = self._now_ms()
        out: list[bool] = []
        for item in items:
            key = (item.app, item.id)
            rec = self._live(key, now)
            if rec is None or rec.state != "pending" or rec.token != item.token:
                out.append(False)
                continue
            at = now + item.delay_ms
            # Counted as leased until the retry time + its lease: a resend meanwhile gets
            # IN_PROGRESS from claim's live-lease check, and only if no worker picks the
            # retry up in that window can a resend take the request over.
            rec.lease_until = at + rec.lease_ms
            self._leases.pop(key, None)
            self._retry[key] = at
            out.append(True)
        return out
