"""EVALSHA on one pooled connection, without redis-py's per-command machinery.

The request path makes two script calls per group or batch (claim, complete). Through
`Script.__call__` each one also runs redis-py's command wrapper: argument re-tupling,
its own retry loop, the observability hooks and their timing, the pool's lookups — about
as much client CPU as sending and reading the call itself (py-spy on the worker, see
benchmarks/RESULTS.md). Here a call borrows a connection, sends, reads, and gives it
back; everything else stays the caller's (RedisStateStore maps errors; StateCalls
retries outages with backoff, every call being replay-safe).

A connection is closed, not pooled again, when a call on it ends other than with a
complete reply (a connection error, a timeout, a cancellation): a reply left half read
would be read by the next call. An error reply (`ResponseError`) is a complete reply.
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


async def evalsha(
    client: aioredis.Redis, script: AsyncScript, keys: Sequence[str], args: Sequence[Any]
) -> Any:
    """The script's reply; raises what redis-py raises for the same call."""
    try:
        return await _call(client, script.sha, keys, args)
    except NoScriptError:
        script.sha = await client.script_load(script.script)
        return await _call(client, script.sha, keys, args)


async def _call(client: aioredis.Redis, sha: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
    pool = client.connection_pool
    for attempt in (1, 2):
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await conn.send_command("EVALSHA", sha, len(keys), *keys, *args)
            return await conn.read_response()
        except ResponseError:
            raise  # the whole reply was read: the connection stays good
        except (RedisConnectionError, RedisTimeoutError):
            await _drop(conn)
            if attempt == 2:
                raise
        except BaseException:
            await _drop(conn)
            raise
        finally:
            await pool.release(conn)
    raise AssertionError("unreachable")


async def _drop(conn: Any) -> None:
    """Close without waiting on the peer; a failure to close must not hide the error."""
    with contextlib.suppress(Exception):
        await conn.disconnect(nowait=True)
