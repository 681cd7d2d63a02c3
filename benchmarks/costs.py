"""Per-request costs of the worker's servers, for the capacity model (docs/scaling.md).

    python -m benchmarks.costs [--rates 100,400] [--closed 128] [--duration 5] [--json]

Starts Mosquitto (`$SYS` every second), redis-server (AOF `appendfsync everysec`) and one
`inference-worker run` (digits, CPU), then for each phase (open loop at each rate, then a
closed loop at `--closed` outstanding) reads the servers' own counters before and after
and divides by the requests answered:

- Redis: commands (`INFO commandstats`: EVALSHA round trips, and every command the scripts
  run inside them), bytes in and out (`INFO stats` total_net_input/output_bytes), AOF
  bytes (`INFO persistence` aof_current_size), memory kept (`INFO memory` used_memory:
  the done records and cached responses, until `result_ttl_s`), CPU (`INFO cpu`);
- Mosquitto: PUBLISH packets in and out (`$SYS/broker/publish/messages/*`), every packet
  in and out (`$SYS/broker/messages/*`: PUBACKs included), bytes in and out
  (`$SYS/broker/bytes/*`), CPU (/proc);
- the worker: CPU (/proc, its process tree).

`--cluster` runs the same phases on a local Redis Cluster (3 primaries, 3 replicas; the
counters are the primaries', summed; replicas receive the same writes again).

An idle phase first measures what a worker costs Redis with no traffic (heartbeat, lease
renewals, reaper sweeps): a per-worker, per-second figure. Redis and Mosquitto here serve
one worker and one load generator on the same 2-core machine, so CPU figures are upper
bounds of what the servers need per request (they share cores with the worker).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import redis

from benchmarks import cpu, procs, servers
from benchmarks.common import models_root

MODEL = "digits"


@contextmanager
def mosquitto_with_sys() -> Iterator[servers.Server]:
    """Mosquitto as the bench runs it, publishing `$SYS` counters every second."""
    binary = servers.find_binary("mosquitto")

    def argv(port: int, tmp: Path) -> list[str]:
        conf = tmp / "mosquitto.conf"
        conf.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "set_tcp_nodelay true\nmax_inflight_messages 0\nmax_queued_messages 100000\n"
            "sys_interval 1\nlog_type error\nlog_type warning\n"
        )
        return [binary, "-c", str(conf)]

    with servers._run("mosquitto", "mqtt", argv) as srv:
        yield srv


class SysCounters:
    """The latest `$SYS/broker/...` counters (a plain subscriber, its own thread)."""

    TOPICS = (
        "publish/messages/received",
        "publish/messages/sent",
        "messages/received",
        "messages/sent",
        "bytes/received",
        "bytes/sent",
    )

    def __init__(self, port: int) -> None:
        self.values: dict[str, int] = {}
        self.updated = threading.Event()
        self._client = paho.Client(
            paho.CallbackAPIVersion.VERSION2, f"costs-{uuid.uuid4().hex[:6]}"
        )
        self._client.on_message = self._on_message
        self._client.connect("127.0.0.1", port)
        for topic in self.TOPICS:
            self._client.subscribe(f"$SYS/broker/{topic}")
        self._client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        self.values[msg.topic.removeprefix("$SYS/broker/")] = int(msg.payload)
        self.updated.set()

    def fresh(self) -> dict[str, int]:
        """Counters published after this call (the broker publishes every second)."""
        self.updated.clear()
        self.updated.wait(5)
        time.sleep(0.05)  # the rest of the same `$SYS` burst
        return dict(self.values)

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


@contextmanager
def redis_cluster(shards: int) -> Iterator[tuple[str, list[int]]]:
    """A local Redis Cluster (3 primaries, 3 replicas, AOF everysec): its state URL (with
    `shards`) and its primaries' ports, whose counters the phases read."""
    binary, cli = servers.find_binary("redis-server"), servers.find_binary("redis-cli")
    with tempfile.TemporaryDirectory(prefix="iw-costs-cluster-") as tmp, ExitStack() as procs_:
        ports: list[int] = []
        while len(ports) < 6:  # the cluster bus listens on port + 10000
            port = servers.free_port()
            if port + 10000 < 65536 and port not in ports:
                with contextlib.suppress(OSError), socket.socket() as sock:
                    sock.bind(("127.0.0.1", port + 10000))
                    ports.append(port)
        for port in ports:
            workdir = Path(tmp) / str(port)
            workdir.mkdir()
            argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir)]
            argv += ["--cluster-enabled", "yes", "--save", "", "--appendonly", "yes"]
            argv += ["--appendfsync", "everysec", "--repl-diskless-sync-delay", "0"]
            log = procs_.enter_context(open(workdir / "redis.log", "wb"))
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
            procs_.callback(procs.stop, proc)
            servers.wait_port(port, proc)
        create = [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports)]
        subprocess.run([*create, "--cluster-replicas", "1", "--cluster-yes"], check=True,
                       capture_output=True, timeout=60)  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            infos = [redis.Redis(port=p).info("replication") for p in ports]
            if all(i.get("master_link_status", "up") == "up" for i in infos):
                ok = [redis.Redis(port=p).execute_command("CLUSTER", "INFO") for p in ports]
                if all(b"cluster_state:ok" in x for x in ok):
                    break
            if time.monotonic() > deadline:
                raise TimeoutError("Redis Cluster not ready")
            time.sleep(0.1)
        primaries = [p for p, i in zip(ports, infos, strict=True) if i["role"] == "master"]
        hosts = ",".join(f"127.0.0.1:{p}" for p in ports)
        yield f"redis+cluster://{hosts}/?shards={shards}", primaries


