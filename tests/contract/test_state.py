"""One contract suite for every `StateStore` backend (design sections 2 and 6).

Each test runs against the in-process twin and a real redis-server. Time: the memory
store reads a fake clock that `advance` moves; for Redis `advance` really sleeps, so the
tests only wait where an expiry must be observed, with short leases, and assert outcomes,
never timings. Every Redis store gets its own random key prefix.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from inference_worker.state import (
    ClaimOutcome,
    ClaimRequest,
    ClaimResult,
    Completion,
    MemoryStateStore,
    Reclaimed,
    RedisStateStore,
    Release,
    RetryLater,
    StateStore,
    member,
    open_state,
    parse_member,
)
from inference_worker.state.base import Renewal, StateUnavailable
from tests.servers import Server, free_port

Advance = Callable[[float], Awaitable[None]]
LONG = 60_000  # ms: a lease that never expires within a test
TTL = 3600


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def _redis_store(server: Server) -> RedisStateStore:
    store = RedisStateStore(server.url, prefix=f"t{uuid.uuid4().hex}:")
    await store.start()
    return store


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[StateStore]:
    s: StateStore
    if request.param == "memory":
        s = MemoryStateStore(clock=clock)
        await s.start()
    else:
        s = await _redis_store(request.getfixturevalue("redis"))
    yield s
    await s.close()


@pytest.fixture
def advance(store: StateStore, clock: FakeClock) -> Advance:
    async def _advance(seconds: float) -> None:
        if isinstance(store, MemoryStateStore):
            clock.now += seconds
        else:
            await asyncio.sleep(seconds)

    return _advance


def req(app: str = "app", id: str = "1", fp: str = "fp1", payload: bytes = b"p") -> ClaimRequest:
    return ClaimRequest(app=app, id=id, fingerprint=fp, payload=payload)


async def claim1(
    store: StateStore, r: ClaimRequest, lease_ms: int = LONG, max_attempts: int = 3
) -> ClaimResult:
    [res] = await store.claim([r], lease_ms=lease_ms, max_attempts=max_attempts)
    return res


async def complete1(store: StateStore, r: ClaimRequest, token: str | None, body: bytes) -> bool:
    assert token is not None
    [ok] = await store.complete([Completion(r.app, r.id, token, body)], result_ttl_s=TTL)
    return ok


async def test_new_then_done_returns_identical_bytes(store: StateStore) -> None:
    r = req()
    first = await claim1(store, r)
    assert first.outcome is ClaimOutcome.NEW and first.token and first.attempts == 1
    body = bytes(range(256)) * 3
    assert await complete1(store, r, first.token, body)
    again = await claim1(store, req(payload=b"same fp, other bytes"))
    assert again == ClaimResult(ClaimOutcome.DONE, response=body, attempts=1)


async def test_conflict_on_other_fingerprint_pending_and_done(store: StateStore) -> None:
    first = await claim1(store, req())
    assert (await claim1(store, req(fp="fp2"))).outcome is ClaimOutcome.CONFLICT
    assert await complete1(store, req(), first.token, b"r")
    assert (await claim1(store, req(fp="fp2"))).outcome is ClaimOutcome.CONFLICT
    assert (await claim1(store, req())).outcome is ClaimOutcome.DONE


async def test_in_progress_while_lease_live(store: StateStore) -> None:
    assert (await claim1(store, req())).outcome is ClaimOutcome.NEW
    second = await claim1(store, req())
    assert second == ClaimResult(ClaimOutcome.IN_PROGRESS, attempts=1)


async def test_expired_lease_is_reclaimed_and_old_token_is_fenced(
    store: StateStore, advance: Advance
) -> None:
    first = await claim1(store, req(), lease_ms=50)
    await advance(0.1)
    second = await claim1(store, req(), lease_ms=LONG)
    assert second.outcome is ClaimOutcome.NEW and second.attempts == 2
    assert second.token != first.token
    # The stale holder finishes late: refused, and nothing is written for it.
    assert not await complete1(store, req(), first.token, b"stale")
    assert (await claim1(store, req())).outcome is ClaimOutcome.IN_PROGRESS
    assert await store.release([Release("app", "1", first.token or "")]) == [False]
    assert await complete1(store, req(), second.token, b"fresh")
    assert (await claim1(store, req())).response == b"fresh"


async def test_exhausted_after_max_attempts(store: StateStore, advance: Advance) -> None:
    for attempt in (1, 2):
        res = await claim1(store, req(), lease_ms=50, max_attempts=2)
        assert (res.outcome, res.attempts) == (ClaimOutcome.NEW, attempt)
        await advance(0.1)
    # The resend takes the lease only to close the record: attempts stay at 2.
    res = await claim1(store, req(), lease_ms=50, max_attempts=2)
    assert (res.outcome, res.attempts) == (ClaimOutcome.EXHAUSTED, 2) and res.token
    assert (await claim1(store, req(), max_attempts=2)).outcome is ClaimOutcome.IN_PROGRESS
    await advance(0.1)  # its holder died before closing it: the next resend closes it
    again = await claim1(store, req(), lease_ms=LONG, max_attempts=2)
    assert (again.outcome, again.attempts) == (ClaimOutcome.EXHAUSTED, 2)
    assert again.token not in (None, res.token)
    assert not await complete1(store, req(), res.token, b"stale")
    assert await complete1(store, req(), again.token, b"exhausted error")
    done = await claim1(store, req(), max_attempts=2)
    assert done == ClaimResult(ClaimOutcome.DONE, response=b"exhausted error", attempts=2)


async def test_duplicates_in_one_call(store: StateStore) -> None:
    res = await store.claim([req(), req(), req(fp="other")], lease_ms=LONG, max_attempts=3)
    assert [x.outcome for x in res] == [
        ClaimOutcome.NEW,
        ClaimOutcome.IN_PROGRESS,
        ClaimOutcome.CONFLICT,
    ]
    assert await complete1(store, req(), res[0].token, b"r")
    res = await store.claim([req(), req()], lease_ms=LONG, max_attempts=3)
    assert [(x.outcome, x.response) for x in res] == [(ClaimOutcome.DONE, b"r")] * 2


async def test_apps_and_awkward_ids_do_not_collide(store: StateStore) -> None:
    pairs = [
        ("a:b", "c"),
        ("a", "b:c"),
        ("a:b:c", ""),
        ("", "a:b:c"),
        ("a", "1"),
        ("b", "1"),
        ("日本", "é:ß"),
        ("日", "本:é:ß"),
        ("1:x", "y"),
        ("1", "x:y"),
    ]
    reqs = [req(app, id) for app, id in pairs]
    res = await store.claim(reqs, lease_ms=LONG, max_attempts=3)
    assert all(x.outcome is ClaimOutcome.NEW for x in res)
    oks = await store.complete(
        [
            Completion(r.app, r.id, x.token or "", f"{r.app}|{r.id}".encode())
            for r, x in zip(reqs, res, strict=True)
        ],
        result_ttl_s=TTL,
    )
    assert all(oks)
    res = await store.claim(reqs, lease_ms=LONG, max_attempts=3)
    assert [x.response for x in res] == [f"{a}|{i}".encode() for a, i in pairs]


def test_member_encoding_round_trips() -> None:
    for app, id in [("a:b", "c"), ("a", "b:c"), ("日本", "é:ß"), ("", "")]:
        assert parse_member(member(app, id)) == (app, id)
        assert parse_member(member(app, id).encode()) == (app, id)
    assert member("a:b", "c") != member("a", "b:c")
    with pytest.raises(ValueError):
        parse_member("5:ab:c")


async def test_release_then_reclaim_is_new(store: StateStore) -> None:
    first = await claim1(store, req())
    assert await store.release([Release("app", "1", "wrong")]) == [False]
    assert await store.release([Release("app", "1", first.token or "")]) == [True]
    assert await store.release([Release("app", "1", first.token or "")]) == [False]
    again = await claim1(store, req(fp="fp2"))  # gone entirely: even a new fingerprint
    assert (again.outcome, again.attempts) == (ClaimOutcome.NEW, 1)
    assert await complete1(store, req(), again.token, b"r")
    assert await store.release([Release("app", "1", again.token or "")]) == [False]
    assert (await claim1(store, req(fp="fp2"))).outcome is ClaimOutcome.DONE


async def test_response_ttl_expiry_makes_it_new_again(store: StateStore, advance: Advance) -> None:
    first = await claim1(store, req())
    [ok] = await store.complete([Completion("app", "1", first.token or "", b"r")], result_ttl_s=1)
    assert ok
    await advance(1.2)
    again = await claim1(store, req(fp="fp2"))
    assert (again.outcome, again.attempts) == (ClaimOutcome.NEW, 1)


async def test_replayed_call_is_harmless(
    store: StateStore, advance: Advance, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client retry after a lost reply re-sends the same tokens: same answers again."""

    def fixed_token(nbytes: int = 8) -> str:
        return "ab" * nbytes

    monkeypatch.setattr(secrets, "token_hex", fixed_token)
    first = await claim1(store, req())
    replay = await claim1(store, req())
    assert replay == first == ClaimResult(ClaimOutcome.NEW, token="ab" * 8, attempts=1)
    assert await complete1(store, req(), first.token, b"r")
    assert await complete1(store, req(), first.token, b"r")
    assert (await claim1(store, req())).response == b"r"
    # An EXHAUSTED claim replayed answers EXHAUSTED again, with the same token.
    monkeypatch.setattr(secrets, "token_hex", lambda nbytes=8: "cd" * nbytes)
    assert (await claim1(store, req("x"), lease_ms=1, max_attempts=1)).outcome is ClaimOutcome.NEW
    await advance(0.01)
    monkeypatch.setattr(secrets, "token_hex", fixed_token)
    ex = await claim1(store, req("x"), max_attempts=1)
    assert ex == ClaimResult(ClaimOutcome.EXHAUSTED, token="ab" * 8, attempts=1)
    assert await claim1(store, req("x"), max_attempts=1) == ex


