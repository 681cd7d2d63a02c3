"""Which Redis a state URL names, the client that talks to it, and how its errors read.

- `redis://`, `rediss://`, `unix://`: one Redis (`redis.asyncio.Redis`).
- `redis+cluster://[user:pass@]h1:p1,h2:p2,.../[?shards=N]` and `rediss+cluster://…` (TLS):
  a Redis Cluster (`redis.asyncio.cluster.RedisCluster`). The listed nodes are only where
  the client starts: it reads the slot map from any of them and follows MOVED/ASK,
  failovers and resharding on its own. `shards` (default 16) cuts the ledger into that
  many hash-tagged shards (layout.py); it is part of where data lives, so it belongs in
  the URL, beside the nodes, and must be the same for every worker of a fleet.

Credentials and TLS are those of `redis://` / `rediss://`: user and password in the URL
or from the `state` settings (which win), TLS ≥ 1.2 with the server certificate and its
hostname checked, a CA file or the system CAs, an optional client certificate.

Errors (`classify`): connection refused/reset/timeout and the replies that mean "the
server will answer soon" (LOADING, BUSY, TRYAGAIN, MASTERDOWN) and, on a cluster, a
failover in progress (CLUSTERDOWN, a slot without a reachable primary, redirections that
did not settle) are an outage, retried by the caller; every other error reply is final.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ClusterError,
    RedisClusterException,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from inference_worker.security import TlsOptions, redis_kwargs
from inference_worker.state.layout import MAX_SHARDS
from inference_worker.state.packing import fast_packing

__all__ = [
    "CLUSTER_SCHEMES",
    "DEFAULT_SHARDS",
    "OUTAGE",
    "ClusterUrl",
    "by_slot",
    "check_cluster",
    "is_cluster_url",
    "open_client",
    "parse_cluster_url",
    "transient_reply",
]

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
DEFAULT_SHARDS = 16

# Connection settings, chosen for a worker that must notice a dead Redis quickly:
# - connect timeout 5 s: a cold TCP/TLS handshake is far below that, a black hole is not;
# - socket (read) timeout 10 s: a 500-item script runs in milliseconds, so 10 s means
#   the server is gone or stuck, and the worker's error handling should take over;
# - health_check_interval 30 s: a PING before reusing a connection idle that long, so a
#   connection cut by a NAT/LB while idle is replaced instead of failing a claim;
# - 3 retries with jittered backoff (50 ms .. 1 s) on connection errors: rides over a
#   Redis restart. A retried EVALSHA may run twice; the scripts make that harmless
#   (a claim replayed with the same nonce answers as before, a completion `True`, a
#   takeover the records it took). On a cluster the same count bounds the client's own
#   retries, each after re-reading the slot map (a failover moves slots to a replica).
#   On a single Redis the store's script calls bypass this client-level retry
#   (state/direct.py: one retry on a fresh connection; StateCalls backs off after).
CONNECT_TIMEOUT_S = 5.0
SOCKET_TIMEOUT_S = 10.0
HEALTH_CHECK_S = 30
RETRIES = 3

# Error replies that mean "the server will answer soon" (loading its data set, running a
# long script, a cluster failover): retried like an outage. Every other one is final.
_TRANSIENT = (b"LOADING", b"BUSY", b"TRYAGAIN", b"MASTERDOWN", b"CLUSTERDOWN")

# Exceptions that are an outage: the connection's, and the cluster client's for a
# failover it could not ride out within its retries (CLUSTERDOWN / MASTERDOWN, TRYAGAIN
# during a slot migration, MOVED/ASK that kept bouncing, a slot map without the slot,
# "cannot be connected" when no startup node answers).
OUTAGE: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    ClusterDownError,
    TryAgainError,
    AskError,
    ClusterError,
    RedisClusterException,
)


def transient_reply(exc: ResponseError, text: str) -> bool:
    """Whether an error reply (its text with the code put back) is an outage."""
    return isinstance(exc, OUTAGE) or text.encode().startswith(_TRANSIENT)


@dataclass(frozen=True)
class ClusterUrl:
    nodes: tuple[tuple[str, int], ...]
    tls: bool
    username: str | None
    password: str | None = field(repr=False)
    shards: int


def is_cluster_url(url: str) -> bool:
    return url.partition("://")[0].lower() in CLUSTER_SCHEMES


def _node(text: str) -> tuple[str, int]:
    if text.startswith("["):  # [IPv6]:port
        host, sep, rest = text[1:].partition("]")
        port = rest[1:] if sep and rest.startswith(":") else ""
    else:
        host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"cluster node {text!r}: expected host:port")
    return host, int(port)


def parse_cluster_url(url: str) -> ClusterUrl:
    """`redis+cluster://[user:pass@]h1:p1,h2:p2/[?shards=N]` (errors never show the
    password: they name the part at fault)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in CLUSTER_SCHEMES:
        raise ValueError(f"not a Redis Cluster URL: scheme {scheme!r}")
    parts = urlsplit(f"redis://{rest}")  # urlsplit knows the scheme-less parts
    userinfo, _, hosts = parts.netloc.rpartition("@")
    user, has_pw, password = userinfo.partition(":")
    nodes = tuple(_node(h) for h in hosts.split(",") if h)
    if not nodes:
        raise ValueError("a Redis Cluster URL needs at least one host:port")
    if parts.path not in ("", "/", "/0"):
        raise ValueError("a Redis Cluster has database 0 only: drop the path")
    shards = DEFAULT_SHARDS
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key != "shards":
            raise ValueError(f"unknown Redis Cluster URL option {key!r} (known: shards)")
        if not value.isdigit() or not 1 <= int(value) <= MAX_SHARDS:
            raise ValueError(f"shards must be between 1 and {MAX_SHARDS}, got {value!r}")
        shards = int(value)
    return ClusterUrl(
        nodes=nodes,
        tls=scheme.lower() == "rediss+cluster",
        username=unquote(user) if user else None,
        password=unquote(password) if has_pw else None,
        shards=shards,
    )


