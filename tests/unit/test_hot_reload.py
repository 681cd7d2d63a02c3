"""Hot reload while requests flow: a new version takes over without a failed request,
and a broken version is refused while the previous one keeps serving."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import numpy as np

from inference_worker.client import InferenceClient
from inference_worker.models import ModelRepository
from inference_worker.pipeline import Assembly, Worker
from inference_worker.serving import load_models
from inference_worker.settings import load_settings
from inference_worker.state.memory import MemoryStateStore
from inference_worker.transports import connect
from inference_worker.transports.base import TransportOptions
from inference_worker.transports.memory import MemoryBroker

DIGITS = Path(__file__).resolve().parents[2] / "config" / "models" / "digits"


async def test_new_version_swaps_in_under_load_and_a_broken_one_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "models"
    (root / "digits" / "1").mkdir(parents=True)
    shutil.copy(DIGITS / "config.yaml", root / "digits" / "config.yaml")
    shutil.copy(DIGITS / "1" / "model.onnx", root / "digits" / "1" / "model.onnx")
    with np.load(DIGITS / "heldout.npz") as data:
        x = data["x"].astype(np.float32)
    settings = load_settings(overrides={"models": {"root": str(root), "device": "cpu"}})
    repo = ModelRepository(root)

    broker = MemoryBroker()
    transport = connect(
        "memory://",
        TransportOptions(client_id="w", subscriptions=("request_message/#",), shared_group="g"),
        memory=broker,
    )
    await transport.start()
    worker = Worker(
        Assembly(settings, transport, MemoryStateStore(), load_models(settings.models), "w")
    )
    stop = asyncio.Event()
    serving = asyncio.create_task(worker.serve(stop))
    client = InferenceClient.connect("memory://", memory=broker, resend_after_s=None, timeout_s=10)
    await client.start()

    versions: list[int | None] = []
    failures: list[str] = []
    flowing = True

    async def load() -> None:
        i = 0
        while flowing:
            reply = await client.send(
                client.make_request("digits", {"pixels": x[i % len(x)][None]}, id=f"r{i}")
            )
            if reply.response.status != "ok":
                failures.append(str(reply.response.error))
            versions.append(reply.response.version)
            i += 1

    loaders = [asyncio.create_task(load()) for _ in range(8)]
    try:
        while len(versions) < 100:
            await asyncio.sleep(0.01)
        (root / "digits" / "2").mkdir()
        shutil.copy(DIGITS / "1" / "model.onnx", root / "digits" / "2" / "model.onnx")
        await worker.reload_models(repo)
        assert worker.served_versions == {"digits": [2]}
        swapped_at = len(versions)
        while len(versions) < swapped_at + 100:
            await asyncio.sleep(0.01)

        (root / "digits" / "3").mkdir()
        (root / "digits" / "3" / "model.onnx").write_bytes(b"not an onnx model")
        await worker.reload_models(repo)
        await worker.reload_models(repo)  # refused once, not retried while unchanged
        broken_at = len(versions)
        while len(versions) < broken_at + 100:
            await asyncio.sleep(0.01)
        asking_for_1 = await client.send(
            client.make_request("digits", {"pixels": x[0][None]}, id="old", version=1)
        )
    finally:
        flowing = False
        await asyncio.gather(*loaders)
        await client.close()
        stop.set()
        await serving
        await transport.close()

    assert failures == [], "no request may fail during a swap"
    # Requests in flight at the swap finish on version 1; everything admitted later is 2.
    tail = versions[swapped_at + 8 :]
    assert set(tail) == {2}
    assert 1 in versions[:swapped_at]
    assert worker.served_versions == {"digits": [2]}, "the broken version 3 is not served"
    text = worker.metrics.exposition().decode()
    assert 'iw_model_load_failures_total{model="digits"} 1.0' in text
    assert asking_for_1.response.error is not None
    assert asking_for_1.response.error.code.value == "unknown_model"
