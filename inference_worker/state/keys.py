"""Helpers shared by the state stores: argument checks, lease tokens, member encoding.

`member(app, id)` is `"<utf8 byte length of app>:<app>:<id>"`: apps and ids may contain
`:`, and the length prefix makes the split unambiguous (`parse_member` inverts it), so
app `a:b`/id `c` and app `a`/id `b:c` never share keys or zset members.
"""

from __future__ import annotations

import secrets


def check_claim_args(lease_ms: int, max_attempts: int) -> None:
    """Reject arguments under which a lease could not hold (shared by both stores)."""
    if lease_ms < 1:
        raise ValueError(f"lease_ms must be >= 1, got {lease_ms}")
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")


def check_takeover_args(lease_ms: int, max_attempts: int, limit: int) -> None:
    """`reap_expired` / `due_retries` arguments (Redis `LIMIT 0 -1` would mean "all")."""
    check_claim_args(lease_ms, max_attempts)
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")


def check_nonce(nonce: str) -> None:
    """A claim's nonce names its tokens (`{nonce}:{i}`): it must not be empty."""
    if not nonce:
        raise ValueError("nonce must not be empty")


def check_renew_args(lease_ms: int, max_lease_ms: int) -> None:
    if lease_ms < 1:
        raise ValueError(f"lease_ms must be >= 1, got {lease_ms}")
    if max_lease_ms < lease_ms:
        raise ValueError(f"max_lease_ms must be >= lease_ms ({lease_ms}), got {max_lease_ms}")


def claim_token(nonce: str, index: int) -> str:
    """The lease token of item `index` of a claim call: replaying the call gives it again."""
    return f"{nonce}:{index}"


def check_delay(delay_ms: int) -> None:
    if delay_ms < 0:
        raise ValueError(f"delay_ms must be >= 0, got {delay_ms}")


def check_ttl(result_ttl_s: int) -> None:
    """Redis `SET EX` needs a positive TTL; keep the twin just as strict."""
    if result_ttl_s < 1:
        raise ValueError(f"result_ttl_s must be >= 1, got {result_ttl_s}")


def new_token() -> str:
    """A random nonce (take-overs): a stale holder can never match a newer lease."""
    return secrets.token_hex(8)


def member(app: str, id: str) -> str:
    """Unambiguous `{app}:{id}` encoding for keys and zset members (see module doc)."""
    return f"{len(app.encode())}:{app}:{id}"


def parse_member(value: str | bytes) -> tuple[str, str]:
    """Invert `member` (for a reaper reading the `leases` / `retry` zsets)."""
    raw = value if isinstance(value, bytes) else value.encode()
    size, _, rest = raw.partition(b":")
    n = int(size)
    if rest[n : n + 1] != b":":
        raise ValueError(f"not a state member: {value!r}")
    return rest[:n].decode(), rest[n + 1 :].decode()
