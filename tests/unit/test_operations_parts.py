"""Operations pieces without servers: quantiles from histogram buckets, the status table,
readiness, the HTTP endpoint, supervisor slot planning and the progress bar."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import pytest

from inference_worker.fleet import format_table, histogram_quantile
from inference_worker.http import HttpEndpoint, Readiness
from inference_worker.progress import Progress
from inference_worker.supervisor import Backoff, Supervisor, parse_gpus, plan_slots


def test_histogram_quantile_interpolates_like_promql() -> None:
    # 10 observations <= 1 ms, 10 more in (1 ms, 2 ms]; none above.
    buckets = {0.001: 10.0, 0.002: 20.0, float("inf"): 20.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.001)
    assert histogram_quantile(0.75, buckets) == pytest.approx(0.0015)
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.0005)
    assert histogram_quantile(0.99, {0.001: 0.0, 1.0: 0.0, float("inf"): 5.0}) == 1.0
    assert histogram_quantile(0.5, {0.001: 0.0, float("inf"): 0.0}) is None
    assert histogram_quantile(0.5, {}) is None


def test_status_table_marks_stale_workers() -> None:
    workers = [
        {"id": "w1", "host": "h", "state": "serving", "rps": "12.0", "age_s": 1.0, "stale": False},
        {"id": "w2", "host": "h", "state": "serving", "age_s": 25.0, "stale": True},
    ]
    lines = format_table(workers).splitlines()
    assert lines[0].startswith("WORKER")
    assert "serving" in lines[1] and "STALE" not in lines[1]
    assert "STALE" in lines[2]
    assert lines[-1] == "2 worker(s), 1 stale"
    assert format_table([]) == "no workers are heartbeating"


class _State:
    def __init__(self, ok: bool) -> None:
        self.ok = ok

    async def ping(self) -> bool:
        return self.ok


class _Transport:
    def __init__(self, connected: bool) -> None:
        self.connected = connected


async def test_readiness_names_what_is_not_ready() -> None:
    draining = False
    r = Readiness(lambda: draining)
    ready, body = await r.check()
    assert not ready and body["not_ready"] == ["models", "broker", "state"]
    r.models = ["digits"]
    r.transport = _Transport(True)  # type: ignore[assignment]
    r.state = _State(False)  # type: ignore[assignment]
    ready, body = await r.check()
    assert not ready and body["not_ready"] == ["state"]
    r.state = _State(True)  # type: ignore[assignment]
    assert (await r.check())[0]
    draining = True
    ready, body = await r.check()
    assert not ready and body["not_ready"] == ["draining"]


async def _raw(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    return data


async def test_http_endpoint_routes_and_refuses() -> None:
    r = Readiness(lambda: False)
    endpoint = HttpEndpoint("127.0.0.1", 0, metrics=lambda: b"iw_x 1\n", readiness=r)
    await endpoint.start()
    try:
        port = endpoint.port
        resp = await _raw(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert resp.startswith(b"HTTP/1.1 200 OK\r\n") and resp.endswith(b"\r\n\r\niw_x 1\n")
        assert b"Content-Type: text/plain; version=0.0.4" in resp
        resp = await _raw(port, b"GET /readyz HTTP/1.1\r\n\r\n")
        assert resp.startswith(b"HTTP/1.1 503 ")
        body: dict[str, Any] = json.loads(resp.split(b"\r\n\r\n", 1)[1])
        assert body["ready"] is False
        resp = await _raw(port, b"HEAD /healthz HTTP/1.1\r\n\r\n")
        assert resp.startswith(b"HTTP/1.1 200 OK") and resp.endswith(b"\r\n\r\n")
        assert (await _raw(port, b"POST /healthz HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 405")
        assert (await _raw(port, b"GET /x HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404")
        assert (await _raw(port, b"nonsense\r\n\r\n")).startswith(b"HTTP/1.1 400")
        big = b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 10000 + b"\r\n\r\n"
        assert (await _raw(port, big)).startswith(b"HTTP/1.1 400")
    finally:
        await endpoint.close()


def test_supervisor_slots_gpus_names_ports() -> None:
    slots = plan_slots("w", 2, [], 9464)
    assert [(s.name, s.gpu, s.metrics_port) for s in slots] == [
        ("w-0", None, 9464),
        ("w-1", None, 9465),
    ]
    slots = plan_slots("w", None, ["0", "3"], 9464)
    assert [(s.name, s.gpu) for s in slots] == [("w-0", "0"), ("w-1", "3")]
    slots = plan_slots("w", 2, ["0", "1"], 0)
    assert [s.gpu for s in slots] == ["0", "0", "1", "1"]
    assert {s.metrics_port for s in slots} == {0}
    assert parse_gpus(" 0, 1 ,") == ["0", "1"]
    with pytest.raises(ValueError):
        parse_gpus(",")
    with pytest.raises(ValueError):
        plan_slots("w", 0, [], 0)


def test_supervisor_child_environment_and_argv() -> None:
    slot = plan_slots("w", None, ["2"], 9464)[0]
    sup = Supervisor([slot], ["--broker", "mqtt://b:1883"], env={"A": "1"}, drain_timeout_s=30)
    env = sup.child_env(slot)
    assert env["CUDA_VISIBLE_DEVICES"] == "2" and env["IW_WORKER__NAME"] == "w-0"
    assert env["A"] == "1"
    argv = sup.child_argv(slot)
    assert argv[1:4] == ["-m", "inference_worker.cli", "run"]
    assert argv[4:] == ["--broker", "mqtt://b:1883", "--metrics-port", "9464"]
    assert "--replicas" not in argv and "--gpus" not in argv


def test_backoff_doubles_and_caps() -> None:
    b = Backoff(initial_s=1.0, max_s=30.0)
    assert [b.delay(n) for n in range(1, 8)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_on_a_terminal_only() -> None:
    quiet = io.StringIO()
    p = Progress(10, "demo", stream=quiet)
    for _ in range(10):
        p.advance()
    p.close()
    assert quiet.getvalue() == ""  # not a TTY (CI logs): nothing at all

    tty = _Tty()
    now = [0.0]
    p = Progress(4, "demo", stream=tty, min_interval_s=0.0, clock=lambda: now[0])
    now[0] = 1.0
    p.advance(2)
    assert "\rdemo [" in tty.getvalue() and "2/4" in tty.getvalue() and "50%" in tty.getvalue()
    p.advance(2)
    assert "4/4" in tty.getvalue() and "100%" in tty.getvalue()
    p.close()
    assert tty.getvalue().endswith("\r")
