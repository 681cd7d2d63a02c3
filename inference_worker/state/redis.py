"""Redis-backed idempotency ledger (design sections 2 steps 3/4/7, 6 and 11).

Every group operation is ONE `EVALSHA` of a Lua script shipped next to this module (its
body after the shared `preamble.lua`, composed by scripts.py), so a batch of N requests
costs one round trip, and each item is decided atomically against every other worker.
The scripts read `TIME` on the server, so lease deadlines do not depend on worker clocks.

Key layout (prefix `p`, default `iw:`), with `m = member(app, id)`:

- `{p}req:{m}`  hash   — state, fp, token, lease_until (ms), attempts, and the journal:
  payload (the raw request bytes), topic, reply_to and corr (when the request had them)
- `{p}resp:{m}` string — response bytes, TTL `result_ttl_s` (the done req hash shares it)
- `{p}leases`   zset   — member `m`, score = lease deadline ms (read by the reaper)
- `{p}retry`    zset   — member `m`, score = next-attempt time ms (`schedule_retry`)
- `{p}takeover:{nonce}` list — members one reap/retry call took (TTL lease_ms), so a
  replayed call answers the same records (see takeover.lua)

The req hash also keeps `lease_ms` (length of the current lease: a parked retry stays
leased until its retry time + that), `taken_at` (ms, when the current token took the
lease: renewals stop `max_lease_ms` after it) and `exhausted` (the current lease was
handed out only to close the record). The scripts derive each zset member from its req
key, so a member travels once per item. `member(app, id)` (keys.py) encodes apps and ids
that contain `:` unambiguously. For Redis Cluster every key of a call must hash to one
slot (the takeover script builds req keys from zset members): use a hash-tagged prefix
such as `{iw}:`.

Security. `rediss://` (TLS ≥ 1.2, hostname checked, CA file or system CAs, optional
client certificate) and an ACL user (`redis://user:pass@host` or `username`/`password`,
which win over the URL) limited to the key prefix: brokers/redis/users.acl.example lists
the commands the store needs (Redis checks the commands run inside scripts too). `start()`
probes them (PING, CLIENT SETNAME, SCRIPT LOAD, an empty EVALSHA on the prefix's keys), so
refused credentials or a missing permission fail there with `StateAccessDenied` naming the
user and the URL (never the password).

Errors. Connection refused/reset/timeout (and LOADING, BUSY, TRYAGAIN, MASTERDOWN: the
server will answer soon) raise `StateUnavailable`, which the caller retries; any other
error reply (OOM, MISCONF, READONLY, NOSCRIPT after the reload failed, a script error)
raises `StateFailed` with the server's message. The `#!lua` shebang of the preamble has
Redis refuse a script under OOM/MISCONF/READONLY before it runs, never half way.

Durability is that of the Redis deployment (AOF `everysec`: up to ~1 s of claims can be
lost on a crash). Scripts are not persisted by Redis; after a restart or SCRIPT FLUSH the
`Script` object sees NOSCRIPT and reloads transparently.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    NoPermissionError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from inference_worker.journal import JournalEntry
from inference_worker.security import TlsOptions, redact_url, redis_kwargs
from inference_worker.state.base import (
    Abandon,
    ClaimOutcome,
    ClaimRequest,
    ClaimResult,
    Completion,
    Reclaimed,
    Renewal,
    RetryLater,
    StateAccessDenied,
    StateFailed,
    StateUnavailable,
)
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
from inference_worker.state.scripts import SCRIPTS, script_source

__all__ = ["RedisStateStore", "member", "parse_member", "redact_url"]

# Connection settings, chosen for a worker that must notice a dead Redis quickly:
# - connect timeout 5 s: a cold TCP/TLS handshake is far below that, a black hole is not;
# - socket (read) timeout 10 s: a 500-item script runs in milliseconds, so 10 s means
#   the server is gone or stuck, and the worker's error handling should take over;
# - health_check_interval 30 s: a PING before reusing a connection idle that long, so a
#   connection cut by a NAT/LB while idle is replaced instead of failing a claim;
# - 3 retries with jittered backoff (50 ms .. 1 s) on connection errors: rides over a
#   Redis restart. A retried EVALSHA may run twice; the scripts make that harmless
#   (a claim replayed with the same nonce answers as before, a completion `True`, a
#   takeover the records it took).
_CONNECT_TIMEOUT_S = 5.0
_SOCKET_TIMEOUT_S = 10.0
_HEALTH_CHECK_S = 30
_RETRIES = 3


# Error replies that mean "the server will answer soon" (loading its data set, running a
# long script, a cluster failover): retried like an outage. Every other one is final.
_TRANSIENT = (b"LOADING", b"BUSY", b"TRYAGAIN", b"MASTERDOWN")


def _optional(value: str | bytes | None) -> bytes:
    """claim.lua's encoding of an optional field: b"" for None, else b"=" + the value."""
    if value is None:
        return b""
    return b"=" + (value.encode() if isinstance(value, str) else value)


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


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
        self._req_prefix = f"{prefix}req:"
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
            for name in SCRIPTS:
                script = client.register_script(script_source(name))
                await client.script_load(script.script)
                self._scripts[name] = script
            await self._scripts["claim.lua"](
                keys=[self._leases_key, self._retry_key], args=[1, 1, "start", self._req_prefix]
            )
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
        except ResponseError as exc:
            await client.aclose()
            raise self._failed(exc) from None
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
        except ResponseError as exc:
            raise self._failed(exc) from None
        return list(result)

    def _failed(self, exc: ResponseError) -> StateUnavailable | StateFailed:
        """The error reply as the contract's error: transient ones are an outage."""
        # redis-py strips the error code it maps to a class (OOM, READONLY, NOSCRIPT...)
        # from the text: put it back so the message is the server's.
        code = getattr(exc, "status_code", None)
        text = f"{code} {exc}" if code else str(exc)
        message = f"Redis at {redact_url(self._url)}: {text}"
        if text.encode().startswith(_TRANSIENT):
            return StateUnavailable(message)
        return StateFailed(message)

    async def claim(
        self, items: Sequence[ClaimRequest], *, nonce: str, lease_ms: int, max_attempts: int
    ) -> list[ClaimResult]:
        check_claim_args(lease_ms, max_attempts)
        check_nonce(nonce)
        if not items:
            return []
        keys: list[str] = []
        args: list[Any] = [lease_ms, max_attempts, nonce, self._req_prefix]
        for item in items:
            s = item.source
            keys += [self.req_key(item.app, item.id), self.resp_key(item.app, item.id)]
            args += [item.fingerprint, s.payload, s.topic]
            args += [_optional(s.reply_to), _optional(s.correlation)]
        keys += [self._leases_key, self._retry_key]
        rows = await self._run("claim.lua", keys, args)
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
        keys: list[str] = []
        args: list[Any] = [result_ttl_s, self._req_prefix]
        for item in items:
            keys += [self.req_key(item.app, item.id), self.resp_key(item.app, item.id)]
            args += [item.token, item.response]
        keys += [self._leases_key, self._retry_key]
        return [bool(x) for x in await self._run("complete.lua", keys, args)]

    async def abandon(self, items: Sequence[Abandon]) -> list[bool]:
        if not items:
            return []
        keys = [self.req_key(item.app, item.id) for item in items]
        keys += [self._leases_key, self._retry_key]
        args: list[Any] = [self._req_prefix, *(item.token for item in items)]
        return [bool(x) for x in await self._run("abandon.lua", keys, args)]

    async def renew(
        self, items: Sequence[Renewal], *, lease_ms: int, max_lease_ms: int
    ) -> list[bool]:
        check_renew_args(lease_ms, max_lease_ms)
        if not items:
            return []
        keys = [self._leases_key] + [self.req_key(item.app, item.id) for item in items]
        args: list[Any] = [lease_ms, max_lease_ms, self._req_prefix]
        args += [item.token for item in items]
        return [bool(x) for x in await self._run("renew.lua", keys, args)]

    async def schedule_retry(self, items: Sequence[RetryLater]) -> list[bool]:
        for item in items:
            check_delay(item.delay_ms)
        if not items:
            return []
        keys = [self.req_key(item.app, item.id) for item in items]
        keys += [self._leases_key, self._retry_key]
        args: list[Any] = [self._req_prefix]
        for item in items:
            args += [item.token, item.delay_ms]
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
        self, zset: str, lease_ms: int, max_attempts: int, limit: int
    ) -> list[Reclaimed]:
        check_takeover_args(lease_ms, max_attempts, limit)
        nonce = new_token()
        keys = [zset, self._leases_key, self._retry_key, f"{self._prefix}takeover:{nonce}"]
        args: list[Any] = [self._req_prefix, lease_ms, max_attempts, limit, nonce]
        out: list[Reclaimed] = []
        rows = await self._run("takeover.lua", keys, args)
        for raw, token, attempts, exhausted, payload, topic, reply_to, corr in rows:
            app, id = parse_member(raw)
            # No topic: journaled by a version before the journal had fields (mixed fleet).
            topic_text = _text(topic) or ""
            source = JournalEntry(bytes(payload), topic_text, _text(reply_to), corr)
            out.append(Reclaimed(app, id, token.decode(), int(attempts), source, bool(exhausted)))
        return out
