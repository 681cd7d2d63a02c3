"""The shipped Node-RED flow (deploy/node-red/) in a real, headless Node-RED 4.1 with a
worker, Redis and a Mosquitto that requires a login: the broker's host, port and
credentials come from environment variables only, the answer reaches the debug sidebar,
and the second tab's fixed id is answered twice, the second time from the ledger."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.servers import free_port
from tests.integration.harness import REPO, heldout, isolated_settings, worker_in_loop
from tests.integration.npm import npm_ci, require_node
from tests.servers import Server, mosquitto_server, require_binary

pytestmark = pytest.mark.integration

FLOW_DIR = REPO / "deploy" / "node-red"
NODE_RED = REPO / "tests" / "node_red"  # node-red and ws, pinned by its package-lock.json
USERS = {"worker": "worker-secret", "nodered": "node-red-secret"}
FIXED_ID = "node-red-fixed-1"


@pytest.fixture
def secured_mosquitto() -> Iterator[Server]:
    passwd_tool = require_binary("mosquitto_passwd")
    # Readable by the user mosquitto drops to when started as root (pytest's tmp_path is not).
    with tempfile.TemporaryDirectory(prefix="iw-nodered-passwd-") as tmp:
        os.chmod(tmp, 0o755)
        passwd = Path(tmp) / "passwd"
        for i, (user, password) in enumerate(USERS.items()):
            create = ["-c"] if i == 0 else []
            subprocess.run([passwd_tool, *create, "-b", str(passwd), user, password], check=True)
        passwd.chmod(0o644)
        extra = f"password_file {passwd}\n"
        with mosquitto_server(allow_anonymous=False, extra_conf=extra) as srv:
            yield srv


def _http(method: str, url: str, timeout: float = 5) -> int:
    request = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return int(response.status)


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


async def _wait_for(what: str, check: Any, within_s: float, log: Path) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not await asyncio.to_thread(check):
        if asyncio.get_running_loop().time() > deadline:
            tail = await asyncio.to_thread(_tail, log)
            raise AssertionError(f"{what} within {within_s}s; Node-RED log:\n{tail}")
        await asyncio.sleep(0.2)


def _start_node_red(
    node: str, user_dir: Path, port: int, env: dict[str, str], log: Path
) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [node, str(NODE_RED / "node_modules" / "node-red" / "red.js"),
             "--userDir", str(user_dir), "--settings", str(user_dir / "settings.js"),
             "--port", str(port)],
            cwd=user_dir, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


def _connected(log: Path, where: str) -> bool:
    text = log.read_text(errors="replace")
    return "Connected to broker" in text and where in text


def _up(url: str) -> bool:
    try:
        return _http("GET", url) == 200
    except (urllib.error.URLError, OSError):
        return False


async def _debug_messages(probe: asyncio.subprocess.Process, want: int) -> list[dict[str, Any]]:
    """The first `want` debug messages the sidebar receives."""
    assert probe.stdout is not None
    seen: list[dict[str, Any]] = []
    while len(seen) < want:
        line = await probe.stdout.readline()
        if not line:
            raise AssertionError(f"the debug probe ended after {seen}")
        item = json.loads(line)
        if "id" in item:
            seen.append(item)
    return seen


async def test_shipped_flow_in_node_red_is_answered_and_shows_the_cached_answer(
    secured_mosquitto: Server, redis: Server, tmp_path: Path
) -> None:
    node, npm = require_node()
    await asyncio.to_thread(npm_ci, NODE_RED, npm)
    settings = isolated_settings(
        secured_mosquitto.url,
        redis.url,
        broker={
            "request_topic": "request_message",
            "response_topic": "response_message",
            "reply_to_allowed": ["response_message", "response_message/{app}/#"],
            "username": "worker",
            "password": USERS["worker"],
        },
    )
    # A stock userDir holding the shipped files, unchanged (Node-RED rewrites its
    # credentials file, so it runs on copies).
    user_dir = tmp_path / "node-red"
    user_dir.mkdir()
    for name in ("flow.json", "flow_cred.json"):
        shutil.copy(FLOW_DIR / name, user_dir / name)
    (user_dir / "settings.js").write_text(
        'module.exports = {uiHost: "127.0.0.1", flowFile: "flow.json",'
        ' logging: {console: {level: "info"}}};\n'
    )
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "MQTT_HOST": "127.0.0.1",
        "MQTT_PORT": str(secured_mosquitto.port),
        "MQTT_USERNAME": "nodered",
        "MQTT_PASSWORD": USERS["nodered"],
    }
    log = tmp_path / "node-red.log"
    x, y = heldout()
    async with worker_in_loop(settings) as worker:
        red = await asyncio.to_thread(_start_node_red, node, user_dir, port, env, log)
        probe = None
        try:
            await _wait_for("Node-RED's admin API", lambda: _up(f"{base}/flows"), 90, log)
            connected = f"127.0.0.1:{secured_mosquitto.port}"
            await _wait_for(
                "the MQTT broker node connected", lambda: _connected(log, connected), 60, log
            )
            probe = await asyncio.create_subprocess_exec(
                node, str(NODE_RED / "debug_probe.mjs"), base,
                cwd=NODE_RED, stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            assert probe.stdout is not None
            assert json.loads(await asyncio.wait_for(probe.stdout.readline(), 30)) == {
                "probe": "subscribed"
            }
            # Clicking the inject buttons, as the editor does it.
            assert await asyncio.to_thread(_http, "POST", f"{base}/inject/iw_inject") == 200
            first = await asyncio.wait_for(_debug_messages(probe, 1), 60)
            assert await asyncio.to_thread(_http, "POST", f"{base}/inject/iw_cached_inject") == 200
            cached = await asyncio.wait_for(_debug_messages(probe, 2), 60)
            inferences = worker.stats.inferences
            from_ledger = worker.stats.dedup["done"]
        finally:
            if probe is not None and probe.returncode is None:
                probe.kill()
                await probe.wait()
            red.terminate()
            try:
                await asyncio.to_thread(red.wait, 20)
            except subprocess.TimeoutExpired:
                red.kill()

    (answer,) = first
    assert answer["id"] == "iw_debug", answer
    label = answer["msg"]["outputs"]["label"]["data"]
    assert answer["msg"]["status"] == "ok" and label == [int(y[_row(x, FLOW_DIR)])]
    assert [m["id"] for m in cached] == ["iw_cached_debug"] * 2
    assert [m["msg"]["topic"] for m in cached] == [
        f"first answer for {FIXED_ID}",
        f"cached answer (identical bytes) for {FIXED_ID}",
    ]
    assert cached[0]["msg"]["payload"] == cached[1]["msg"]["payload"]
    assert cached[0]["msg"]["payload"]["status"] == "ok"
    assert inferences == 2, "the fixed id is computed once"
    assert from_ledger == 1


def _row(x: Any, flow_dir: Path) -> int:
    """The held-out row the flow's request literal holds."""
    flow = json.loads((flow_dir / "flow.json").read_text())
    func = next(n for n in flow if n["id"] == "iw_build")["func"]
    request = json.loads(func.split("const REQUEST = '")[1].split("';")[0])
    pixels = request["inputs"]["pixels"]["data"][0]
    return next(i for i in range(len(x)) if [float(v) for v in x[i]] == pixels)
