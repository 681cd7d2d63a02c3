"""Running the state scripts: one call per shard the items touch, replies in order.

Every call maps redis-py's errors to the store's (`ErrorText`: an outage raises
`StateUnavailable`, any other error reply `StateFailed`). On a single Redis a call goes
out through `direct.DirectScripts` (kept connections, no per-command wrapper); on a
cluster through redis-py's cluster client, which routes it to its slot's node. The
request-path scripts (claim, complete) carry their items as one msgpack argument
(`packed`) and answer with one value (`unpack_rows`; a completion's flags are one
string): Redis's Lua reads and writes msgpack in C (cmsgpack), where hundreds of separate
arguments and nested replies cost the worker ~10 us of Python per item. A call that
returns checks that its task was not cancelled meanwhile (`cancelling`: redis-py can
swallow a cancel while it reads a reply).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import msgpack
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript

from inference_worker.cancelling import raise_if_cancelled
from inference_worker.state.base import StateUnavailable
from inference_worker.state.direct import DirectScripts
from inference_worker.state.errors import ErrorText
from inference_worker.state.layout import KeyLayout, Shard

Call = tuple[list[str], list[Any]]  # one script call's keys and args


def packed(items: list[list[Any]]) -> bytes:
    """A script's items as one argument: msgpack without the bin type, which Redis's
    cmsgpack does not read (its strings are byte strings either way)."""
    packed: bytes = msgpack.packb(items, use_bin_type=False)
    return packed


def optional(value: str | bytes | None) -> bytes:
    """claim.lua's encoding of an optional field: b"" for None, else b"=" + the value."""
    if value is None:
        return b""
    return b"=" + (value.encode() if isinstance(value, str) else value)


def unpack_rows(reply: bytes) -> list[Any]:
    rows: list[Any] = msgpack.unpackb(reply, raw=True)
    return rows


class ScriptCalls:
    """The store's script calls, bound to its client once it has started."""

    def __init__(self, layout: KeyLayout, errors: ErrorText) -> None:
        self.layout = layout
        self._errors = errors
        self._client: aioredis.Redis | RedisCluster | None = None
        self._direct: DirectScripts | None = None  # a single Redis's calls
        self._scripts: dict[str, AsyncScript] = {}

    def bind(self, client: aioredis.Redis | RedisCluster, scripts: dict[str, AsyncScript]) -> None:
        self._client, self._scripts = client, scripts
        self._direct = None if isinstance(client, RedisCluster) else DirectScripts(client)

    def unbind(self) -> None:
        self._client, self._direct, self._scripts = None, None, {}

    async def run(
        self,
        name: str,
        keys: list[str],
        args: list[Any],
        unpack: Callable[[Any], Sequence[Any]] = list,
    ) -> Sequence[Any]:
        client = self._client
        if client is None:
            raise RuntimeError("RedisStateStore used before start()")
        script = self._scripts[name]
        try:
            if self._direct is None:
                result = await script(keys=keys, args=args)
            else:
                result = await self._direct.evalsha(script, keys, args)
        except Exception as exc:
            error = self._errors.in_call(exc)
            if error is None:
                raise
            raise error from exc if type(error) is StateUnavailable else None
        raise_if_cancelled()  # redis-py may have swallowed this task's cancel
        return unpack(result)

    async def run_each(
        self,
        name: str,
        calls: Sequence[Call],
        unpack: Callable[[Any], Sequence[Any]] = list,
    ) -> list[Sequence[Any]]:
        """One call per shard, concurrently; all answered, or the first error raised."""
        if len(calls) == 1:
            return [await self.run(name, *calls[0], unpack)]
        results = await asyncio.gather(
            *(self.run(name, keys, args, unpack) for keys, args in calls),
            return_exceptions=True,
        )
        out: list[Sequence[Any]] = []
        for result in results:
            if isinstance(result, BaseException):
                raise result
            out.append(result)
        return out

    async def grouped(
        self,
        name: str,
        members: Sequence[str],
        build: Callable[[Shard, list[int]], Call],
        *,
        unpack: Callable[[Any], Sequence[Any]] = list,
    ) -> list[Any]:
        """Run `name` once per shard of `members` (`build` makes each call from the
        shard and its items' positions); one answer per member, in the members' order
        (`unpack` turns one call's reply into its answers)."""
        groups = self.layout.group(members)
        calls = [build(shard, idx) for shard, idx in groups]
        answers = await self.run_each(name, calls, unpack)
        out: list[Any] = [None] * len(members)
        for (_, idx), rows in zip(groups, answers, strict=True):
            for i, row in zip(idx, rows, strict=True):
                out[i] = row
        return out
