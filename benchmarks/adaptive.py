"""Adaptive batching vs fixed delays: `python -m benchmarks.adaptive [--duration S] ...`.

For each model (digits, MiniLM) it starts Mosquitto and redis-server on free ports, then:

1. **capacity**: the worker with the model's own config under a closed loop
   (2 x max_batch_size outstanding, `benchmarks.load`): answers per second;
2. a **sweep** of fixed `max_delay_ms` values, one worker each, and the worker with the
   model's `latency_target_ms` set (adaptive), each measured by open-loop Poisson load at
   10%, 50% and 90% of that capacity (same seed, so every setting sees the same arrivals).

Per run it records the throughput (answers to the requests sent in the window, per
second), the p50/p99 of `queue_ms + compute_ms` as the worker reports it in each response
(what `latency_target_ms` aims at), the client's end-to-end p99, the mean batch, and, for
the adaptive worker, the wait and row limit it chose (`iw_batch_wait_seconds`,
`iw_batch_rows_limit` from `/metrics` after the run). "best fixed" at a rate is the fixed
delay with the highest throughput there (ties within 1%: the lower p99).

The worker is `inference-worker run` (benchmarks.procs) serving a repository whose
config.yaml is the model's with the swept key changed. `--duration` is the measured
window of every open-loop run (default 5 s; the short form for a shared machine is 2-3 s),
lengthened for a slow model at a low rate to send at least `--min-requests` (at most
`--max-duration`).
Results: benchmarks/RESULTS.md, section "Adaptive batching".
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml

from benchmarks import servers
from benchmarks.common import REPO, model_config, model_dir
from benchmarks.procs import log, run_load, start_worker, stop_worker
from benchmarks.raw import raw_rps
from benchmarks.report import machine_info

LOADS = (0.1, 0.5, 0.9)
DELAYS = {"digits": "0,1,2,5,10", "minilm": "0,5,20,50"}
TARGETS = {"digits": 20.0, "minilm": 1000.0}
SAMPLE_FILES = {"digits": "heldout.npz", "minilm": "sentences.json"}


def repository(tmp: Path, model: str, overrides: dict[str, Any]) -> Path:
    """A model repository at `tmp` serving `model` with its config keys overridden."""
    src = model_dir(model)
    root = tmp / f"repo-{len(list(tmp.iterdir()))}"
    (root / model).mkdir(parents=True)
    config = yaml.safe_load((src / "config.yaml").read_text())
    config.pop("latency_target_ms", None)
    config.update(overrides)
    (root / model / "config.yaml").write_text(yaml.safe_dump(config))
    (root / model / "1").symlink_to(src / "1", target_is_directory=True)
    sample = SAMPLE_FILES[model]
    (root / model / sample).symlink_to(src / sample)
    return root


def gauges(port: int, model: str) -> dict[str, float]:
    """The worker's batching gauges for `model` (wait and row limit it chose)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        for name in ("iw_batch_wait_seconds", "iw_batch_rows_limit"):
            if line.startswith(f'{name}{{model="{model}"}}'):
                out[name] = float(line.rpartition(" ")[2])
    return out