def redis_counters(clients: list[redis.Redis]) -> dict[str, float]:
    """The counters of every primary, summed."""
    out: dict[str, float] = {}

    def add(key: str, value: float) -> None:
        out[key] = out.get(key, 0) + value

    for r in clients:
        stats, persist, cpu_info = r.info("stats"), r.info("persistence"), r.info("cpu")
        add("memory", r.info("memory")["used_memory"])
        add("net_in", stats["total_net_input_bytes"])
        add("net_out", stats["total_net_output_bytes"])
        add("aof", persist["aof_current_size"])
        add("cpu_s", cpu_info["used_cpu_sys"] + cpu_info["used_cpu_user"])
        for name, row in r.info("commandstats").items():
            add(f"cmd:{name.removeprefix('cmdstat_')}", row["calls"])
    return out


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def per(value: float, n: float, digits: int = 3) -> float:
    return round(value / n, digits) if n else 0.0


def summarize(
    name: str, answered: int, red: dict[str, float], mq: dict[str, float], cpus: dict[str, Any]
) -> dict[str, Any]:
    commands = {k.removeprefix("cmd:"): v for k, v in red.items() if k.startswith("cmd:")}
    commands.pop("info", None)  # this script's own reads
    return {
        "phase": name,
        "answered": answered,
        "redis_evalsha_per_req": per(commands.get("evalsha", 0), answered),
        "redis_commands_per_req": per(sum(commands.values()), answered, 2),
        "redis_bytes_in_per_req": per(red.get("net_in", 0), answered, 0),
        "redis_bytes_out_per_req": per(red.get("net_out", 0), answered, 0),
        "aof_bytes_per_req": per(red.get("aof", 0), answered, 0),
        # What an answered request keeps in memory until result_ttl_s (done record +
        # cached response), replicas not counted.
        "redis_memory_bytes_per_req": per(red.get("memory", 0), answered, 0),
        "redis_cpu_ms_per_req": per(red.get("cpu_s", 0) * 1000, answered),
        "mqtt_publish_in_per_req": per(mq.get("publish/messages/received", 0), answered, 2),
        "mqtt_publish_out_per_req": per(mq.get("publish/messages/sent", 0), answered, 2),
        "mqtt_packets_per_req": per(
            mq.get("messages/received", 0) + mq.get("messages/sent", 0), answered, 2
        ),
        "mqtt_bytes_per_req": per(
            mq.get("bytes/received", 0) + mq.get("bytes/sent", 0), answered, 0
        ),
        "mosquitto_cpu_ms_per_req": per((cpus.get("mosquitto") or 0) * 1000, answered),
        "worker_cpu_ms_per_req": per((cpus.get("worker") or 0) * 1000, answered),
        "commands": {k: int(v) for k, v in sorted(commands.items())},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rates", default="100,400", help="open-loop phases, requests/s")
    p.add_argument("--closed", type=int, default=128, help="closed-loop outstanding (0: none)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per phase")
    p.add_argument("--idle", type=float, default=5.0, help="seconds of the idle phase")
    p.add_argument("--json", action="store_true", help="one JSON line per phase")
    p.add_argument("--cluster", action="store_true", help="a local 3+3 Redis Cluster instead")
    p.add_argument("--shards", type=int, default=16, help="ledger shards on the cluster")
    args = p.parse_args(argv)
    phases: list[tuple[str, dict[str, Any]]] = [
        (f"open {r}/s", {"mode": "open", "rate": float(r)}) for r in args.rates.split(",") if r
    ]
    if args.closed:
        phases.append((f"closed {args.closed}", {"mode": "closed", "concurrency": args.closed}))
    rows: list[dict[str, Any]] = []
    with ExitStack() as stack:
        broker = stack.enter_context(mosquitto_with_sys())
        if args.cluster:
            state_url, ports = stack.enter_context(redis_cluster(args.shards))
        else:
            single = stack.enter_context(servers.redis())
            state_url, ports = single.url, [single.port]
        root = stack.enter_context(models_root([MODEL]))
        topic = f"costs{uuid.uuid4().hex[:6]}"
        worker = procs.start_worker(broker.url, state_url, root, topic)
        stack.callback(procs.stop_worker, worker)
        sys_counters = SysCounters(broker.port)
        stack.callback(sys_counters.close)
        clients = [redis.Redis(port=port) for port in ports]
        for client in clients:
            stack.callback(client.close)
        procs.run_load(
            "mqtt", broker.url, topic, root, MODEL, "open", rate=50, duration=1, warmup=0.5
        )

        def measure(name: str, run: dict[str, Any] | None, seconds: float) -> None:
            meter = cpu.CpuMeter({"worker": worker.pid, "mosquitto": broker.proc.pid}).start()
            red0, mq0 = redis_counters(clients), sys_counters.fresh()
            if run is None:
                time.sleep(seconds)
                answered = 0
            else:
                result = procs.run_load(
                    "mqtt", broker.url, topic, root, MODEL, duration=seconds, warmup=0.5, **run
                )
                answered = int(result["answered_total"])
            red1, mq1 = redis_counters(clients), sys_counters.fresh()
            cpus = meter.stop()
            red, mq = delta(red1, red0), delta(mq1, mq0)
            if run is None:  # per worker-second: the background a worker costs
                row = summarize(name, 0, red, mq, cpus)
                commands = row["commands"]
                row.update(
                    answered=0,
                    idle_seconds=seconds,
                    redis_evalsha_per_s=per(commands.get("evalsha", 0), seconds, 2),
                    redis_commands_per_s=per(sum(commands.values()), seconds, 2),
                    redis_bytes_in_per_s=per(red.get("net_in", 0), seconds, 0),
                )
            else:
                row = summarize(name, answered, red, mq, cpus)
                row["mean_batch"] = result.get("mean_batch")
                row["p50_ms"], row["p99_ms"] = result.get("p50_ms"), result.get("p99_ms")
            rows.append(row)
            print(json.dumps(row, sort_keys=True) if args.json else _line(row), flush=True)

        measure("idle", None, args.idle)
        for name, run in phases:
            measure(name, run, args.duration)
    return 0


def _line(row: dict[str, Any]) -> str:
    keys = [k for k in row if k not in ("phase", "commands")]
    return (
        f"{row['phase']}: "
        + ", ".join(f"{k}={row[k]}" for k in keys)
        + f"\n  commands: {row['commands']}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
