"""Operating the fleet (issue 6) on real Mosquitto and Redis: the HTTP endpoint, the fleet
view, the supervisor, the graceful drain and the Node-RED flow.

Every test keeps a ledger of what it sent and states its pass condition; none asserts on
timings (waits are bounded only so that a hang fails instead of blocking CI).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import pytest
import redis as redis_sync
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from inference_worker.app import run_worker
from inference_worker.http import HttpEndpoint
from inference_worker.models import ModelRepository
from inference_worker.pipeline import Worker
from inference_worker.runtimes import load_runner
from inference_worker.settings import Settings
from inference_worker.state.redis import RedisStateStore
from tests.integration.harness import (
    MODELS,
    REPO,
    WorkerProcess,
    client_for,
    heldout,
    isolated_settings,
    settings_env,
)
from tests.servers import Server

pytestmark = pytest.mark.integration


# ---------------------------------------------------------------------------- helpers


def http_get(port: int, path: str) -> tuple[int, str, bytes]:
    """(status, content type, body) of GET http://127.0.0.1:<port><path>."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type", ""), err.read()


async def aget(port: int, path: str) -> tuple[int, str, bytes]:
    return await asyncio.to_thread(http_get, port, path)


class _Running:
    def __init__(self, worker: Worker, port: int, stop: asyncio.Event, task: asyncio.Task[Any]):
        self.worker, self.port, self.stop, self.task = worker, port, stop, task


