"""Recovery in the `StateStore` contract (design section 2 step 8): the reaper takes over
expired leases, parked retries come due, attempts run out; take-overs carry the journal
back as it was claimed. Fixtures and rules: state_support.py.
"""

from __future__ import annotations

import asyncio
import secrets

import pytest

from inference_worker.journal import JournalEntry
from inference_worker.state import (
    ClaimOutcome,
    ClaimRequest,
    ClaimResult,
    MemoryStateStore,
    Reclaimed,
    RedisStateStore,
    RetryLater,
    StateStore,
)
from tests.contract import state_support
from tests.contract.state_support import (
    LONG,
    Advance,
    claim1,
    complete1,
    entry,
    nonce,
    redis_store,
    req,
    zcards,
)
from tests.servers import Server

clock = state_support.clock
store = state_support.store
advance = state_support.advance


async def reap(store: StateStore, max_attempts: int = 3, limit: int = 100) -> list[Reclaimed]:
    return await store.reap_expired(lease_ms=LONG, max_attempts=max_attempts, limit=limit)


async def due(store: StateStore, max_attempts: int = 3, limit: int = 100) -> list[Reclaimed]:
    return await store.due_retries(lease_ms=LONG, max_attempts=max_attempts, limit=limit)


async def test_reap_takes_over_an_expired_lease(store: StateStore, advance: Advance) -> None:
    first = await claim1(store, req(payload=b"journal"), lease_ms=50)
    await advance(0.1)
    [got] = await reap(store)
    assert got == Reclaimed("app", "1", got.token, 2, entry(b"journal"), False)
    assert got.token != first.token
    assert await reap(store) == []  # its lease is fresh now
    assert (await claim1(store, req())).outcome is ClaimOutcome.IN_PROGRESS
    assert not await complete1(store, req(), first.token, b"stale")
    assert await complete1(store, req(), got.token, b"fresh")
    assert (await claim1(store, req())).response == b"fresh"
    assert await zcards(store) == (0, 0)


async def test_live_lease_is_not_reaped(store: StateStore) -> None:
    first = await claim1(store, req())
    assert await reap(store) == []
    assert await complete1(store, req(), first.token, b"r")


async def test_concurrent_reapers_never_share_a_record(
    store: StateStore, advance: Advance, request: pytest.FixtureRequest
) -> None:
    reqs = [req("c", str(i)) for i in range(30)]
    await store.claim(reqs, nonce=nonce(), lease_ms=50, max_attempts=3)
    await advance(0.1)
    other: StateStore = store
    if isinstance(store, RedisStateStore):  # a second worker on the same keys
        other = RedisStateStore(store.url, prefix=store.prefix)
        await other.start()
    try:
        a, b = await asyncio.gather(reap(store, limit=20), reap(other, limit=20))
    finally:
        if other is not store:
            await other.close()
    ids_a, ids_b = {x.id for x in a}, {x.id for x in b}
    assert not ids_a & ids_b
    assert ids_a | ids_b == {r.id for r in reqs}
    assert len(a) + len(b) == 30 and all(x.attempts == 2 for x in a + b)


async def test_exhausted_via_reaping(store: StateStore, advance: Advance) -> None:
    await claim1(store, req(payload=b"poison"), lease_ms=50, max_attempts=2)
    await advance(0.1)
    [second] = await store.reap_expired(lease_ms=50, max_attempts=2)
    assert (second.attempts, second.exhausted) == (2, False)
    await advance(0.1)
    [third] = await store.reap_expired(lease_ms=LONG, max_attempts=2)
    assert third == Reclaimed("app", "1", third.token, 2, entry(b"poison"), True)
    assert not await complete1(store, req(), second.token, b"late")
    assert await complete1(store, req(), third.token, b"exhausted error")
    done = await claim1(store, req(), max_attempts=2)
    assert done == ClaimResult(ClaimOutcome.DONE, response=b"exhausted error", attempts=2)


async def test_claim_of_exhausted_expired_record_takes_the_lease(
    store: StateStore, advance: Advance
) -> None:
    await claim1(store, req(payload=b"journal"), lease_ms=50, max_attempts=1)
    await advance(0.1)
    ex = await claim1(store, req(), lease_ms=50, max_attempts=1)
    assert (ex.outcome, ex.attempts, ex.response) == (ClaimOutcome.EXHAUSTED, 1, None)
    assert ex.token
    await advance(0.1)  # the closer died too: the reaper hands it on, still exhausted
    [got] = await reap(store, max_attempts=1)
    assert got == Reclaimed("app", "1", got.token, 1, entry(b"journal"), True)
    assert not await complete1(store, req(), ex.token, b"stale")
    assert await complete1(store, req(), got.token, b"err")
    assert (await claim1(store, req(), max_attempts=1)).response == b"err"


