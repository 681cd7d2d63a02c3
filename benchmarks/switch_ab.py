"""A/B of `worker.switch_interval_ms`: open-loop latency at a fixed rate, variants alternating.

`python -m benchmarks.switch_ab RATE ROUNDS 5,0.5`: MQTT (Mosquitto), Redis, digits; a fresh
worker per window, the variants interleaved round by round so that drifting machine load
hits both alike. Prints (p50 ms, p99 ms, answered/s) per window and the load average.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from benchmarks import procs
from tests.servers import mosquitto_server, redis_server

MODELS = Path(__file__).resolve().parent.parent / "config" / "models"


def main(argv: list[str]) -> int:
    rate, rounds, variants = float(argv[0]), int(argv[1]), argv[2].split(",")
    results: dict[str, list[tuple[float, float, float]]] = {v: [] for v in variants}
    with mosquitto_server() as mq, redis_server() as rd:
        for i in range(rounds):
            for v in variants:
                os.environ["IW_WORKER__SWITCH_INTERVAL_MS"] = v
                topic = f"ab{i}{v.replace('.', '')}"
                worker = procs.start_worker(mq.url, rd.url, MODELS, topic)
                try:
                    r = procs.run_load(
                        "mqtt", mq.url, topic, MODELS, "digits", "open",
                        rate=rate, duration=6, warmup=1,
                    )  # fmt: skip
                finally:
                    procs.stop_worker(worker)
                row = (round(r.get("p50_ms", 0), 1), round(r.get("p99_ms", 0), 1), r.get("rps", 0))
                results[v].append(row)
                print(v, row, "load", os.getloadavg()[0], flush=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
