"""The idempotency ledger contract (design sections 2 and 6).

Every method works on a group of items so that an implementation can make one round
trip per group (Redis: one EVALSHA). Keys are namespaced by app: `(app, id)` is the
idempotency key.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from inference_worker_client.frozen import quick_init

from inference_worker.journal import JournalEntry


class ClaimOutcome(enum.StrEnum):
    NEW = "new"  # lease taken by this caller; request journaled
    DONE = "done"  # a cached response exists: republish it, compute nothing
    IN_PROGRESS = "in_progress"  # someone else holds a live lease: drop this copy
    CONFLICT = "conflict"  # same (app, id), different payload fingerprint
    # Attempts are used up and the lease had expired: the caller now holds the lease
    # (`token`) only to close the request. Do not run it: `complete()` it with the
    # `exhausted` error response under that token (a later resend then gets DONE with that
    # error) and dead-letter the journaled request.
    EXHAUSTED = "exhausted"


@quick_init
@dataclass(frozen=True)
class ClaimRequest:
    app: str
    id: str
    fingerprint: str  # hex digest of the request's semantic content
    # Journaled so a later attempt can re-run it: the raw request bytes as their own
    # field, with the topic, reply topic and correlation beside them (no re-wrapping).
    source: JournalEntry


@quick_init
@dataclass(frozen=True)
class ClaimResult:
    outcome: ClaimOutcome
    token: str | None = None  # lease token, set for NEW and EXHAUSTED
    response: bytes | None = None  # cached response bytes, set for DONE
    attempts: int = 0  # attempts including this one (NEW), or run so far (others)


@quick_init
@dataclass(frozen=True)
class Completion:
    app: str
    id: str
    token: str
    response: bytes


@dataclass(frozen=True)
class Abandon:
    """Give a lease back and forget the record (turned away after its claim)."""

    app: str
    id: str
    token: str


@dataclass(frozen=True)
class Reclaimed:
    """A request taken over for another attempt (reaper, due retry): its lease is ours."""

    app: str
    id: str
    token: str  # the new lease token
    attempts: int  # attempts including this one; when exhausted, the attempts already run
    source: JournalEntry  # what was journaled at claim time
    # Attempts would exceed max_attempts: do not run it. Answer `exhausted`: complete()
    # the error response under `token`, and dead-letter the payload.
    exhausted: bool


@dataclass(frozen=True)
class RetryLater:
    """Park a leased request until `delay_ms` from now (retryable failure, backoff)."""

    app: str
    id: str
    token: str
    delay_ms: int


@dataclass(frozen=True)
class Renewal:
    """Extend a lease the caller still holds (the request is queued or computing)."""

    app: str
    id: str
    token: str


@runtime_checkable
class StateStore(Protocol):
    async def start(self) -> None:
        """Connect and load scripts; raise a clear error when the store is unreachable."""

    async def close(self) -> None: ...

    async def ping(self) -> bool: ...

    async def claim(
        self, items: Sequence[ClaimRequest], *, nonce: str, lease_ms: int, max_attempts: int
    ) -> list[ClaimResult]:
        """Claim each item atomically; results are in the order of `items`.

        `nonce` (unique per call, chosen by the caller; not empty) names the group: item
        i's lease token is `f"{nonce}:{i}"`. A call repeated with the same nonce and items
        (the caller's retry after a lost reply) is a replay: an item whose record is
        pending under exactly that token comes back NEW (or EXHAUSTED) again with the same
        token and attempt count, never IN_PROGRESS against itself, and no attempt is
        counted twice. So the caller retries a claim that raised StateUnavailable with
        the same nonce, and a fresh nonce for every new group.

        A pending record whose lease has expired is re-claimable (NEW, attempts + 1);
        when attempts + 1 would exceed `max_attempts` it is EXHAUSTED, and the caller
        takes the lease all the same (`token`, fresh lease) to complete it with the
        `exhausted` error response. A record waiting in the retry set counts as leased
        until its retry time + lease (IN_PROGRESS). Two items with the same `(app, id)` in
        one call: the first decides, the second sees its result (IN_PROGRESS, or CONFLICT
        if fingerprints differ).
        """
        ...

    async def complete(self, items: Sequence[Completion], *, result_ttl_s: int) -> list[bool]:
        """Store responses (TTL) and release leases, token-checked.

        Returns per item whether this caller still held the lease; when it did not
        (lease expired and was re-claimed), nothing is written for that item.
        """
        ...

    async def abandon(self, items: Sequence[Abandon]) -> list[bool]:
        """Drop pending records the caller holds, token-checked, without an answer, so a
        resend is claimed afresh (used for requests over their app's quota: they were
        claimed first so that a resend of an answered request gets its cached bytes)."""
        ...

    async def reap_expired(
        self, *, lease_ms: int, max_attempts: int, limit: int = 100
    ) -> list[Reclaimed]:
        """Take over pending records whose lease expired (their worker died or stalled).

        Each gets a new token, attempts + 1 and a fresh lease of `lease_ms`; one that has
        used up `max_attempts` keeps its count and comes back `exhausted` (do not run it).
        One round trip for up to `limit` records, oldest deadline first. Two reapers
        running at once never get the same record; the old token is fenced off.
        """
        ...

    async def renew(
        self, items: Sequence[Renewal], *, lease_ms: int, max_lease_ms: int
    ) -> list[bool]:
        """Push the leases of records the caller is still working on to now + lease_ms.

        A lease is never pushed past `max_lease_ms` after it was taken (claim or
        take-over; the store keeps the take time): the new deadline is
        min(now + lease_ms, taken + max_lease_ms), and once that is not ahead of now renew
        answers False and writes nothing. The lease then runs out, so a request stuck
        behind a hung model call or a failing completion is re-run (take-over, attempts
        + 1) or ends `exhausted` instead of being held for ever. ValueError when
        `max_lease_ms < lease_ms`.

        Token-checked, one round trip for the group. Only leases in the lease set are
        renewed (a record parked for retry is not). False: the caller lost the lease.
        Without renewal a request that waits in a long queue would be taken over and
        computed twice; with it, only a worker that stops renewing (dead or stalled)
        loses its leases.
        """
        ...

    async def schedule_retry(self, items: Sequence[RetryLater]) -> list[bool]:
        """Park leased records for a later attempt, token-checked.

        The record stays pending (payload kept) and moves from the lease set to the retry
        set, due `delay_ms` from now; until its retry time + its lease length a resend
        gets IN_PROGRESS. The token stays valid until the record is taken over. Returns
        per item False (and writes nothing) when the caller no longer holds the lease.
        """
        ...

    async def due_retries(
        self, *, lease_ms: int, max_attempts: int, limit: int = 100
    ) -> list[Reclaimed]:
        """Take over records whose retry time has come: like `reap_expired`, from the
        retry set (oldest due first)."""
        ...


class StateUnavailable(ConnectionError):
    """The store could not be reached (connection refused/reset, timeout).

    Implementations translate their client library's connection errors into this so
    the worker can retry with backoff without knowing which store it talks to.
    """


class StateFailed(RuntimeError):
    """The store answered a command with an error that retrying at once will not fix.

    E.g. Redis `OOM command not allowed` (maxmemory reached under `noeviction`),
    `MISCONF` (it cannot persist), `READONLY` (a replica), `NOSCRIPT` after a failed
    reload, a script error. The message is the server's. For OOM, MISCONF and READONLY
    nothing of the call was written (Redis checks a script for them before it runs). The
    caller logs and counts it and lets the affected leases expire (another attempt, or
    `exhausted`, follows once the store works again) rather than crash or retry in a
    tight loop.
    """


class StateAccessDenied(StateUnavailable):
    """The store refused our credentials or a command/key (e.g. a Redis ACL user without
    EVALSHA or outside its key pattern). Fatal at `start()`; later the worker backs off
    and retries like an outage, so fixing the ACL lets it recover without a restart.
    """
