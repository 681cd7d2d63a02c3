"""Redis-backed idempotency ledger (design sections 2 steps 3/4/7, 6 and 11).

Every group operation is ONE `EVALSHA` of a Lua script shipped next to this module, so a
batch of N requests costs one round trip, and each item is decided atomically against
every other worker. The scripts read `TIME` on the server, so lease deadlines do not
depend on worker clocks.

Key layout (prefix `p`, default `iw:`), with `m = member(app, id)`:

- `{p}req:{m}`  hash   — state, fp, token, lease_until (ms), attempts, payload (journal)
- `{p}resp:{m}` string — response bytes, TTL `result_ttl_s` (the done req hash shares it)
- `{p}leases`   zset   — member `m`, score = lease deadline ms (read by the reaper)
- `{p}retry`    zset   — member `m`, score = next-attempt time ms (`schedule_retry`)
- `{p}takeover:{nonce}` list — members one reap/retry call took (TTL lease_ms), so a
  replayed call answers the same records (see takeover.lua)

The req hash also keeps `lease_ms` (length of the current lease: a parked retry stays
leased until its retry time + that) and `exhausted` (the current lease was handed out
only to close the record). `member(app, id)` (keys.py) encodes apps and ids that contain
`:` unambiguously. For Redis Cluster every key of a call must hash to one slot (the
takeover script builds req keys from zset members): use a hash-tagged prefix such as
`{iw}:`.

Security. `rediss://` (TLS ≥ 1.2, hostname checked, CA file or system CAs, optional
client certificate) and an ACL user (`redis://user:pass@host` or `username`/`password`,
which win over the URL) limited to the key prefix: brokers/redis/users.acl.example lists
the commands the store needs (Redis checks the commands run inside scripts too). `start()`
probes them (PING, CLIENT SETNAME, SCRIPT LOAD, an empty EVALSHA on the prefix's keys), so
refused credentials or a missing permission fail there with `StateAccessDenied` naming the
user and the URL (never the password).

Durability is that of the Redis deployment (AOF `everysec`: up to ~1 s of claims can be
lost on a crash). Scripts are not persisted by Redis; after a restart or SCRIPT FLUSH the
`Script` object sees NOSCRIPT and reloads transparently.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import AuthenticationError, AuthorizationError, NoPermissionError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from inference_worker.security import TlsOptions, redis_kwargs
from inference_worker.state.base import (
    ClaimOutcome,
    ClaimRequest,
    ClaimResult,
    Completion,
    Reclaimed,
    Release,
    Renewal,
    RetryLater,
    StateAccessDenied,
    StateUnavailable,
)
from inference_worker.state.keys import (
    check_claim_args,
    check_delay,
    check_takeover_args,
    check_ttl,
    member,
    new_token,
    parse_member,
)

__all__ = ["RedisStateStore", "member", "parse_member", "redact_url"]

# Connection settings, chosen for a worker that must notice a dead Redis quickly:
# - connect timeout 5 s: a cold TCP/TLS handshake is far below that, a black hole is not;
# - socket (read) timeout 10 s: a 500-item script runs in milliseconds, so 10 s means
#   the server is gone or stuck, and the worker's error handling should take over;
# - health_check_interval 30 s: a PING before reusing a connection idle that long, so a
#   connection cut by a NAT/LB while idle is replaced instead of failing a claim;
# - 3 retries with jittered backoff (50 ms .. 1 s) on connection errors: rides over a
#   Redis restart. A retried EVALSHA may run twice; the scripts make that harmless
#   (a claim replayed with the same token answers as before, a completion `True`, a
#   takeover the records it took).
_CONNECT_TIMEOUT_S = 5.0
_SOCKET_TIMEOUT_S = 10.0
_HEALTH_CHECK_S = 30
_RETRIES = 3


def redact_url(url: str) -> str:
    """The URL without its password, fit for error messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