@contextlib.asynccontextmanager
async def running_worker(
    settings: Settings, state: RedisStateStore | None = None
) -> AsyncIterator[_Running]:
    """`run_worker` in this loop; yields the worker and its bound HTTP port."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[Worker] = loop.create_future()
    http: asyncio.Future[HttpEndpoint] = loop.create_future()
    task = asyncio.create_task(
        run_worker(settings, stop, state=state, on_ready=ready.set_result, on_http=http.set_result)
    )
    await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
    running = _Running(ready.result(), http.result().port, stop, task)
    try:
        yield running
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


def reference_labels(x: np.ndarray) -> np.ndarray:
    """What the served model answers for each row, computed here (the wrong-answer oracle)."""
    repo = ModelRepository(MODELS)
    version = repo.latest_version("digits")
    runner = load_runner(repo.config("digits"), repo.artifact_path("digits", version), device="cpu")
    try:
        return runner.run({"pixels": x})["label"]
    finally:
        runner.close()


async def wait_for(predicate: Callable[[], bool], within_s: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def log_records(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_bytes().decode(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
    return out


# ---------------------------------------------------------------------------- HTTP endpoint


class _GatedStore(RedisStateStore):
    """Redis store whose `complete` waits while `gate` is clear (holds a batch in flight)."""

    def __init__(self, url: str, *, prefix: str) -> None:
        super().__init__(url, prefix=prefix)
        self.gate = asyncio.Event()
        self.gate.set()
        self.waiting = asyncio.Event()

    async def complete(self, items: Any, *, result_ttl_s: int) -> list[bool]:
        if not self.gate.is_set():
            self.waiting.set()
            await self.gate.wait()
        return await super().complete(items, result_ttl_s=result_ttl_s)


async def test_health_readiness_and_metrics_over_http(mosquitto: Server, redis: Server) -> None:
    settings = isolated_settings(mosquitto.url, redis.url, metrics={"port": 0})
    store = _GatedStore(settings.state.url, prefix=settings.state.prefix)
    x, _ = heldout()
    async with running_worker(settings, state=store) as w, client_for(settings) as client:
        status, _, body = await aget(w.port, "/healthz")
        assert status == 200 and json.loads(body) == {"alive": True}
        status, ctype, body = await aget(w.port, "/readyz")
        ready = json.loads(body)
        assert status == 200 and ctype == "application/json", ready
        assert ready["checks"] == {
            "models": True, "broker": True, "state": True, "pipeline": True, "draining": False,
        }  # fmt: skip
        assert "digits" in ready["models"]

        n = 20
        replies = await asyncio.gather(
            *(client.infer("digits", {"pixels": x[i : i + 1]}, id=f"h{i}") for i in range(n))
        )
        assert all(r.status == "ok" for r in replies)
        status, ctype, body = await aget(w.port, "/metrics")
        text = body.decode()
        assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
        assert f'iw_requests_total{{model="digits",status="ok"}} {float(n)}' in text
        assert f'iw_request_seconds_count{{model="digits"}} {float(n)}' in text
        assert 'iw_dedup_total{outcome="new"}' in text
        assert (await aget(w.port, "/nope"))[0] == 404

        # Hold one request in flight (its completion waits), start the drain: readiness
        # must drop at once, naming the drain, while the worker finishes that request.
        store.gate.clear()
        pending = asyncio.create_task(client.infer("digits", {"pixels": x[:1]}, id="held"))
        await asyncio.wait_for(store.waiting.wait(), 30)
        w.stop.set()
        status, _, body = await aget(w.port, "/readyz")
        draining = json.loads(body)
        assert status == 503, draining
        assert draining["checks"]["draining"] is True and draining["not_ready"] == ["draining"]
        assert (await aget(w.port, "/healthz"))[0] == 200  # alive while draining
        store.gate.set()
        held = await asyncio.wait_for(pending, 30)
        assert held.status == "ok"  # the drain finished and published it


# ---------------------------------------------------------------------------- fleet view


def run_status(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["IW_STATE__PREFIX"] = settings.state.prefix
    return subprocess.run(
        [sys.executable, "-m", "inference_worker.cli", "status", "--state", settings.state.url,
         *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


async def test_status_lists_the_fleet_and_marks_stale_workers(
    mosquitto: Server, redis: Server
) -> None:
    settings = isolated_settings(
        mosquitto.url, redis.url, metrics={"port": 0}, worker={"name": "live", "heartbeat_s": 0.5}
    )
    prefix = settings.state.prefix
    r = redis_sync.Redis.from_url(redis.url)
    x, _ = heldout()
    async with running_worker(settings) as w, client_for(settings) as client:
        replies = await asyncio.gather(
            *(client.infer("digits", {"pixels": x[i : i + 1]}, id=f"st{i}") for i in range(50))
        )
        assert all(rep.status == "ok" for rep in replies)
        # A worker that stopped heartbeating 25 s ago with a 10 s interval: STALE (> 2
        # intervals), its key not yet expired (3 intervals).
        ghost = f"{prefix}workers:ghost"
        r.hset(ghost, mapping={"id": "ghost", "host": "h", "pid": "1", "heartbeat_s": "10",
                               "state": "serving", "models": "digits:1"})  # fmt: skip
        r.pexpire(ghost, 5000)
        # Wait for a heartbeat that has seen the requests.
        await wait_for(
            lambda: r.hget(f"{prefix}workers:live", "requests") == b"50", 30, "heartbeat"
        )
        out = await asyncio.to_thread(run_status, settings, "--json")
        assert out.returncode == 0, out.stderr
        fleet = {rec["id"]: rec for rec in json.loads(out.stdout)}
        assert set(fleet) == {"live", "ghost"}
        live = fleet["live"]
        assert live["stale"] is False and live["state"] == "serving"
        assert live["pid"] == str(os.getpid()) and "digits:1" in live["models"].split(",")
        assert live["metrics_port"] == str(w.port) and live["devices"]
        assert live["requests"] == "50" and live["inflight"] == "0"
        assert fleet["ghost"]["stale"] is True

        table = await asyncio.to_thread(run_status, settings)
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[0].split()[:2] == ["WORKER", "HOST"]
        ghost_line = next(line for line in lines if line.startswith("ghost"))
        live_line = next(line for line in lines if line.startswith("live"))
        assert "STALE" in ghost_line and "STALE" not in live_line and "serving" in live_line
        assert "2 worker(s), 1 stale" in table.stdout
    # A clean shutdown removes the record: the fleet view is the live fleet.
    assert not r.exists(f"{prefix}workers:live")
    r.close()


def test_status_needs_redis() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "inference_worker.cli", "status", "--state", "memory://"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and "redis://" in out.stderr


# ---------------------------------------------------------------------------- supervisor


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
            return False
    return True


def start_supervisor(
    args: list[str], env: dict[str, str], log_path: Path
) -> subprocess.Popen[bytes]:
    """`inference-worker run <args>` (the supervisor), its and its children's logs in one file."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "inference_worker.cli", "run", *args],
            env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip


async def test_supervisor_runs_replicas_restarts_a_killed_child_and_forwards_sigterm(
    mosquitto: Server, redis: Server, tmp_path: Path
) -> None:
    settings = isolated_settings(
        mosquitto.url, redis.url, metrics={"port": 0}, worker={"name": "sup"}
    )
    env = settings_env(settings)
    env["IW_LOGGING__LEVEL"] = "INFO"
    env["IW_LOGGING__JSON"] = "true"
    log_path = tmp_path / "supervisor.log"
    sup = start_supervisor(["--replicas", "2"], env, log_path)
    try:

        def ready_count(name: str) -> int:
            return sum(
                1
                for rec in log_records(log_path)
                if rec.get("msg") == "worker ready" and rec.get("worker") == name
            )

        def started() -> list[dict[str, Any]]:
            return [rec for rec in log_records(log_path) if rec.get("msg") == "child started"]

        await wait_for(lambda: ready_count("sup-0") and ready_count("sup-1"), 90, "2 children")
        assert sup.poll() is None
        pids = {rec["worker"]: rec["pid"] for rec in started()}
        assert set(pids) == {"sup-0", "sup-1"}

        x, _ = heldout()
        async with client_for(settings) as client:
            replies = await asyncio.gather(
                *(client.infer("digits", {"pixels": x[i : i + 1]}, id=f"a{i}") for i in range(200))
            )
            assert all(rep.status == "ok" for rep in replies)
            assert {rep.worker for rep in replies} == {"sup-0", "sup-1"}, "both children serve"

            # A crash (SIGKILL) of child 0: the supervisor starts it again.
            os.kill(pids["sup-0"], signal.SIGKILL)
            await wait_for(lambda: ready_count("sup-0") == 2, 90, "child 0 restarted")
            restarted = [rec for rec in started() if rec["worker"] == "sup-0"]
            assert len(restarted) == 2 and restarted[1]["pid"] != pids["sup-0"]
            assert any(
                rec.get("msg") == "child exited; restarting" and rec.get("code") == -9
                for rec in log_records(log_path)
            )
            pids["sup-0"] = restarted[1]["pid"]
            again = await asyncio.gather(
                *(client.infer("digits", {"pixels": x[i : i + 1]}, id=f"b{i}") for i in range(40))
            )
            assert all(rep.status == "ok" for rep in again)

        # SIGTERM the supervisor: forwarded, both children drain and exit 0, so does it.
        sup.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(sup.wait, settings.worker.drain_timeout_s + 30)
        assert code == 0, log_path.read_text()[-3000:]
        stopped = {
            rec["worker"]: rec["code"]
            for rec in log_records(log_path)
            if rec.get("msg") == "child stopped"
        }
        assert stopped == {"sup-0": 0, "sup-1": 0}
        assert not any(_alive(pid) for pid in pids.values())
        workers_stopped = {
            rec["worker"] for rec in log_records(log_path) if rec.get("msg") == "worker stopped"
        }
        assert workers_stopped == {"sup-0", "sup-1"}
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()


# ---------------------------------------------------------------------------- graceful drain


