"""A fleet across hosts: a broker host, a Redis host, worker hosts and a client host, each
a network namespace, with every process started inside its own.

Workers are `inference-worker run --config <file>` (through `fleet_worker`, which only
adds the compute log), one per host, configured by a YAML file written from the test's
settings. The client runs in the test process, on a thread that has entered the client
host (`Host.call`), so every socket it opens lives on that host and its traffic crosses
the bridge like any other host's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from inference_worker.settings import Settings
from tests.chaos.harness import (
    CHAOS_BROKER,
    CHAOS_STATE,
    KAFKA_DURABLE_QUERY,
    KAFKA_QUERY,
    MODEL,
    TIMING,
    Timing,
)
from tests.fleet.checker import Computation
from tests.fleet.netns import Host, Network
from tests.fleet.services import METRICS_PORT, HostServer, broker_in, redis_in
from tests.integration.harness import REPO, isolated_settings

BROKER, REDIS, CLIENT = "broker", "redis", "client"


@dataclass
class Incarnation:
    """One process of a worker host (a new one after every kill)."""

    name: str
    n: int
    proc: subprocess.Popen[bytes]
    log: Path  # the compute log (FLEET_LOG)
    out: Path  # stdout and stderr: the worker's JSON log lines
    planned_stop: bool = False
    paused: bool = False
    killed: bool = False  # by the test (kill -9), not by a fault of its own

    def alive(self) -> bool:
        return self.proc.poll() is None

    def ready(self) -> bool:
        return b'"worker ready"' in self.out.read_bytes()


def _plain(value: Any) -> Any:
    """Settings as YAML can hold them (tuples become lists)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


