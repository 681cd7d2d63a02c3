"""One contract suite for every `StateStore` backend (design sections 2 and 6): claims,
completions, fencing, exhaustion, keys. Recovery, replays, lease bounds, server errors
and the memory/Redis differential run live in the sibling test_state_*.py modules; the
fixtures and their rules (fake clock, real Redis, no timing assertions) are in
state_support.py.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection

from inference_worker.state import (
    Abandon,
    ClaimOutcome,
    ClaimRequest,
    ClaimResult,
    Completion,
    MemoryStateStore,
    NullStateStore,
    RedisStateStore,
    StateStore,
    member,
    open_state,
    parse_member,
)
from inference_worker.state.base import StateUnavailable
from tests.contract import state_support
from tests.contract.state_support import (
    LONG,
    TTL,
    Advance,
    claim1,
    complete1,
    entry,
    nonce,
    redis_store,
    req,
    zcards,
)
from tests.servers import Server, free_port

clock = state_support.clock
store = state_support.store
advance = state_support.advance


async def test_new_then_done_returns_identical_bytes(store: StateStore) -> None:
    r = req()
    first = await claim1(store, r)
    assert first.outcome is ClaimOutcome.NEW and first.token and first.attempts == 1
    body = bytes(range(256)) * 3
    assert await complete1(store, r, first.token, body)
    again = await claim1(store, req(payload=b"same fp, other bytes"))
    assert again == ClaimResult(ClaimOutcome.DONE, response=body, attempts=1)


async def test_tokens_are_the_nonce_and_the_items_place(store: StateStore) -> None:
    res = await store.claim(
        [req(id="a"), req(id="b"), req(id="a")], nonce="n1", lease_ms=LONG, max_attempts=3
    )
    assert [(x.outcome, x.token) for x in res] == [
        (ClaimOutcome.NEW, "n1:0"),
        (ClaimOutcome.NEW, "n1:1"),
        (ClaimOutcome.IN_PROGRESS, None),
    ]
    with pytest.raises(ValueError):
        await store.claim([req()], nonce="", lease_ms=LONG, max_attempts=3)


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
    res = await store.claim(
        [req(), req(), req(fp="other")], nonce=nonce(), lease_ms=LONG, max_attempts=3
    )
    assert [x.outcome for x in res] == [
        ClaimOutcome.NEW,
        ClaimOutcome.IN_PROGRESS,
        ClaimOutcome.CONFLICT,
    ]
    assert await complete1(store, req(), res[0].token, b"r")
    res = await store.claim([req(), req()], nonce=nonce(), lease_ms=LONG, max_attempts=3)
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
    res = await store.claim(reqs, nonce=nonce(), lease_ms=LONG, max_attempts=3)
    assert all(x.outcome is ClaimOutcome.NEW for x in res)
    oks = await store.complete(
        [
            Completion(r.app, r.id, x.token or "", f"{r.app}|{r.id}".encode())
            for r, x in zip(reqs, res, strict=True)
        ],
        result_ttl_s=TTL,
    )
    assert all(oks)
    res = await store.claim(reqs, nonce=nonce(), lease_ms=LONG, max_attempts=3)
    assert [x.response for x in res] == [f"{a}|{i}".encode() for a, i in pairs]


def test_member_encoding_round_trips() -> None:
    for app, id in [("a:b", "c"), ("a", "b:c"), ("日本", "é:ß"), ("", "")]:
        assert parse_member(member(app, id)) == (app, id)
        assert parse_member(member(app, id).encode()) == (app, id)
    assert member("a:b", "c") != member("a", "b:c")
    with pytest.raises(ValueError):
        parse_member("5:ab:c")


async def test_abandon_forgets_the_record_so_a_resend_is_new(store: StateStore) -> None:
    first = await claim1(store, req())
    assert await store.abandon([Abandon("app", "1", "wrong")]) == [False]
    assert await store.abandon([Abandon("app", "1", first.token or "")]) == [True]
    assert await store.abandon([Abandon("app", "1", first.token or "")]) == [False]
    assert await zcards(store) == (0, 0)
    again = await claim1(store, req(fp="fp2"))  # gone entirely: even a new fingerprint
    assert (again.outcome, again.attempts) == (ClaimOutcome.NEW, 1)
    assert await complete1(store, req(), again.token, b"r")
    assert await store.abandon([Abandon("app", "1", again.token or "")]) == [False]
    assert (await claim1(store, req(fp="fp2"))).outcome is ClaimOutcome.DONE
    assert await store.abandon([]) == []


async def test_response_ttl_expiry_makes_it_new_again(store: StateStore, advance: Advance) -> None:
    first = await claim1(store, req())
    [ok] = await store.complete([Completion("app", "1", first.token or "", b"r")], result_ttl_s=1)
    assert ok
    await advance(1.2)
    again = await claim1(store, req(fp="fp2"))
    assert (again.outcome, again.attempts) == (ClaimOutcome.NEW, 1)


async def test_redis_journals_the_request_as_fields_not_rewrapped(redis: Server) -> None:
    """The raw payload is its own hash field, byte for byte, with the transport's reply
    topic and correlation beside it (absent when the request had none)."""
    store = await redis_store(redis)
    try:
        payload = b"\x00\xff raw request bytes" * 10
        full = ClaimRequest("app", "full", "fp", entry(payload, "t/a", "reply/x", b"\x00c"))
        bare = ClaimRequest("app", "bare", "fp", entry(b"", "t/b"))
        await store.claim([full, bare], nonce=nonce(), lease_ms=LONG, max_attempts=3)
        c = store.client
        got = await c.hmget(store.req_key("app", "full"), "payload", "topic", "reply_to", "corr")
        assert got == [payload, b"t/a", b"reply/x", b"\x00c"]
        got = await c.hmget(store.req_key("app", "bare"), "payload", "topic", "reply_to", "corr")
        assert got == [b"", b"t/b", None, None]
    finally:
        await store.close()


_HANDSHAKE = {"HELLO", "AUTH", "CLIENT", "SELECT", "PING", "READONLY"}


async def test_group_of_500_in_one_round_trip(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    reqs = [req("bulk", str(i), payload=bytes([i % 256]) * 100) for i in range(500)]
    sent: list[object] = []
    before = await _evalsha_calls(store)
    if isinstance(store, RedisStateStore):  # count what the client sends, too
        # A cluster's calls go through the client's execute_command; a single Redis's
        # script calls bypass it (state/direct.py) and are counted at the connection.
        cluster = isinstance(store.client, RedisCluster)
        owner: Any = store.client if cluster else AbstractConnection
        name = "execute_command" if cluster else "send_command"
        inner: Callable[..., Awaitable[Any]] = getattr(owner, name)

        async def counting(*args: Any, **kwargs: Any) -> Any:
            command = args[0] if cluster else args[1]  # (self, command, ...) on the class
            if str(command).upper() not in _HANDSHAKE:  # a new connection's own setup
                sent.append(command)
            return await inner(*args, **kwargs)

        monkeypatch.setattr(owner, name, counting)
    res = await store.claim(reqs, nonce=nonce(), lease_ms=LONG, max_attempts=3)
    if isinstance(store, RedisStateStore):
        monkeypatch.undo()
        # One per shard the group touches: one on a single Redis, every shard on a cluster.
        shards = len(store.layout.group([member(r.app, r.id) for r in reqs]))
        assert shards == len(store.layout.shards)
        assert sent == ["EVALSHA"] * shards
        assert await _evalsha_calls(store) == before + shards  # the servers saw as many
    assert all(x.outcome is ClaimOutcome.NEW for x in res)
    comps = [
        Completion(r.app, r.id, x.token or "", r.id.encode())
        for r, x in zip(reqs, res, strict=True)
    ]
    assert all(await store.complete(comps, result_ttl_s=TTL))
    res = await store.claim(reqs, nonce=nonce(), lease_ms=LONG, max_attempts=3)
    assert [x.response for x in res] == [str(i).encode() for i in range(500)]


async def _evalsha_calls(store: StateStore) -> int:
    if not isinstance(store, RedisStateStore):
        return 0
    if isinstance(store.client, RedisCluster):  # summed over the primaries
        per_node = await store.client.info("commandstats", target_nodes=RedisCluster.PRIMARIES)
        infos: list[dict[str, Any]] = list(per_node.values())
    else:
        infos = [await store.client.info("commandstats")]
    return sum(int(i.get("cmdstat_evalsha", {}).get("calls", 0)) for i in infos)


async def test_empty_groups_and_bad_arguments(store: StateStore) -> None:
    assert await store.claim([], nonce="n", lease_ms=1, max_attempts=1) == []
    assert await store.complete([], result_ttl_s=1) == []
    assert await store.renew([], lease_ms=1, max_lease_ms=1) == []
    with pytest.raises(ValueError):
        await store.claim([req()], nonce="n", lease_ms=0, max_attempts=1)
    with pytest.raises(ValueError):
        await store.complete([], result_ttl_s=0)
    with pytest.raises(ValueError):
        await store.renew([], lease_ms=100, max_lease_ms=99)
    assert await store.ping()


async def test_null_store_follows_the_token_contract() -> None:
    null = NullStateStore()
    res = await null.claim([req(), req()], nonce="n", lease_ms=LONG, max_attempts=3)
    assert res == [ClaimResult(ClaimOutcome.NEW, token=f"n:{i}", attempts=3) for i in (0, 1)]
    assert not hasattr(null, "release")


async def test_redis_restart_reconnects_and_reloads_scripts(redis: Server) -> None:
    store = await redis_store(redis)
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


async def test_script_calls_keep_their_connection_and_survive_it_being_killed(
    redis: Server,
) -> None:
    """state/direct.py: a call keeps its connection for the next one (no pool borrow,
    no new connection), and a kept connection that the server closed is replaced by a
    fresh one within the same call."""
    store = await redis_store(redis)
    try:
        assert (await claim1(store, req("warm"))).outcome is ClaimOutcome.NEW
        opened = int((await store.client.info("stats"))["total_connections_received"])
        for i in range(20):
            assert (await claim1(store, req(f"seq{i}"))).outcome is ClaimOutcome.NEW
        after = int((await store.client.info("stats"))["total_connections_received"])
        assert after == opened, "sequential script calls opened new connections"
        await store.client.client_kill_filter(_type="normal", skipme=True)
        assert (await claim1(store, req("after-kill"))).outcome is ClaimOutcome.NEW
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