async def test_sigterm_under_load_drains_without_losing_anything(
    mosquitto: Server, redis: Server, tmp_path: Path
) -> None:
    """The drain test of issue 6.

    Two worker processes share the group; a client keeps a steady load (bounded
    concurrency) with a ledger of every id it sent; worker A gets SIGTERM once it has
    answered part of the load. Pass: every sent id answered (resends allowed: Mosquitto
    drops the deliveries A held unclaimed, and the client's same-id resend covers them),
    every answer is the model's answer for that input, A exits 0 within drain_timeout,
    A's logged stats show it finished everything it claimed, and Redis holds no lease.
    """
    drain_timeout = 20.0
    settings = isolated_settings(
        mosquitto.url, redis.url, metrics={"port": 0}, worker={"drain_timeout_s": drain_timeout}
    )
    x, _ = heldout()
    expected = reference_labels(x)
    n, concurrency = 3000, 32
    a = WorkerProcess(settings, "drain-a", tmp_path / "a.log")
    b = WorkerProcess(settings, "drain-b", tmp_path / "b.log")
    ledger: dict[str, int] = {}  # id -> row of x it carries
    answers: dict[str, Any] = {}
    try:
        await asyncio.gather(a.wait_ready(), b.wait_ready())
        async with client_for(settings, resend_after_s=2.0, timeout_s=90.0) as client:
            sem = asyncio.Semaphore(concurrency)
            by_a = 0
            a_answered = asyncio.Event()

            async def one(i: int) -> None:
                nonlocal by_a
                row = i % len(x)
                rid = f"d{i}"
                ledger[rid] = row
                async with sem:
                    reply = await client.send(
                        client.make_request("digits", {"pixels": x[row : row + 1]}, id=rid)
                    )
                answers[rid] = reply.response
                if reply.response.worker == "drain-a":
                    by_a += 1
                    if by_a >= 300:
                        a_answered.set()

            async def send_all() -> None:
                await asyncio.gather(*(one(i) for i in range(n)))

            load = asyncio.create_task(send_all())
            await asyncio.wait_for(a_answered.wait(), 120)
            assert not load.done(), "SIGTERM must land mid-load"
            a.proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(a.proc.wait, drain_timeout + 10)
            await asyncio.wait_for(load, 180)
            duplicates = client.duplicates
        assert code == 0, a.log_path.read_text()[-3000:]
    finally:
        a.stop()
        b.stop()

    lost = sorted(set(ledger) - set(answers))
    wrong = [
        rid
        for rid, resp in answers.items()
        if resp.id != rid
        or resp.status != "ok"
        or resp.outputs is None
        or int(resp.outputs["label"][0]) != int(expected[ledger[rid]])
    ]
    by_worker: dict[str, int] = {}
    for resp in answers.values():
        by_worker[resp.worker] = by_worker.get(resp.worker, 0) + 1
    print(f"drain: sent {n}, lost {len(lost)}, wrong {len(wrong)}, duplicates {duplicates}, "
          f"per worker {by_worker}")  # fmt: skip
    assert len(ledger) == n and not lost and not wrong
    assert by_worker.get("drain-a", 0) >= 300 and by_worker.get("drain-b", 0) > 0

    # A's own account, logged after its drain: everything it claimed was computed,
    # completed in Redis and published; no lease was lost or left to expire.
    stats = next(
        rec["stats"] for rec in log_records(a.log_path) if rec.get("msg") == "worker stopped"
    )
    assert stats["dedup"].get("new", 0) == stats["inferences"] > 0, stats
    assert stats["lease_lost"] == 0 and stats["retries"] == 0 and stats["exhausted"] == 0
    assert stats["responses"] >= stats["inferences"]
    r = redis_sync.Redis.from_url(redis.url)
    try:
        prefix = settings.state.prefix
        assert r.zcard(f"{prefix}leases") == 0, "a claimed request was left behind"
        assert r.zcard(f"{prefix}retry") == 0
        assert not r.exists(f"{prefix}workers:drain-a")
    finally:
        r.close()


