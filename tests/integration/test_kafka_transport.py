"""Kafka transport on a real Kafka-protocol broker (Tansu): what the contract suite cannot
see — committed offsets, group splits, stale acks after a rebalance, pause/resume — and the
topic-name mapping. Hostile records and topic creation: `test_kafka_hardening`.

Committed offsets are read back from the broker by a consumer of the same group that
assigns partitions by hand (no join); aiokafka's admin `list_consumer_group_offsets`
cannot decode Tansu's answer. Waits are
bounded only against hangs; nothing asserts speed.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from inference_worker.transports import Delivery, TransportOptions, connect
from tests.servers import Server, require_module

aiokafka = require_module("aiokafka", "pip install -e '.[kafka]'")
from aiokafka import AIOKafkaConsumer, TopicPartition  # noqa: E402

from inference_worker.transports.kafka import KafkaTransport, kafka_topic, mqtt_topic  # noqa: E402

pytestmark = pytest.mark.integration
WAIT = 30.0
QUIET = 0.5

Make = Callable[..., Awaitable[KafkaTransport]]


def uid() -> str:
    return uuid.uuid4().hex[:12]


@pytest.fixture
async def make(kafka: Server) -> AsyncIterator[Make]:
    created: list[KafkaTransport] = []

    async def factory(
        subscriptions: tuple[str, ...] = (), *, partitions: int = 4, **kw: Any
    ) -> KafkaTransport:
        options = TransportOptions(client_id=f"test-{uid()}", subscriptions=subscriptions, **kw)
        transport = connect(kafka.url_with(f"partitions={partitions}"), options)
        assert isinstance(transport, KafkaTransport)
        created.append(transport)
        await transport.start()
        return transport

    yield factory
    for transport in created:
        await transport.close()


async def take(transport: KafkaTransport, n: int) -> list[Delivery]:
    """The next `n` deliveries, unacked."""
    iterator = transport.deliveries()
    return [await asyncio.wait_for(anext(iterator), WAIT) for _ in range(n)]


async def committed(kafka: Server, group: str, topic: str) -> dict[int, int]:
    """Committed offsets of `group` on partition 0 of `topic` (the one-partition tests)."""
    reader = AIOKafkaConsumer(
        bootstrap_servers=f"127.0.0.1:{kafka.port}", group_id=group, enable_auto_commit=False
    )
    await reader.start()
    try:
        tp = TopicPartition(topic, 0)
        reader.assign([tp])
        offset = await reader.committed(tp)
    finally:
        await reader.stop()
    return {} if offset is None else {0: offset}


async def until_committed(kafka: Server, group: str, topic: str, want: dict[int, int]) -> None:
    async def poll() -> None:
        while await committed(kafka, group, topic) != want:
            await asyncio.sleep(0.1)

    await asyncio.wait_for(poll(), WAIT)


async def test_only_the_contiguous_acked_prefix_is_committed(make: Make, kafka: Server) -> None:
    topic, group = f"t/{uid()}", f"g{uid()}"
    pub = await make(partitions=1)
    sub = await make((topic,), shared_group=group, partitions=1)
    sent = [f"m{i}".encode() for i in range(6)]
    for payload in sent:
        await pub.publish(topic, payload)
    got = await take(sub, 6)
    assert [d.payload for d in got] == sent  # one partition: in order
    name = topic.replace("/", ".")

    got[3].ack()  # out of order: offset 3 alone commits nothing
    await asyncio.sleep(QUIET)
    assert await committed(kafka, group, name) == {}
    got[1].ack()
    got[0].ack()
    await until_committed(kafka, group, name, {0: 2})  # 0 and 1; 2 is the gap
    assert sub.unacked == 3

    await sub.close()  # 2, 4, 5 never acked
    again = await make((topic,), shared_group=group, partitions=1)
    redelivered = await take(again, 4)
    assert [d.payload for d in redelivered] == sent[2:]  # 3 again too: behind the gap
    for delivery in redelivered:
        delivery.ack()
    await until_committed(kafka, group, name, {0: 6})


async def test_group_members_split_partitions_and_see_each_record_once(make: Make) -> None:
    topic, group = f"t/{uid()}", f"g{uid()}"
    a = await make((topic,), shared_group=group)
    b = await make((topic,), shared_group=group)

    async def assigned_apart() -> None:
        while not (a.assignment() and b.assignment()):
            await asyncio.sleep(0.1)

    await asyncio.wait_for(assigned_apart(), WAIT)
    assert not a.assignment() & b.assignment()
    assert len(a.assignment() | b.assignment()) == 4

    pub = await make()
    sent = [f"m{i:03d}".encode() for i in range(100)]
    # Keyed by correlation id, as responses are: the key picks the partition.
    await asyncio.gather(*(pub.publish(topic, p, correlation=p) for p in sent))
    seen: list[tuple[str, bytes]] = []

    async def drain(name: str, transport: KafkaTransport) -> None:
        async for delivery in transport.deliveries():
            delivery.ack()
            seen.append((name, delivery.payload))

    tasks = [asyncio.create_task(drain("a", a)), asyncio.create_task(drain("b", b))]
    try:

        async def all_seen() -> None:
            while len(seen) < len(sent):
                await asyncio.sleep(0.05)

        await asyncio.wait_for(all_seen(), WAIT)
        await asyncio.sleep(QUIET)
    finally:
        for task in tasks:
            task.cancel()
    assert sorted(p for _, p in seen) == sent
    assert {name for name, _ in seen} == {"a", "b"}


async def test_acks_from_a_revoked_assignment_are_ignored(make: Make) -> None:
    topic, group = f"t/{uid()}", f"g{uid()}"
    a = await make((topic,), shared_group=group)
    pub = await make()
    for i in range(8):
        await pub.publish(topic, f"m{i}".encode())
    old = await take(a, 8)
    b = await make((topic,), shared_group=group)  # rebalance: a's generation moves on
    assert b.assignment()
    for delivery in old:
        delivery.ack()
    assert a.stale_acks == 8
    # Nothing was committed, so the new owners (a included) read all 8 again.
    again: list[bytes] = []

    async def drain(transport: KafkaTransport) -> None:
        async for delivery in transport.deliveries():
            delivery.ack()
            again.append(delivery.payload)

    tasks = [asyncio.create_task(drain(a)), asyncio.create_task(drain(b))]
    try:

        async def all_again() -> None:
            while len(again) < 8:
                await asyncio.sleep(0.05)

        await asyncio.wait_for(all_again(), WAIT)
    finally:
        for task in tasks:
            task.cancel()
    assert sorted(again) == sorted(d.payload for d in old)
    assert a.unacked == b.unacked == 0


async def test_pause_pauses_partitions_and_resume_loses_nothing(make: Make) -> None:
    topic = f"t/{uid()}"
    sub = await make((topic,))
    pub = await make()
    sub.pause()
    sent = [f"m{i}".encode() for i in range(10)]
    for payload in sent:
        await pub.publish(topic, payload)
    iterator = sub.deliveries()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(anext(iterator), QUIET)
    assert sub.unacked == 0  # nothing was even fetched
    sub.resume()
    got = [await asyncio.wait_for(anext(iterator), WAIT) for _ in sent]
    assert sorted(d.payload for d in got) == sent


async def test_receive_maximum_bounds_fetching(make: Make) -> None:
    topic = f"t/{uid()}"
    sub = await make((topic,), receive_maximum=3)
    pub = await make()
    sent = [f"m{i:02d}".encode() for i in range(12)]
    for payload in sent:
        await pub.publish(topic, payload)
    got = await take(sub, 3)
    iterator = sub.deliveries()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(anext(iterator), QUIET)
    assert sub.unacked == 3
    while len(got) < len(sent):
        for delivery in got:
            delivery.ack()
        got.append(await asyncio.wait_for(anext(iterator), WAIT))
        assert sub.unacked <= 3
    assert sorted(d.payload for d in got) == sent


async def test_tansu_refuses_the_idempotent_producer_and_we_fall_back(make: Make) -> None:
    pub = await make()
    assert pub.idempotent is False  # feature-detected at start; acks=all still holds
    await pub.publish("response_message", b"x", correlation=b"id-1")  # created at start


def test_kafka_urls() -> None:
    options = TransportOptions(client_id="x")
    many = connect("kafka://h1,h2:9093?partitions=8&session_timeout_ms=6000", options)
    assert isinstance(many, KafkaTransport) and many.where == "h1:9092,h2:9093"
    assert many._session_timeout_ms == 6000 and many._partitions == 8
    bad_urls = ("kafka://h1:x", "kafka://h1?partitions=0", "kafka://h1?other=1", "kafka://h/p")
    for bad in (*bad_urls, "kafka://h1?session_timeout_ms=10"):
        with pytest.raises(ValueError):
            connect(bad, options)


def test_topic_mapping_keeps_the_plain_names() -> None:
    assert kafka_topic("request_message/digits") == "request_message.digits"
    assert mqtt_topic("request_message.digits") == "request_message/digits"
    assert kafka_topic("request_message.dlq") == "request_message.dlq"  # the DLQ suffix
    assert mqtt_topic("request_message.dlq") == "request_message.dlq"
    assert mqtt_topic("a.b.dlq") == "a/b.dlq" and kafka_topic("a/b.dlq") == "a.b.dlq"
    assert kafka_topic("response_message/_/iw-client-1") == "response_message._.iw-client-1"


def test_topic_names_that_would_not_map_back_are_refused() -> None:
    refused = [
        "request_message/digits/a.b",  # app `a.b` would be read back as `a/b`
        "a//b",
        "/a",
        "a/",
        "a/dlq",  # would be `a.dlq`, which reads back as the dead-letter name `a.dlq`
        "a b",
        "$SYS/x",
        "a/+",
        "__consumer_offsets",
        "x" * 250,
        "ü",
    ]
    for name in refused:
        with pytest.raises(ValueError):
            kafka_topic(name)
    for kafka_name in ("a..b", ".a", "a.", "__x", "a b", "", "x" * 250, ".dlq"):
        with pytest.raises(ValueError):
            mqtt_topic(kafka_name)


def test_topic_mapping_is_one_to_one_and_reversible() -> None:
    """Every string of up to five pieces over an alphabet that holds all the hard cases:
    each name that maps, maps back to itself, in both directions (so no two collide)."""
    pieces = ("a", "B", "_", "-", ".", "/", "dlq", "__")
    mapped: dict[str, str] = {}
    for n in range(1, 6):
        for combo in itertools.product(pieces, repeat=n):
            name = "".join(combo)
            try:
                kafka = kafka_topic(name)
            except ValueError:
                pass
            else:
                assert mqtt_topic(kafka) == name
                assert mapped.setdefault(kafka, name) == name, (kafka, name)
            try:
                back = mqtt_topic(name)
            except ValueError:
                continue
            assert kafka_topic(back) == name
    assert len(mapped) > 1000


async def test_check_topic_accepts_what_maps_and_refuses_the_rest(make: Make) -> None:
    transport = await make()
    for good in ("response_message", "response_message/app1/c-1", "request_message.dlq"):
        transport.check_topic(good)
    for bad in ("response_message/app 1", "response_message/a.b", "response_message/"):
        with pytest.raises(ValueError):
            transport.check_topic(bad)
