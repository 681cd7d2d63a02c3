"""One worker, one closed loop and one open loop, CPU per answer: a quick A/B probe.

`python -m benchmarks.quick [ROUNDS] [RATE] [GIL_PROFILE] [--profile-phase open]
[--src DIR ...]`: Mosquitto and Redis on free ports, digits, the worker from this checkout
with `config/worker.yaml`, or from each `--src` export in turn (rounds alternate between
them, A B A B ...; an export's own `config/` is where a variant changes settings). Per
round a fresh worker, a 6 s closed loop at 128 outstanding (after 1 s warm-up) with the
worker's CPU per answer from /proc, then a 4 s open loop at RATE req/s (default: half the
closed-loop rate) with its CPU per answer too (at part load the fixed costs per group and
per batch show there). GIL_PROFILE: a path for `py-spy record --gil` (500 Hz, 5 s, raw)
of the closed loop (or the open one), which samples only the thread holding the GIL, so
it shows where the interpreter's time goes.
No baselines: for comparing two variants run in alternation in the same minutes (the
whole bench, `benchmarks.bench`, is the measurement of record).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import procs
from benchmarks.common import REPO
from benchmarks.cpu import CpuMeter
from benchmarks.profiling import py_spy
from tests.servers import mosquitto_server, redis_server


def _spy(profile: str | None, pid: int) -> subprocess.Popen[bytes] | None:
    spy_bin = py_spy()
    if not profile or spy_bin is None:
        return None
    argv = [spy_bin, "record", "--gil", "-r", "500", "-d", "5", "-f", "raw"]
    argv += ["-o", profile, "-p", str(pid)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _round(args: argparse.Namespace, mq_url: str, rd_url: str, tag: str, src: Path) -> None:
    topic = f"quick{tag}{int(time.time() * 1000) % 100000}"
    models = src / "config" / "models"  # an export's own model settings
    worker = procs.start_worker(mq_url, rd_url, models, topic, src=src)
    try:
        load = ("mqtt", mq_url, topic, models, "digits")
        procs.run_load(*load, "closed", concurrency=128, duration=1, warmup=1)
        spy = _spy(args.profile if args.profile_phase == "closed" else None, worker.pid)
        meter = CpuMeter({"worker": worker.pid}).start()
        closed = procs.run_load(*load, "closed", concurrency=128, duration=6, warmup=1)
        cpu_closed = meter.stop()["worker"]
        if spy is not None:
            spy.wait()
        open_rate = args.rate or closed["rps"] / 2
        spy = _spy(args.profile if args.profile_phase == "open" else None, worker.pid)
        meter = CpuMeter({"worker": worker.pid}).start()
        opened = procs.run_load(*load, "open", rate=open_rate, duration=4, warmup=1)
        cpu_open = meter.stop()["worker"]
        if spy is not None:
            spy.wait()
    finally:
        procs.stop_worker(worker)
    print(
        f"{tag} closed rps {closed['rps']:.0f} p50 {closed['p50_ms']:.1f} "
        f"p99 {closed['p99_ms']:.1f} cpu_ms/answer {_per_answer(cpu_closed, closed)} | "
        f"open {opened['rps']:.0f} p50 {opened['p50_ms']:.1f} p99 {opened['p99_ms']:.1f} "
        f"cpu_ms/answer {_per_answer(cpu_open, opened)} | load {os.getloadavg()[0]:.2f}",
        flush=True,
    )


def _per_answer(cpu_s: float | None, run: dict[str, Any]) -> float | None:
    """CPU over the whole run (warm-up included) per answer of the whole run."""
    total = run.get("answered_total") or 0
    return None if cpu_s is None or not total else round(cpu_s * 1000 / total, 4)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quick")
    p.add_argument("rounds", nargs="?", type=int, default=1)
    p.add_argument("rate", nargs="?", type=float, default=0.0, help="open loop req/s")
    p.add_argument("profile", nargs="?", help="a path for py-spy record --gil (raw)")
    p.add_argument("--profile-phase", choices=["closed", "open"], default="closed")
    p.add_argument("--src", action="append", type=Path, default=[], help="a worker export")
    args = p.parse_args(argv)
    srcs = [s.resolve() for s in args.src] or [REPO]
    with mosquitto_server() as mq, redis_server() as rd:
        for i in range(args.rounds):
            src = srcs[i % len(srcs)]
            tag = f"r{i}" if len(srcs) == 1 else f"r{i}-{src.name}"
            _round(args, mq.url, rd.url, tag, src)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
