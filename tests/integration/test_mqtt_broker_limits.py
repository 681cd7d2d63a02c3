"""The MQTT transport against a Mosquitto with its default in-flight limit (20)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from inference_worker.transports import connect
from inference_worker.transports.base import TransportOptions
from inference_worker.transports.mqtt import MqttTransport
from tests.servers import mosquitto_server

pytestmark = pytest.mark.integration


async def test_publishes_beyond_the_brokers_receive_maximum_all_complete() -> None:
    # Our window (1000) is far above what this broker accepts (20): the transport must
    # fit its window to the broker instead of having publishes refused.
    topic = f"limits-{uuid.uuid4().hex[:8]}"
    with mosquitto_server(max_inflight_messages=20) as srv:
        sub = connect(srv.url, TransportOptions(client_id="sub", subscriptions=(topic,)))
        pub = connect(srv.url, TransportOptions(client_id="pub", max_inflight=1000))
        await sub.start()
        await pub.start()
        assert isinstance(pub, MqttTransport)
        # MQTT 5: a client must not exceed the Receive Maximum the server announced.
        # (Mosquitto 2.0 does not refuse the excess for QoS 1, so assert the window.)
        assert pub._conn.window == 20
        try:
            sends = asyncio.gather(*(pub.publish(topic, str(i).encode()) for i in range(500)))
            await asyncio.sleep(0)  # every publish queued: 20 handed to paho, the rest held
            assert len(pub._pending) == 20 and len(pub._held) == 480
            await asyncio.wait_for(sends, 60)
            got: set[bytes] = set()
            it = sub.deliveries()
            while len(got) < 500:
                d = await asyncio.wait_for(it.__anext__(), 30)
                d.ack()
                got.add(d.payload)
        finally:
            await pub.close()
            await sub.close()
    assert got == {str(i).encode() for i in range(500)}


async def test_persistent_session_hands_back_unacked_and_queued_messages() -> None:
    """With a stable client id and a session expiry, a worker that goes away gets back
    what it had not acked plus what was published while it was gone."""
    topic = f"persist-{uuid.uuid4().hex[:8]}"
    options = TransportOptions(
        client_id="stable-replica-0", subscriptions=(topic,), session_expiry_s=60
    )
    with mosquitto_server() as srv:
        pub = connect(srv.url, TransportOptions(client_id="pub"))
        await pub.start()
        worker = connect(srv.url, options)
        await worker.start()
        await pub.publish(topic, b"unacked")
        first = await asyncio.wait_for(worker.deliveries().__anext__(), 10)
        assert first.payload == b"unacked"
        await worker.close()  # gone without acking
        await pub.publish(topic, b"while-away")
        back = connect(srv.url, options)
        await back.start()
        got = []
        it = back.deliveries()
        for _ in range(2):
            d = await asyncio.wait_for(it.__anext__(), 10)
            d.ack()
            got.append(d.payload)
        await back.close()
        await pub.close()
    assert sorted(got) == [b"unacked", b"while-away"]
