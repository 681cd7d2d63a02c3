"""The light client distribution (./client, `inference_worker_client`) against a real
worker: its own MQTT and Kafka transports, and a fresh venv that holds only the client."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from inference_worker_client import Codec, InferenceClient
from inference_worker_client.mqtt import MqttClientTransport

from tests.integration.harness import REPO, heldout, isolated_settings, worker_in_loop
from tests.servers import Server, require_module

pytestmark = pytest.mark.integration

# What a client-only install may bring: the client, its transport library, the codec's
# libraries and numpy. Never the worker, onnxruntime, redis or torch.
CLIENT_DISTRIBUTIONS = {"inference-worker-client", "paho-mqtt", "msgpack", "zstandard", "numpy"}


async def test_light_client_over_mqtt_every_codec_resends_and_errors(
    mosquitto: Server, redis: Server
) -> None:
    settings = isolated_settings(mosquitto.url, redis.url)
    broker = settings.broker
    x, y = heldout()
    n = 60
    async with worker_in_loop(settings) as worker:
        clients = {
            codec: InferenceClient.connect(
                broker.url,
                request_topic=broker.request_topic,
                response_topic=broker.response_topic,
                codec=codec,
                timeout_s=30,
            )
            for codec in Codec
        }
        for client in clients.values():
            await client.start()
        try:
            assert all(isinstance(c._transport, MqttClientTransport) for c in clients.values())
            codecs = list(Codec)
            requests = [
                clients[codecs[i % 3]].make_request("digits", {"pixels": x[i : i + 1]}, id=f"l{i}")
                for i in range(n)
            ]
            payloads = [clients[r.codec].encode(r) for r in requests]
            replies = await asyncio.gather(
                *(
                    clients[r.codec].send_raw(r.id, p)
                    for r, p in zip(requests, payloads, strict=True)
                )
            )
            computed = worker.stats.inferences
            again = await asyncio.gather(
                *(
                    clients[requests[i].codec].send_raw(requests[i].id, payloads[i])
                    for i in range(0, n, 6)
                )
            )
            unknown = await clients[Codec.JSON].infer("no-such-model", {"pixels": x[:1]})
            after = worker.stats.inferences
        finally:
            for client in clients.values():
                await client.close()

    assert [r.response.id for r in replies] == [r.id for r in requests]
    assert all(r.response.status == "ok" for r in replies)
    labels = np.array([int(r.response.outputs["label"][0]) for r in replies])  # type: ignore[index]
    assert float((labels == y[:n]).mean()) >= 0.95
    assert computed == n and after == n, "resends and errors must not run the model"
    assert [a.raw for a in again] == [replies[i].raw for i in range(0, n, 6)]
    assert unknown.status == "error" and unknown.error is not None
    assert unknown.error.code == "unknown_model" and not unknown.error.retryable
    assert unknown.version is None and unknown.timing is None and unknown.outputs is None


async def test_light_client_over_kafka(kafka: Server, redis: Server) -> None:
    require_module("aiokafka", "pip install -e './client[kafka]'")
    settings = isolated_settings(kafka.url, redis.url)
    broker = settings.broker
    x, y = heldout()
    async with worker_in_loop(settings) as worker:
        client = InferenceClient.connect(
            broker.url,
            request_topic=broker.request_topic,
            response_topic=broker.response_topic,
            timeout_s=60,
        )
        async with client:
            replies = await asyncio.gather(
                *(
                    client.send(client.make_request("digits", {"pixels": x[i : i + 1]}, id=f"k{i}"))
                    for i in range(20)
                )
            )
            again = await client.send(client.make_request("digits", {"pixels": x[:1]}, id="k0"))
        assert worker.stats.inferences == 20
    labels = [int(r.response.outputs["label"][0]) for r in replies]  # type: ignore[index]
    assert [r.response.id for r in replies] == [f"k{i}" for i in range(20)]
    assert np.mean(np.array(labels) == y[:20]) >= 0.9
    assert again.raw == replies[0].raw


_VENV_CLIENT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from inference_worker_client import SyncInferenceClient
    url, request_topic, response_topic, pixels = sys.argv[1:5]
    with SyncInferenceClient(url, request_topic=request_topic,
                             response_topic=response_topic, timeout_s=30) as client:
        resp = client.infer("digits", {"pixels": np.array(json.loads(pixels), np.float32)})
    heavy = ("inference_worker", "onnxruntime", "redis")
    mods = sorted(m for m in sys.modules if m.split(".")[0] in heavy)
    print(json.dumps({"status": resp.status, "label": int(resp.outputs["label"][0]), "mods": mods}))
    """
)


async def test_client_alone_in_a_fresh_venv(
    mosquitto: Server, redis: Server, tmp_path: Path
) -> None:
    """`pip install ./client` into an empty venv: only the client's dependencies arrive,
    and that venv's client is answered by a worker."""
    footprint = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            str(REPO / "scripts" / "client_footprint.py"),
            "--json",
            "--runs",
            "1",
            "--venv",
            str(tmp_path / "venv"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert footprint.returncode == 0, footprint.stderr[-3000:]
    result = json.loads(footprint.stdout.splitlines()[-1])
    assert set(result["distributions"]) == CLIENT_DISTRIBUTIONS
    settings = isolated_settings(mosquitto.url, redis.url)
    broker = settings.broker
    x, y = heldout()
    async with worker_in_loop(settings):
        proc = await asyncio.create_subprocess_exec(
            result["python"],
            "-I",
            "-c",
            _VENV_CLIENT,
            broker.url,
            broker.request_topic,
            broker.response_topic,
            json.dumps(x[3:4].tolist()),
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()[-3000:]
    printed = json.loads(out.decode().splitlines()[-1])
    assert printed == {"status": "ok", "label": int(y[3]), "mods": []}
