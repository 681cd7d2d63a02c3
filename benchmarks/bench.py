"""The side-by-side benchmark (issue 5): `python -m benchmarks.bench [--json] ...`.

For each transport it starts the broker (Mosquitto with `set_tcp_nodelay true` and
`max_inflight_messages 0`, or Tansu) and redis-server on free ports, then measures one
phase at a time, never two at once (everything shares the machine's cores):

A. the worker (`python -m inference_worker.cli run`, Redis idempotency on) serving every
   selected model; per model: a closed-loop saturation run (`e2e_rps`); right after it,
   with the worker idle, `raw_rps`: the model's runner in this process at the mean batch
   size the worker formed (batch 1 and max_batch_size are measured before A, for
   reference and to size warm-ups); then an open-loop run at 50% of e2e (`p50_ms`,
   `p99_ms`, `p99_added_ms`, batch histogram);
B. the same worker with `IW_STATE__URL=none://` (`nodedup_rps`);
C. `benchmarks/naive_worker.py` (`naive_rps`);
D. `benchmarks/relay.py`, a bare subscribe→publish relay (`relay_rps`).

Load comes from `benchmarks/load.py`, a separate process per run. See RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import servers
from benchmarks.cli_bench import configure
from benchmarks.common import REPO, ModelUnavailable, model_config, models_root, samples, stacked

PY = sys.executable
READY_TIMEOUT_S = 90.0


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    import aiokafka
    import onnxruntime as ort
    import paho.mqtt

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    ram_gib = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    mosq = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": ram_gib,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(),
        "paho_mqtt": paho.mqtt.__version__,
        "aiokafka": aiokafka.__version__,
        "mosquitto": servers.version_of([mosq, "-h"]),
        "redis": servers.version_of(["redis-server", "--version"]),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


# ----------------------------------------------------------------------------- processes


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IW_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def stop(proc: subprocess.Popen[Any], *, kill: bool = False) -> None:
    """End a helper. `kill`: SIGKILL at once (between phases nothing needs a graceful
    drain, and a worker draining queued compute-bound batches would cost seconds)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class WorkerProc:
    proc: subprocess.Popen[Any]
    metrics_port: int

    @property
    def pid(self) -> int:
        return self.proc.pid


def scrape(port: int) -> dict[str, float]:
    """The worker's Prometheus `_sum`/`_count` samples, keyed `name{labels}`."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith("iw_") and ("_sum{" in line or "_count{" in line):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def worker_side(before: dict[str, float], after: dict[str, float], model: str) -> dict[str, Any]:
    """Means over one run from the worker's own histograms (receive → publish, etc.)."""

    def mean(name: str) -> float | None:
        label = f'{{model="{model}"}}'
        n = after.get(f"{name}_count{label}", 0.0) - before.get(f"{name}_count{label}", 0.0)
        total = after.get(f"{name}_sum{label}", 0.0) - before.get(f"{name}_sum{label}", 0.0)
        return round(total / n, 3 if name == "iw_batch_size" else 6) if n else None

    ms = {k: mean(f"iw_{k}_seconds") for k in ("request", "queue", "compute")}
    return {
        "request_ms": None if ms["request"] is None else round(ms["request"] * 1000, 2),
        "queue_ms": None if ms["queue"] is None else round(ms["queue"] * 1000, 2),
        "compute_ms_per_batch": None if ms["compute"] is None else round(ms["compute"] * 1000, 2),
        "mean_batch": mean("iw_batch_size"),
    }


def start_worker(broker: str, state: str, root: Path, topic: str) -> WorkerProc:
    port = servers.free_port()
    env = _env(
        {
            "IW_BROKER__URL": broker,
            "IW_BROKER__REQUEST_TOPIC": topic,
            "IW_STATE__URL": state,
            "IW_MODELS__ROOT": str(root),
            "IW_LOGGING__LEVEL": "WARNING",
            "IW_METRICS__HOST": "127.0.0.1",
            "IW_METRICS__PORT": str(port),
            "IW_WORKER__NAME": f"bench-{topic}",
        }
    )
    config = REPO / "config" / "worker.yaml"
    argv = [PY, "-m", "inference_worker.cli", "run"]
    if config.is_file():
        argv += ["--config", str(config)]
    proc = subprocess.Popen(argv, env=env, cwd=REPO)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                if r.status == 200:
                    return WorkerProc(proc, port)
        except OSError:
            pass
        time.sleep(0.1)
    stop(proc)
    raise TimeoutError(f"worker not ready within {READY_TIMEOUT_S}s")


