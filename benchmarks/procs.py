"""The bench's child processes: the worker under test, the baselines, the load generator.

The worker is driven only through its public surface: `python -m inference_worker.cli run`
(`inference-worker run`, with `--replicas N` for N > 1), configured by `IW_*` environment
variables, and read back through its HTTP endpoints (`/readyz`, `/metrics`). So the bench
keeps measuring whatever the request path inside looks like, and `--worker-src DIR` can
point it at another checkout (an older commit, for a before/after table from one run).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import cpu, servers
from benchmarks.common import REPO

PY = sys.executable
READY_TIMEOUT_S = 90.0


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def env_for(extra: dict[str, str], src: Path = REPO) -> dict[str, str]:
    """This process's environment without `IW_*`, with `src` first on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IW_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), str(REPO) if src != REPO else ""]))
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
    metrics_ports: list[int]
    replicas: int

    @property
    def pid(self) -> int:
        return self.proc.pid


def stop_worker(worker: WorkerProc) -> None:
    """SIGKILL the worker and, for `--replicas`, its children first: killed alone, the
    supervisor's death would SIGTERM them (PR_SET_PDEATHSIG) and they would drain while
    the next phase runs."""
    for pid in reversed(cpu.tree(worker.pid)[1:]):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    stop(worker.proc, kill=True)


def _consecutive_free_ports(n: int) -> int:
    """A port P with P .. P+n-1 all free now (a supervisor gives slot i port P+i)."""
    for _ in range(50):
        base = servers.free_port()
        if base + n > 65535:
            continue
        ok = True
        for port in range(base + 1, base + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError(f"no {n} consecutive free ports")


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def start_worker(
    broker: str, state: str, root: Path, topic: str, *, replicas: int = 1, src: Path = REPO
) -> WorkerProc:
    """`inference-worker run` (with `--replicas N` when N > 1), ready on every slot."""
    base = _consecutive_free_ports(replicas)
    env = env_for(
        {
            "IW_BROKER__URL": broker,
            "IW_BROKER__REQUEST_TOPIC": topic,
            "IW_STATE__URL": state,
            "IW_MODELS__ROOT": str(root),
            "IW_LOGGING__LEVEL": "WARNING",
            "IW_METRICS__HOST": "127.0.0.1",
            "IW_METRICS__PORT": str(base),
            "IW_WORKER__NAME": f"bench-{topic}",
            # A consumer group per phase: a group a killed worker was in would make the
            # next phase's worker wait out its session timeout before it gets partitions.
            "IW_BROKER__GROUP": f"bench-{topic}-{os.getpid()}",
        },
        src,
    )
    config = src / "config" / "worker.yaml"
    argv = [PY, "-m", "inference_worker.cli", "run"]
    if config.is_file():
        argv += ["--config", str(config)]
    if replicas > 1:
        argv += ["--replicas", str(replicas)]
    proc = subprocess.Popen(argv, env=env, cwd=src)
    ports = [base + i for i in range(replicas)]
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode} before it was ready")
        if all(_ready(p) for p in ports):
            return WorkerProc(proc, ports, replicas)
        time.sleep(0.1)
    stop(proc)
    raise TimeoutError(f"worker not ready within {READY_TIMEOUT_S}s")


def start_ready(argv: list[str]) -> subprocess.Popen[Any]:
    """Start a helper (naive worker, relay) and wait for its `ready` line."""
    proc = subprocess.Popen(argv, env=env_for({}), cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # blocks until ready or exit
    if line.strip() != "ready":
        stop(proc)
        raise RuntimeError(f"{argv[2]} did not start (said {line!r})")
    return proc


def run_load(
    transport: str, url: str, topic: str, root: Path, model: str, mode: str, **kw: Any
) -> dict[str, Any]:
    """One `benchmarks.load` run in its own process; its JSON result."""
    argv = [PY, "-m", "benchmarks.load", "--transport", transport, "--url", url]
    argv += ["--topic", topic, "--models-root", str(root), "--model", model, "--mode", mode]
    for key, value in kw.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    out = subprocess.run(argv, env=env_for({}), cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed ({out.returncode}):\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def scrape(ports: list[int]) -> dict[str, float]:
    """The workers' Prometheus `_sum`/`_count` samples, keyed `name{labels}`, summed over
    the replicas' endpoints."""
    out: dict[str, float] = {}
    for port in ports:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("iw_") and ("_sum{" in line or "_count{" in line):
                key, _, value = line.rpartition(" ")
                out[key] = out.get(key, 0.0) + float(value)
    return out


def worker_side(before: dict[str, float], after: dict[str, float], model: str) -> dict[str, Any]:
    """Means over one run from the worker's own histograms (receive → publish, etc.)."""

    def mean(name: str) -> float | None:
        # Histograms labelled by model, possibly with more labels (version, ...).
        n = total = 0.0
        for key, value in after.items():
            if key.startswith(f"{name}_") and f'model="{model}"' in key:
                delta = value - before.get(key, 0.0)
                if key.startswith(f"{name}_count{{"):
                    n += delta
                elif key.startswith(f"{name}_sum{{"):
                    total += delta
        return round(total / n, 3 if name == "iw_batch_size" else 6) if n else None

    ms = {k: mean(f"iw_{k}_seconds") for k in ("request", "queue", "compute")}
    return {
        "request_ms": None if ms["request"] is None else round(ms["request"] * 1000, 2),
        "queue_ms": None if ms["queue"] is None else round(ms["queue"] * 1000, 2),
        "compute_ms_per_batch": None if ms["compute"] is None else round(ms["compute"] * 1000, 2),
        "mean_batch": mean("iw_batch_size"),
    }
