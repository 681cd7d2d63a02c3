"""A bare subscribe → publish relay: the client library's own limit on this machine.

`python -m benchmarks.relay --transport mqtt|kafka --url URL --topic T` prints `ready`
once subscribed, then republishes every message on `T`, unchanged, to its reply topic
(MQTT 5 Response Topic / Kafka `reply_to` header) until SIGTERM. No decoding, no model,
no Redis: only the delivery settings of the worker.

- MQTT: paho-mqtt 2, MQTT 5, QoS 1 in and out, manual acks (the inbound message is acked
  right after its republish is queued), Receive Maximum 256 and 1000 publishes in flight
  (the worker's defaults), paho's own network loop in the main thread.
- Kafka: aiokafka, consumer group with auto-commit off, producer acks=all; each fetched
  batch is republished (sends pipelined, then awaited) and offsets are committed every
  100 ms, as the worker's transport does.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
import uuid
from typing import Any

from benchmarks.common import ensure_kafka_topics, kafka_bootstrap, kafka_name, no_delay


def relay_mqtt(url: str, topic: str) -> None:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    host, _, port = url.partition("://")[2].rstrip("/").rpartition(":")
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"bench-relay-{uuid.uuid4().hex[:8]}",
        protocol=paho.MQTTv5,
        manual_ack=True,
    )
    client.on_socket_open = no_delay
    client.max_inflight_messages_set(1000)

    def on_connect(c: Any, _u: Any, _f: Any, _r: Any, _p: Any) -> None:
        c.subscribe(topic, qos=1)

    def on_subscribe(*_a: Any) -> None:
        print("ready", flush=True)

    def on_message(c: Any, _u: Any, msg: Any) -> None:
        reply = getattr(msg.properties, "ResponseTopic", None)
        if reply:
            c.publish(reply, msg.payload, qos=1)
        c.ack(msg.mid, msg.qos)

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.ReceiveMaximum = 256
    client.connect(host, int(port), keepalive=30, properties=props)
    signal.signal(signal.SIGTERM, lambda *_: client.disconnect())
    client.loop_forever()


async def relay_kafka(url: str, topic: str, fetch_max_wait_ms: int) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    bootstrap = kafka_bootstrap(url)
    name = kafka_name(topic)
    await ensure_kafka_topics(bootstrap, {name: 4})
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    consumer = AIOKafkaConsumer(
        name,
        bootstrap_servers=bootstrap,
        group_id=f"bench-relay-{uuid.uuid4().hex[:8]}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=fetch_max_wait_ms,
    )
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await producer.start()
    await consumer.start()
    pending: list[Any] = []
    last_commit = time.monotonic()
    try:
        while not consumer.assignment():
            pending.extend(await _republish(producer, await consumer.getmany(timeout_ms=100)))
        print("ready", flush=True)
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=100, max_records=256)
            futures = await _republish(producer, batches)
            if futures:
                await asyncio.gather(*futures)
            if time.monotonic() - last_commit >= 0.1:
                await consumer.commit()
                last_commit = time.monotonic()
    finally:
        await consumer.stop()
        await producer.stop()


async def _republish(producer: Any, batches: dict[Any, list[Any]]) -> list[Any]:
    futures = []
    for records in batches.values():
        for record in records:
            reply = next((bytes(v) for k, v in record.headers or () if k == "reply_to"), None)
            if reply:
                futures.append(await producer.send(reply.decode(), record.value))
    return futures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--transport", choices=["mqtt", "kafka"], required=True)
    p.add_argument("--url", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument(
        "--fetch-max-wait-ms",
        type=int,
        default=500,
        help="Kafka consumer fetch_max_wait_ms (default 500: aiokafka's, as the worker uses)",
    )
    args = p.parse_args(argv)
    if args.transport == "mqtt":
        relay_mqtt(args.url, args.topic)
    else:
        asyncio.run(relay_kafka(args.url, args.topic, args.fetch_max_wait_ms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