def check_cluster(url: str, tls: TlsOptions | None) -> ClusterUrl:
    """The parsed cluster URL, after checking the TLS files against its scheme."""
    parsed = parse_cluster_url(url)
    tls = tls or TlsOptions()
    tls.check()
    if tls.given and not parsed.tls:
        raise ValueError("Redis TLS files are set but the state URL is not rediss+cluster://")
    return parsed


def open_client(
    url: str,
    *,
    username: str | None = None,
    password: str | None = None,
    tls: TlsOptions | None = None,
) -> aioredis.Redis | RedisCluster:
    """The (not yet connected) client for `url`, bytes in and out.

    `username` / `password` win over the URL's. Raises ValueError for a malformed URL or
    TLS files given for a plain connection.
    """
    if not is_cluster_url(url):
        security = redis_kwargs(url, username=username, password=password, tls=tls)
        client = aioredis.Redis.from_url(
            url,
            decode_responses=False,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_keepalive=True,
            health_check_interval=HEALTH_CHECK_S,
            retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), RETRIES),
            client_name="inference-worker",
            **security,
        )
        # The URL's scheme picked the class (plain, TLS, unix socket); nothing is
        # connected yet, so every connection of the pool packs fast (state/packing.py).
        pool = client.connection_pool
        pool.connection_class = fast_packing(pool.connection_class)
        return client
    parsed = check_cluster(url, tls)
    tls = tls or TlsOptions()
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in parsed.nodes],
        username=username if username is not None else parsed.username,
        password=password if password is not None else parsed.password,
        decode_responses=False,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_keepalive=True,
        health_check_interval=HEALTH_CHECK_S,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), RETRIES),
        client_name="inference-worker",
        ssl=parsed.tls,
        ssl_ca_certs=tls.ca_file or None,
        ssl_certfile=tls.cert_file or None,
        ssl_keyfile=tls.key_file or None,
        ssl_cert_reqs="required",
        ssl_check_hostname=True,
        ssl_min_version=ssl.TLSVersion.TLSv1_2,
    )


def by_slot(client: Any, keys: Sequence[str]) -> list[list[int]]:
    """The positions of `keys` grouped by hash slot (in order) on a cluster client, where a
    script may only name keys of one slot; all in one group on a single Redis."""
    if not isinstance(client, RedisCluster):
        return [list(range(len(keys)))]
    groups: dict[int, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key_slot(key.encode()), []).append(i)
    return list(groups.values())