class Fleet:
    """Worker hosts: create them, start/kill/pause their worker, read their compute logs."""

    def __init__(self, net: Network, settings: Settings, workdir: Path) -> None:
        self.net = net
        self.settings = settings
        self.workdir = workdir
        self.current: dict[str, Incarnation] = {}
        self.incarnations: list[Incarnation] = []
        self.slow_ms: dict[str, int] = {}

    def host(self, name: str) -> Host:
        return self.net.hosts[name]

    def config(self, name: str) -> Path:
        values = _plain(dataclasses.asdict(self.settings))
        values["worker"]["name"] = name
        values["models"].update({"device": "cpu", "intra_op_threads": 1})
        values["logging"] = {"level": "INFO", "json": True}
        path = self.workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(values))
        return path

    def start(self, name: str, *, slow_ms: int | None = None) -> Incarnation:
        """Start `name`'s worker, creating its host first if it has none (a host added
        while the others run)."""
        if name not in self.net.hosts:
            self.net.add(name)
        if slow_ms is not None:
            self.slow_ms[name] = slow_ms
        n = sum(1 for i in self.incarnations if i.name == name)
        log, out = self.workdir / f"{name}.{n}.compute", self.workdir / f"{name}.{n}.out"
        env = {k: v for k, v in os.environ.items() if not k.startswith("IW_")}
        env.update({"FLEET_LOG": str(log), "FLEET_SLOW_MS": str(self.slow_ms.get(name, 0))})
        argv = [
            sys.executable,
            "-m",
            "tests.fleet.fleet_worker",
            "--config",
            str(self.config(name)),
        ]
        with open(out, "wb") as sink:
            proc = subprocess.Popen(
                self.host(name).argv(argv), cwd=REPO, env=env, stdout=sink,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        inc = Incarnation(name, n, proc, log, out)
        self.current[name] = inc
        self.incarnations.append(inc)
        return inc

    def wait_ready(self, *names: str, within_s: float = 60.0) -> None:
        deadline = time.monotonic() + within_s
        for name in names or tuple(self.current):
            inc = self.current[name]
            while not inc.ready():
                if not inc.alive():
                    raise RuntimeError(f"{name} exited early: {tail(inc.out)}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} not ready in {within_s} s: {tail(inc.out)}")
                time.sleep(0.05)

    # -- faults on the processes ------------------------------------------------------

    def kill(self, name: str) -> Incarnation:
        """kill -9 (the test starts the next incarnation with `start`)."""
        inc = self.current[name]
        if inc.alive():
            inc.killed = True
            inc.proc.send_signal(signal.SIGKILL)
            inc.proc.wait(10)
        return inc

    def pause(self, name: str) -> None:
        inc = self.current[name]
        if inc.alive():
            inc.proc.send_signal(signal.SIGSTOP)
            inc.paused = True

    def resume(self, name: str) -> None:
        inc = self.current[name]
        if inc.paused and inc.alive():
            inc.proc.send_signal(signal.SIGCONT)
        inc.paused = False

    def deaths(self) -> list[tuple[str, int]]:
        """Workers that exited on their own: neither killed nor stopped by the test."""
        return [
            (i.name, i.proc.returncode)
            for i in self.incarnations
            if not i.alive() and not i.killed and not i.planned_stop
        ]

    def crashes(self) -> list[tuple[str, int]]:
        """Deaths of workers that had been ready: a worker that refused to start (Redis
        unreachable at start-up, say) is restarted like any supervisor would; one that
        served and then exited on its own is a failure."""
        return [(i.name, i.proc.returncode) for i in self.incarnations if self._crashed(i)]

    def _crashed(self, inc: Incarnation) -> bool:
        return not inc.alive() and not inc.killed and not inc.planned_stop and inc.ready()

    def restart_exited(self) -> list[str]:
        """A supervisor's pass: start again every current worker that exited on its own."""
        restarted = []
        for name, inc in list(self.current.items()):
            if not inc.alive() and not inc.killed and not inc.planned_stop:
                self.start(name)
                restarted.append(name)
        return restarted

    def terminate_all(self, within_s: float = 12.0) -> None:
        """SIGCONT what is paused, SIGTERM everything (workers drain), kill what stays."""
        for inc in self.incarnations:
            inc.planned_stop = True
            if inc.alive():
                if inc.paused:
                    inc.proc.send_signal(signal.SIGCONT)
                inc.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + within_s
        while any(i.alive() for i in self.incarnations) and time.monotonic() < deadline:
            time.sleep(0.05)
        for inc in self.incarnations:
            if inc.alive():
                inc.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                inc.proc.wait(10)

    # -- what the workers did -----------------------------------------------------------

    def computations(self) -> list[Computation]:
        rows = []
        for inc in self.incarnations:
            if not inc.log.exists():
                continue
            for line in inc.log.read_text().splitlines():
                cells = line.split("\t")
                if cells[0] == "C" and len(cells) == 5:
                    t = int(cells[4]) / 1e9
                    rows.append(Computation(inc.name, inc.n, cells[1], cells[2], int(cells[3]), t))
        return rows

    def started_batch(self, name: str) -> int | None:
        """The batch `name`'s current incarnation is computing now (started, not logged
        as computed), or None."""
        inc = self.current[name]
        if not inc.log.exists():
            return None
        lines = inc.log.read_text().splitlines()
        if not lines or not lines[-1].startswith("S\t"):
            return None
        return int(lines[-1].split("\t")[1])

    def counter(self, name: str, metric: str) -> float:
        """A counter from `name`'s /metrics (call from the client host)."""
        url = f"http://{self.host(name).ip}:{METRICS_PORT}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(metric) and not line.startswith("#"):
                head = line.split(" ")[0]
                if head == metric or head.startswith(metric + "{"):
                    total += float(line.rsplit(" ", 1)[1])
        return total


def tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_bytes()[-n:].decode(errors="replace")
    except OSError:
        return ""


@dataclass
class Rig:
    """Everything one fleet owns; built and torn down by `rig()`."""

    transport: str
    net: Network
    broker: HostServer
    redis: HostServer
    settings: Settings
    fleet: Fleet
    timing: Timing
    workdir: Path

    @property
    def client(self) -> Host:
        return self.net.hosts[CLIENT]


def fleet_settings(
    broker: HostServer,
    redis: HostServer,
    transport: str,
    durable: bool,
    **sections: Mapping[str, Any],
) -> Settings:
    merged: dict[str, dict[str, Any]] = {
        "state": dict(CHAOS_STATE),
        "broker": dict(CHAOS_BROKER),
        "worker": {"drain_timeout_s": 10.0},
        "models": {"names": [MODEL]},
        "metrics": {"host": "0.0.0.0", "port": METRICS_PORT},
    }
    for name, values in sections.items():
        merged.setdefault(name, {}).update(values)
    # An S3-backed Tansu is kept busy by consumers polling every 20 ms: 250 ms there.
    query = (KAFKA_DURABLE_QUERY if durable else KAFKA_QUERY) if transport == "kafka" else ""
    url = broker.url_with(query)
    return isolated_settings(url, redis.url, **merged)


@contextmanager
def rig(
    transport: str,
    workdir: Path,
    workers: Mapping[str, int] = {"w1": 0, "w2": 0},
    *,
    durable: bool = False,
    **sections: Mapping[str, Any],
) -> Iterator[Rig]:
    """Hosts, servers and started workers (`workers`: name → FLEET_SLOW_MS); on exit the
    workers are stopped, the servers closed and every namespace deleted, also on failure."""
    net = Network()
    fleet: Fleet | None = None
    try:
        hosts = {name: net.add(name) for name in (BROKER, REDIS, CLIENT)}
        with (
            broker_in(transport, hosts[BROKER], workdir, durable=durable) as broker,
            redis_in(hosts[REDIS], workdir) as redis,
        ):
            settings = fleet_settings(broker, redis, transport, durable, **sections)
            fleet = Fleet(net, settings, workdir)
            try:
                for name, slow in workers.items():
                    fleet.start(name, slow_ms=slow)
                fleet.wait_ready()
                timing = TIMING["kafka-durable" if transport == "kafka" and durable else transport]
                yield Rig(transport, net, broker, redis, settings, fleet, timing, workdir)
            finally:
                fleet.terminate_all()
    finally:
        net.close()