class Bench:
    def __init__(self, args: argparse.Namespace, broker: str, redis: str, tmp: Path) -> None:
        self.args, self.broker, self.redis, self.tmp = args, broker, redis, tmp
        self.seq = 0

    def worker(self, root: Path) -> Any:
        self.seq += 1
        return start_worker(
            self.broker, f"{self.redis}/0", root, f"benchAd{self.seq}", src=self.args.worker_src
        )

    def capacity(self, model: str) -> float:
        root = repository(self.tmp, model, {})
        cfg = model_config(root, model)
        # A slow model answers in whole-batch bursts: warm up over a batch and a half and
        # measure over at least three batch times (as benchmarks.phases does).
        (rps,) = raw_rps(root, model, [cfg.max_batch_size], 1.0, 0)
        batch_s = cfg.max_batch_size / rps
        warmup = max(self.args.warmup, min(10.0, 1.5 * batch_s))
        duration = max(self.args.duration, min(20.0, 3 * batch_s))
        worker = self.worker(root)
        try:
            result = run_load(
                "mqtt", self.broker, f"benchAd{self.seq}", root, model, "closed",
                concurrency=2 * cfg.max_batch_size, duration=duration, warmup=warmup, drain=0,
            )  # fmt: skip
        finally:
            stop_worker(worker)
        log(f"{model} capacity: {result['rps']} rps (closed loop, batch {result['mean_batch']})")
        if not result["rps"]:
            raise RuntimeError(f"{model}: the closed loop answered nothing: {result}")
        return float(result["rps"])

    def setting(
        self, model: str, name: str, overrides: dict[str, Any], rates: list[float]
    ) -> list[dict[str, Any]]:
        root = repository(self.tmp, model, overrides)
        worker = self.worker(root)
        rows = []
        try:
            for load, rate in zip(LOADS, rates, strict=True):
                # A slow model at a low rate gets a longer window, for enough samples.
                window = min(
                    self.args.max_duration, max(self.args.duration, self.args.min_requests / rate)
                )
                result = run_load(
                    "mqtt", self.broker, f"benchAd{self.seq}", root, model, "open", rate=rate,
                    duration=window, warmup=self.args.warmup, drain=10,
                    max_delay_ms=overrides.get("max_delay_ms", 0),
                )  # fmt: skip
                chosen = gauges(worker.metrics_ports[0], model)
                row = {
                    "model": model,
                    "load": load,
                    "rate": rate,
                    "window_s": round(window, 1),
                    "setting": name,
                    "rps": result["rps"],
                    "p50_served_ms": result.get("p50_served_ms"),
                    "p99_served_ms": result.get("p99_served_ms"),
                    "p99_e2e_ms": result["p99_ms"],
                    "mean_batch": result["mean_batch"],
                    "statuses": result["statuses"],
                    "unanswered": result["unanswered_at_exit"],
                    "wait_ms": round(1000 * chosen["iw_batch_wait_seconds"], 2)
                    if "iw_batch_wait_seconds" in chosen
                    else None,
                    "rows_limit": chosen.get("iw_batch_rows_limit"),
                }
                log(f"{model} {name} at {int(load * 100)}% ({rate}/s): {row}")
                rows.append(row)
        finally:
            stop_worker(worker)
        return rows

    def model(self, model: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        target = self.args.targets.get(model, TARGETS[model])
        delays = [float(d) for d in (self.args.delays or DELAYS[model]).split(",")]
        cap = self.capacity(model)
        rates = [round(f * cap, 1) for f in LOADS]
        rows: list[dict[str, Any]] = []
        for d in delays:
            rows += self.setting(model, f"fixed {d:g} ms", {"max_delay_ms": d}, rates)
        rows += self.setting(model, f"target {target:g} ms", {"latency_target_ms": target}, rates)
        return rows, {"capacity_rps": cap, "target_ms": target, "delays_ms": delays}


def summary(rows: list[dict[str, Any]], meta: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model and load: the adaptive run against the best fixed delay there."""
    out = []
    for model, m in meta.items():
        for load in LOADS:
            here = [r for r in rows if r["model"] == model and r["load"] == load]
            fixed = [r for r in here if r["setting"].startswith("fixed")]
            adaptive = next(r for r in here if r["setting"].startswith("target"))
            top = max(r["rps"] for r in fixed)
            near = [r for r in fixed if r["rps"] >= 0.99 * top]
            best = min(near, key=lambda r: r["p99_served_ms"] or float("inf"))
            p99 = adaptive["p99_served_ms"]
            out.append(
                {
                    "model": model,
                    "load": f"{int(load * 100)}%",
                    "rate": adaptive["rate"],
                    "target_ms": m["target_ms"],
                    "adaptive_p99_ms": p99,
                    "within_target": p99 is not None and p99 <= m["target_ms"],
                    "adaptive_rps": adaptive["rps"],
                    "best_fixed": best["setting"],
                    "best_fixed_p99_ms": best["p99_served_ms"],
                    "best_fixed_rps": best["rps"],
                    "rps_vs_best": round(adaptive["rps"] / best["rps"], 3) if best["rps"] else None,
                    "wait_ms": adaptive["wait_ms"],
                    "rows_limit": adaptive["rows_limit"],
                    "adaptive_mean_batch": adaptive["mean_batch"],
                    "best_fixed_mean_batch": best["mean_batch"],
                }
            )
    return out


def markdown(rows: list[dict[str, Any]], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(c) is None else str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="digits,minilm")
    p.add_argument("--duration", type=float, default=5.0, help="window of each run (s)")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument(
        "--min-requests", type=float, default=30,
        help="lengthen a run's window to send at least this many (up to --max-duration)",
    )  # fmt: skip
    p.add_argument("--max-duration", type=float, default=12.0)
    p.add_argument("--delays", default="", help="fixed max_delay_ms sweep (default per model)")
    p.add_argument(
        "--target", action="append", default=[], metavar="MODEL=MS",
        help="latency_target_ms per model (default digits=20, minilm=1000)",
    )  # fmt: skip
    p.add_argument(
        "--worker-src", type=Path, default=REPO,
        help="run the worker from this checkout (e.g. `git archive HEAD` unpacked)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    args.targets = {k: float(v) for k, _, v in (t.partition("=") for t in args.target)}
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    meta: dict[str, dict[str, Any]] = {}
    with ExitStack() as stack:
        broker = stack.enter_context(servers.mosquitto())
        redis = stack.enter_context(servers.redis())
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="iw-adaptive-")))
        bench = Bench(args, broker.url, redis.url, tmp)
        for model in [m.strip() for m in args.models.split(",") if m.strip()]:
            got, meta[model] = bench.model(model)
            rows += got
    table = summary(rows, meta)
    wall = round(time.monotonic() - started, 1)
    print(f"machine: {machine_info()}")
    print(f"models: {meta}")
    print()
    cols = ["model", "load", "rate", "setting", "rps", "p50_served_ms", "p99_served_ms"]
    print(markdown(rows, [*cols, "p99_e2e_ms", "mean_batch", "wait_ms", "rows_limit"]))
    print()
    print(markdown(table, list(table[0]) if table else []))
    print(f"\nwall time: {wall} s")
    if args.json:
        print(json.dumps({"runs": rows, "summary": table, "meta": meta, "wall_s": wall}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
