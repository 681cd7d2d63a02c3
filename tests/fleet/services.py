"""The real servers of tests/servers.py, each started inside a host of a `Network`.

A host has a network stack of its own, so every server listens on a fixed port of its
host's address (no free-port search, no collision with anything on the machine: the
standard ports are not used either). Readiness is checked from inside the host.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.fleet.netns import Host
from tests.servers import KAFKA_TEST_QUERY, Server, missing, require_binary, tansu_binary

MQTT_PORT = 11883
REDIS_PORT = 16379
KAFKA_PORT = 19092
S3_PORT = 15000  # moto, on the broker host's loopback only
METRICS_PORT = 19464


@dataclass
class HostServer(Server):
    """A `Server` whose process runs in `host` and listens on `host.ip:port`."""

    host: Host | None = None
    listen_ip: str | None = None  # when not the host's address (a server on its loopback)

    @property
    def address(self) -> str:
        assert self.host is not None
        return self.listen_ip or self.host.ip

    def url_with(self, query: str) -> str:
        scheme = self.scheme or {"redis": "redis", "kafka": "kafka"}.get(self.name, "mqtt")
        joined = "&".join(q for q in (self.query, query) if q)
        return f"{scheme}://{self.address}:{self.port}" + (f"?{joined}" if joined else "")

    def start(self) -> None:
        assert self.host is not None
        if self.log is None:
            self.log = open(self.workdir / f"{self.name}.log", "ab")  # noqa: SIM115 - close()
        env = None if self.env is None else {**os.environ, **self.env}
        self.proc = subprocess.Popen(
            self.host.argv(self.argv), stdout=self.log, stderr=subprocess.STDOUT,
            cwd=self.workdir, env=env,
        )  # fmt: skip
        self.host.wait_tcp(self.address, self.port, self.proc)


@contextmanager
def mosquitto_in(host: Host, workdir: Path) -> Iterator[HostServer]:
    """Mosquitto on `host`; no persistence (a restart drops what it held: clients resend)."""
    binary = require_binary("mosquitto")
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {MQTT_PORT} {host.ip}\n"
        "allow_anonymous true\n"
        "persistence false\n"
        "set_tcp_nodelay true\n"
        "max_inflight_messages 0\n"
        "max_queued_messages 100000\n"
        "log_type error\nlog_type warning\n"
    )
    srv = HostServer("mosquitto", MQTT_PORT, [binary, "-c", str(conf)], workdir, host=host)
    srv.start()
    try:
        yield srv
    finally:
        srv.close()


@contextmanager
def redis_in(host: Host, workdir: Path) -> Iterator[HostServer]:
    """redis-server on `host` with AOF (`appendfsync everysec`), as brokers/redis does."""
    binary = require_binary("redis-server")
    data = workdir / "redis"
    data.mkdir(exist_ok=True)
    # Protected mode refuses non-loopback clients without a password; the host is private.
    argv = [binary, "--port", str(REDIS_PORT), "--bind", host.ip, "--protected-mode", "no"]
    argv += ["--save", ""]
    argv += ["--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(data)]
    srv = HostServer("redis", REDIS_PORT, argv, workdir, host=host)
    srv.start()
    try:
        yield srv
    finally:
        srv.close()


@contextmanager
def tansu_in(host: Host, workdir: Path, *, durable: bool) -> Iterator[HostServer]:
    """Tansu (Kafka protocol) on `host`. `durable`: its log lives in S3 (a moto server on
    the same host's loopback), so a kill -9 and restart keeps topics, records and offsets
    like a Kafka broker with its log on disk; otherwise in memory."""
    binary = tansu_binary()
    with contextlib.ExitStack() as stack:
        storage, env = "memory://tansu/", None
        if durable:
            stack.enter_context(_moto_in(host, workdir))
            storage = "s3://tansu/"
            env = {
                "AWS_ENDPOINT": f"http://127.0.0.1:{S3_PORT}",
                "AWS_ALLOW_HTTP": "true",
                "AWS_ACCESS_KEY_ID": "test",
                "AWS_SECRET_ACCESS_KEY": "test",
                "AWS_DEFAULT_REGION": "us-east-1",
            }
        listener = f"tcp://{host.ip}:{KAFKA_PORT}"
        argv = [binary, "broker", "--listener-url", listener]
        argv += ["--advertised-listener-url", listener, "--storage-engine", storage]
        srv = HostServer(
            "kafka", KAFKA_PORT, argv, workdir, env=env, query=KAFKA_TEST_QUERY, host=host
        )
        srv.start()
        stack.callback(srv.close)
        yield srv


@contextmanager
def _moto_in(host: Host, workdir: Path) -> Iterator[HostServer]:
    if importlib.util.find_spec("moto") is None:
        missing("moto (pip install 'moto[server]') not found")
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(S3_PORT)]
    srv = HostServer("s3", S3_PORT, argv, workdir, scheme="http", host=host, listen_ip="127.0.0.1")
    srv.start()
    try:

        def bucket() -> None:
            request = urllib.request.Request(f"http://127.0.0.1:{S3_PORT}/tansu", method="PUT")
            with urllib.request.urlopen(request, timeout=10) as reply:
                reply.read()

        host.call(bucket, 20.0)
        yield srv
    finally:
        srv.close()


@contextmanager
def broker_in(transport: str, host: Host, workdir: Path, *, durable: bool) -> Iterator[HostServer]:
    if transport == "mqtt":
        with mosquitto_in(host, workdir) as srv:
            yield srv
    elif transport == "kafka":
        with tansu_in(host, workdir, durable=durable) as srv:
            yield srv
    else:  # pragma: no cover - a transport added later adds its broker here
        raise ValueError(f"no fleet broker for transport {transport!r}")
