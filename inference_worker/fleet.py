"""The fleet view: each worker heartbeats into Redis; `inference-worker status` reads it.

Every `worker.heartbeat_s` a worker writes the hash `{prefix}workers:{name}` and gives it
a TTL of 3 heartbeats, so a worker that dies disappears on its own; a clean shutdown
deletes it. Fields (all strings): `id`, `host`, `pid`, `devices`, `models`,
`started_at`/`last_seen` (epoch seconds), `heartbeat_s`, `state` (`serving` |
`draining`), `rps` (requests answered per second over the last interval), `p50_ms` /
`p99_ms`, `inflight`, `queue_depth`, `requests` (total answered), `metrics_port`,
`cuda_visible_devices`.

Latency percentiles come from the worker's Prometheus histogram `iw_request_seconds`:
each heartbeat diffs the cumulative bucket counts (summed over models) against the
previous heartbeat and interpolates inside the bucket, as PromQL `histogram_quantile`
does. So they cover exactly the last interval, cost nothing on the request path, and are
as coarse as the buckets (sub-millisecond to seconds); empty when nothing was answered.
`inflight` is `iw_inflight` summed (claimed, queued in a batcher or computing);
`queue_depth` is the deliveries the transport handed over and the worker has not yet
claimed and acked (its `unacked` count).

Staleness is judged with the Redis clock only (from the key's remaining TTL), so clock
skew between worker and operator hosts cannot mark a live worker stale: a worker is
STALE when its last heartbeat is older than 2 intervals (its key expires at 3).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from inference_worker.cancelling import raise_if_cancelled
from inference_worker.metrics import Metrics

log = logging.getLogger("inference_worker.fleet")

TTL_HEARTBEATS = 3
STALE_HEARTBEATS = 2


def worker_key(prefix: str, name: str) -> str:
    return f"{prefix}workers:{name}"


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


# ---------------------------------------------------------------------------- sampling


def _bucket_counts(metrics: Metrics) -> dict[float, float]:
    """Cumulative `iw_request_seconds` bucket counts by upper bound, summed over models."""
    out: dict[float, float] = {}
    for family in metrics.request_seconds.collect():
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                le = float(sample.labels["le"])
                out[le] = out.get(le, 0.0) + sample.value
    return out


def _answered(metrics: Metrics) -> float:
    total = 0.0
    for family in metrics.requests.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                total += sample.value
    return total


def _gauge_sum(metrics: Metrics) -> float:
    total = 0.0
    for family in metrics.inflight.collect():
        for sample in family.samples:
            total += sample.value
    return total


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """`q`-quantile from cumulative counts by upper bound (PromQL's interpolation).

    None without observations; the largest finite bound when it falls in the +Inf bucket.
    """
    bounds = sorted(buckets)
    if not bounds:
        return None
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            in_bucket = count - below
            if in_bucket <= 0:
                return bound
            return lower + (bound - lower) * (rank - below) / in_bucket
        lower, below = bound, count
    return lower


@dataclass
class _Window:
    at: float
    answered: float
    buckets: dict[float, float]


class Heartbeat:
    """Writes this worker's fleet record every `interval_s` until stopped."""

    def __init__(
        self,
        client: aioredis.Redis | RedisCluster,
        *,
        prefix: str,
        name: str,
        interval_s: float,
        metrics: Metrics,
        info: Mapping[str, str],
        queue_depth: Callable[[], int],
        draining: Callable[[], bool],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self.key = worker_key(prefix, name)
        self._interval = interval_s
        self._metrics = metrics
        self._queue_depth = queue_depth
        self._draining = draining
        self._clock = clock
        self._static = {
            "id": name,
            "host": socket.gethostname(),
            "pid": str(os.getpid()),
            "started_at": f"{time.time():.3f}",
            "heartbeat_s": str(interval_s),
            **info,
        }
        self._last = _Window(clock(), _answered(metrics), _bucket_counts(metrics))

    def sample(self) -> dict[str, str]:
        """The record to write now; advances the rate/percentile window."""
        now = self._clock()
        answered = _answered(self._metrics)
        buckets = _bucket_counts(self._metrics)
        elapsed = max(now - self._last.at, 1e-9)
        delta = {le: c - self._last.buckets.get(le, 0.0) for le, c in buckets.items()}
        rps = (answered - self._last.answered) / elapsed
        self._last = _Window(now, answered, buckets)
        p50 = histogram_quantile(0.50, delta)
        p99 = histogram_quantile(0.99, delta)
        return {
            **self._static,
            "state": "draining" if self._draining() else "serving",
            "last_seen": f"{time.time():.3f}",
            "rps": f"{rps:.1f}",
            "p50_ms": "" if p50 is None else f"{p50 * 1000:.3f}",
            "p99_ms": "" if p99 is None else f"{p99 * 1000:.3f}",
            "inflight": str(int(_gauge_sum(self._metrics))),
            "queue_depth": str(self._queue_depth()),
            "requests": str(int(answered)),
        }

    async def beat(self) -> None:
        ttl_ms = int(self._interval * TTL_HEARTBEATS * 1000)
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.hset(self.key, mapping=self.sample())  # type: ignore[arg-type]
            pipe.pexpire(self.key, ttl_ms)
            await pipe.execute()

    async def run(self, stop: asyncio.Event) -> None:
        """Beat now and every interval; beat at once when drain starts (state=draining)."""
        while True:
            try:
                await self.beat()
            except (RedisError, OSError) as exc:
                log.warning("heartbeat failed", extra={"error": str(exc)})
            raise_if_cancelled()  # each pass: a Redis call may have swallowed the cancel
            if stop.is_set():
                await asyncio.sleep(self._interval)  # draining: keep the record alive
                continue
            # Wakes early when drain starts, so the next beat says `draining` at once.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._interval)

    async def remove(self) -> None:
        """Delete the record (clean shutdown)."""
        try:
            await self._client.delete(self.key)
        except (RedisError, OSError) as exc:
            log.warning("could not remove heartbeat", extra={"error": str(exc)})


# ---------------------------------------------------------------------------- status


async def read_fleet(client: aioredis.Redis | RedisCluster, prefix: str) -> list[dict[str, Any]]:
    """Every worker record under `prefix`, with `age_s` (Redis clock) and `stale`."""
    base = worker_key(prefix, "")
    keys = sorted([k async for k in client.scan_iter(match=_glob_escape(base) + "*", count=500)])
    if not keys:
        return []
    async with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.hgetall(key)
            pipe.pttl(key)
        raw = await pipe.execute()
    out: list[dict[str, Any]] = []
    for i in range(len(keys)):
        fields, pttl = raw[2 * i], raw[2 * i + 1]
        if not fields:
            continue  # expired between SCAN and HGETALL
        rec: dict[str, Any] = {_s(k): _s(v) for k, v in fields.items()}
        interval = _float(rec.get("heartbeat_s")) or 5.0
        ttl_s = interval * TTL_HEARTBEATS
        age = ttl_s - pttl / 1000.0 if isinstance(pttl, int) and pttl >= 0 else None
        rec["age_s"] = None if age is None else round(max(age, 0.0), 3)
        rec["stale"] = age is None or age > STALE_HEARTBEATS * interval
        out.append(rec)
    return out


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


COLUMNS = (
    ("WORKER", "id"),
    ("HOST", "host"),
    ("PID", "pid"),
    ("DEVICE", "devices"),
    ("MODELS", "models"),
    ("STATE", "state"),
    ("REQ/S", "rps"),
    ("P50 MS", "p50_ms"),
    ("P99 MS", "p99_ms"),
    ("INFLIGHT", "inflight"),
    ("QUEUE", "queue_depth"),
    ("SEEN", "age_s"),
)


def format_table(workers: Sequence[Mapping[str, Any]]) -> str:
    """The fleet as an aligned text table; stale workers show STATE `STALE`."""
    if not workers:
        return "no workers are heartbeating"
    rows = [[title for title, _ in COLUMNS]]
    for w in workers:
        row = []
        for _, key in COLUMNS:
            value = w.get(key)
            if key == "state" and w.get("stale"):
                value = "STALE"
            elif key == "age_s":
                value = "-" if value is None else f"{float(value):.1f}s ago"
            row.append("-" if value in (None, "") else str(value))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in rows]
    stale = sum(1 for w in workers if w.get("stale"))
    lines.append(f"{len(workers)} worker(s), {stale} stale")
    return "\n".join(lines)
