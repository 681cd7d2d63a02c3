"""App identity by API key (design section 5 `key`; `inference-worker keys ...`).

A key is `iwk_<key id>_<secret>`. Redis keeps, per key id, the app, a random salt and
sha256(salt + secret), never the secret, so reading Redis does not reveal usable keys.
Workers look up the key ids of a whole claim group in one round trip and cache what
they learn for `cache_ttl_s`: a revoked key stops working within that time.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from inference_worker.cancelling import raise_if_cancelled
from inference_worker.state.base import StateFailed, StateUnavailable

_PREFIX = "iwk_"


class AuthMode(enum.StrEnum):
    OFF = "off"  # keys are ignored
    OPTIONAL = "optional"  # a key, when sent, must be valid and names the app
    REQUIRED = "required"  # every request needs a valid key


@dataclass(frozen=True)
class StoredKey:
    key_id: str
    app: str
    salt: bytes
    digest: str
    created_ms: int
    revoked: bool

    def matches(self, secret: str) -> bool:
        return hmac.compare_digest(self.digest, _digest(self.salt, secret))


def _digest(salt: bytes, secret: str) -> str:
    return hashlib.sha256(salt + secret.encode()).hexdigest()


def split_key(key: str) -> tuple[str, str] | None:
    """(key id, secret) of a well-formed key, else None."""
    if not key.startswith(_PREFIX):
        return None
    key_id, sep, secret = key[len(_PREFIX) :].partition("_")
    if not sep or len(key_id) != 16 or not secret:
        return None
    return key_id, secret


def new_key(app: str, *, now_ms: int) -> tuple[str, StoredKey]:
    """A fresh key: the full key (shown once) and what is stored."""
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(24)
    salt = secrets.token_bytes(16)
    stored = StoredKey(key_id, app, salt, _digest(salt, secret), now_ms, False)
    return f"{_PREFIX}{key_id}_{secret}", stored


class KeyStore(Protocol):
    async def lookup(self, key_ids: Sequence[str]) -> dict[str, StoredKey]:
        """The stored keys among `key_ids` (absent ids are missing from the result)."""
        ...


class RedisKeyStore:
    """Keys as hashes `{prefix}apikey:{key id}`; one pipeline per lookup."""

    def __init__(self, client: Any, prefix: str) -> None:
        self._client = client
        self._prefix = prefix

    def _name(self, key_id: str) -> str:
        return f"{self._prefix}apikey:{key_id}"

    async def lookup(self, key_ids: Sequence[str]) -> dict[str, StoredKey]:
        if not key_ids:
            return {}
        pipe = self._client.pipeline(transaction=False)
        for key_id in key_ids:
            pipe.hgetall(self._name(key_id))
        try:
            rows = await pipe.execute()
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            # Retried by the pipeline like a claim: one Redis blip must not stop intake.
            raise StateUnavailable(f"API key lookup: {exc}") from None
        except ResponseError as exc:
            raise StateFailed(f"API key lookup: {exc}") from None
        raise_if_cancelled()  # redis-py may have swallowed this task's cancel
        return {k: _decode(k, row) for k, row in zip(key_ids, rows, strict=True) if row}

    async def create(self, app: str) -> str:
        key, stored = new_key(app, now_ms=time.time_ns() // 1_000_000)
        await self._client.hset(
            self._name(stored.key_id),
            mapping={
                "app": app,
                "salt": stored.salt,
                "digest": stored.digest,
                "created_ms": stored.created_ms,
                "revoked": 0,
            },
        )
        return key

    async def revoke(self, key_id: str) -> bool:
        name = self._name(key_id)
        if not await self._client.exists(name):
            return False
        await self._client.hset(name, "revoked", 1)
        return True

    async def list(self) -> list[StoredKey]:
        found: list[StoredKey] = []
        async for name in self._client.scan_iter(match=self._name("*"), count=500):
            raw = name.decode() if isinstance(name, bytes) else str(name)
            key_id = raw.rsplit(":", 1)[-1]
            row = await self._client.hgetall(name)
            if row:
                found.append(_decode(key_id, row))
        return sorted(found, key=lambda k: (k.app, k.created_ms))


def _decode(key_id: str, row: Mapping[bytes, bytes]) -> StoredKey:
    return StoredKey(
        key_id=key_id,
        app=row[b"app"].decode(),
        salt=row[b"salt"],
        digest=row[b"digest"].decode(),
        created_ms=int(row[b"created_ms"]),
        revoked=row.get(b"revoked", b"0") == b"1",
    )


class MemoryKeyStore:
    """In-process twin for tests and the demo."""

    def __init__(self) -> None:
        self.keys: dict[str, StoredKey] = {}

    async def lookup(self, key_ids: Sequence[str]) -> dict[str, StoredKey]:
        return {k: self.keys[k] for k in key_ids if k in self.keys}

    def create(self, app: str) -> str:
        key, stored = new_key(app, now_ms=time.time_ns() // 1_000_000)
        self.keys[stored.key_id] = stored
        return key

    def revoke(self, key_id: str) -> None:
        old = self.keys[key_id]
        self.keys[key_id] = dataclasses.replace(old, revoked=True)


@dataclass(frozen=True)
class Verdict:
    app: str | None  # the key's app when the key is valid
    error: str | None  # why not, when it is not (never contains the key)


class Authenticator:
    """Checks the keys of a group of requests with at most one store round trip."""

    def __init__(
        self,
        store: KeyStore,
        mode: AuthMode,
        *,
        cache_ttl_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.mode = mode
        self._store = store
        self._ttl = cache_ttl_s
        self._clock = clock
        self._cache: dict[str, tuple[float, StoredKey | None]] = {}

    async def check(self, keys: Sequence[str | None]) -> list[Verdict]:
        """One verdict per key, in order. No key: fine unless the mode requires one."""
        now = self._clock()
        wanted: set[str] = set()
        parsed: list[tuple[str, str] | None] = []
        for key in keys:
            parts = split_key(key) if key else None
            parsed.append(parts)
            if parts is not None:
                hit = self._cache.get(parts[0])
                if hit is None or hit[0] <= now:
                    wanted.add(parts[0])
        if wanted:
            found = await self._store.lookup(sorted(wanted))
            expires = now + self._ttl
            for key_id in wanted:  # negative answers are cached too: a flood of bad ids
                self._cache[key_id] = (expires, found.get(key_id))  # costs one lookup each
            if len(self._cache) > 100_000:
                self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
        return [self._verdict(key, parts) for key, parts in zip(keys, parsed, strict=True)]

    def _verdict(self, key: str | None, parts: tuple[str, str] | None) -> Verdict:
        if not key:
            if self.mode is AuthMode.REQUIRED:
                return Verdict(None, "an API key is required")
            return Verdict(None, None)
        if parts is None:
            return Verdict(None, "malformed API key")
        stored = self._cache[parts[0]][1]
        if stored is None or not stored.matches(parts[1]):
            return Verdict(None, "unknown or wrong API key")
        if stored.revoked:
            return Verdict(None, "revoked API key")
        return Verdict(stored.app, None)