def start_ready(argv: list[str]) -> subprocess.Popen[Any]:
    """Start a helper (naive worker, relay) and wait for its `ready` line."""
    proc = subprocess.Popen(argv, env=_env({}), cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # blocks until ready or exit
    if line.strip() != "ready":
        stop(proc)
        raise RuntimeError(f"{argv[2]} did not start (said {line!r})")
    return proc


def run_load(
    transport: str, url: str, topic: str, root: Path, model: str, mode: str, **kw: Any
) -> dict[str, Any]:
    argv = [
        PY,
        "-m",
        "benchmarks.load",
        "--transport",
        transport,
        "--url",
        url,
        "--topic",
        topic,
        "--models-root",
        str(root),
        "--model",
        model,
        "--mode",
        mode,
    ]
    for key, value in kw.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    out = subprocess.run(argv, env=_env({}), cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed ({out.returncode}):\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# ----------------------------------------------------------------------------- raw


def worker_settings() -> Any:
    """The settings the worker subprocess starts from (config/worker.yaml, no env)."""
    from inference_worker.settings import load_settings

    config = REPO / "config" / "worker.yaml"
    return load_settings(config if config.is_file() else None)


def raw_rps(
    root: Path, model: str, batches: list[int], seconds: float, threads: int
) -> list[float]:
    """Items/s of the model's runner called in this process, for each batch size.

    One warm-up call (and one per small batch size), then calls for at least `seconds`
    (at least one).
    """
    from inference_worker.models import ModelRepository
    from inference_worker.runtimes import load_runner

    repo = ModelRepository(root)
    version = repo.latest_version(model)
    runner = load_runner(
        repo.config(model),
        repo.artifact_path(model, version),
        device="cpu",
        intra_op_threads=threads,
    )
    items = samples(root, model)
    rates = []
    try:
        runner.run(stacked(items, 1))  # first call: allocations
        for batch in batches:
            inputs = stacked(items, batch)
            if batch <= 8:
                runner.run(inputs)
            n = 0
            started = time.perf_counter()
            while (elapsed := time.perf_counter() - started) < seconds or n < 1:
                runner.run(inputs)
                n += 1
            rates.append(batch * n / elapsed)
        return rates
    finally:
        runner.close()


# ----------------------------------------------------------------------------- profile


def profile_start(pid: int, seconds: float, out: Path) -> subprocess.Popen[Any] | None:
    spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    if not os.access(spy, os.X_OK):
        log("py-spy not found: no profile")
        return None
    argv = [
        spy,
        "record",
        "-p",
        str(pid),
        "-f",
        "raw",
        "-d",
        str(int(seconds)),
        "-r",
        "100",
        "--threads",
        "--nonblocking",
        "-o",
        str(out),
    ]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarize_profile(raw: Path, top: int = 25) -> str:
    """Top inclusive frames (function + file, lines merged) of a py-spy raw profile."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        if frames and frames[0].startswith(("thread", "process")):
            threads[frames[0].split(" (")[0] if frames[0].startswith("process") else frames[0]] += n
            frames = frames[1:]
        names = []
        for f in frames:
            func, _, where = f.partition(" (")
            names.append(f"{func} ({where.rsplit(':', 1)[0].rstrip(')')})")
        for name in set(names):
            inclusive[name] += n
        if names:
            own[names[-1]] += n
    if not total:
        return "no samples"
    lines = [f"{total} samples (100 Hz, non-blocking, all threads)", "by thread:"]
    lines += [f"  {n / total:6.1%}  {t}" for t, n in threads.most_common(8)]
    lines.append("inclusive:")
    lines += [f"  {n / total:6.1%}  {f}" for f, n in inclusive.most_common(top)]
    lines.append("self:")
    lines += [f"  {n / total:6.1%}  {f}" for f, n in own.most_common(15)]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- orchestration


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


def measure_transport(plan: Plan, transport: str, root: Path) -> list[ModelRun]:
    runs = []
    for m in plan.models:
        cfg = model_config(root, m)
        conc = plan.factor * cfg.max_batch_size
        runs.append(ModelRun(m, transport, cfg.max_batch_size, cfg.max_delay_ms, conc))
    if "raw" not in plan.skip:
        measure_raw(plan, root, runs)
    with ExitStack() as stack:
        if transport == "mqtt":
            broker = stack.enter_context(servers.mosquitto())
            url = broker.url
        else:
            broker = stack.enter_context(servers.kafka())
            url = f"{broker.url}?partitions=4"
        redis = stack.enter_context(servers.redis())
        log(f"{transport}: broker {broker.url}, redis {redis.url}")

        def closed(topic: str, r: ModelRun, seconds: float, last: bool) -> dict[str, Any]:
            # The last run against a server process does not wait for its stragglers:
            # the process is killed next. Otherwise they would load the next run.
            return run_load(
                transport,
                url,
                topic,
                root,
                r.model,
                "closed",
                concurrency=r.concurrency,
                duration=seconds,
                warmup=r.warmup,
                max_delay_ms=r.max_delay_ms,
                drain=0 if last else 30,
            )

        def each(phase: str, topic: str) -> None:
            for i, r in enumerate(runs):
                seconds = max(plan.baseline, r.baseline)
                r.figures[phase] = closed(topic, r, seconds, i == len(runs) - 1)
                log(f"{r.model}/{transport} {phase}: {r.figures[phase]['rps']} rps")

        # A: the worker with Redis idempotency.
        worker = start_worker(url, f"{redis.url}/0", root, "benchA")
        try:
            for r in runs:
                spy = out = None
                if plan.profile is not None:
                    out = plan.profile / f"{r.model}-{transport}.raw.txt"
                    spy = profile_start(worker.pid, r.warmup + plan.duration, out)
                before = scrape(worker.metrics_port)
                e2e = closed("benchA", r, plan.duration, False)
                e2e["worker_side"] = worker_side(before, scrape(worker.metrics_port), r.model)
                if spy is not None and out is not None:
                    spy.wait(timeout=60)
                    summary = summarize_profile(out)
                    out.with_name(f"{r.model}-{transport}.summary.txt").write_text(summary)
                    log(f"profile of the worker, {r.model} e2e over {transport}:\n{summary}")
                r.figures["e2e"] = e2e
                log(
                    f"{r.model}/{transport} e2e: {e2e['rps']} rps, mean batch "
                    f"{e2e['mean_batch']}, p50 {e2e['p50_ms']} ms"
                )
                if "raw" not in plan.skip:
                    raw_at_mean_batch(plan, root, r)
                if "open" not in plan.skip and e2e["rps"] > 0:
                    rate = round(0.5 * e2e["rps"], 1)
                    before = scrape(worker.metrics_port)
                    opened = run_load(
                        transport,
                        url,
                        "benchA",
                        root,
                        r.model,
                        "open",
                        rate=rate,
                        duration=plan.open,
                        warmup=plan.warmup,
                        max_delay_ms=r.max_delay_ms,
                        drain=30,
                    )
                    opened["worker_side"] = worker_side(
                        before, scrape(worker.metrics_port), r.model
                    )
                    r.figures["open"] = opened
                    log(
                        f"{r.model}/{transport} open @{rate}/s: p50 {opened['p50_ms']} ms, "
                        f"p99 {opened['p99_ms']} ms, p99 added {opened['p99_added_ms']} ms"
                    )
        finally:
            stop(worker.proc, kill=True)

        # B: the same worker without idempotency.
        if "nodedup" not in plan.skip:
            worker = start_worker(url, "none://", root, "benchB")
            try:
                each("nodedup", "benchB")
            finally:
                stop(worker.proc, kill=True)

        # C: the naive worker.
        if "naive" not in plan.skip:
            naive = start_ready(
                [
                    PY,
                    "-m",
                    "benchmarks.naive_worker",
                    "--transport",
                    transport,
                    "--url",
                    url,
                    "--topic",
                    "benchC",
                    "--models-root",
                    str(root),
                    "--intra-op-threads",
                    str(plan.threads),
                    "--fetch-max-wait-ms",
                    str(plan.fetch_wait_ms),
                ]
            )
            try:
                each("naive", "benchC")
            finally:
                stop(naive, kill=True)

        # D: the bare relay, with each model's request payloads.
        if "relay" not in plan.skip:
            relay = start_ready(
                [
                    PY,
                    "-m",
                    "benchmarks.relay",
                    "--transport",
                    transport,
                    "--url",
                    url,
                    "--topic",
                    "benchD",
                    "--fetch-max-wait-ms",
                    str(plan.fetch_wait_ms),
                ]
            )
            try:
                each("relay", "benchD")
            finally:
                stop(relay, kill=True)
    return runs


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def result_row(r: ModelRun) -> dict[str, Any]:
    f = r.figures
    e2e = f["e2e"]["rps"]
    opened = f.get("open", {})
    raw = f.get("raw", {})
    row: dict[str, Any] = {
        "model": r.model,
        "transport": r.transport,
        "e2e_rps": e2e,
        "raw_rps": raw.get("rps"),
        "relay_rps": f.get("relay", {}).get("rps"),
        "naive_rps": f.get("naive", {}).get("rps"),
        "nodedup_rps": f.get("nodedup", {}).get("rps"),
        "p50_ms": opened.get("p50_ms"),
        "p99_ms": opened.get("p99_ms"),
        "p99_added_ms": opened.get("p99_added_ms"),
        "batch_hist": opened.get("batch_hist", {}),
    }
    row["ratios"] = {
        "e2e/relay": _ratio(e2e, row["relay_rps"]),
        "e2e/raw": _ratio(e2e, row["raw_rps"]),
        "e2e/naive": _ratio(e2e, row["naive_rps"]),
        "e2e/nodedup": _ratio(e2e, row["nodedup_rps"]),
    }
    ratios = row["ratios"]
    # The targets. A model costing >= 1 ms per single item is compute-bound.
    b1 = raw.get("rps_batch1")
    compute_bound = bool(b1) and 1000.0 / b1 >= 1.0
    targets: dict[str, bool | None] = {}

    def at_least(ratio: float | None, bound: float) -> bool | None:
        return None if ratio is None else ratio >= bound

    if compute_bound:
        targets["e2e>=0.85*raw"] = at_least(ratios["e2e/raw"], 0.85)
        targets["e2e>=2*naive"] = at_least(ratios["e2e/naive"], 2.0)
    else:
        targets["e2e>=0.8*relay"] = at_least(ratios["e2e/relay"], 0.8)
    targets["e2e>=0.9*nodedup"] = at_least(ratios["e2e/nodedup"], 0.9)
    p99a = row["p99_added_ms"]
    targets["p99_added<=5ms"] = None if p99a is None else p99a <= 5.0
    row["targets"] = targets
    row["kind"] = "compute-bound" if compute_bound else "overhead-bound"
    row["details"] = {
        "max_batch_size": r.max_batch,
        "max_delay_ms": r.max_delay_ms,
        "concurrency": r.concurrency,
        "e2e_mean_batch": f["e2e"].get("mean_batch"),
        "e2e_batch_hist": f["e2e"].get("batch_hist"),
        "e2e_p50_ms": f["e2e"].get("p50_ms"),
        "e2e_p99_ms": f["e2e"].get("p99_ms"),
        "warmup_s": round(r.warmup, 2),
        "baseline_window_s": round(max(r.baseline, 0.0), 2) or None,
        "raw_batch": raw.get("batch"),
        "raw_rps_batch1": raw.get("rps_batch1"),
        "raw_rps_max_batch": raw.get("rps_max_batch"),
        "e2e_worker_side": f["e2e"].get("worker_side"),
        "open_worker_side": opened.get("worker_side"),
        "open_rate": opened.get("rate"),
        "open_answered": opened.get("answered"),
        "open_mean_batch": opened.get("mean_batch"),
        "errors": {
            k: {
                "unanswered": v.get("unanswered_at_exit"),
                "send_errors": v.get("send_errors"),
                "statuses": v.get("statuses"),
            }
            for k, v in f.items()
            if k != "raw"
        },
    }
    return row


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.0f}"
    return str(v)


def table(rows: list[dict[str, Any]]) -> str:
    cols = [
        "model",
        "transport",
        "e2e_rps",
        "raw_rps",
        "relay_rps",
        "naive_rps",
        "nodedup_rps",
        "p50_ms",
        "p99_ms",
        "p99_added_ms",
    ]
    cells = [cols] + [[_fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    out = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    out.append("")
    for r in rows:
        ratios = ", ".join(f"{k} {_fmt(v)}" for k, v in r["ratios"].items())
        marks = ", ".join(
            f"{k} {'met' if ok else ('MISSED' if ok is False else 'n/a')}"
            for k, ok in r["targets"].items()
        )
        d = r["details"]
        out.append(f"{r['model']}/{r['transport']} ({r['kind']}): {ratios}")
        out.append(f"  targets: {marks}")
        out.append(
            f"  e2e: C={d['concurrency']}, mean batch {d['e2e_mean_batch']}, p50 "
            f"{d['e2e_p50_ms']} ms, p99 {d['e2e_p99_ms']} ms; raw at batch {d['raw_batch']} "
            f"(batch 1: {_fmt(d['raw_rps_batch1'])}/s, batch {d['max_batch_size']}: "
            f"{_fmt(d['raw_rps_max_batch'])}/s)"
        )
        out.append(f"  open loop @{d['open_rate']}/s: batch sizes {r['batch_hist']}")
        out.append(f"  worker's own means (receive->publish): e2e {d['e2e_worker_side']}")
        out.append(f"    open loop {d['open_worker_side']}")
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    bad = [t for t in transports if t not in ("mqtt", "kafka")]
    if bad or not transports or not models:
        print(f"bench: --transports takes mqtt,kafka (got {args.transports!r})", file=sys.stderr)
        return 2
    plan = Plan(
        duration=args.duration,
        baseline=args.baseline_duration or max(2.0, args.duration / 3),
        open=args.open_duration or max(2.0, args.duration / 3),
        warmup=args.warmup,
        factor=args.concurrency_factor,
        skip={s.strip() for s in args.skip.split(",") if s.strip()},
        profile=Path(args.profile) if args.profile else None,
        fetch_wait_ms=args.kafka_fetch_max_wait_ms,
        threads=worker_settings().models.intra_op_threads,
        models=[],
        transports=transports,
    )
    if plan.profile is not None:
        plan.profile.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    skipped: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    with ExitStack() as stack:
        for m in models:
            try:
                from benchmarks.common import model_dir

                model_dir(m)
                plan.models.append(m)
            except ModelUnavailable as exc:
                skipped[m] = str(exc)
                log(f"skipping model {m}: {exc}")
        if not plan.models:
            print("bench: no model available", file=sys.stderr)
            return 2
        root = stack.enter_context(models_root(plan.models))
        settings = {
            "windows_s": {
                "e2e": plan.duration,
                "open_loop": plan.open,
                "nodedup_naive_relay": plan.baseline,
                "warmup": plan.warmup,
            },
            "closed_loop": f"{plan.factor} x max_batch_size requests outstanding, unique ids",
            "open_loop": "Poisson arrivals at 50% of e2e_rps",
            "delivery": "MQTT 5 QoS 1 (Mosquitto: set_tcp_nodelay true, "
            "max_inflight_messages 0); Kafka (Tansu, memory storage): acks=all, 4 partitions, "
            f"fetch_max_wait_ms: worker 20 (kafka:// default), relay/naive "
            f"{plan.fetch_wait_ms}, generator 10",
            "worker": f"config/worker.yaml defaults, device cpu/auto, intra_op_threads "
            f"{plan.threads} (0 = ORT default)",
            "state": "redis-server (AOF everysec) for e2e/open; none:// for nodedup",
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
            "skipped_models": skipped,
        }
        print("machine:")
        for k, v in machine.items():
            print(f"  {k}: {v}")
        print("settings:")
        for k, v in settings.items():
            print(f"  {k}: {v}")
        sys.stdout.flush()
        for t in transports:
            try:
                runs = measure_transport(plan, t, root)
            except servers.ServerUnavailable as exc:
                log(f"skipping transport {t}: {exc}")
                skipped[t] = str(exc)
                continue
            rows += [result_row(r) for r in runs]
    wall = round(time.monotonic() - started, 1)
    print()
    print(table(rows))
    print(f"\nwall time: {wall} s")
    if args.json:
        doc = {"machine": machine, "settings": settings, "results": rows, "wall_s": wall}
        print(json.dumps(doc, sort_keys=True, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = configure(argparse.ArgumentParser(prog="python -m benchmarks.bench"))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
