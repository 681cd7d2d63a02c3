"""Error replies from a reachable Redis: `StateFailed`, never `StateUnavailable`.

An out-of-memory (`maxmemory` under `noeviction`), read-only (a replica) or script-less
server answers every call with an error that retrying at once will not fix; the store
raises `StateFailed` with the server's message, writes nothing, and works again as soon
as the server does. These tests reconfigure their server, so they get one of their own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from inference_worker.state import (
    ClaimOutcome,
    Completion,
    RedisStateStore,
    Renewal,
    StateFailed,
    StateUnavailable,
)
from tests.contract.state_support import LONG, TTL, claim1, complete1, nonce, redis_store, req
from tests.servers import Server, free_port, redis_server


@pytest.fixture(scope="module")
def own_redis() -> Iterator[Server]:
    with redis_server() as srv:
        yield srv


@pytest.fixture
async def store(own_redis: Server) -> AsyncIterator[RedisStateStore]:
    s = await redis_store(own_redis)
    yield s
    await s.close()


def _failed(err: pytest.ExceptionInfo[StateFailed], word: str) -> None:
    assert word in str(err.value) and not isinstance(err.value, StateUnavailable)


async def test_out_of_memory_fails_calls_and_recovers(store: RedisStateStore) -> None:
    held = await claim1(store, req(id="held"))
    c = store.client
    policy = str((await c.config_get("maxmemory-policy"))["maxmemory-policy"])
    await c.config_set("maxmemory-policy", "noeviction")
    await c.config_set("maxmemory", 1)
    try:
        with pytest.raises(StateFailed) as err:
            await claim1(store, req(id="new"))
        _failed(err, "OOM")
        with pytest.raises(StateFailed):
            await complete1(store, req(id="held"), held.token, b"r")
        with pytest.raises(StateFailed):
            await store.renew(
                [Renewal("app", "held", held.token or "")], lease_ms=LONG, max_lease_ms=LONG
            )
    finally:
        await c.config_set("maxmemory", 0)
        await c.config_set("maxmemory-policy", policy)
    # Nothing was written by the refused calls, and the store works again.
    fresh = await claim1(store, req(id="new"))
    assert (fresh.outcome, fresh.attempts) == (ClaimOutcome.NEW, 1)
    assert await complete1(store, req(id="held"), held.token, b"r")
    assert (await claim1(store, req(id="held"))).response == b"r"


async def test_read_only_replica_fails_calls_and_recovers(store: RedisStateStore) -> None:
    c = store.client
    await c.replicaof("127.0.0.1", free_port())  # a master that is not there
    try:
        with pytest.raises(StateFailed) as err:
            await claim1(store, req())
        _failed(err, "READONLY")
        with pytest.raises(StateFailed):
            await store.complete([Completion("app", "1", "t", b"r")], result_ttl_s=TTL)
    finally:
        await c.replicaof("NO", "ONE")
    assert (await claim1(store, req())).outcome is ClaimOutcome.NEW


async def test_noscript_after_a_failed_reload_fails_then_heals(
    store: RedisStateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = store.client
    await c.script_flush()

    async def load_nothing(script: str) -> str:  # a reload that did not take
        return "0" * 40

    monkeypatch.setattr(c, "script_load", load_nothing)
    with pytest.raises(StateFailed) as err:
        await store.claim([req()], nonce=nonce(), lease_ms=LONG, max_attempts=3)
    _failed(err, "NOSCRIPT")
    monkeypatch.undo()
    assert (await claim1(store, req())).outcome is ClaimOutcome.NEW
