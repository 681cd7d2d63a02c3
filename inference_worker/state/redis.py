"""Redis-backed idempotency ledger (design sections 2 steps 3/4/7, 6 and 11), on one
Redis or on a Redis Cluster.

Every group operation is ONE `EVALSHA` of a Lua script shipped next to this module (its
body after the shared `preamble.lua`, composed by scripts.py) per shard the group
touches, so a batch of N requests costs one round trip on a single Redis (one shard), and
each item is decided atomically against every other worker. The scripts read `TIME` on
the server, so lease deadlines do not depend on worker clocks. The two calls on the
request path (claim, complete) carry their items' fields as one msgpack argument and
answer with one value (scriptcalls.py runs the calls).

Key layout (layout.py): shard base `b` is the prefix (`iw:`) on a single Redis, and
`{prefix}{{tag}}:` for each of the shards of a cluster; with `m = member(app, id)`:

- `{b}req:{m}`  hash   — state, fp, token, lease_until (ms), attempts, and the journal:
  payload (the raw request bytes), topic, reply_to and corr (when the request had them)
- `{b}resp:{m}` string — response bytes, TTL `result_ttl_s` (the done req hash shares it)
- `{b}leases`   zset   — member `m`, score = lease deadline ms (read by the reaper)
- `{b}retry`    zset   — member `m`, score = next-attempt time ms (`schedule_retry`)
- `{b}takeover:{nonce}` list — members one reap/retry call took (TTL lease_ms), so a
  replayed call answers the same records (see takeover.lua)

The req hash also keeps `lease_ms` (length of the current lease: a parked retry stays
leased until its retry time + that), `taken_at` (ms, when the current token took the
lease: renewals stop `max_lease_ms` after it) and `exhausted` (the current lease was
handed out only to close the record). The scripts derive each zset member from its req
key, so a member travels once per item. `member(app, id)` (keys.py) encodes apps and ids
that contain `:` unambiguously.

Cluster. Every script call names keys of one shard, hence one slot. A group spanning
shards is one call per shard, run concurrently and joined in the group's order; claim
tokens still name the item's place in the whole group (claim.lua takes it per item). When
one shard's call fails the group raises (the caller repeats it: the shards that did
answer replay). A sweep (`reap_expired`, `due_retries`) peeks at every shard first (sweep.py),
so it still takes at most `limit` records, oldest first.

Security (connect.py: TLS, ACL user). brokers/redis/users.acl.example lists the commands
the store needs (Redis checks the commands run inside scripts too). `start()` probes them
(PING, CLIENT SETNAME, SCRIPT LOAD, an empty EVALSHA on the prefix's keys), so refused
credentials or a missing permission fail there with `StateAccessDenied` naming the user
and the URL (never the password).

Errors. An outage (connect.py: connection refused/reset/timeout, LOADING, BUSY, TRYAGAIN,
MASTERDOWN, a cluster failover) raises `StateUnavailable`, which the caller retries; any
other error reply (OOM, MISCONF, READONLY, NOSCRIPT after the reload failed, a script
error) raises `StateFailed` with the server's message. The `#!lua` shebang of the preamble
has Redis refuse a script under OOM/MISCONF/READONLY before it runs, never half way.

Durability is that of the Redis deployment (AOF `everysec`: up to ~1 s of claims can be
lost on a crash; a cluster failover loses what the replica had not received yet, see
docs/reliability.md). Scripts are not persisted by Redis; after a restart, a failover or
SCRIPT FLUSH the `Script` object sees NOSCRIPT and reloads transparently.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from inference_worker.security import TlsOptions, redact_url, redis_kwargs
from inference_worker.state import sweep
from inference_worker.state.base import (
    Abandon,
    ClaimOutcome,
    ClaimRequest,
    ClaimResult,
    Completion,
    Reclaimed,
    Renewal,
    RetryLater,
    StateUnavailable,
)
from inference_worker.state.connect import (
    OUTAGE,
    check_cluster,
    is_cluster_url,
    open_client,
)
from inference_worker.state.errors import ErrorText
from inference_worker.state.keys import (
    check_claim_args,
    check_delay,
    check_nonce,
    check_renew_args,
    check_takeover_args,
    check_ttl,
    claim_token,
    member,
    new_token,
    parse_member,
)
from inference_worker.state.layout import KeyLayout, Shard
from inference_worker.state.scriptcalls import (
    Call,
    ScriptCalls,
    optional,
    packed,
    unpack_rows,
)
from inference_worker.state.scripts import SCRIPTS, script_source

__all__ = ["RedisStateStore", "member", "parse_member", "redact_url"]

_PROBE_ERRORS: tuple[type[BaseException], ...] = (RedisError, RuntimeError, *OUTAGE)


class RedisStateStore:
    """`StateStore` over one pooled `redis.asyncio` client (bytes responses): a `Redis`,
    or a `RedisCluster` for `redis+cluster://` / `rediss+cluster://` URLs."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "iw:",
        username: str | None = None,
        password: str | None = None,
        tls: TlsOptions | None = None,
    ) -> None:
        # Checks the URL and the TLS options against the scheme now.
        if is_cluster_url(url):
            cluster = check_cluster(url, tls)
            url_user = cluster.username
            self.layout = KeyLayout.sharded(prefix, cluster.shards)
        else:
            parts = urlsplit(url)
            url_user = parts.username and unquote(parts.username)
            self.layout = KeyLayout.plain(prefix)
            redis_kwargs(url, username=username, password=password, tls=tls)
        self._url = url
        self._username, self._password, self._tls = username, password, tls
        # Who we log in as, for error messages ("default" is Redis's user without a name).
        self.user = username or url_user or "default"
        self._prefix = prefix
        self._errors = ErrorText(url, self.user, prefix)
        self._client: aioredis.Redis | RedisCluster | None = None
        self._calls = ScriptCalls(self.layout, self._errors)

    @property
    def client(self) -> aioredis.Redis | RedisCluster:
        """The live client (after `start()`); the reaper and status commands share it."""
        if self._client is None:
            raise RuntimeError("RedisStateStore used before start()")
        return self._client

    @property
    def url(self) -> str:
        return self._url

    @property
    def prefix(self) -> str:
        return self._prefix

    def req_key(self, app: str, id: str) -> str:
        m = member(app, id)
        return self.layout.shard_of(m).req_prefix + m

    def resp_key(self, app: str, id: str) -> str:
        m = member(app, id)
        return self.layout.shard_of(m).resp_prefix + m

    async def start(self) -> None:
        """Connect, ping and preload the scripts so the first group is one round trip.

        An empty claim (no items, only a shard's zset keys) then checks EVALSHA and the
        key pattern, so an ACL user that could not work fails here, not on first traffic.
        On a cluster SCRIPT LOAD goes to every primary.
        """
        client = open_client(
            self._url, username=self._username, password=self._password, tls=self._tls
        )
        try:
            await client.ping()
            scripts: dict[str, AsyncScript] = {}
            for name in SCRIPTS:
                script = client.register_script(script_source(name))
                await client.script_load(script.script)
                scripts[name] = script
            first = self.layout.shards[0]
            await scripts["claim.lua"](
                keys=[first.leases, first.retry],
                args=[1, 1, "start", first.req_prefix, packed([])],
            )
        except Exception as exc:
            error = self._errors.at_start(exc)
            await client.aclose()
            if error is None:
                raise
            raise error from exc if type(error) is StateUnavailable else None
        self._client = client
        self._calls.bind(client, scripts)

    async def close(self) -> None:
        if self._client is not None:
            self._calls.unbind()
            await self._client.aclose()
            self._client = None

    async def ping(self) -> bool:
        """True when Redis answers; False (not an exception) for health probes."""
        try:
            return bool(await self.client.ping())
        except _PROBE_ERRORS:
            return False

    async def claim(
        self, items: Sequence[ClaimRequest], *, nonce: str, lease_ms: int, max_attempts: int
    ) -> list[ClaimResult]:
        check_claim_args(lease_ms, max_attempts)
        check_nonce(nonce)
        if not items:
            return []
        members = [member(item.app, item.id) for item in items]

        def build(shard: Shard, idx: list[int]) -> Call:
            keys: list[str] = []
            fields: list[list[Any]] = []
            for i in idx:
                s = items[i].source
                keys += [shard.req_prefix + members[i], shard.resp_prefix + members[i]]
                fields.append(
                    [
                        i,
                        items[i].fingerprint,
                        s.payload,
                        s.topic,
                        optional(s.reply_to),
                        optional(s.correlation),
                    ]
                )
            args = [lease_ms, max_attempts, nonce, shard.req_prefix, packed(fields)]
            return [*keys, shard.leases, shard.retry], args

        rows = await self._calls.grouped("claim.lua", members, build, unpack=unpack_rows)
        out: list[ClaimResult] = []
        for i, row in enumerate(rows):
            token = claim_token(nonce, i)
            outcome = ClaimOutcome(row[0].decode())
            attempts = int(row[1])
            if outcome in (ClaimOutcome.NEW, ClaimOutcome.EXHAUSTED):
                out.append(ClaimResult(outcome, token=token, attempts=attempts))
            elif outcome is ClaimOutcome.DONE:
                out.append(ClaimResult(outcome, response=bytes(row[2]), attempts=attempts))
            else:
                out.append(ClaimResult(outcome, attempts=attempts))
        return out

    async def complete(self, items: Sequence[Completion], *, result_ttl_s: int) -> list[bool]:
        check_ttl(result_ttl_s)
        if not items:
            return []
        members = [member(item.app, item.id) for item in items]

        def build(shard: Shard, idx: list[int]) -> Call:
            keys: list[str] = []
            for i in idx:
                keys += [shard.req_prefix + members[i], shard.resp_prefix + members[i]]
            fields = packed([[items[i].token, items[i].response] for i in idx])
            return [*keys, shard.leases, shard.retry], [result_ttl_s, shard.req_prefix, fields]

        rows = await self._calls.grouped("complete.lua", members, build, unpack=bytes)
        return [x == ord("1") for x in rows]

    async def abandon(self, items: Sequence[Abandon]) -> list[bool]:
        if not items:
            return []
        members = [member(item.app, item.id) for item in items]

        def build(shard: Shard, idx: list[int]) -> Call:
            keys = [shard.req_prefix + members[i] for i in idx] + [shard.leases, shard.retry]
            return keys, [shard.req_prefix, *(items[i].token for i in idx)]

        return [bool(x) for x in await self._calls.grouped("abandon.lua", members, build)]

    async def renew(
        self, items: Sequence[Renewal], *, lease_ms: int, max_lease_ms: int
    ) -> list[bool]:
        check_renew_args(lease_ms, max_lease_ms)
        if not items:
            return []
        members = [member(item.app, item.id) for item in items]

        def build(shard: Shard, idx: list[int]) -> Call:
            keys = [shard.leases] + [shard.req_prefix + members[i] for i in idx]
            args: list[Any] = [lease_ms, max_lease_ms, shard.req_prefix]
            return keys, args + [items[i].token for i in idx]

        return [bool(x) for x in await self._calls.grouped("renew.lua", members, build)]

    async def schedule_retry(self, items: Sequence[RetryLater]) -> list[bool]:
        for item in items:
            check_delay(item.delay_ms)
        if not items:
            return []
        members = [member(item.app, item.id) for item in items]

        def build(shard: Shard, idx: list[int]) -> Call:
            keys = [shard.req_prefix + members[i] for i in idx] + [shard.leases, shard.retry]
            args: list[Any] = [shard.req_prefix]
            for i in idx:
                args += [items[i].token, items[i].delay_ms]
            return keys, args

        return [bool(x) for x in await self._calls.grouped("schedule.lua", members, build)]

    async def reap_expired(
        self, *, lease_ms: int, max_attempts: int, limit: int = 100
    ) -> list[Reclaimed]:
        return await self._takeover(lambda s: s.leases, lease_ms, max_attempts, limit)

    async def due_retries(
        self, *, lease_ms: int, max_attempts: int, limit: int = 100
    ) -> list[Reclaimed]:
        return await self._takeover(lambda s: s.retry, lease_ms, max_attempts, limit)

    async def _takeover(
        self, source: Callable[[Shard], str], lease_ms: int, max_attempts: int, limit: int
    ) -> list[Reclaimed]:
        check_takeover_args(lease_ms, max_attempts, limit)
        shards = self.layout.shards
        if len(shards) == 1:
            return await self._take(source, [(shards[0], limit)], {}, lease_ms, max_attempts)
        out: list[Reclaimed] = []
        for _ in range(sweep.ROUNDS):
            want = limit - len(out)
            peeks = await self._calls.run_each("peek.lua", [([source(s)], [want]) for s in shards])
            todo, scores = sweep.plan(shards, peeks, want)
            if not todo:
                break
            got = await self._take(source, todo, scores, lease_ms, max_attempts)
            out += got
            if len(got) == sum(n for _, n in todo):  # no other reaper took any of them
                break
        return out

    async def _take(
        self,
        source: Callable[[Shard], str],
        todo: sweep.Plan,
        scores: sweep.Scores,
        lease_ms: int,
        max_attempts: int,
    ) -> list[Reclaimed]:
        nonce = new_token()
        calls: list[Call] = []
        for shard, n in todo:
            # One shard keeps the plain nonce; several get one each, so tokens stay unique.
            own = nonce if len(todo) == 1 else f"{nonce}-{shard.index}"
            keys = [source(shard), shard.leases, shard.retry, shard.receipt(own)]
            calls.append((keys, [shard.req_prefix, lease_ms, max_attempts, n, own]))
        answers = await self._calls.run_each("takeover.lua", calls)
        return sweep.reclaimed([row for answer in answers for row in answer], scores)
