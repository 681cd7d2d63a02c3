"""The side-by-side benchmark: `python -m benchmarks.bench [--json] [--smoke] ...`.

For each transport it starts the broker (Mosquitto with `set_tcp_nodelay true` and
`max_inflight_messages 0`, or Tansu) and redis-server on free ports, then measures one
phase at a time (see `benchmarks.phases`): the worker with Redis idempotency (e2e, raw at
the mean batch it formed, open loop at 50% of e2e), the worker as `run --replicas N`, the
worker without dedupe, the naive worker, and the bare relay (closed loop, and open loop at
the worker's open-loop rate: the reference of `p99_added_ms`). Every phase reads the CPU
time of the processes it drives from /proc (`cpu/relay` = the worker's CPU per request
over the relay's CPU per message). With `--peers ray` the Ray Serve peer is measured last,
on the same model file, at the same outstanding counts (`benchmarks.peers`).

`--smoke`: both transports, digits, a couple of seconds per phase, no raw/naive, exit
status 1 when any phase answers nothing; CI runs it (tests/integration/test_bench_smoke.py).
A phase that answers nothing is never a 0 in the table: it is FAILED, and the bench exits 1.
Load comes from `benchmarks/load.py`, a separate process per run. See RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from benchmarks import servers
from benchmarks.cli_bench import configure
from benchmarks.common import REPO, ModelUnavailable, model_config, model_dir, models_root
from benchmarks.peers import PeerUnavailable, run_peer
from benchmarks.phases import ModelRun, Plan, measure_transport
from benchmarks.procs import log
from benchmarks.raw import worker_settings
from benchmarks.report import machine_info, result_row, table

SMOKE = {
    "models": "digits",
    "transports": "mqtt,kafka",
    "duration": 2.0,
    "baseline_duration": 2.0,
    "open_duration": 2.0,
    "warmup": 0.5,
    "skip": "raw,naive",
}


def _split(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def make_plan(args: argparse.Namespace, models: list[str], transports: list[str]) -> Plan:
    src = Path(args.worker_src).resolve() if args.worker_src else REPO
    return Plan(
        duration=args.duration,
        baseline=args.baseline_duration or max(2.0, args.duration / 3),
        open=args.open_duration or max(2.0, args.duration / 3),
        warmup=args.warmup,
        factor=args.concurrency_factor,
        skip=set(_split(args.skip)),
        profile=Path(args.profile) if args.profile else None,
        fetch_wait_ms=args.kafka_fetch_max_wait_ms,
        threads=worker_settings().models.intra_op_threads,
        models=models,
        transports=transports,
        replicas=sorted({1, *(int(n) for n in _split(args.replicas))}),
        worker_src=src,
    )


def settings_doc(plan: Plan, root: Path, skipped: dict[str, str]) -> dict[str, Any]:
    return {
        "windows_s": {
            "e2e": plan.duration,
            "open_loop": plan.open,
            "nodedup_naive_relay": plan.baseline,
            "warmup": plan.warmup,
        },
        "closed_loop": f"{plan.factor} x max_batch_size requests outstanding, unique ids",
        "open_loop": "Poisson arrivals at 50% of e2e_rps; the relay at the same rate",
        "p99_added": "open-loop p99 of the worker - open-loop p99 of the relay, same rate",
        "cpu": "utime+stime from /proc of the worker (supervisor and children) and of the "
        "relay, over each load run, per answer of that run",
        "delivery": "MQTT 5 QoS 1 (Mosquitto: set_tcp_nodelay true, "
        "max_inflight_messages 0); Kafka (Tansu, memory storage): acks=all, 4 partitions, "
        f"fetch_max_wait_ms: worker 20 (kafka:// default), relay/naive "
        f"{plan.fetch_wait_ms}, generator 10",
        "worker": f"inference-worker run from {plan.worker_src}, config/worker.yaml "
        f"defaults, device cpu/auto, intra_op_threads {plan.threads} (0 = ORT default), "
        f"replicas {plan.replicas}",
        "state": "redis-server (AOF everysec) for e2e/open/replicas; none:// for nodedup",
        "generator": "benchmarks/load.py: paho-mqtt / aiokafka directly, templated zstd "
        "requests, one process per run",
        "raw": "runner in this process at round(mean e2e batch size), CPU, right after e2e",
        "models": {
            m: {
                k: getattr(model_config(root, m), k)
                for k in ("max_batch_size", "max_delay_ms", "instances")
            }
            for m in plan.models
        },
        "skipped": skipped,
    }


def measure_peers(
    args: argparse.Namespace, plan: Plan, root: Path, skipped: dict[str, str]
) -> tuple[dict[str, dict[str, dict[int, float]]], dict[str, Any]]:
    """Each `--peers` system on each model it can serve: model → peer → {C: rps}."""
    by_model: dict[str, dict[str, dict[int, float]]] = {}
    raw: dict[str, Any] = {}
    python = args.peer_python or sys.executable
    for name in _split(args.peers):
        for m in plan.models:
            if m != "digits":  # the peers serve the digits file only (the table)
                continue
            conc = sorted({plan.factor * model_config(root, m).max_batch_size, 64})
            try:
                doc = run_peer(name, python, model_dir(m), conc, duration=plan.duration, warmup=2.0)
            except (PeerUnavailable, RuntimeError) as exc:
                log(f"peer {name}: {exc}")
                skipped[f"peer {name}"] = str(exc)
                continue
            raw[f"{name}/{m}"] = doc
            by_model.setdefault(m, {})[name] = {
                int(r["concurrency"]): float(r["rps"]) for r in doc["results"] if r["answered"]
            }
    return by_model, raw


def run(args: argparse.Namespace) -> int:
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    started = time.monotonic()
    models, transports = _split(args.models), _split(args.transports)
    bad = [t for t in transports if t not in ("mqtt", "kafka")]
    if bad or not transports or not models:
        print(f"bench: --transports takes mqtt,kafka (got {args.transports!r})", file=sys.stderr)
        return 2
    skipped: dict[str, str] = {}
    available = []
    for m in models:
        try:
            model_dir(m)
            available.append(m)
        except ModelUnavailable as exc:
            skipped[m] = str(exc)
            log(f"skipping model {m}: {exc}")
    if not available:
        print("bench: no model available", file=sys.stderr)
        return 2
    plan = make_plan(args, available, transports)
    if plan.profile is not None:
        plan.profile.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    runs: list[ModelRun] = []
    with ExitStack() as stack:
        root = stack.enter_context(models_root(plan.models))
        settings = settings_doc(plan, root, skipped)
        print("machine:")
        for k, v in machine.items():
            print(f"  {k}: {v}")
        print("settings:")
        for k, v in settings.items():
            print(f"  {k}: {v}")
        sys.stdout.flush()
        for t in transports:
            try:
                runs += measure_transport(plan, t, root)
            except servers.ServerUnavailable as exc:
                log(f"skipping transport {t}: {exc}")
                skipped[t] = str(exc)
        peers, peer_docs = measure_peers(args, plan, root, skipped) if args.peers else ({}, {})
    rows = [result_row(r, peers.get(r.model)) for r in runs]
    failed = [f"{r.model}/{r.transport} {p}" for r in runs for p in r.failures]
    missing = [t for t in transports if t in skipped]
    wall = round(time.monotonic() - started, 1)
    print()
    print(table(rows))
    print(f"\nwall time: {wall} s")
    if failed:
        print(f"FAILED phases: {', '.join(failed)}")
    if args.smoke and missing:
        print(f"FAILED: transports not measured: {', '.join(missing)}")
    if args.json:
        doc = {
            "machine": machine,
            "settings": settings,
            "results": rows,
            "peers": peer_docs,
            "failed": failed,
            "wall_s": wall,
        }
        print(json.dumps(doc, sort_keys=True, default=str))
    return 1 if failed or (args.smoke and missing) or not runs else 0


def main(argv: list[str] | None = None) -> int:
    parser = configure(argparse.ArgumentParser(prog="python -m benchmarks.bench"))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
