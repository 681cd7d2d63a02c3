"""Model metadata on a real broker: a late subscriber finds the retained description of
every served model, and removing a model clears it (Mosquitto)."""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from inference_worker.app import run_worker
from inference_worker.metadata import from_repository
from inference_worker.pipeline import Worker
from inference_worker.settings import Settings
from inference_worker.transports import connect
from inference_worker.transports.base import Delivery, TransportOptions
from tests.integration.harness import MODELS, isolated_settings
from tests.poison_models import write_config, write_version
from tests.servers import Server, require_module

pytestmark = pytest.mark.integration


async def _until(condition: Callable[[], bool], what: str) -> None:
    try:
        async with asyncio.timeout(60):
            while not condition():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"never happened: {what}") from None


@asynccontextmanager
async def _subscriber(url: str, topic_filter: str) -> AsyncIterator[list[Delivery]]:
    seen: list[Delivery] = []
    options = TransportOptions(client_id=f"m-{uuid.uuid4().hex[:8]}", subscriptions=(topic_filter,))
    transport = connect(url, options)
    await transport.start()

    async def pull() -> None:
        async for d in transport.deliveries():
            seen.append(d)
            d.ack()

    task = asyncio.create_task(pull())
    try:
        yield seen
    finally:
        await transport.close()
        task.cancel()


async def _retained(settings: Settings, base: str) -> dict[str, bytes]:
    """What a subscriber arriving now is handed: Mosquitto sends the retained messages
    while handling the SUBSCRIBE, so everything before a marker published after the
    SUBACK is the retained set."""
    marker = f"{base}/marker-{uuid.uuid4().hex[:6]}"
    async with _subscriber(settings.broker.url, f"{base}/#") as seen:
        sender = connect(settings.broker.url, TransportOptions(client_id=f"s-{uuid.uuid4().hex}"))
        await sender.start()
        await sender.publish(marker, b"m")
        await sender.close()
        await _until(lambda: any(d.topic == marker for d in seen), "marker")
        upto = next(i for i, d in enumerate(seen) if d.topic == marker)
        return {d.topic: d.payload for d in seen[:upto]}


async def test_late_subscriber_gets_retained_metadata_and_removal_clears_it(
    mosquitto: Server, redis: Server, tmp_path: Path
) -> None:
    root = tmp_path / "models"
    shutil.copytree(MODELS / "digits", root / "digits", ignore=shutil.ignore_patterns("*.npz"))
    probe = write_config(root, "probe")
    write_version(probe, 1, fixed=True)
    base = f"meta-{uuid.uuid4().hex[:8]}"
    settings = isolated_settings(
        mosquitto.url,
        redis.url,
        broker={"metadata_topic": f"{base}/{{model}}/metadata"},
        models={"root": str(root), "device": "cpu", "poll_interval_s": 0},
    )
    stop, reload = asyncio.Event(), asyncio.Event()
    ready: asyncio.Future[Worker] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(run_worker(settings, stop, reload=reload, on_ready=ready.set_result))
    await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
    worker = ready.result()
    digits_topic, probe_topic = f"{base}/digits/metadata", f"{base}/probe/metadata"
    try:
        first = await _retained(settings, base)
        assert set(first) == {digits_topic, probe_topic}
        expected = from_repository(root)
        assert json.loads(first[digits_topic]) == expected["digits"]
        assert json.loads(first[probe_topic])["versions"] == [1]
        assert json.loads(first[digits_topic])["inputs"][0]["range"] == [0, 16]

        async with _subscriber(settings.broker.url, f"{base}/+/metadata") as live:
            write_version(probe, 2, fixed=True)
            reload.set()
            await _until(
                lambda: any(b'"versions":[2]' in d.payload for d in live if d.topic == probe_topic),
                "version 2 described",
            )
            shutil.rmtree(probe)
            reload.set()
            await _until(
                lambda: any(d.topic == probe_topic and d.payload == b"" for d in live),
                "probe cleared",
            )
        assert "probe" not in worker.served_versions
        after = await _retained(settings, base)
        assert set(after) == {digits_topic}, "the removed model's metadata is gone"
        assert after[digits_topic] == first[digits_topic], "the other one is unchanged"
    finally:
        stop.set()
        await task


async def _compacted_view(bootstrap: str, topic: str) -> dict[bytes, bytes | None]:
    """Read a Kafka topic from the beginning to its end; the last value per key."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        assert topic in await consumer.topics(), "created by the worker at start"
        parts = [
            TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        ends = await consumer.end_offsets(parts)
        view: dict[bytes, bytes | None] = {}

        async def behind() -> bool:
            return any([await consumer.position(tp) < ends[tp] for tp in parts])

        while await behind():
            batch = await consumer.getmany(*parts, timeout_ms=500)
            for records in batch.values():
                for record in records:
                    assert record.key is not None
                    view[record.key] = record.value
        return view
    finally:
        await consumer.stop()


async def _topic_configs(bootstrap: str, topic: str) -> dict[str, str]:
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (response,) = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic)]
        )
        (resource,) = response.resources
        return {entry[0]: entry[1] for entry in resource[4]}
    finally:
        await admin.close()


async def test_kafka_metadata_is_a_compacted_topic_keyed_by_model_with_tombstones(
    kafka: Server, tmp_path: Path
) -> None:
    require_module("aiokafka", "pip install -e '.[kafka]'")
    root = tmp_path / "models"
    shutil.copytree(MODELS / "digits", root / "digits", ignore=shutil.ignore_patterns("*.npz"))
    probe = write_config(root, "probe")
    write_version(probe, 1, fixed=True)
    tag = uuid.uuid4().hex[:8]
    settings = isolated_settings(
        kafka.url_with("partitions=2"),
        "memory://",
        broker={"metadata_kafka_topic": f"meta-{tag}/metadata"},
        models={"root": str(root), "device": "cpu", "poll_interval_s": 0},
    )
    topic = f"meta-{tag}.metadata"
    bootstrap = kafka.url.removeprefix("kafka://").partition("?")[0]
    stop, reload = asyncio.Event(), asyncio.Event()
    ready: asyncio.Future[Worker] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(run_worker(settings, stop, reload=reload, on_ready=ready.set_result))
    await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
    worker = ready.result()
    try:
        assert await _topic_configs(bootstrap, topic) == {"cleanup.policy": "compact"}
        view = await _compacted_view(bootstrap, topic)
        assert set(view) == {b"digits", b"probe"}
        assert json.loads(view[b"digits"] or b"") == from_repository(root)["digits"]
        shutil.rmtree(probe)
        reload.set()
        await _until(lambda: "probe" not in worker.served_versions, "probe retired")
        async with asyncio.timeout(60):
            while b"probe" in {
                k for k, v in (await _compacted_view(bootstrap, topic)).items() if v
            }:
                await asyncio.sleep(0.1)
        final = await _compacted_view(bootstrap, topic)
        assert final[b"probe"] is None, "a tombstone (null value), not an empty record"
        assert json.loads(final[b"digits"] or b"") == from_repository(root)["digits"]
    finally:
        stop.set()
        await task