# ---------------------------------------------------------------------------- Node-RED


def flow_request(flow: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the function node, the request object its REQUEST literal holds)."""
    func = next(node for node in flow if node["type"] == "function")
    match = re.search(r"const REQUEST = '(.*)';", func["func"])
    assert match, "the function node keeps its request as a JSON string literal"
    return func, json.loads(match.group(1))


async def test_node_red_flow_request_is_answered_by_a_worker(
    mosquitto: Server, redis: Server
) -> None:
    flow = json.loads((REPO / "deploy" / "node-red" / "flow.json").read_text())
    nodes = {node["id"]: node for node in flow}
    assert len(nodes) == len(flow), "node ids are unique"
    for node in flow:  # every wire and config reference resolves
        for outputs in node.get("wires", []):
            assert all(target in nodes for target in outputs), node["id"]
        if "broker" in node and node["type"] != "mqtt-broker":
            assert nodes[node["broker"]]["type"] == "mqtt-broker"
    inject = next(node for node in flow if node["type"] == "inject")
    func, request = flow_request(flow)
    out = next(node for node in flow if node["type"] == "mqtt out")
    inn = next(node for node in flow if node["type"] == "mqtt in")
    debug = next(node for node in flow if node["type"] == "debug")
    assert inject["wires"] == [[func["id"]]] and func["wires"] == [[out["id"]]]
    assert inn["wires"] == [[debug["id"]]]
    assert nodes[out["broker"]]["protocolVersion"] == "5"
    assert out["topic"] == "request_message"
    assert out["respTopic"] == inn["topic"] == "response_message/_/node-red"
    assert "request.id = msg._msgid" in func["func"]

    x, y = heldout()
    pixels = np.asarray(request["inputs"]["pixels"]["data"], dtype=np.float32)
    row = next(i for i in range(len(x)) if np.array_equal(x[i], pixels[0]))  # a held-out digit
    label = int(y[row])
    # What the function node sends: the literal with Node-RED's message id as the id.
    request["id"] = uuid.uuid4().hex[:16]
    payload = json.dumps(request).encode()

    settings = isolated_settings(
        mosquitto.url,
        redis.url,
        metrics={"port": 0},
        # The default reply patterns: a request without an app answers under
        # response_message/_/ (response_message/{app}/# with app "_").
        broker={"request_topic": "request_message", "response_topic": "response_message",
                "reply_to_allowed": ["response_message", "response_message/{app}/#"]},
    )  # fmt: skip
    received: queue.Queue[tuple[str, bytes]] = queue.Queue()
    subscribed: queue.Queue[bool] = queue.Queue()
    mqtt = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"node-red-{request['id']}", protocol=paho.MQTTv5
    )
    mqtt.on_message = lambda _c, _u, msg: received.put((msg.topic, msg.payload))
    mqtt.on_subscribe = lambda *_args: subscribed.put(True)
    mqtt.on_connect = lambda c, *_args: c.subscribe(inn["topic"], qos=int(inn["qos"]))
    mqtt.connect("127.0.0.1", mosquitto.port)
    mqtt.loop_start()
    try:
        await asyncio.to_thread(subscribed.get, True, 10)
        async with running_worker(settings):
            # Publish exactly as the mqtt out node does: MQTT 5, QoS 1, Response Topic
            # and Content Type properties, the JSON text as the payload.
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = out["respTopic"]
            props.ContentType = out["contentType"]
            mqtt.publish(out["topic"], payload, qos=int(out["qos"]), properties=props)
            topic, body = await asyncio.to_thread(received.get, True, 30)
    finally:
        mqtt.loop_stop()
        mqtt.disconnect()
    response = json.loads(body)  # a JSON request is answered in JSON (the debug node shows it)
    assert topic == "response_message/_/node-red"
    assert response["id"] == request["id"] and response["status"] == "ok", response
    assert response["outputs"]["label"]["data"] == [label]