_SCRIPTS = (
    "claim.lua",
    "complete.lua",
    "release.lua",
    "schedule.lua",
    "takeover.lua",
    "renew.lua",
)


def _load_script(name: str) -> str:
    return importlib.resources.files("inference_worker.state").joinpath(name).read_text()


class RedisStateStore:
    """`StateStore` over one pooled `redis.asyncio.Redis` client (bytes responses)."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "iw:",
        username: str | None = None,
        password: str | None = None,
        tls: TlsOptions | None = None,
    ) -> None:
        parts = urlsplit(url)
        # Checks the TLS options against the scheme now; the password stays out of repr.
        self._security = redis_kwargs(url, username=username, password=password, tls=tls)
        self._url = url
        # Who we log in as, for error messages ("default" is Redis's user without a name).
        self.user = username or (parts.username and unquote(parts.username)) or "default"
        self._prefix = prefix
        self._leases_key = f"{prefix}leases"
        self._retry_key = f"{prefix}retry"
        self._client: aioredis.Redis | None = None
        self._scripts: dict[str, AsyncScript] = {}

    @property
    def client(self) -> aioredis.Redis:
        """The live client (after `start()`); the reaper and status commands share it."""
        if self._client is None:
            raise RuntimeError("RedisStateStore used before start()")
        return self._client

    @property
    def prefix(self) -> str:
        return self._prefix

    def req_key(self, app: str, id: str) -> str:
        return f"{self._prefix}req:{member(app, id)}"

    def resp_key(self, app: str, id: str) -> str:
        return f"{self._prefix}resp:{member(app, id)}"

    async def start(self) -> None:
        """Connect, ping and preload the scripts so the first group is one round trip.

        An empty claim (no items, only the prefix's zset keys) then checks EVALSHA and the
        key pattern, so an ACL user that could not work fails here, not on first traffic.
        """
        client = aioredis.Redis.from_url(
            self._url,
            decode_responses=False,
            socket_connect_timeout=_CONNECT_TIMEOUT_S,
            socket_timeout=_SOCKET_TIMEOUT_S,
            socket_keepalive=True,
            health_check_interval=_HEALTH_CHECK_S,
            retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), _RETRIES),
            client_name="inference-worker",
            **self._security,
        )
        try:
            await client.ping()
            for name in _SCRIPTS:
                script = client.register_script(_load_script(name))
                await client.script_load(script.script)
                self._scripts[name] = script
            await self._scripts["claim.lua"](keys=[self._leases_key, self._retry_key], args=[1, 1])
        except (AuthenticationError, AuthorizationError) as exc:
            await client.aclose()
            raise StateAccessDenied(
                f"Redis at {redact_url(self._url)} refused the credentials of user "
                f"{self.user!r}: {exc}"
            ) from None
        except NoPermissionError as exc:
            await client.aclose()
            raise StateAccessDenied(self._denied(exc)) from None
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            await client.aclose()
            raise StateUnavailable(
                f"Redis state store unreachable at {redact_url(self._url)}: {exc}"
            ) from exc
        self._client = client

    def _denied(self, exc: Exception) -> str:
        return (
            f"Redis user {self.user!r} at {redact_url(self._url)} lacks permission for "
            f"PING, CLIENT SETNAME, SCRIPT LOAD, EVALSHA (and the commands the scripts run) "
            f"or keys ~{self._prefix}* ({exc}); see brokers/redis/users.acl.example"
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def ping(self) -> bool:
        """True when Redis answers; False (not an exception) for health probes."""
        try:
            return bool(await self.client.ping())
        except (RedisError, OSError, RuntimeError):
            return False

    async def _run(self, name: str, keys: list[str], args: list[Any]) -> list[Any]:
        if self._client is None:
            raise RuntimeError("RedisStateStore used before start()")
        try:
            result = await self._scripts[name](keys=keys, args=args)
        except NoPermissionError as exc:
            # Retried like an outage (the worker backs off): fixing the ACL recovers.
            raise StateAccessDenied(self._denied(exc)) from None
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            # The worker retries on StateUnavailable without knowing this is Redis.
            raise StateUnavailable(f"Redis at {redact_url(self._url)}: {exc}") from exc
        return list(result)

    async def claim(
        self, items: Sequence[ClaimRequest], *, lease_ms: int, max_attempts: int
    ) -> list[ClaimResult]:
        check_claim_args(lease_ms, max_attempts)
        if not items:
            return []
        keys: list[str] = []
        args: list[Any] = [lease_ms, max_attempts]
        tokens: list[str] = []
        for item in items:
            token = new_token()
            tokens.append(token)
            keys += [self.req_key(item.app, item.id), self.resp_key(item.app, item.id)]
            args += [item.fingerprint, item.payload, token, member(item.app, item.id)]
        keys += [self._leases_key, self._retry_key]
        rows = await self._run("claim.lua", keys, args)
        out: list[ClaimResult] = []
        for token, row in zip(tokens, rows, strict=True):
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
        keys: list[str] = []
        args: list[Any] = [result_ttl_s]
        for item in items:
            keys += [self.req_key(item.app, item.id), self.resp_key(item.app, item.id)]
            args += [item.token, item.response, member(item.app, item.id)]
        keys += [self._leases_key, self._retry_key]
        return [bool(x) for x in await self._run("complete.lua", keys, args)]

    async def release(self, items: Sequence[Release]) -> list[bool]:
        if not items:
            return []
        keys = [self.req_key(item.app, item.id) for item in items]
        keys += [self._leases_key, self._retry_key]
        args: list[Any] = []
        for item in items:
            args += [item.token, member(item.app, item.id)]
        return [bool(x) for x in await self._run("release.lua", keys, args)]

    async def renew(self, items: Sequence[Renewal], *, lease_ms: int) -> list[bool]:
        check_ttl(lease_ms)
        if not items:
            return []
        keys = [self._leases_key] + [self.req_key(item.app, item.id) for item in items]
        args: list[Any] = [lease_ms]
        args += [item.token for item in items]
        args += [member(item.app, item.id) for item in items]
        return [bool(x) for x in await self._run("renew.lua", keys, args)]

    async def schedule_retry(self, items: Sequence[RetryLater]) -> list[bool]:
        for item in items:
            check_delay(item.delay_ms)
        if not items:
            return []
        keys = [self.req_key(item.app, item.id) for item in items]
        keys += [self._leases_key, self._retry_key]
        args: list[Any] = []
        for item in items:
            args += [item.token, member(item.app, item.id), item.delay_ms]
        return [bool(x) for x in await self._run("schedule.lua", keys, args)]

    async def reap_expired(
        self, *, lease_ms: int, max_attempts: int, limit: int = 100
    ) -> list[Reclaimed]:
        return await self._takeover(self._leases_key, lease_ms, max_attempts, limit)

    async def due_retries(
        self, *, lease_ms: int, max_attempts: int, limit: int = 100
    ) -> list[Reclaimed]:
        return await self._takeover(self._retry_key, lease_ms, max_attempts, limit)

    async def _takeover(
        self, source: str, lease_ms: int, max_attempts: int, limit: int
    ) -> list[Reclaimed]:
        check_takeover_args(lease_ms, max_attempts, limit)
        nonce = new_token()
        keys = [source, self._leases_key, self._retry_key, f"{self._prefix}takeover:{nonce}"]
        args: list[Any] = [f"{self._prefix}req:", lease_ms, max_attempts, limit, nonce]
        out: list[Reclaimed] = []
        for raw, token, attempts, payload, exhausted in await self._run("takeover.lua", keys, args):
            app, id = parse_member(raw)
            out.append(
                Reclaimed(app, id, token.decode(), int(attempts), bytes(payload), bool(exhausted))
            )
        return out
