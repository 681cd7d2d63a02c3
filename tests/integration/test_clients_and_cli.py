"""The sync client and `inference-worker send` against a worker on real servers."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from inference_worker.client import SyncInferenceClient
from tests.integration.harness import REPO, heldout, isolated_settings, worker_in_loop
from tests.servers import Server

pytestmark = pytest.mark.integration


async def test_sync_client_and_send_command(
    mosquitto: Server, redis: Server, tmp_path: Path
) -> None:
    settings = isolated_settings(mosquitto.url, redis.url)
    x, y = heldout()
    request_file = tmp_path / "req.json"
    request_file.write_text(
        json.dumps(
            {
                "id": "cli-1",
                "model": "digits",
                "meta": {"device": "sensor-7"},
                "inputs": {
                    "pixels": {"dtype": "float32", "shape": [1, 64], "data": x[7:8].tolist()}
                },
            }
        )
    )
    broker = settings.broker

    def use_sync_client() -> tuple[int, str]:
        with SyncInferenceClient(
            broker.url,
            request_topic=broker.request_topic,
            response_topic=broker.response_topic,
            timeout_s=30,
        ) as client:
            resp = client.infer("digits", {"pixels": x[4:5]})
            assert resp.outputs is not None
            return int(resp.outputs["label"][0]), resp.status

    def use_send_command() -> subprocess.CompletedProcess[str]:
        env = {
            "IW_BROKER__REQUEST_TOPIC": broker.request_topic,
            "IW_BROKER__RESPONSE_TOPIC": broker.response_topic,
        }
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "inference_worker.cli",
                "send",
                "--broker",
                broker.url,
                "--codec",
                "json",
                str(request_file),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, **env},
        )

    async with worker_in_loop(settings):
        # Both are blocking APIs: run them off this loop, which hosts the worker.
        label, status = await asyncio.to_thread(use_sync_client)
        out = await asyncio.to_thread(use_send_command)

    assert status == "ok" and label == int(y[4])
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    assert printed["id"] == "cli-1" and printed["status"] == "ok"
    assert printed["outputs"]["label"]["data"] == [int(y[7])]
    assert printed["meta"] == {"device": "sensor-7"}
