"""The baseline: what a user writes first to serve a model over MQTT or Kafka.

`python -m benchmarks.naive_worker --transport mqtt|kafka --url URL --topic T
--models-root DIR` prints `ready` once subscribed, then, for each message: decode it with
the project's protocol codec, run the model on that one request, encode the response and
publish it to the reply topic. One message at a time, no batching, no Redis, no
idempotency; compute runs inside the message callback (MQTT) or the consumer loop
(Kafka). Delivery settings are the libraries' first-example defaults at QoS 1 / acks=all:
paho acks each message when its callback returns; aiokafka auto-commits and
`send_and_wait`s each response.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.common import ensure_kafka_topics, kafka_bootstrap, latest_version, no_delay
from inference_worker.models import ModelRepository
from inference_worker.protocol import Limits, ProtocolError, Response, Timing, WireCodec
from inference_worker.runtimes import load_runner
from inference_worker.runtimes.base import Runner


class Handler:
    """decode → run → encode, one request at a time."""

    def __init__(self, root: Path, intra_op_threads: int = 0) -> None:
        repo = ModelRepository(root)
        self.runners: dict[str, tuple[Runner, int]] = {}
        for name in repo.names():
            version = latest_version(root, name)
            runner = load_runner(
                repo.config(name),
                repo.artifact_path(name, version),
                device="cpu",
                intra_op_threads=intra_op_threads,
            )
            self.runners[name] = (runner, version)
        self.codec = WireCodec(Limits())

    def handle(self, payload: bytes) -> tuple[bytes, str | None] | None:
        try:
            req = self.codec.decode_request(payload)
        except ProtocolError:
            return None
        runner, version = self.runners[req.model]
        started = time.monotonic()
        outputs = runner.run(req.inputs)
        compute_ms = (time.monotonic() - started) * 1000.0
        resp = Response(
            id=req.id,
            status="ok",
            app=req.app,
            model=req.model,
            version=version,
            outputs=outputs,
            timing=Timing(0.0, round(compute_ms, 3), 1),
            worker="naive",
        )
        return self.codec.encode_response(resp, req.codec), req.reply_to


def serve_mqtt(handler: Handler, url: str, topic: str) -> None:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    host, _, port = url.partition("://")[2].rstrip("/").rpartition(":")
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"bench-naive-{uuid.uuid4().hex[:8]}",
        protocol=paho.MQTTv5,
    )
    client.on_socket_open = no_delay

    def on_connect(c: Any, _u: Any, _f: Any, _r: Any, _p: Any) -> None:
        c.subscribe(topic, qos=1)

    def on_subscribe(*_a: Any) -> None:
        print("ready", flush=True)

    def on_message(c: Any, _u: Any, msg: Any) -> None:
        out = handler.handle(msg.payload)
        if out is None:
            return
        payload, reply_to = out
        reply = getattr(msg.properties, "ResponseTopic", None) or reply_to or "response_message"
        c.publish(reply, payload, qos=1)

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect(host, int(port), keepalive=30)
    signal.signal(signal.SIGTERM, lambda *_: client.disconnect())
    client.loop_forever()


async def serve_kafka(handler: Handler, url: str, topic: str, fetch_max_wait_ms: int) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    bootstrap = kafka_bootstrap(url)
    name = topic.replace("/", ".")
    await ensure_kafka_topics(bootstrap, {name: 4})
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    consumer = AIOKafkaConsumer(
        name,
        bootstrap_servers=bootstrap,
        group_id=f"bench-naive-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        fetch_max_wait_ms=fetch_max_wait_ms,
    )
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    await producer.start()
    await consumer.start()
    try:
        while not consumer.assignment():  # noqa: ASYNC110 - the group join has no event
            await asyncio.sleep(0.05)
        print("ready", flush=True)
        async for msg in consumer:
            out = handler.handle(msg.value)
            if out is None:
                continue
            payload, reply_to = out
            header = next((bytes(v).decode() for k, v in msg.headers if k == "reply_to"), None)
            reply = (header or reply_to or "response_message").replace("/", ".")
            await producer.send_and_wait(reply, payload)
    except asyncio.CancelledError:
        pass
    finally:
        await consumer.stop()
        await producer.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--transport", choices=["mqtt", "kafka"], required=True)
    p.add_argument("--url", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--models-root", type=Path, required=True)
    p.add_argument("--intra-op-threads", type=int, default=0)
    p.add_argument(
        "--fetch-max-wait-ms",
        type=int,
        default=500,
        help="Kafka consumer fetch_max_wait_ms (default 500: aiokafka's)",
    )
    args = p.parse_args(argv)
    handler = Handler(args.models_root, args.intra_op_threads)
    if args.transport == "mqtt":
        serve_mqtt(handler, args.url, args.topic)
    else:
        asyncio.run(serve_kafka(handler, args.url, args.topic, args.fetch_max_wait_ms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
