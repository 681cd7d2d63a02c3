"""Model metadata: the document, the config fields behind it, retained messages on the
memory broker, and a worker keeping them in line through hot reloads and a removal."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from inference_worker.app import run_worker
from inference_worker.client import InferenceClient
from inference_worker.metadata import (
    CODECS,
    MetadataPublisher,
    describe,
    from_repository,
    route_for,
)
from inference_worker.models import ModelConfigError, load_model_config
from inference_worker.pipeline import Worker
from inference_worker.settings import BrokerSettings, load_settings
from inference_worker.transports import connect
from inference_worker.transports.base import Delivery, Outgoing, TransportOptions
from inference_worker.transports.memory import MemoryBroker
from tests.poison_models import write_config, write_version

MODELS = Path(__file__).resolve().parents[2] / "config" / "models"


def test_digits_document_says_what_the_model_takes() -> None:
    doc = describe(load_model_config(MODELS / "digits"), [1])
    assert doc["name"] == "digits" and doc["versions"] == [1]
    assert doc["max_batch_size"] == 64 and doc["codecs"] == list(CODECS)
    assert set(CODECS) == {"zstd", "msgpack", "json"}
    (pixels,) = doc["inputs"]
    assert pixels["name"] == "pixels" and pixels["dtype"] == "float32"
    assert pixels["shape"] == [-1, 64] and pixels["range"] == [0, 16]
    assert "pixel" in pixels["description"]
    assert [o["name"] for o in doc["outputs"]] == ["label", "probabilities"]
    assert doc["outputs"][0]["range"] == [0, 9]
    on_disk = from_repository(MODELS, ["digits"])
    assert on_disk == {"digits": doc}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('description: "two\\nlines"', "one line"),
        ("description: 5", "one line"),
        ("range: [3, 1]", "lo <= hi"),
        ("range: [0]", "lo <= hi"),
        ("range: [0, true]", "lo <= hi"),
        ("unit: cm", "unknown key"),
    ],
)
def test_tensor_docs_are_validated(tmp_path: Path, extra: str, message: str) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.yaml").write_text(
        "backend: onnx\ninputs:\n  - name: x\n    dtype: float32\n    shape: [-1, 2]\n"
        f"    {extra}\noutputs:\n  - {{name: y, dtype: float32, shape: [-1]}}\n"
    )
    with pytest.raises(ModelConfigError, match=message):
        load_model_config(model)


async def _collect(t: object, into: list[Delivery]) -> None:
    async for d in t.deliveries():  # type: ignore[attr-defined]
        into.append(d)
        d.ack()


async def test_memory_broker_retains_the_last_value_and_an_empty_payload_clears_it() -> None:
    broker = MemoryBroker()
    pub = connect("memory://", TransportOptions(client_id="pub"), memory=broker)
    await pub.start()
    live_seen: list[Delivery] = []
    live = connect("memory://", TransportOptions("live", ("m/+/meta",)), memory=broker)
    await live.start()
    live_task = asyncio.create_task(_collect(live, live_seen))
    await pub.publish_many(
        [
            Outgoing("m/a/meta", b"a1", retain=True),
            Outgoing("m/a/meta", b"a2", retain=True),
            Outgoing("m/b/meta", b"b1", retain=True),
            Outgoing("m/c/meta", b"not kept"),
        ]
    )
    assert broker.retained == {"m/a/meta": b"a2", "m/b/meta": b"b1"}

    async def late(filters: tuple[str, ...], group: str | None = None) -> list[bytes]:
        options = TransportOptions(f"late-{len(filters)}-{group}", filters, shared_group=group)
        t = connect("memory://", options, memory=broker)
        await t.start()
        got: list[Delivery] = []
        task = asyncio.create_task(_collect(t, got))
        await asyncio.sleep(0)
        await t.close()
        task.cancel()
        return [d.payload for d in got]

    assert await late(("m/+/meta",)) == [b"a2", b"b1"]
    assert await late(("m/b/meta", "m/#")) == [b"a2", b"b1"], "once each, two filters or not"
    assert await late(("m/+/meta",), group="g") == [], "shared subscriptions get no retained"
    await pub.publish_many([Outgoing("m/a/meta", b"", retain=True)])
    assert broker.retained == {"m/b/meta": b"b1"}
    assert await late(("m/+/meta",)) == [b"b1"]
    await asyncio.sleep(0)
    assert [d.payload for d in live_seen] == [b"a1", b"a2", b"b1", b"not kept", b""], "live: all"
    live_task.cancel()
    await live.close()
    await pub.close()


async def test_publisher_sends_only_changes_and_clears_what_is_gone() -> None:
    broker = MemoryBroker()
    pub = connect("memory://", TransportOptions(client_id="pub"), memory=broker)
    await pub.start()
    sent: list[Outgoing] = []
    real = pub.publish_many

    async def spy(messages: list[Outgoing]) -> list[BaseException | None]:
        sent.extend(messages)
        return await real(messages)

    pub.publish_many = spy  # type: ignore[method-assign]
    publisher = MetadataPublisher(pub, route_for(BrokerSettings()))
    await publisher.sync({"a": b"A1", "b": b"B1"})
    await publisher.sync({"a": b"A1", "b": b"B1"})
    assert [(m.topic, m.payload, m.retain) for m in sent] == [
        ("models/a/metadata", b"A1", True),
        ("models/b/metadata", b"B1", True),
    ]
    await publisher.sync({"a": b"A2"})
    assert [(m.topic, m.payload) for m in sent[2:]] == [
        ("models/a/metadata", b"A2"),
        ("models/b/metadata", b""),
    ]
    assert broker.retained == {"models/a/metadata": b"A2"}
    assert publisher.published == {"a": b"A2"}
    kafka = route_for(BrokerSettings(url="kafka://k:9092"))("digits", b"{}")
    assert (kafka.topic, kafka.correlation, kafka.retain) == ("models/metadata", b"digits", True)
    await pub.close()


async def _until(condition: Callable[[], bool], what: str) -> None:
    async with asyncio.timeout(30):
        while not condition():
            await asyncio.sleep(0.01)
    assert condition(), what


async def test_worker_publishes_on_start_and_reload_and_clears_a_removed_model(
    tmp_path: Path,
) -> None:
    root = tmp_path / "models"
    shutil.copytree(MODELS / "digits", root / "digits", ignore=shutil.ignore_patterns("*.npz"))
    probe = write_config(root, "probe")
    write_version(probe, 1, fixed=True)
    settings = load_settings(
        overrides={
            "models": {"root": str(root), "device": "cpu", "poll_interval_s": 0},
            "metrics": {"host": "127.0.0.1", "port": 0},
            "logging": {"level": "WARNING", "json": False},
        }
    )
    broker = MemoryBroker()
    stop, reload = asyncio.Event(), asyncio.Event()
    ready: asyncio.Future[Worker] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        run_worker(settings, stop, memory=broker, reload=reload, on_ready=ready.set_result)
    )
    await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
    worker = ready.result()

    def meta(name: str) -> dict[str, object] | None:
        raw = broker.retained.get(f"models/{name}/metadata")
        return None if raw is None else json.loads(raw)

    client = InferenceClient.connect("memory://", memory=broker, resend_after_s=None, timeout_s=10)
    await client.start()
    try:
        assert meta("digits") == from_repository(root)["digits"]
        assert meta("probe") is not None and meta("probe")["versions"] == [1]  # type: ignore[index]
        write_version(probe, 2, fixed=True)
        reload.set()
        await _until(lambda: worker.served_versions.get("probe") == [2], "v2 serves")
        await _until(lambda: (meta("probe") or {}).get("versions") == [2], "v2 published")
        shutil.rmtree(probe)
        reload.set()
        await _until(lambda: "probe" not in worker.served_versions, "probe retired")
        await _until(lambda: meta("probe") is None, "probe metadata cleared")
        assert meta("digits") is not None, "the other model's metadata stays"
        x = np.zeros((1, 64), np.float32)
        gone = await client.send(client.make_request("probe", {"pixels": x}, id="after"))
        still = await client.send(client.make_request("digits", {"pixels": x}, id="digits"))
    finally:
        await client.close()
        stop.set()
        await task
    assert gone.response.error is not None and gone.response.error.code.value == "unknown_model"
    assert still.response.status == "ok"


def test_models_command_prints_what_workers_publish(capsys: pytest.CaptureFixture[str]) -> None:
    from inference_worker.cli import main
    from inference_worker.metadata import encode

    assert main(["models", "--models", str(MODELS), "--json", "digits"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line.encode() == encode(from_repository(MODELS, ["digits"])["digits"])
    assert main(["models", "--models", str(MODELS), "digits"]) == 0
    table = capsys.readouterr().out
    assert "pixels" in table and "0..16" in table and "float32" in table
    assert main(["models", "--models", str(MODELS), "no-such-model"]) == 2
    assert "unknown model" in capsys.readouterr().err