async def test_group_of_500_in_one_round_trip(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    reqs = [req("bulk", str(i), payload=bytes([i % 256]) * 100) for i in range(500)]
    sent: list[object] = []
    before = await _evalsha_calls(store)
    if isinstance(store, RedisStateStore):  # count what the client sends, too
        inner: Callable[..., Awaitable[Any]] = store.client.execute_command

        async def counting(*args: Any, **kwargs: Any) -> Any:
            sent.append(args[0])
            return await inner(*args, **kwargs)

        monkeypatch.setattr(store.client, "execute_command", counting)
    res = await store.claim(reqs, lease_ms=LONG, max_attempts=3)
    if isinstance(store, RedisStateStore):
        monkeypatch.undo()
        assert sent == ["EVALSHA"]
        assert await _evalsha_calls(store) == before + 1  # the server saw just one, too
    assert all(x.outcome is ClaimOutcome.NEW for x in res)
    comps = [
        Completion(r.app, r.id, x.token or "", r.id.encode())
        for r, x in zip(reqs, res, strict=True)
    ]
    assert all(await store.complete(comps, result_ttl_s=TTL))
    res = await store.claim(reqs, lease_ms=LONG, max_attempts=3)
    assert [x.response for x in res] == [str(i).encode() for i in range(500)]


async def _evalsha_calls(store: StateStore) -> int:
    if not isinstance(store, RedisStateStore):
        return 0
    info: dict[str, Any] = await store.client.info("commandstats")
    return int(info.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_empty_groups_and_bad_arguments(store: StateStore) -> None:
    assert await store.claim([], lease_ms=1, max_attempts=1) == []
    assert await store.complete([], result_ttl_s=1) == []
    assert await store.release([]) == []
    with pytest.raises(ValueError):
        await store.claim([req()], lease_ms=0, max_attempts=1)
    with pytest.raises(ValueError):
        await store.complete([], result_ttl_s=0)
    assert await store.ping()


async def test_redis_restart_reconnects_and_reloads_scripts(redis: Server) -> None:
    store = await _redis_store(redis)
    try:
        assert (await claim1(store, req("pre"))).outcome is ClaimOutcome.NEW
        redis.restart()  # scripts are not persisted: the next EVALSHA meets NOSCRIPT
        first = await claim1(store, req("post"))
        assert first.outcome is ClaimOutcome.NEW
        assert await complete1(store, req("post"), first.token, b"r")
        await store.client.script_flush()
        assert (await claim1(store, req("post"))).response == b"r"
        assert await store.ping()
    finally:
        await store.close()


async def test_unreachable_redis_fails_clearly_without_password() -> None:
    url = f"redis://user:s3cret@127.0.0.1:{free_port()}/0"
    store = RedisStateStore(url)
    with pytest.raises(StateUnavailable) as err:
        await store.start()
    assert "127.0.0.1" in str(err.value) and "s3cret" not in str(err.value)
    assert not await store.ping()


def test_open_state_picks_backend_by_scheme() -> None:
    assert isinstance(open_state("memory://"), MemoryStateStore)
    assert isinstance(open_state("redis://localhost:6379/0"), RedisStateStore)
    assert isinstance(open_state("rediss://h:6380", prefix="x:"), RedisStateStore)
    with pytest.raises(ValueError, match="kafka"):
        open_state("kafka://broker:9092")
    with pytest.raises(ValueError) as err:
        open_state("http://u:pw@h")
    assert "pw" not in str(err.value)


# --- recovery: reaper, retries, exhaustion (design section 2 step 8) ---------------------


async def reap(store: StateStore, max_attempts: int = 3, limit: int = 100) -> list[Reclaimed]:
    return await store.reap_expired(lease_ms=LONG, max_attempts=max_attempts, limit=limit)


async def due(store: StateStore, max_attempts: int = 3, limit: int = 100) -> list[Reclaimed]:
    return await store.due_retries(lease_ms=LONG, max_attempts=max_attempts, limit=limit)


async def zcards(store: StateStore) -> tuple[int, int]:
    """(leases, retry) zset sizes, read straight from the backend."""
    if isinstance(store, MemoryStateStore):
        return len(store._leases), len(store._retry)
    assert isinstance(store, RedisStateStore)
    c = store.client
    return await c.zcard(f"{store.prefix}leases"), await c.zcard(f"{store.prefix}retry")


async def test_reap_takes_over_an_expired_lease(store: StateStore, advance: Advance) -> None:
    first = await claim1(store, req(payload=b"journal"), lease_ms=50)
    await advance(0.1)
    [got] = await reap(store)
    assert got == Reclaimed("app", "1", got.token, 2, b"journal", False)
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
    await store.claim(reqs, lease_ms=50, max_attempts=3)
    await advance(0.1)
    other: StateStore = store
    if isinstance(store, RedisStateStore):  # a second worker on the same keys
        other = RedisStateStore(request.getfixturevalue("redis").url, prefix=store.prefix)
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
    assert third == Reclaimed("app", "1", third.token, 2, b"poison", True)
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
    assert got == Reclaimed("app", "1", got.token, 1, b"journal", True)
    assert not await complete1(store, req(), ex.token, b"stale")
    assert await complete1(store, req(), got.token, b"err")
    assert (await claim1(store, req(), max_attempts=1)).response == b"err"


async def test_schedule_retry_parks_until_due(store: StateStore, advance: Advance) -> None:
    soon, later = req(id="soon", payload=b"s"), req(id="later", payload=b"l")
    a, b = await store.claim([soon, later], lease_ms=50, max_attempts=3)
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
    assert got == Reclaimed("app", "soon", got.token, 2, b"s", False)
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
        x.response for x in await store.claim([soon, later], lease_ms=LONG, max_attempts=3)
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
    assert (again.attempts, again.payload) == (3, b"p")
    assert not await complete1(store, req(), got.token, b"x")
    with pytest.raises(ValueError):
        await store.schedule_retry([RetryLater("app", "1", again.token, -1)])


async def test_complete_and_release_clear_both_sets(store: StateStore) -> None:
    x, y, z = req(id="x"), req(id="y"), req(id="z")
    rx, ry, rz = await store.claim([x, y, z], lease_ms=LONG, max_attempts=3)
    oks = await store.schedule_retry(
        [RetryLater("app", "x", rx.token or "", 0), RetryLater("app", "y", ry.token or "", 0)]
    )
    assert oks == [True, True] and await zcards(store) == (1, 2)
    assert await complete1(store, x, rx.token, b"rx")
    assert await store.release([Release("app", "y", ry.token or "")]) == [True]
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
    store = await _redis_store(redis)
    try:
        await store.claim([req(id="1"), req(id="2")], lease_ms=1, max_attempts=3)
        await asyncio.sleep(0.01)
        monkeypatch.setattr(secrets, "token_hex", lambda nbytes=8: "ef" * nbytes)
        first = await reap(store)
        assert [(x.id, x.attempts) for x in first] == [("1", 2), ("2", 2)]
        assert await reap(store) == first
        assert await complete1(store, req(id="1"), first[0].token, b"r")
        assert [x.id for x in await reap(store)] == ["2"]  # only what it still holds
    finally:
        await store.close()


@pytest.mark.parametrize("seed", range(8))
async def test_memory_and_redis_agree_on_random_sequences(
    seed: int, redis: Server, clock: FakeClock
) -> None:
    """Random claim/complete/release/retry/reap/expire sequences agree on both stores."""
    rng = random.Random(seed)
    mem = MemoryStateStore(clock=clock)
    red = await _redis_store(redis)
    keys = [("a", "1"), ("a", "2"), ("b", "1"), ("a:b", "1"), ("a", "b:1"), ("a", "3")]
    keys += [("c", "1"), ("c", "2")]
    handles: list[tuple[str, str, str, str]] = []  # app, id, memory token, redis token
    seen: set[ClaimOutcome] = set()
    taken: set[str] = set()
    weights = {"claim": 6, "complete": 2, "release": 1, "expire": 2, "retry": 2, "reap": 2}
    weights["due"] = 2
    try:
        for _ in range(120):
            op = rng.choices(list(weights), list(weights.values()))[0]
            if op == "claim":
                group = [
                    req(*rng.choice(keys), fp=rng.choice("xy")) for _ in range(rng.randint(1, 4))
                ]
                a = await mem.claim(group, lease_ms=5000, max_attempts=2)
                b = await red.claim(group, lease_ms=5000, max_attempts=2)
                seen.update(x.outcome for x in a)
                assert [(x.outcome, x.attempts, x.response) for x in a] == [
                    (x.outcome, x.attempts, x.response) for x in b
                ]
                handles += [
                    (r.app, r.id, x.token or "", y.token or "")
                    for r, x, y in zip(group, a, b, strict=True)
                    if x.token
                ]
            elif op in ("complete", "release", "retry") and handles:
                picked = rng.sample(handles, min(len(handles), rng.randint(1, 3)))
                if op == "complete":
                    body = rng.randbytes(8)
                    ra = await mem.complete(
                        [Completion(h[0], h[1], h[2], body) for h in picked], result_ttl_s=TTL
                    )
                    rb = await red.complete(
                        [Completion(h[0], h[1], h[3], body) for h in picked], result_ttl_s=TTL
                    )
                elif op == "release":
                    ra = await mem.release([Release(h[0], h[1], h[2]) for h in picked])
                    rb = await red.release([Release(h[0], h[1], h[3]) for h in picked])
                else:  # due at once (0) or not within the test (30 s)
                    delays = [rng.choice((0, 30_000)) for _ in picked]
                    ra = await mem.schedule_retry(
                        [
                            RetryLater(h[0], h[1], h[2], d)
                            for h, d in zip(picked, delays, strict=True)
                        ]
                    )
                    rb = await red.schedule_retry(
                        [
                            RetryLater(h[0], h[1], h[3], d)
                            for h, d in zip(picked, delays, strict=True)
                        ]
                    )
                assert ra == rb
            elif op in ("reap", "due"):
                take = "reap_expired" if op == "reap" else "due_retries"
                ga = await getattr(mem, take)(lease_ms=5000, max_attempts=2)
                gb = await getattr(red, take)(lease_ms=5000, max_attempts=2)
                # Sorted: after `expire` Redis scores are all 0, memory's keep their order.
                ga.sort(key=lambda x: (x.app, x.id))
                gb.sort(key=lambda x: (x.app, x.id))
                assert [(x.app, x.id, x.attempts, x.payload, x.exhausted) for x in ga] == [
                    (x.app, x.id, x.attempts, x.payload, x.exhausted) for x in gb
                ]
                handles += [(x.app, x.id, x.token, y.token) for x, y in zip(ga, gb, strict=True)]
                taken.update(f"{op}:exhausted" if x.exhausted else op for x in ga)
            elif op == "expire":  # every live lease and every waiting retry runs out
                clock.now += 100
                async for key in red.client.scan_iter(match=f"{red.prefix}req:*"):
                    if await red.client.hget(key, "state") == b"pending":
                        await red.client.hset(key, "lease_until", 0)
                for zset in (f"{red.prefix}leases", f"{red.prefix}retry"):
                    members: list[Any] = await red.client.zrange(zset, 0, -1)
                    zeroed: dict[bytes, float] = dict.fromkeys(members, 0)
                    if zeroed:
                        await red.client.zadd(zset, zeroed)
            assert await zcards(mem) == await zcards(red)
        assert {ClaimOutcome.NEW, ClaimOutcome.IN_PROGRESS, ClaimOutcome.DONE} <= seen
        assert taken  # some reap or due retry took records over
    finally:
        await red.close()


async def test_renewal_keeps_a_queued_request_from_being_taken_over(store: StateStore) -> None:
    """A lease renewed by its holder does not expire; a stale or parked one is not renewed."""
    [claimed] = await store.claim(
        [ClaimRequest("app", "slow", "fp", b"p")], lease_ms=60, max_attempts=3
    )
    assert claimed.token is not None
    await asyncio.sleep(0.04)
    assert await store.renew([Renewal("app", "slow", claimed.token)], lease_ms=60) == [True]
    await asyncio.sleep(0.04)  # past the first lease, inside the renewed one
    assert await store.renew([Renewal("app", "slow", claimed.token)], lease_ms=60) == [True]
    assert await store.reap_expired(lease_ms=60, max_attempts=3) == []
    assert await store.renew([Renewal("app", "slow", "not-the-token")], lease_ms=60) == [False]
    assert await store.renew([Renewal("app", "missing", claimed.token)], lease_ms=60) == [False]
    # Parked for retry: not renewed (the retry, not the lease, decides what happens next).
    assert await store.schedule_retry([RetryLater("app", "slow", claimed.token, 1000)]) == [True]
    assert await store.renew([Renewal("app", "slow", claimed.token)], lease_ms=60) == [False]
