"""EVALSHA on a kept connection, without redis-py's per-command and pool machinery.

The request path makes two script calls per group or batch (claim, complete). Through
`Script.__call__` each one also runs redis-py's command wrapper: argument re-tupling,
its own retry loop, the observability hooks and their timing, the pool's lookups — about
as much client CPU as sending and reading the call itself (py-spy on the worker, see
benchmarks/RESULTS.md). Here a call takes a connection (`DirectScripts` keeps a few
between calls), sends, reads, and keeps it again; everything else stays the caller's
(RedisStateStore maps errors; StateCalls retries outages with backoff, every call being
replay-safe).

A connection is closed (and handed back to the pool closed, so that the pool does not
count it in use), not kept, when a call on it ends other than with a complete reply (a
connection error, a timeout, a cancellation): a reply left half read would be read by
the next call. An error reply (`ResponseError`) is a complete reply.
A connection error is tried once more on a fresh connection before it is raised, as
redis-py's own retry would: a pooled connection that died while idle (Redis restarted)
is not an outage (a connect that fails is not retried here: the pool already tried it).
Every script is replay-safe, so a call whose reply was lost may run twice.
NOSCRIPT (Redis restarted, failed over, SCRIPT FLUSH) loads the script and calls once
more, as `Script.__call__` does. Only for a single Redis; a cluster keeps redis-py's
client, which routes each call to its slot's node.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

IDLE_MAX = 8  # connections kept between calls; more concurrent calls borrow from the pool


class DirectScripts:
    """EVALSHA for one client, with a small stack of its own idle connections.

    Borrowing from redis-py's pool costs more than the call's own Python: a lock both
    ways, a readiness probe (a `recv` on the socket), observability counters and an
    event dispatch per borrow and per return (py-spy at part load: ~5 % of the worker).
    So a call takes a connection this object kept from an earlier call and keeps it
    again after a complete reply; only when none is idle does it borrow from the pool.
    The kept ones stay "in use" for the pool, which closes them with the client.
    """

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._idle: list[Any] = []

    async def evalsha(self, script: AsyncScript, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """The script's reply; raises what redis-py raises for the same call."""
        try:
            return await self._call(script.sha, keys, args)
        except NoScriptError:
            script.sha = await self._client.script_load(script.script)
            return await self._call(script.sha, keys, args)

    async def _call(self, sha: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        pool = self._client.connection_pool
        for attempt in (1, 2):
            # A kept connection first; the retry always a fresh one from the pool (the
            # kept ones may all have died with a restarted Redis).
            kept = attempt == 1 and bool(self._idle)
            if kept:
                conn = self._idle.pop()
            else:
                conn = await pool.get_connection()  # type: ignore[no-untyped-call]
            try:
                await conn.send_command("EVALSHA", sha, len(keys), *keys, *args)
                reply = await conn.read_response()
            except ResponseError:
                await self._keep(conn, pool)  # the whole reply was read: the connection is good
                raise
            except (RedisConnectionError, RedisTimeoutError):
                await _drop(conn, pool)
                if attempt == 2:
                    raise
            except BaseException:
                await _drop(conn, pool)
                raise
            else:
                await self._keep(conn, pool)
                return reply
        raise AssertionError("unreachable")

    async def _keep(self, conn: Any, pool: Any) -> None:
        if len(self._idle) < IDLE_MAX:
            self._idle.append(conn)
        else:
            await pool.release(conn)


async def _drop(conn: Any, pool: Any) -> None:
    """Close without waiting on the peer, then hand it back to the pool (which counts it
    in use until then); a failure to close must not hide the error."""
    try:
        with contextlib.suppress(Exception):
            await conn.disconnect(nowait=True)
    finally:  # also when cancelled meanwhile: the pool must not count it in use for ever
        with contextlib.suppress(Exception):
            await pool.release(conn)
