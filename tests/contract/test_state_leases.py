"""Lease renewal in the `StateStore` contract: renewing keeps a queued request from being
taken over, and never pushes a lease past `max_lease_ms` after it was taken, so a request
held by a hung call runs out and is re-run or ends `exhausted`.

Memory runs on the fake clock; Redis on real time with leases of a few hundred ms, and
loops that wait for a condition poll with a bound instead of asserting a timing.
Fixtures and rules: state_support.py.
"""

from __future__ import annotations

from inference_worker.state import (
    MemoryStateStore,
    Reclaimed,
    RedisStateStore,
    Renewal,
    RetryLater,
    StateStore,
    member,
)
from tests.contract import state_support
from tests.contract.state_support import LONG, Advance, claim1, req

clock = state_support.clock
store = state_support.store
advance = state_support.advance

LEASE = 300  # ms
MAX_LEASE = 600  # ms
STEP = 0.1  # s between renewals, as a worker's lease book would
BOUND = 100  # steps: far more than any condition below needs


async def renew1(store: StateStore, token: str | None, *, max_lease_ms: int = MAX_LEASE) -> bool:
    assert token is not None
    [ok] = await store.renew(
        [Renewal("app", "1", token)], lease_ms=LEASE, max_lease_ms=max_lease_ms
    )
    return ok


async def lease_span(store: StateStore) -> int:
    """How far past its take time the current lease of ("app", "1") reaches (ms)."""
    if isinstance(store, MemoryStateStore):
        rec = store._records[("app", "1")]
        return store._leases[("app", "1")] - rec.taken_at
    assert isinstance(store, RedisStateStore)
    fields = await store.client.hmget(store.req_key("app", "1"), "taken_at", "lease_until")
    taken, until = (int(x or 0) for x in fields)
    leases = store.layout.shard_of(member("app", "1")).leases
    score = await store.client.zscore(leases, member("app", "1"))
    assert score == until
    return until - taken


async def renew_until_refused(store: StateStore, token: str | None, advance: Advance) -> int:
    """Renew every STEP until renew says False; the number of renewals it granted."""
    for granted in range(BOUND):
        if not await renew1(store, token):
            return granted
        assert await lease_span(store) <= MAX_LEASE  # never pushed past the maximum
        await advance(STEP)
    raise AssertionError("renew never reached the lease maximum")


async def reap_until_taken(store: StateStore, advance: Advance, max_attempts: int = 3) -> Reclaimed:
    for _ in range(BOUND):
        got = await store.reap_expired(lease_ms=LONG, max_attempts=max_attempts)
        if got:
            [one] = got
            return one
        await advance(STEP)
    raise AssertionError("the lease never ran out")


async def test_renewal_keeps_a_queued_request_from_being_taken_over(
    store: StateStore, advance: Advance
) -> None:
    claimed = await claim1(store, req(), lease_ms=LEASE)
    assert await store.renew(
        [Renewal("app", "1", claimed.token or "")], lease_ms=LONG, max_lease_ms=LONG
    ) == [True]
    await advance(LEASE / 1000 * 2)  # well past the first lease
    assert await store.reap_expired(lease_ms=LONG, max_attempts=3) == []
    assert not await renew1(store, "not-the-token")
    assert await store.renew(
        [Renewal("app", "missing", claimed.token or "")], lease_ms=LEASE, max_lease_ms=LONG
    ) == [False]
    # Parked for retry: not renewed (the retry, not the lease, decides what happens next).
    retry = RetryLater("app", "1", claimed.token or "", LONG)
    assert await store.schedule_retry([retry]) == [True]
    assert not await renew1(store, claimed.token)


async def test_lease_is_not_renewed_past_its_maximum_and_is_taken_over(
    store: StateStore, advance: Advance
) -> None:
    claimed = await claim1(store, req(), lease_ms=LEASE)
    assert await renew_until_refused(store, claimed.token, advance) >= 1
    assert not await renew1(store, claimed.token)  # and stays refused
    got = await reap_until_taken(store, advance)
    assert (got.attempts, got.exhausted) == (2, False)
    assert not await renew1(store, claimed.token)  # fenced off
    assert await renew1(store, got.token)  # a take-over starts a new maximum


async def test_lease_at_its_maximum_with_no_attempt_left_ends_exhausted(
    store: StateStore, advance: Advance
) -> None:
    claimed = await claim1(store, req(), lease_ms=LEASE, max_attempts=1)
    await renew_until_refused(store, claimed.token, advance)
    got = await reap_until_taken(store, advance, max_attempts=1)
    assert (got.attempts, got.exhausted) == (1, True)