async def test_schedule_retry_parks_until_due(store: StateStore, advance: Advance) -> None:
    soon, later = req(id="soon", payload=b"s"), req(id="later", payload=b"l")
    a, b = await store.claim([soon, later], nonce=nonce(), lease_ms=50, max_attempts=3)
    assert await store.schedule_retry(
        [
            RetryLater("app", "soon", a.token or "", 50),
            RetryLater("app", "later", b.token or "", LONG),
        ]
    ) == [True, True]
    assert await zcards(store) == (0, 2)
    if isinstance(store, MemoryStateStore):  # the fake clock has not moved: nothing due yet
        assert await due(store) == []
    await advance(0.1)
    assert await reap(store) == []  # out of the leases set: not reaped though 50 ms passed
    [got] = await due(store)
    assert got == Reclaimed("app", "soon", got.token, 2, entry(b"s"), False)
    assert await due(store) == []
    assert await zcards(store) == (1, 1)
    # A resend of the one still waiting is IN_PROGRESS (lease_until = retry time + lease).
    assert (await claim1(store, later)).outcome is ClaimOutcome.IN_PROGRESS
    assert not await complete1(store, soon, a.token, b"stale")
    assert await complete1(store, soon, got.token, b"ok")
    # The waiting one's token still holds until a takeover; completing it clears the set.
    assert await complete1(store, later, b.token, b"ok too")
    assert await zcards(store) == (0, 0)
    assert [
        x.response
        for x in await store.claim([soon, later], nonce=nonce(), lease_ms=LONG, max_attempts=3)
    ] == [
        b"ok",
        b"ok too",
    ]


async def test_schedule_retry_with_a_lost_lease_writes_nothing(
    store: StateStore, advance: Advance
) -> None:
    first = await claim1(store, req(), lease_ms=50)
    await advance(0.1)
    [got] = await store.reap_expired(lease_ms=50, max_attempts=3)
    assert await store.schedule_retry([RetryLater("app", "1", first.token or "", 0)]) == [False]
    assert await store.schedule_retry([RetryLater("app", "nope", "t", 0)]) == [False]
    assert await due(store) == []
    assert await zcards(store) == (1, 0)
    await advance(0.1)
    [again] = await reap(store)  # still in the leases set, and its lease ran out
    assert (again.attempts, again.source) == (3, entry(b"p"))
    assert not await complete1(store, req(), got.token, b"x")
    with pytest.raises(ValueError):
        await store.schedule_retry([RetryLater("app", "1", again.token, -1)])


async def test_complete_clears_both_sets(store: StateStore) -> None:
    x, y, z = req(id="x"), req(id="y"), req(id="z")
    rx, ry, rz = await store.claim([x, y, z], nonce=nonce(), lease_ms=LONG, max_attempts=3)
    oks = await store.schedule_retry(
        [RetryLater("app", "x", rx.token or "", 0), RetryLater("app", "y", ry.token or "", 0)]
    )
    assert oks == [True, True] and await zcards(store) == (1, 2)
    assert await complete1(store, x, rx.token, b"rx")
    assert await complete1(store, y, ry.token, b"ry")
    assert await complete1(store, z, rz.token, b"rz")
    assert await zcards(store) == (0, 0)
    assert await due(store) == [] and await reap(store) == []


async def test_takeover_limit_and_oldest_first(store: StateStore, advance: Advance) -> None:
    for i, id in enumerate("zyx"):  # deadlines z < y < x, against the member order
        await claim1(store, req(id=id), lease_ms=50 + 10 * i)
    await advance(0.2)
    assert [x.id for x in await reap(store, limit=2)] == ["z", "y"]
    assert [x.id for x in await reap(store, limit=2)] == ["x"]
    for bad in (0, -1):
        with pytest.raises(ValueError):
            await reap(store, limit=bad)
        with pytest.raises(ValueError):
            await due(store, limit=bad)
    assert await store.schedule_retry([]) == []


async def test_replayed_takeover_answers_the_same_records(
    redis: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client retry of a reap call (same nonce) gets the records the first run took."""
    store = await redis_store(redis)
    try:
        await store.claim([req(id="1"), req(id="2")], nonce=nonce(), lease_ms=1, max_attempts=3)
        await asyncio.sleep(0.01)
        monkeypatch.setattr(secrets, "token_hex", lambda nbytes=8: "ef" * nbytes)
        first = await reap(store)
        assert [(x.id, x.attempts) for x in first] == [("1", 2), ("2", 2)]
        assert await reap(store) == first
        assert await complete1(store, req(id="1"), first[0].token, b"r")
        assert [x.id for x in await reap(store)] == ["2"]  # only what it still holds
    finally:
        await store.close()


async def test_takeover_gives_back_the_journal_as_claimed(
    store: StateStore, advance: Advance
) -> None:
    """Payload, topic, reply topic and correlation come back exactly, absent ones None."""
    full = JournalEntry(b"\x00raw\xff", "request_message/app/m", "reply/here", b"\x01corr")
    empty = JournalEntry(b"", "t", "", b"")  # empty values are kept, not taken for None
    bare = JournalEntry(b"bare", "t", None, None)
    items = [ClaimRequest("app", str(i), "fp", s) for i, s in enumerate((full, empty, bare))]
    await store.claim(items, nonce=nonce(), lease_ms=50, max_attempts=3)
    await advance(0.1)
    got = sorted(await reap(store), key=lambda x: x.id)
    assert [x.source for x in got] == [full, empty, bare]
