"""Load generator: `python -m benchmarks.load ...` prints one JSON result line.

A lean generator written straight on the transports' client libraries (paho-mqtt 2 at
QoS 1 for MQTT, aiokafka with acks=all for Kafka) rather than on `InferenceClient`: it
must not be the bottleneck on a 2-core machine shared with the worker, so it encodes a
request by patching its id into a pre-packed template (see `common.RequestFactory`) and
reads responses with one zstd decompress + msgpack unpack, and nothing else. Requests go
to `--topic` with the reply topic in the MQTT 5 Response Topic property (Kafka: the
`reply_to` header); every request has a unique id.

Modes:
- `closed`: keep `--concurrency` requests outstanding (a response triggers the next
  request) for `--warmup` + `--duration` seconds; `rps` = responses per second within
  the `--duration` window, measured between whole answer bursts (see `closed_rps`).
- `open`: send at `--rate` requests/s with Poisson arrivals (seeded) for `--warmup` +
  `--duration`; latencies are those of requests sent within the window.

Latency is client send → response received (monotonic clock, one process).
`added_ms` per response = latency - the response's `timing.compute_ms` - `--max-delay-ms`.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import itertools
import json
import random
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    RequestFactory,
    ResponseReader,
    ensure_kafka_topics,
    kafka_bootstrap,
    kafka_name,
    no_delay,
    reply_topic,
)


class Recorder:
    """Bookkeeping of sends and responses; `lock` guards it (MQTT uses two threads)."""

    def __init__(self, args: argparse.Namespace, factory: RequestFactory) -> None:
        self.args = args
        self.factory = factory
        self.reader = ResponseReader()
        self.lock = threading.Lock()
        self.pending: dict[str, float] = {}
        self.start = time.monotonic()
        self.win_lo = self.start + args.warmup
        self.win_hi = self.win_lo + args.duration
        self.running = True
        self.sent = 0
        self.answered = 0  # responses received in the window (closed) / for window sends (open)
        self.latency_ms: list[float] = []
        self.added_ms: list[float] = []
        self.served_ms: list[float] = []  # the worker's own queue_ms + compute_ms
        self.batches: Counter[int] = Counter()
        self.statuses: Counter[str] = Counter()
        self.unmatched = 0
        self.send_errors = 0
        self.arrivals: list[float] = []  # closed mode: every answer's arrival time

    def take(self) -> tuple[str, bytes]:
        """The next request; its send time is recorded now (call right before sending)."""
        with self.lock:
            rid, payload = self.factory.next()
            self.pending[rid] = time.monotonic()
            self.sent += 1
            return rid, payload

    def received(self, raw: bytes, now: float) -> bool:
        """Record one response; True when it answered a pending request."""
        obj = self.reader.read(raw)
        rid = obj.get("id")
        with self.lock:
            sent_at = self.pending.pop(rid, None) if isinstance(rid, str) else None
            if sent_at is None:
                self.unmatched += 1
                return False
            self.arrivals.append(now)
            in_window = (
                self.win_lo <= now < self.win_hi
                if self.args.mode == "closed"
                else self.win_lo <= sent_at < self.win_hi
            )
            if not in_window:
                return True
            self.answered += 1
            self.statuses[str(obj.get("status", "echo"))] += 1
            latency = (now - sent_at) * 1000.0
            self.latency_ms.append(latency)
            timing = obj.get("timing")
            if isinstance(timing, dict):
                self.batches[int(timing.get("batch_size", 0))] += 1
                compute = float(timing.get("compute_ms", 0.0))
                self.added_ms.append(latency - compute - self.args.max_delay_ms)
                self.served_ms.append(float(timing.get("queue_ms", 0.0)) + compute)
            return True

    def closed_rps(self) -> float:
        """Throughput over the window, measured between the ends of whole answer bursts.

        A compute-bound model answers in bursts of a whole batch (64 answers every few
        seconds): counting the answers inside a fixed window would be off by up to one
        batch. Bursts are runs of answers separated by gaps longer than
        max(50 ms, 20 x the median gap); the rate is the answers after the first burst end
        in the window up to the last burst end in it, over the time between those ends.
        With fewer than two burst ends in the window (a steady stream), or ends less than
        half the window apart (a steady stream with a hiccup or two: the span between them
        would be mostly the hiccup), it is the answers received in the window over its
        length.
        """
        arr = sorted(self.arrivals)
        fixed = float(self.answered / self.args.duration)
        if len(arr) < 3:
            return fixed
        gaps = [b - a for a, b in itertools.pairwise(arr)]
        threshold = max(0.05, 20 * sorted(gaps)[len(gaps) // 2])
        ends = [arr[i] for i, g in enumerate(gaps) if g > threshold] + [arr[-1]]
        inside = [t for t in ends if self.win_lo <= t <= self.win_hi]
        if len(inside) < 2 or inside[-1] - inside[0] < 0.5 * (self.win_hi - self.win_lo):
            return fixed
        t_a, t_b = inside[0], inside[-1]
        counted = bisect.bisect_right(arr, t_b) - bisect.bisect_right(arr, t_a)
        return counted / (t_b - t_a)

    def result(self) -> dict[str, Any]:
        a = self.args
        lat = np.asarray(self.latency_ms) if self.latency_ms else np.zeros(1)
        added = np.asarray(self.added_ms) if self.added_ms else None
        total = sum(self.batches.values())
        mean_batch = sum(size * n for size, n in self.batches.items()) / total if total else None
        return {
            "mode": a.mode,
            "transport": a.transport,
            "model": a.model,
            "concurrency": a.concurrency if a.mode == "closed" else None,
            "rate": a.rate if a.mode == "open" else None,
            "duration_s": a.duration,
            "sent": self.sent,
            "answered": self.answered,
            # closed: answers per second between burst ends (closed_rps);
            # open: answers to the requests sent in the window, per second of window.
            "rps": round(
                self.closed_rps() if a.mode == "closed" else self.answered / a.duration, 1
            ),
            "rps_fixed_window": round(self.answered / a.duration, 1),
            # Every matched answer, warm-up and drain included: the denominator of the
            # CPU-per-request figures, whose /proc readings span the whole run.
            "answered_total": len(self.arrivals),
            "unanswered_at_exit": len(self.pending),
            "unmatched": self.unmatched,
            "send_errors": self.send_errors,
            "statuses": dict(self.statuses),
            "p50_ms": round(float(np.percentile(lat, 50)), 3),
            "p90_ms": round(float(np.percentile(lat, 90)), 3),
            "p99_ms": round(float(np.percentile(lat, 99)), 3),
            "max_ms": round(float(lat.max()), 3),
            "p50_added_ms": None if added is None else round(float(np.percentile(added, 50)), 3),
            "p99_added_ms": None if added is None else round(float(np.percentile(added, 99)), 3),
            # receive → dispatch + model call, as the worker reports it (`timing`): what a
            # model's latency_target_ms aims at.
            "p99_served_ms": _pct(self.served_ms, 99),
            "p50_served_ms": _pct(self.served_ms, 50),
            # Batch sizes as seen by the responses: each batch of n counts n times.
            "batch_hist": {str(k): v for k, v in sorted(self.batches.items())},
            "mean_batch": None if mean_batch is None else round(mean_batch, 2),
        }


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


def _arrivals(rate: float, seed: int = 1) -> Any:
    """Poisson arrival offsets (seconds from start) at `rate` per second."""
    rng = random.Random(seed)
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        yield t


def _wait_drained(rec: Recorder, drain_s: float) -> None:
    give_up = time.monotonic() + drain_s
    while rec.pending and time.monotonic() < give_up:
        time.sleep(0.02)


# --------------------------------------------------------------------------- MQTT


def run_mqtt(args: argparse.Namespace, factory: RequestFactory) -> dict[str, Any]:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    host, _, port = args.url.partition("://")[2].rstrip("/").rpartition(":")
    cid = f"bench-load-{uuid.uuid4().hex[:10]}"
    reply = reply_topic(cid)
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=paho.MQTTv5)
    client.on_socket_open = no_delay
    client.max_inflight_messages_set(max(1000, 2 * args.concurrency))
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ResponseTopic = reply
    subscribed = threading.Event()
    rec: Recorder | None = None
    closed = args.mode == "closed"

    def send() -> None:
        assert rec is not None
        _, payload = rec.take()
        info = client.publish(args.topic, payload, qos=1, properties=props)
        if info.rc not in (0, 4):  # success / no connection (paho queues and resends)
            rec.send_errors += 1

    def on_connect(c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        c.subscribe(reply, qos=1)

    def on_subscribe(*_a: Any) -> None:
        subscribed.set()

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        now = time.monotonic()
        assert rec is not None
        if rec.received(msg.payload, now) and closed and rec.running:
            send()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect(host, int(port), keepalive=30)
    client.loop_start()
    if not subscribed.wait(10):
        raise SystemExit("MQTT: no SUBACK within 10 s")
    rec = Recorder(args, factory)
    if closed:
        for _ in range(args.concurrency):
            send()
        time.sleep(max(0.0, rec.win_hi - time.monotonic()))
    else:
        for offset in _arrivals(args.rate):
            due = rec.start + offset
            if due >= rec.win_hi:
                break
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            send()
    rec.running = False
    _wait_drained(rec, args.drain)
    client.disconnect()
    client.loop_stop()
    return rec.result()


# --------------------------------------------------------------------------- Kafka


async def run_kafka(args: argparse.Namespace, factory: RequestFactory) -> dict[str, Any]:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    bootstrap = kafka_bootstrap(args.url)
    cid = f"bench-load-{uuid.uuid4().hex[:10]}"
    # `response_message.<cid>` would read back as `response_message/<cid>`, which the
    # default allow-list refuses (the bench then measured e2e 0 req/s): see reply_topic.
    reply = kafka_name(reply_topic(cid))
    topic = kafka_name(args.topic)
    await ensure_kafka_topics(bootstrap, {reply: 1, topic: args.partitions})
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    # No consumer group: the reply partition is assigned by hand (no group join wait).
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        fetch_max_wait_ms=args.fetch_max_wait_ms,
    )
    await producer.start()
    await consumer.start()
    tp = TopicPartition(reply, 0)
    consumer.assign([tp])
    await consumer.seek_to_end(tp)
    await consumer.position(tp)
    headers = [("reply_to", reply.encode())]
    rec = Recorder(args, factory)
    closed = args.mode == "closed"
    sends: set[asyncio.Future[Any]] = set()

    def sent(fut: asyncio.Future[Any]) -> None:
        sends.discard(fut)
        if fut.cancelled() or fut.exception() is not None:
            rec.send_errors += 1

    async def send() -> None:
        _, payload = rec.take()
        fut = await producer.send(topic, payload, headers=headers)
        sends.add(fut)
        fut.add_done_callback(sent)

    async def receive() -> None:
        while True:
            batches = await consumer.getmany(tp, timeout_ms=50, max_records=1000)
            now = time.monotonic()
            for records in batches.values():
                for record in records:
                    if rec.received(record.value, now) and closed and rec.running:
                        await send()

    receiver = asyncio.create_task(receive())
    try:
        if closed:
            for _ in range(args.concurrency):
                await send()
            await asyncio.sleep(max(0.0, rec.win_hi - time.monotonic()))
        else:
            for offset in _arrivals(args.rate):
                due = rec.start + offset
                if due >= rec.win_hi:
                    break
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await send()
        rec.running = False
        give_up = time.monotonic() + args.drain
        while rec.pending and time.monotonic() < give_up:  # noqa: ASYNC110 - polls a dict
            await asyncio.sleep(0.02)
    finally:
        receiver.cancel()
        await asyncio.gather(receiver, return_exceptions=True)
        await consumer.stop()
        await producer.stop()
    return rec.result()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--transport", choices=["mqtt", "kafka"], required=True)
    p.add_argument("--url", required=True, help="mqtt://host:port or kafka://host:port")
    p.add_argument("--topic", required=True, help="request topic (MQTT form: a/b)")
    p.add_argument("--models-root", type=Path, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--mode", choices=["closed", "open"], required=True)
    p.add_argument("--concurrency", type=int, default=128)
    p.add_argument("--rate", type=float, default=100.0)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--drain", type=float, default=5.0, help="longest wait for stragglers")
    p.add_argument("--max-delay-ms", type=float, default=0.0)
    p.add_argument(
        "--fetch-max-wait-ms",
        type=int,
        default=10,
        help="Kafka reply consumer's fetch_max_wait_ms (default 10: Tansu holds every fetch "
        "for the full wait, so aiokafka's default of 500 would bound the generator)",
    )
    p.add_argument("--partitions", type=int, default=4, help="Kafka request topic partitions")
    args = p.parse_args(argv)
    factory = RequestFactory(args.models_root, args.model, uuid.uuid4().hex[:4])
    if args.transport == "mqtt":
        result = run_mqtt(args, factory)
    else:
        result = asyncio.run(run_kafka(args, factory))
    print(json.dumps(result, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
