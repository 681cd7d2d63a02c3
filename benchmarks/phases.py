"""One transport's phases, one at a time (everything shares the machine's cores).

A. the worker (`inference-worker run`, Redis idempotency) serving every selected model; per
   model a closed-loop saturation run (`e2e`), right after it `raw` at the mean batch size
   the worker formed, then an open-loop run at 50% of e2e (`open`);
A'. for each `--replicas N` other than 1: the same worker as `run --replicas N` (`e2e_rN`);
B. the same worker with `IW_STATE__URL=none://` (`nodedup`);
C. `benchmarks/naive_worker.py` (`naive`);
D. `benchmarks/relay.py`, a bare subscribe→publish relay: closed loop (`relay`) and open
   loop at the rate of A's open loop (`relay_open`, the reference of `p99_added_ms`).

Every phase reads the CPU time of the process trees it drives from /proc before and after
its load run (`cpu_s`, and `cpu_ms_per_answer` over every answer of that run). A phase
whose load run fails, answers nothing in its window, or answers only errors is a failure
(`ModelRun.failures`): the report prints FAILED for it and the bench exits non-zero.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks import servers
from benchmarks.common import REPO, model_config
from benchmarks.cpu import CpuMeter
from benchmarks.procs import (
    PY,
    WorkerProc,
    log,
    run_load,
    scrape,
    start_ready,
    start_worker,
    stop,
    stop_worker,
    worker_side,
)
from benchmarks.profiling import profile_start, summarize_profile
from benchmarks.raw import raw_rps

GOOD_STATUSES = frozenset({"ok", "echo"})  # a worker's answer / a relay's echoed request


@dataclass
class Plan:
    duration: float
    baseline: float
    open: float
    warmup: float
    factor: int
    skip: set[str]
    profile: Path | None
    fetch_wait_ms: int
    threads: int
    models: list[str]
    transports: list[str]
    replicas: list[int] = field(default_factory=lambda: [1])
    worker_src: Path = REPO


@dataclass
class ModelRun:
    model: str
    transport: str
    max_batch: int
    max_delay_ms: float
    concurrency: int
    warmup: float = 1.0
    baseline: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)


def measured(
    r: ModelRun, phase: str, roots: dict[str, int], load: Callable[[], dict[str, Any]]
) -> dict[str, Any] | None:
    """Run one load, with the CPU of `roots` (name → pid of a process tree) read around
    it; store it as `r.figures[phase]`, or record a failure and return None."""
    meter = CpuMeter(roots).start()
    try:
        result = load()
    except (RuntimeError, OSError, ValueError) as exc:
        r.failures[phase] = f"load run failed: {exc}"
        log(f"{r.model}/{r.transport} {phase}: FAILED ({exc})")
        return None
    cpu = meter.stop()
    n = int(result.get("answered_total") or 0)
    result["cpu_s"] = cpu
    result["cpu_ms_per_answer"] = {
        k: round(1000.0 * v / n, 4) if v is not None and n else None for k, v in cpu.items()
    }
    statuses: dict[str, int] = result.get("statuses") or {}
    good = sum(v for k, v in statuses.items() if k in GOOD_STATUSES)
    if not result.get("answered") or not good:
        r.failures[phase] = (
            f"answered {result.get('answered')} of {result.get('sent')} sent in the window, "
            f"statuses {statuses}"
        )
        log(f"{r.model}/{r.transport} {phase}: FAILED ({r.failures[phase]})")
        return None
    r.figures[phase] = result
    log(
        f"{r.model}/{r.transport} {phase}: {result['rps']} rps, p50 {result['p50_ms']} ms, "
        f"p99 {result['p99_ms']} ms, CPU ms/answer {result['cpu_ms_per_answer']}"
    )
    return result


def measure_raw(plan: Plan, root: Path, runs: list[ModelRun]) -> None:
    """The model alone, before any messaging: batch 1 and max_batch_size."""
    for r in runs:
        b1, bmax = raw_rps(root, r.model, [1, r.max_batch], 1.0, plan.threads)
        r.figures["raw"] = {"rps_batch1": round(b1, 1), "rps_max_batch": round(bmax, 1)}
        # Closed loops of a slow model: a couple of full batches of warm-up, and baseline
        # windows of at least three batch times (its answers come in whole-batch bursts).
        batch_s = r.max_batch / bmax
        r.warmup = max(plan.warmup, min(10.0, 1.5 * batch_s))
        r.baseline = max(plan.baseline, min(20.0, 3 * batch_s))
        log(f"{r.model} raw: batch 1 {b1:.1f}/s, batch {r.max_batch} {bmax:.1f}/s")


def raw_at_mean_batch(plan: Plan, root: Path, r: ModelRun) -> None:
    """raw_rps at the mean batch size the worker formed in e2e, measured right after that
    e2e run (the worker idle meanwhile): on a shared machine, figures taken minutes apart
    are not comparable."""
    raw = r.figures["raw"]
    mean = r.figures["e2e"].get("mean_batch") or r.max_batch
    b = max(1, min(r.max_batch, round(mean)))
    raw["batch"] = b
    raw["rps"] = round(raw_rps(root, r.model, [b], 1.5, plan.threads)[0], 1)
    log(f"{r.model} raw at batch {b}: {raw['rps']}/s")


class Transport:
    """The servers of one transport and the load runs against them."""

    def __init__(self, plan: Plan, name: str, root: Path, stack: ExitStack) -> None:
        self.plan, self.name, self.root = plan, name, root
        if name == "mqtt":
            self.broker = stack.enter_context(servers.mosquitto())
            self.url = self.broker.url
        else:
            self.broker = stack.enter_context(servers.kafka())
            self.url = f"{self.broker.url}?partitions=4"
        self.redis = stack.enter_context(servers.redis())
        log(f"{name}: broker {self.broker.url}, redis {self.redis.url}")

    def roots(self, name: str, pid: int, *, redis: bool = False) -> dict[str, int]:
        out = {name: pid, "broker": self.broker.proc.pid}
        if redis:
            out["redis"] = self.redis.proc.pid
        return out

    def closed(self, topic: str, r: ModelRun, seconds: float, last: bool) -> dict[str, Any]:
        # The last run against a server process does not wait for its stragglers: the
        # process is killed next. Otherwise they would load the next run.
        return run_load(
            self.name, self.url, topic, self.root, r.model, "closed",
            concurrency=r.concurrency, duration=seconds, warmup=r.warmup,
            max_delay_ms=r.max_delay_ms, drain=0 if last else 30,
        )  # fmt: skip

    def opened(self, topic: str, r: ModelRun, rate: float) -> dict[str, Any]:
        return run_load(
            self.name, self.url, topic, self.root, r.model, "open", rate=rate,
            duration=self.plan.open, warmup=self.plan.warmup, max_delay_ms=r.max_delay_ms,
            drain=30,
        )  # fmt: skip

    def start_worker(self, topic: str, state: str, replicas: int = 1) -> WorkerProc:
        return start_worker(
            self.url, state, self.root, topic, replicas=replicas, src=self.plan.worker_src
        )

    def helper(self, module: str, topic: str, *extra: str) -> Any:
        argv = [PY, "-m", module, "--transport", self.name, "--url", self.url, "--topic", topic]
        return start_ready([*argv, "--fetch-max-wait-ms", str(self.plan.fetch_wait_ms), *extra])


def _each(
    t: Transport, runs: list[ModelRun], phase: str, topic: str, roots: dict[str, int]
) -> None:
    for i, r in enumerate(runs):
        seconds = max(t.plan.baseline, r.baseline)
        last = i == len(runs) - 1
        measured(r, phase, roots, partial(t.closed, topic, r, seconds, last))


def _phase_a(t: Transport, runs: list[ModelRun]) -> None:
    plan = t.plan
    worker = t.start_worker("benchA", f"{t.redis.url}/0")
    roots = t.roots("worker", worker.pid, redis=True)
    try:
        for r in runs:
            spy = out = None
            if plan.profile is not None:
                out = plan.profile / f"{r.model}-{t.name}.raw.txt"
                spy = profile_start(worker.pid, r.warmup + plan.duration, out)
            before = scrape(worker.metrics_ports)
            e2e = measured(r, "e2e", roots, partial(t.closed, "benchA", r, plan.duration, False))
            if spy is not None and out is not None:
                spy.wait(timeout=60)
                summary = summarize_profile(out)
                out.with_name(f"{r.model}-{t.name}.summary.txt").write_text(summary)
                log(f"profile of the worker, {r.model} e2e over {t.name}:\n{summary}")
            if e2e is None:
                continue
            e2e["worker_side"] = worker_side(before, scrape(worker.metrics_ports), r.model)
            if "raw" not in plan.skip:
                raw_at_mean_batch(plan, t.root, r)
            if "open" in plan.skip:
                continue
            rate = round(0.5 * e2e["rps"], 1)
            before = scrape(worker.metrics_ports)
            opened = measured(r, "open", roots, partial(t.opened, "benchA", r, rate))
            if opened is not None:
                opened["worker_side"] = worker_side(before, scrape(worker.metrics_ports), r.model)
    finally:
        stop_worker(worker)


def _replicas(t: Transport, runs: list[ModelRun], n: int) -> None:
    topic = f"benchR{n}"
    worker = t.start_worker(topic, f"{t.redis.url}/0", replicas=n)
    roots = t.roots("worker", worker.pid, redis=True)
    try:
        for i, r in enumerate(runs):
            last = i == len(runs) - 1
            measured(r, f"e2e_r{n}", roots, partial(t.closed, topic, r, t.plan.duration, last))
    finally:
        stop_worker(worker)


def _relay(t: Transport, runs: list[ModelRun]) -> None:
    relay = t.helper("benchmarks.relay", "benchD")
    roots = t.roots("relay", relay.pid)
    try:
        _each(t, runs, "relay", "benchD", roots)
        for r in runs:
            rate = (r.figures.get("open") or {}).get("rate")
            if rate:  # the reference latency of p99_added: the relay at the same rate
                measured(r, "relay_open", roots, partial(t.opened, "benchD", r, rate))
    finally:
        stop(relay, kill=True)


def measure_transport(plan: Plan, transport: str, root: Path) -> list[ModelRun]:
    runs = []
    for m in plan.models:
        cfg = model_config(root, m)
        conc = plan.factor * cfg.max_batch_size
        runs.append(ModelRun(m, transport, cfg.max_batch_size, cfg.max_delay_ms, conc))
    if "raw" not in plan.skip:
        measure_raw(plan, root, runs)
    with ExitStack() as stack:
        t = Transport(plan, transport, root, stack)
        _phase_a(t, runs)
        for n in plan.replicas:
            if n != 1:
                _replicas(t, runs, n)
        if "nodedup" not in plan.skip:
            worker = t.start_worker("benchB", "none://")
            try:
                _each(t, runs, "nodedup", "benchB", t.roots("worker", worker.pid))
            finally:
                stop_worker(worker)
        if "naive" not in plan.skip:
            naive = t.helper(
                "benchmarks.naive_worker", "benchC", "--models-root", str(root),
                "--intra-op-threads", str(plan.threads),
            )  # fmt: skip
            try:
                _each(t, runs, "naive", "benchC", t.roots("naive", naive.pid))
            finally:
                stop(naive, kill=True)
        if "relay" not in plan.skip:
            _relay(t, runs)
    return runs
