"""Replayed claims (a caller's retry after a lost reply) in the `StateStore` contract.

A claim call repeated with the same nonce gets the same answers: an item whose record is
pending under the very token the call gives it comes back NEW (or EXHAUSTED) with that
token and the same attempt count, never IN_PROGRESS against itself, and no attempt is
counted twice. Fixtures and rules: state_support.py.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError

from inference_worker.state import (
    ClaimOutcome,
    ClaimResult,
    StateStore,
    StateUnavailable,
)
from tests.contract import state_support
from tests.contract.state_support import (
    LONG,
    Advance,
    claim1,
    complete1,
    nonce,
    redis_store,
    req,
)
from tests.servers import Server

clock = state_support.clock
store = state_support.store
advance = state_support.advance


async def test_claim_replayed_with_its_nonce_answers_the_same(store: StateStore) -> None:
    r = req(id="done")
    first = await claim1(store, r)
    assert await complete1(store, r, first.token, b"cached")
    group = [req(id="a"), req(id="b"), req(id="a"), req(id="b", fp="other"), req(id="done")]
    n = nonce()
    first_run = await store.claim(group, nonce=n, lease_ms=LONG, max_attempts=3)
    replay = await store.claim(group, nonce=n, lease_ms=LONG, max_attempts=3)
    assert (
        replay
        == first_run
        == [
            ClaimResult(ClaimOutcome.NEW, token=f"{n}:0", attempts=1),
            ClaimResult(ClaimOutcome.NEW, token=f"{n}:1", attempts=1),
            ClaimResult(ClaimOutcome.IN_PROGRESS, attempts=1),
            ClaimResult(ClaimOutcome.CONFLICT, attempts=1),
            ClaimResult(ClaimOutcome.DONE, response=b"cached", attempts=1),
        ]
    )
    # Another call (another nonce) is not a replay: the lease is someone else's.
    assert (await claim1(store, req(id="a"))).outcome is ClaimOutcome.IN_PROGRESS


async def test_replay_with_one_attempt_allowed_is_still_new(store: StateStore) -> None:
    n = nonce()
    first = await claim1(store, req(), max_attempts=1, nonce_=n)
    replay = await claim1(store, req(), max_attempts=1, nonce_=n)
    assert replay == first == ClaimResult(ClaimOutcome.NEW, token=f"{n}:0", attempts=1)
    assert await complete1(store, req(), replay.token, b"r")
    assert (await claim1(store, req(), max_attempts=1)).response == b"r"


async def test_replay_counts_no_second_attempt(store: StateStore, advance: Advance) -> None:
    n = nonce()
    await claim1(store, req(), lease_ms=50, nonce_=n)
    again = await claim1(store, req(), lease_ms=50, nonce_=n)
    assert (again.outcome, again.attempts) == (ClaimOutcome.NEW, 1)
    await advance(0.1)  # the holder died: the next claim is the second attempt
    second = await claim1(store, req())
    assert (second.outcome, second.attempts) == (ClaimOutcome.NEW, 2)


async def test_exhausted_claim_replayed_is_exhausted_again(
    store: StateStore, advance: Advance
) -> None:
    await claim1(store, req(), lease_ms=50, max_attempts=1)
    await advance(0.1)
    n = nonce()
    ex = await claim1(store, req(), max_attempts=1, nonce_=n)
    assert ex == ClaimResult(ClaimOutcome.EXHAUSTED, token=f"{n}:0", attempts=1)
    assert await claim1(store, req(), max_attempts=1, nonce_=n) == ex


async def test_lost_reply_then_retry_is_not_dropped(
    redis: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server ran the claim but the reply was lost: the caller's retry with the same
    nonce gets its own lease back instead of IN_PROGRESS (which would drop the request)."""
    store = await redis_store(redis)
    try:
        # At the connection: the store's script calls do not go through execute_command
        # (state/direct.py). Every reply is lost until undo, the call's own retry too.
        inner: Callable[..., Awaitable[Any]] = AbstractConnection.read_response

        async def lose_reply(*args: Any, **kwargs: Any) -> Any:
            await inner(*args, **kwargs)
            raise RedisConnectionError("connection reset after the script ran")

        monkeypatch.setattr(AbstractConnection, "read_response", lose_reply)
        n = nonce()
        with pytest.raises(StateUnavailable):
            await claim1(store, req(), max_attempts=1, nonce_=n)
        monkeypatch.undo()
        retried = await claim1(store, req(), max_attempts=1, nonce_=n)
        assert retried == ClaimResult(ClaimOutcome.NEW, token=f"{n}:0", attempts=1)
    finally:
        await store.close()
