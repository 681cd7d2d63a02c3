"""examples/node/ (mqtt.js + @msgpack/msgpack, written from docs/wire.md) against a real
worker, Mosquitto and Redis: every held-out digit, then resends of the same ids."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from tests.integration.harness import REPO, isolated_settings, worker_in_loop
from tests.integration.npm import npm_ci, require_node
from tests.servers import Server

pytestmark = pytest.mark.integration

EXAMPLE = REPO / "examples" / "node"


async def _run_example(node: str, env: dict[str, str]) -> dict[str, object]:
    proc = await asyncio.create_subprocess_exec(
        node,
        "digits.mjs",
        cwd=EXAMPLE,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode == 0, (out.decode()[-2000:], err.decode()[-3000:])
    print(out.decode())
    result: dict[str, object] = json.loads(out.decode().strip().splitlines()[-1])
    return result


async def test_node_example_accuracy_and_resends_without_inference(
    mosquitto: Server, redis: Server
) -> None:
    node, npm = require_node()
    await asyncio.to_thread(npm_ci, EXAMPLE, npm)
    settings = isolated_settings(mosquitto.url, redis.url)
    broker = settings.broker
    env = {
        "BROKER_URL": broker.url,
        "REQUEST_TOPIC": broker.request_topic,
        "RESPONSE_TOPIC": broker.response_topic,
        "RESEND": "40",
    }
    async with worker_in_loop(settings) as worker:
        binary = await _run_example(node, env | {"CODEC": "msgpack"})
        after_msgpack = worker.stats.inferences
        done_after_msgpack = worker.stats.dedup["done"]
        listed = await _run_example(node, env | {"CODEC": "json", "COUNT": "60", "RESEND": "10"})
        inferences = worker.stats.inferences
        cached = worker.stats.dedup["done"]

    assert binary["count"] == 540 and binary["errors"] == {}
    assert float(binary["accuracy"]) >= 0.95  # type: ignore[arg-type]
    assert binary["resent"] == binary["resent_identical"] == 40
    # Every first send was computed once; the 40 resends were answered from the ledger.
    assert after_msgpack == 540
    assert done_after_msgpack == 40
    assert listed["count"] == 60 and listed["errors"] == {}
    assert float(listed["accuracy"]) >= 0.95  # type: ignore[arg-type]
    assert listed["resent"] == listed["resent_identical"] == 10
    assert inferences == 600, "a resend must not run the model"
    assert cached == 50
