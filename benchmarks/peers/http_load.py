"""Closed-loop HTTP JSON load: `python -m benchmarks.peers.http_load --url URL ...`.

`--concurrency` requests outstanding at all times (each answer sends the next), the body a
JSON object `{"<input>": [[...one row...]]}` cycling through `--samples` (an .npz with the
model's sample rows under `x`). One aiohttp session with a connection per outstanding
request, so that the client never queues requests of its own. Prints one JSON line: answers
per second in the `--duration` window after `--warmup`, and latency percentiles (send →
body read, monotonic clock) of the answers in it. Needs aiohttp and numpy only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import numpy as np


async def closed_loop(
    url: str, bodies: list[bytes], concurrency: int, warmup: float, duration: float
) -> dict[str, Any]:
    import aiohttp  # type: ignore[import-not-found, unused-ignore]

    start = time.monotonic()
    lo, hi = start + warmup, start + warmup + duration
    latencies: list[float] = []
    errors = 0
    sent = 0
    headers = {"content-type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(slot: int) -> None:
            nonlocal errors, sent
            i = slot
            while time.monotonic() < hi:
                body = bodies[i % len(bodies)]
                i += concurrency
                sent += 1
                t0 = time.monotonic()
                try:
                    async with session.post(url, data=body, headers=headers) as resp:
                        await resp.read()
                        ok = resp.status == 200
                except aiohttp.ClientError:
                    ok = False
                t1 = time.monotonic()
                if not ok:
                    errors += 1
                elif lo <= t1 < hi:
                    latencies.append((t1 - t0) * 1000.0)

        await asyncio.gather(*(one(s) for s in range(concurrency)))
    lat = np.asarray(latencies) if latencies else np.zeros(1)
    return {
        "concurrency": concurrency,
        "duration_s": duration,
        "sent": sent,
        "answered": len(latencies),
        "errors": errors,
        "rps": round(len(latencies) / duration, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 3),
        "p99_ms": round(float(np.percentile(lat, 99)), 3),
    }


def bodies_from(samples: str, input_name: str) -> list[bytes]:
    x = np.load(samples)["x"].astype(np.float32)
    return [json.dumps({input_name: x[i : i + 1].tolist()}).encode() for i in range(len(x))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--samples", required=True, help=".npz with sample rows under 'x'")
    p.add_argument("--input", default="pixels", help="the JSON key of the input rows")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    args = p.parse_args(argv)
    bodies = bodies_from(args.samples, args.input)
    result = asyncio.run(
        closed_loop(args.url, bodies, args.concurrency, args.warmup, args.duration)
    )
    print(json.dumps(result, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
