"""Fixtures and helpers shared by the `StateStore` contract suites (test_state*.py).

Each test runs against the in-process twin, a real redis-server and a real Redis Cluster
(3 primaries, 3 replicas; the store shards its keys over it). Time: the memory
store reads a fake clock that `advance` moves; for Redis `advance` really sleeps, so the
tests only wait where an expiry must be observed, with short leases, and assert outcomes,
never timings. Every Redis store gets its own random key prefix. A test module binds the
fixtures it uses by assignment (`store = state_support.store`), which pytest registers.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from inference_worker.journal import JournalEntry
from inference_worker.state import (
    ClaimRequest,
    ClaimResult,
    Completion,
    MemoryStateStore,
    RedisStateStore,
    StateStore,
)
from tests.servers import ClusterServer, Server

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


async def redis_store(server: Server | ClusterServer) -> RedisStateStore:
    store = RedisStateStore(server.url, prefix=f"t{uuid.uuid4().hex}:")
    await store.start()
    return store


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
async def store(request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[StateStore]:
    s: StateStore
    if request.param == "memory":
        s = MemoryStateStore(clock=clock)
        await s.start()
    elif request.param == "redis-cluster":
        s = await redis_store(request.getfixturevalue("redis_cluster"))
    else:
        s = await redis_store(request.getfixturevalue("redis"))
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


def entry(
    payload: bytes = b"p",
    topic: str = "request_message/app",
    reply_to: str | None = None,
    correlation: bytes | None = None,
) -> JournalEntry:
    return JournalEntry(payload, topic, reply_to, correlation)


def req(app: str = "app", id: str = "1", fp: str = "fp1", payload: bytes = b"p") -> ClaimRequest:
    return ClaimRequest(app=app, id=id, fingerprint=fp, source=entry(payload))


def nonce() -> str:
    """A fresh nonce: what the caller mints for each new claim group."""
    return uuid.uuid4().hex


async def claim1(
    store: StateStore,
    r: ClaimRequest,
    lease_ms: int = LONG,
    max_attempts: int = 3,
    *,
    nonce_: str | None = None,
) -> ClaimResult:
    [res] = await store.claim(
        [r], nonce=nonce_ or nonce(), lease_ms=lease_ms, max_attempts=max_attempts
    )
    return res


async def complete1(store: StateStore, r: ClaimRequest, token: str | None, body: bytes) -> bool:
    assert token is not None
    [ok] = await store.complete([Completion(r.app, r.id, token, body)], result_ttl_s=TTL)
    return ok


async def zcards(store: StateStore) -> tuple[int, int]:
    """(leases, retry) zset sizes, read straight from the backend."""
    if isinstance(store, MemoryStateStore):
        return len(store._leases), len(store._retry)
    assert isinstance(store, RedisStateStore)
    c = store.client
    leases = retry = 0
    for shard in store.layout.shards:  # one on a single Redis
        leases += await c.zcard(shard.leases)
        retry += await c.zcard(shard.retry)
    return leases, retry
