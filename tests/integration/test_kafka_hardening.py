"""Hostile Kafka records and topics on a real broker (Tansu), and a whole worker behind them.

A record's headers are untrusted: each bad one is delivered with `defect` set (payload
kept, ackable) and consumption goes on past it; the transport's background tasks end
visibly when they crash; only configured topics are created, and a publish to a missing
one fails promptly instead of creating it. Waits are bounded only against hangs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from inference_worker.protocol import ErrorCode, Limits, WireCodec
from inference_worker.transports import Delivery, TransportOptions, connect
from inference_worker.transports.base import Outgoing
from tests.servers import Server, require_module

require_module("aiokafka", "pip install -e '.[kafka]'")
from aiokafka import AIOKafkaProducer  # noqa: E402
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # noqa: E402
from aiokafka.errors import UnknownTopicOrPartitionError  # noqa: E402

from inference_worker.transports.kafka import KafkaTransport  # noqa: E402
from tests.integration.test_kafka_transport import (  # noqa: E402
    WAIT,
    Make,
    take,
    uid,
    until_committed,
)
from tests.integration.test_kafka_transport import make as make  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture
async def raw(kafka: Server) -> AsyncIterator[AIOKafkaProducer]:
    """A plain aiokafka producer: it writes records our transport never would."""
    producer = AIOKafkaProducer(bootstrap_servers=f"127.0.0.1:{kafka.port}", acks="all")
    await producer.start()
    yield producer
    await producer.stop()


async def kafka_topics(kafka: Server) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=f"127.0.0.1:{kafka.port}")
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


BAD_HEADERS: dict[str, list[tuple[str, Any]]] = {
    "null header value": [("traceparent", None)],
    "null reply_to": [("reply_to", None)],
    "reply_to not UTF-8": [("reply_to", b"\xff\xferesponse")],
    "reply_to not a legal name": [("reply_to", b"response message")],
    "reply_to that maps to no MQTT name": [("reply_to", b"response_message..x")],
    "oversized headers": [("x-big", b"x" * (65 * 1024))],
    "oversized correlation_id": [("correlation_id", b"c" * 2048)],
}


async def test_bad_headers_are_delivered_as_defects_and_consumption_goes_on(
    make: Make, kafka: Server, raw: AIOKafkaProducer
) -> None:
    topic, group = f"t/{uid()}", f"g{uid()}"
    name = topic.replace("/", ".")
    sub = await make((topic,), shared_group=group, partitions=1)
    for why, headers in BAD_HEADERS.items():
        await raw.send_and_wait(name, why.encode(), headers=headers)
    good_headers = [("traceparent", b"00-abc-def-01"), ("x-bin", b"\xffok")]
    for i in range(5):
        await raw.send_and_wait(name, f"good{i}".encode(), headers=good_headers)

    got = await take(sub, len(BAD_HEADERS) + 5)
    bad, good = got[: len(BAD_HEADERS)], got[len(BAD_HEADERS) :]
    for delivery, why in zip(bad, BAD_HEADERS, strict=True):
        assert delivery.payload == why.encode()  # one partition: in order, payload kept
        assert delivery.defect, why
    assert "null" in (bad[0].defect or "")
    assert [d.payload for d in good] == [f"good{i}".encode() for i in range(5)]
    assert all(d.defect is None for d in good)
    assert dict(good[0].headers) == {"traceparent": "00-abc-def-01", "x-bin": "\ufffdok"}
    assert all(not task.done() for task in sub.background())

    sub.ack_many(got)  # the defects are ackable like any delivery
    await until_committed(kafka, group, name, {0: len(got)})  # past every bad record
    assert sub.unacked == 0


class _NotUtf8(str):
    """A header name that the (pure Python) record builder writes as invalid UTF-8."""

    def encode(self, *_: Any, **__: Any) -> bytes:
        return b"\xff\xfename"


async def test_a_header_name_aiokafka_cannot_decode_is_a_defect_not_a_stop(
    make: Make, kafka: Server, raw: AIOKafkaProducer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiokafka raises UnicodeDecodeError inside `getmany` for such a record, on every
    retry: the transport finds it, delivers it as a defect and reads on."""
    import aiokafka.producer.message_accumulator as accumulator
    import aiokafka.producer.producer as producer_module
    from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy

    for module in (accumulator, producer_module):
        monkeypatch.setattr(module, "DefaultRecordBatchBuilder", _DefaultRecordBatchBuilderPy)
    topic, group = f"t/{uid()}", f"g{uid()}"
    name = topic.replace("/", ".")
    sub = await make((topic,), shared_group=group, partitions=1)
    await raw.send_and_wait(name, b"before")
    await raw.send_and_wait(name, b"bad", headers=[(_NotUtf8("x"), b"v")])
    for i in range(3):
        await raw.send_and_wait(name, f"after{i}".encode())
    got = await take(sub, 5)
    assert [d.payload for d in got] == [b"before", b"", b"after0", b"after1", b"after2"]
    assert [d.defect is not None for d in got] == [False, True, False, False, False]
    sub.ack_many(got)
    await until_committed(kafka, group, name, {0: 5})
    assert all(not task.done() for task in sub.background())


