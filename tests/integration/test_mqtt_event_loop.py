"""The MQTT transport driven from the event loop: its connection task is the one place
where a failure in a packet callback or a silent broker shows, so the worker (which
watches the task) can act on it. Real Mosquitto; nothing here asserts how fast anything is."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import uuid
from typing import Any

import pytest

from inference_worker.transports import MqttTransport, TransportOptions, connect
from tests.servers import mosquitto_server

pytestmark = pytest.mark.integration

WAIT = 20.0  # bound against hangs only


def _options(**kw: Any) -> TransportOptions:
    return TransportOptions(
        client_id=f"t-{uuid.uuid4().hex[:8]}", reconnect_min_s=0.1, reconnect_max_s=0.5, **kw
    )


async def test_an_error_inside_a_packet_callback_ends_the_connection_task_with_it() -> None:
    topic = f"t/{uuid.uuid4().hex[:8]}"
    with mosquitto_server() as srv:
        sub = connect(srv.url, _options(subscriptions=(topic,)))
        pub = connect(srv.url, _options())
        assert isinstance(sub, MqttTransport)
        await sub.start()
        await pub.start()
        try:
            (task,) = sub.background()

            def broken(*_args: Any) -> None:
                raise RuntimeError("bug in on_message")

            sub._conn._handlers = dataclasses.replace(sub._conn._handlers, message=broken)
            await pub.publish(topic, b"x")
            done, _ = await asyncio.wait([task], timeout=WAIT)
            assert task in done, "the connection task must end, not swallow the error"
            with pytest.raises(RuntimeError, match="bug in on_message"):
                task.result()
        finally:
            await pub.close()
            await sub.close()


async def test_a_silent_broker_is_noticed_by_keepalive_and_the_transport_comes_back() -> None:
    topic = f"t/{uuid.uuid4().hex[:8]}"
    with mosquitto_server() as srv:
        sub = connect(srv.url, _options(subscriptions=(topic,), keepalive_s=1))
        pub = connect(srv.url, _options())
        assert isinstance(sub, MqttTransport)
        await sub.start()
        await pub.start()
        got: list[bytes] = []

        async def consume() -> None:
            async for delivery in sub.deliveries():
                delivery.ack()
                got.append(delivery.payload)

        consumer = asyncio.create_task(consume())
        try:
            generation = sub.generation
            assert srv.proc is not None
            srv.proc.send_signal(signal.SIGSTOP)  # the TCP connection stays, answers stop
            try:

                async def lost() -> None:
                    while sub.connected:
                        await asyncio.sleep(0.1)

                # No PINGRESP within the keepalive: the connection task drops the link.
                await asyncio.wait_for(lost(), WAIT)
            finally:
                srv.proc.send_signal(signal.SIGCONT)

            async def probe() -> None:
                while b"probe" not in got:
                    await pub.publish(topic, b"probe")
                    await asyncio.sleep(0.1)

            await asyncio.wait_for(probe(), WAIT)
            assert sub.generation > generation
            assert not sub.background()[0].done()
        finally:
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)
            await pub.close()
            await sub.close()


async def test_close_while_the_broker_is_down_is_bounded_and_fails_pending_publishes() -> None:
    with mosquitto_server() as srv:
        options = dataclasses.replace(_options(), client_id=f"p-{uuid.uuid4().hex[:8]}")
        pub = MqttTransport("127.0.0.1", srv.port, options, close_timeout_s=0.2)
        await pub.start()
        (task,) = pub.background()
        await asyncio.to_thread(srv.stop)
        pending = asyncio.create_task(pub.publish("t/down", b"never-acked"))
        await asyncio.sleep(0.1)
        await asyncio.wait_for(pub.close(), WAIT)
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(pending, WAIT)
        assert task.done() and not pub.connected
        assert pub.background() == (task,)


async def test_a_broker_that_sends_a_malformed_packet_loses_the_link_not_the_worker() -> None:
    """A stand-in broker on loopback (only this test's bytes are wrong on purpose): the
    first session gets a PUBLISH with a truncated topic, the second a good one. The
    transport drops the first link, reconnects, and delivers the good message; its
    connection task keeps running."""
    connack = b"\x20\x03\x00\x00\x00"
    suback = b"\x90\x04\xff\xff\x00\x01"  # the transport subscribes with packet id 65535
    good = b"\x30\x06\x00\x01t\x00ok"
    sessions: list[int] = []

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sessions.append(len(sessions) + 1)
        await reader.read(1024)  # CONNECT
        writer.write(connack)
        await writer.drain()
        await reader.read(1024)  # SUBSCRIBE
        writer.write(suback + (b"\x30\x02\x00\x09" if len(sessions) == 1 else good))
        await writer.drain()
        await reader.read(1024)  # until the client hangs up
        writer.close()

    server = await asyncio.start_server(session, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sub = MqttTransport("127.0.0.1", port, _options(subscriptions=("t",), qos=0))
    try:
        await sub.start()
        (task,) = sub.background()
        deliveries = sub.deliveries()
        delivery = await asyncio.wait_for(deliveries.__anext__(), WAIT)
        assert delivery.payload == b"ok" and delivery.topic == "t"
        assert sessions == [1, 2] and sub.generation == 2 and not task.done()
    finally:
        await sub.close()
        server.close()
        await server.wait_closed()
