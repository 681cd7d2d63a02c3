"""One worker, one closed loop and one open loop, CPU per answer: a quick A/B probe.

`python -m benchmarks.quick [ROUNDS] [RATE] [GIL_PROFILE] [--src DIR ...]`: Mosquitto and
Redis on free ports, digits, the worker from this checkout with `config/worker.yaml`
(an export's `config/` is where a variant changes settings), or from each
`--src` export in turn (rounds alternate between them, A B A B ...); per round a fresh worker,
a 6 s closed loop at 128 outstanding (after 1 s warm-up) with the worker's CPU per answer
from /proc, then a 4 s open loop at RATE req/s (default: half the closed-loop rate).
GIL_PROFILE: a path for `py-spy record --gil` (500 Hz, raw) of the closed loop, which
samples only the thread holding the GIL, so it shows where the interpreter's time goes.
No baselines: for comparing two variants run in alternation in the same minutes (the
whole bench, `benchmarks.bench`, is the measurement of record).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import procs
from benchmarks.cpu import CpuMeter
from benchmarks.profiling import py_spy
from tests.servers import mosquitto_server, redis_server


def _round(
    mq_url: str, rd_url: str, tag: str, rate: float, profile: str | None, src: Path
) -> None:
    topic = f"quick{tag}{int(time.time() * 1000) % 100000}"
    models = src / "config" / "models"  # an export's own model settings
    worker = procs.start_worker(mq_url, rd_url, models, topic, src=src)
    try:
        load = ("mqtt", mq_url, topic, models, "digits")
        procs.run_load(*load, "closed", concurrency=128, duration=1, warmup=1)
        spy = None
        spy_bin = py_spy()
        if profile and spy_bin is not None:
            argv = [spy_bin, "record", "--gil", "-r", "500", "-d", "8", "-f", "raw"]
            argv += ["-o", profile, "-p", str(worker.pid)]
            spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        meter = CpuMeter({"worker": worker.pid}).start()
        closed = procs.run_load(*load, "closed", concurrency=128, duration=6, warmup=1)
        cpu = meter.stop()["worker"]
        if spy is not None:
            spy.wait()
        open_rate = rate or closed["rps"] / 2
        opened = procs.run_load(*load, "open", rate=open_rate, duration=4, warmup=1)
    finally:
        procs.stop_worker(worker)
    per_answer = None if cpu is None else round(cpu * 1000 / closed["answered_total"], 4)
    print(
        f"{tag} closed rps {closed['rps']:.0f} p50 {closed['p50_ms']:.1f} "
        f"p99 {closed['p99_ms']:.1f} cpu_ms/answer {per_answer} | open {opened['rps']:.0f} "
        f"p50 {opened['p50_ms']:.1f} p99 {opened['p99_ms']:.1f} | load {os.getloadavg()[0]:.2f}",
        flush=True,
    )


def main(argv: list[str]) -> int:
    srcs = [Path(argv[i + 1]).resolve() for i, a in enumerate(argv) if a == "--src"]
    argv = [a for i, a in enumerate(argv) if a != "--src" and (i == 0 or argv[i - 1] != "--src")]
    rounds = int(argv[0]) if argv else 1
    rate = float(argv[1]) if len(argv) > 1 else 0.0
    profile = argv[2] if len(argv) > 2 else None
    srcs = srcs or [procs.REPO]
    with mosquitto_server() as mq, redis_server() as rd:
        for i in range(rounds):
            src = srcs[i % len(srcs)]
            tag = f"r{i}" if len(srcs) == 1 else f"r{i}-{src.name}"
            _round(mq.url, rd.url, tag, rate, profile, src)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