async def test_background_tasks_run_and_a_fetch_crash_ends_its_task_visibly(
    make: Make, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    sub = await make((f"t/{uid()}",))
    tasks = sub.background()
    assert len(tasks) == 2 and not any(t.done() for t in tasks)
    consumer = sub._consumer
    assert consumer is not None

    async def crash(*_: Any, **__: Any) -> Any:
        raise RuntimeError("injected fetch crash")

    monkeypatch.setattr(consumer, "getmany", crash)
    with caplog.at_level(logging.ERROR, logger="inference_worker.transports"):
        done, _ = await asyncio.wait(tasks, timeout=WAIT, return_when=asyncio.FIRST_COMPLETED)
    assert len(done) == 1
    (fetch,) = done
    error = fetch.exception()
    assert isinstance(error, RuntimeError) and "injected" in str(error)
    assert "Kafka fetch task died" in caplog.text


async def test_publish_many_returns_each_message_outcome_and_creates_nothing(
    make: Make, kafka: Server
) -> None:
    topic = f"t/{uid()}"
    sub = await make((topic,))  # creates its subscription
    pub = await make()
    missing = f"response_message/{uid()}"
    messages = [
        Outgoing(topic, b"ok"),
        Outgoing(missing, b"to a topic nobody configured"),
        Outgoing("response_message/app 1", b"illegal name"),
        Outgoing(topic, b"ok too", reply_to="a/b.c"),  # a reply_to with no Kafka name
    ]
    results = await asyncio.wait_for(pub.publish_many(messages), WAIT)
    assert results[0] is None
    assert isinstance(results[1], UnknownTopicOrPartitionError)
    assert isinstance(results[2], ValueError) and isinstance(results[3], ValueError)
    (delivery,) = await take(sub, 1)
    assert delivery.payload == b"ok"
    with pytest.raises(UnknownTopicOrPartitionError):
        await asyncio.wait_for(pub.publish(missing, b"again"), WAIT)
    assert missing.replace("/", ".") not in await kafka_topics(kafka)


async def test_a_topic_created_later_can_be_published_to(make: Make) -> None:
    topic = f"t/{uid()}"
    pub = await make()
    (error,) = await pub.publish_many([Outgoing(topic, b"early")])
    assert isinstance(error, UnknownTopicOrPartitionError)
    sub = await make((topic,))  # an operator (here: a subscriber) creates the topic

    async def published() -> None:
        # Looked up again after the recheck interval, not before.
        while (await pub.publish_many([Outgoing(topic, b"late")]))[0] is not None:
            await asyncio.sleep(0.2)

    await asyncio.wait_for(published(), WAIT)
    (delivery,) = await take(sub, 1)
    assert delivery.payload == b"late"


async def test_tansu_auto_creates_topics_on_a_plain_producer_send(
    kafka: Server, raw: AIOKafkaProducer
) -> None:
    """What the broker does that the transport must not trigger: Tansu answers a producer's
    metadata request (allow_auto_topic_creation, aiokafka's default) by creating it."""
    name = f"response_message.{uid()}"
    await raw.send_and_wait(name, b"x")
    assert name in await kafka_topics(kafka)


# --- the whole worker ------------------------------------------------------------------


async def observe(kafka: Server, topic: str) -> KafkaTransport:
    transport = connect(
        kafka.url, TransportOptions(client_id=f"obs-{uid()}", subscriptions=(topic,))
    )
    assert isinstance(transport, KafkaTransport)
    await transport.start()
    return transport


async def test_worker_dead_letters_a_null_header_record_and_answers_the_rest(
    kafka: Server, redis: Server
) -> None:
    """One record with a null header value, then 100 good digits requests: all 100 are
    answered correctly; the bad one is dead-lettered and answered bad_request on the
    default response topic."""
    import onnxruntime

    # Imported here: the harness follows the worker's rebuild, the transport tests do not.
    from tests.integration.harness import (
        MODELS,
        client_for,
        heldout,
        isolated_settings,
        worker_in_loop,
    )

    settings = isolated_settings(kafka.url, redis.url, models={"names": ["digits"]})
    broker = settings.broker
    # The response and dead-letter topics exist, as an operator creates them (the worker
    # creates only what its configuration names).
    admin = AIOKafkaAdminClient(bootstrap_servers=f"127.0.0.1:{kafka.port}")
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(t, 4, 1) for t in (broker.response_topic, broker.dlq_topic)]
        )
    finally:
        await admin.close()
    x, _ = heldout()
    session = onnxruntime.InferenceSession(
        str(MODELS / "digits" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    expected = [int(v) for v in session.run(["label"], {"pixels": x[:100]})[0]]
    dlq = await observe(kafka, broker.dlq_topic)
    default = await observe(kafka, broker.response_topic)
    producer = AIOKafkaProducer(bootstrap_servers=f"127.0.0.1:{kafka.port}", acks="all")
    await producer.start()
    try:
        async with worker_in_loop(settings), client_for(settings, resend_after_s=None) as client:
            bad = client.encode(client.make_request("digits", {"pixels": x[:1]}, id="bad-1"))
            await producer.send_and_wait(broker.request_topic, bad, headers=[("traceparent", None)])
            replies = await asyncio.gather(
                *(client.infer("digits", {"pixels": x[i : i + 1]}, id=f"ok{i}", timeout_s=60)
                  for i in range(100))
            )  # fmt: skip
            letters = await take_until(dlq, lambda d: bad in d.payload)
            answers = await take_until(default, lambda d: _is_bad_request(d, "bad-1"))
    finally:
        await producer.stop()
        await dlq.close()
        await default.close()
    assert [r.status for r in replies] == ["ok"] * 100
    assert [int(r.outputs["label"][0]) for r in replies if r.outputs] == expected
    assert letters and answers


def _is_bad_request(delivery: Delivery, id_: str) -> bool:
    try:
        response = WireCodec(Limits()).decode_response(delivery.payload)
    except Exception:
        return False
    return (
        response.id == id_
        and response.error is not None
        and response.error.code == ErrorCode.BAD_REQUEST
    )


async def take_until(transport: KafkaTransport, want: Any) -> list[Delivery]:
    """Deliveries up to and including the first for which `want` holds."""
    seen: list[Delivery] = []
    iterator = transport.deliveries()
    while not seen or not want(seen[-1]):
        seen.append(await asyncio.wait_for(anext(iterator), WAIT))
        seen[-1].ack()
    return seen
