"""The in-process twin and Redis agree: random sequences of every operation, replays and
renewals included, give the same answers on both. The memory store runs on a fake clock
that only `expire` moves; on Redis `expire` zeroes the lease fields and zset scores.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from inference_worker.state import (
    Abandon,
    ClaimOutcome,
    ClaimRequest,
    Completion,
    MemoryStateStore,
    Renewal,
    RetryLater,
)
from tests.contract import state_support
from tests.contract.state_support import TTL, FakeClock, redis_store, req, zcards
from tests.servers import Server

clock = state_support.clock

LEASE = 5000  # ms: never runs out by itself within a test; `expire` ends leases
Handle = tuple[str, str, str, str]  # app, id, memory token, redis token


@pytest.mark.parametrize("seed", range(8))
async def test_memory_and_redis_agree_on_random_sequences(
    seed: int, redis: Server, clock: FakeClock
) -> None:
    """Random claim/replay/complete/abandon/retry/renew/reap/expire sequences agree."""
    rng = random.Random(seed)
    mem = MemoryStateStore(clock=clock)
    red = await redis_store(redis)
    keys = [("a", "1"), ("a", "2"), ("b", "1"), ("a:b", "1"), ("a", "b:1"), ("a", "3")]
    keys += [("c", "1"), ("c", "2")]
    handles: list[Handle] = []
    groups: list[tuple[str, list[ClaimRequest]]] = []  # nonce, items: for replays
    seen: set[ClaimOutcome] = set()
    taken: set[str] = set()
    weights = {"claim": 6, "replay": 2, "complete": 2, "expire": 2, "retry": 2, "renew": 2}
    weights |= {"abandon": 1, "reap": 2, "due": 2}
    try:
        for step in range(120):
            op = rng.choices(list(weights), list(weights.values()))[0]
            if op == "replay" and not groups:
                op = "claim"
            if op in ("claim", "replay"):
                if op == "claim":
                    group = [
                        req(*rng.choice(keys), fp=rng.choice("xy"))
                        for _ in range(rng.randint(1, 4))
                    ]
                    n = f"s{seed}n{step}"
                    groups.append((n, group))
                else:
                    n, group = rng.choice(groups)
                a = await mem.claim(group, nonce=n, lease_ms=LEASE, max_attempts=2)
                b = await red.claim(group, nonce=n, lease_ms=LEASE, max_attempts=2)
                seen.update(x.outcome for x in a)
                assert a == b  # tokens too: both derive them from the nonce
                handles += [
                    (r.app, r.id, x.token, x.token)
                    for r, x in zip(group, a, strict=True)
                    if x.token
                ]
            elif op in ("complete", "retry", "renew", "abandon") and handles:
                picked = rng.sample(handles, min(len(handles), rng.randint(1, 3)))
                ra, rb = await _group_op(op, rng, mem, red, picked)
                assert ra == rb
            elif op in ("reap", "due"):
                take = "reap_expired" if op == "reap" else "due_retries"
                ga = await getattr(mem, take)(lease_ms=LEASE, max_attempts=2)
                gb = await getattr(red, take)(lease_ms=LEASE, max_attempts=2)
                # Sorted: after `expire` Redis scores are all 0, memory's keep their order.
                ga.sort(key=lambda x: (x.app, x.id))
                gb.sort(key=lambda x: (x.app, x.id))
                assert [(x.app, x.id, x.attempts, x.source, x.exhausted) for x in ga] == [
                    (x.app, x.id, x.attempts, x.source, x.exhausted) for x in gb
                ]
                handles += [(x.app, x.id, x.token, y.token) for x, y in zip(ga, gb, strict=True)]
                taken.update(f"{op}:exhausted" if x.exhausted else op for x in ga)
            elif op == "expire":
                await _expire(red, clock)
            assert await zcards(mem) == await zcards(red)
        assert {ClaimOutcome.NEW, ClaimOutcome.IN_PROGRESS, ClaimOutcome.DONE} <= seen
        assert taken  # some reap or due retry took records over
    finally:
        await red.close()


async def _group_op(
    op: str, rng: random.Random, mem: Any, red: Any, picked: list[Handle]
) -> tuple[list[bool], list[bool]]:
    if op == "complete":
        body = rng.randbytes(8)
        return (
            await mem.complete([Completion(*h[:3], body) for h in picked], result_ttl_s=TTL),
            await red.complete(
                [Completion(h[0], h[1], h[3], body) for h in picked], result_ttl_s=TTL
            ),
        )
    if op == "abandon":
        return (
            await mem.abandon([Abandon(*h[:3]) for h in picked]),
            await red.abandon([Abandon(h[0], h[1], h[3]) for h in picked]),
        )
    if op == "renew":
        return (
            await mem.renew([Renewal(*h[:3]) for h in picked], lease_ms=LEASE, max_lease_ms=LEASE),
            await red.renew(
                [Renewal(h[0], h[1], h[3]) for h in picked], lease_ms=LEASE, max_lease_ms=LEASE
            ),
        )
    delays = [rng.choice((0, 30_000)) for _ in picked]  # due at once, or not in the test
    return (
        await mem.schedule_retry(
            [RetryLater(*h[:3], d) for h, d in zip(picked, delays, strict=True)]
        ),
        await red.schedule_retry(
            [RetryLater(h[0], h[1], h[3], d) for h, d in zip(picked, delays, strict=True)]
        ),
    )


async def _expire(red: Any, clock: FakeClock) -> None:
    """Every live lease, waiting retry and lease maximum runs out, on both stores."""
    clock.now += 100
    async for key in red.client.scan_iter(match=f"{red.prefix}req:*"):
        if await red.client.hget(key, "state") == b"pending":
            await red.client.hset(key, mapping={"lease_until": 0, "taken_at": 0})
    for zset in (f"{red.prefix}leases", f"{red.prefix}retry"):
        members: list[Any] = await red.client.zrange(zset, 0, -1)
        zeroed: dict[bytes, float] = dict.fromkeys(members, 0)
        if zeroed:
            await red.client.zadd(zset, zeroed)
