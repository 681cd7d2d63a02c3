"""Idempotency state stores (design sections 2 and 6): the contract and its two backends.

`open_state(url)` picks the backend from the URL scheme so configuration stays a string:
`memory://` (in-process, nothing persists), `redis://` / `rediss://` (shared by the fleet),
`redis+cluster://h1:p1,h2:p2,…/` / `rediss+cluster://…` (a Redis Cluster, the ledger
sharded over its primaries: layout.py) or `none://` (no idempotency: for measuring what
the ledger costs).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

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
    StateStore,
    StateUnavailable,
)
from inference_worker.state.connect import CLUSTER_SCHEMES
from inference_worker.state.keys import member, parse_member
from inference_worker.state.memory import MemoryStateStore
from inference_worker.state.null import NullStateStore
from inference_worker.state.redis import RedisStateStore, redact_url

__all__ = [
    "Abandon",
    "ClaimOutcome",
    "ClaimRequest",
    "ClaimResult",
    "Completion",
    "MemoryStateStore",
    "NullStateStore",
    "Reclaimed",
    "RedisStateStore",
    "Renewal",
    "RetryLater",
    "StateAccessDenied",
    "StateFailed",
    "StateStore",
    "StateUnavailable",
    "member",
    "open_state",
    "parse_member",
]


def open_state(url: str, *, prefix: str = "iw:", **security: Any) -> StateStore:
    """Build (not start) the store named by `url`; call `await store.start()` next.

    `security` (`username`, `password`, `tls`; see `security.state_security`) goes to the
    Redis store and is ignored by the others.
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme == "memory":
        return MemoryStateStore()
    if scheme == "none":
        return NullStateStore()
    if scheme in ("redis", "rediss", "unix", *CLUSTER_SCHEMES):
        return RedisStateStore(url, prefix=prefix, **security)
    raise ValueError(
        f"unsupported state store URL {redact_url(url)!r}: expected memory://, redis://, "
        "rediss://, unix://, redis+cluster://, rediss+cluster:// or none://"
    )
