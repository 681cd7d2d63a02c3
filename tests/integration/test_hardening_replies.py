"""Where error replies go, and that sending them can never wedge intake: real Mosquitto,
Tansu (Kafka) and Redis, workers started with `run_worker`.

Ledgers: the ids sent, which topic each answer landed on, the dead letters per id and,
on Kafka, the consumer group's committed offsets.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import numpy as np
import pytest

from inference_worker.client import InferenceClient, Reply
from inference_worker.protocol import Limits, Request, WireCodec
from inference_worker.settings import Settings
from tests.integration.hostile import (
    Inbox,
    create_key,
    dead_letters,
    expected_digits,
    heldout,
    hostile_settings,
    worker_in_loop,
)
from tests.servers import Server, require_module

pytestmark = pytest.mark.integration


def _client(settings: Settings, **kwargs: Any) -> InferenceClient:
    kwargs.setdefault("resend_after_s", None)  # no resends: a second answer is a duplicate
    kwargs.setdefault("timeout_s", 60.0)
    return InferenceClient.connect(
        settings.broker.url,
        request_topic=settings.broker.request_topic,
        response_topic=settings.broker.response_topic,
        **kwargs,
    )


async def _ask_good(
    client: InferenceClient, x: np.ndarray, ids: list[str]
) -> tuple[dict[str, Reply], Counter[str]]:
    """Send one good digits request per id (row i for ids[i]); replies and failures."""
    replies: dict[str, Reply] = {}
    failures: Counter[str] = Counter()

    async def one(i: int, id_: str) -> None:
        try:
            replies[id_] = await client.send(
                client.make_request("digits", {"pixels": x[i : i + 1]}, id=id_)
            )
        except (TimeoutError, ConnectionError) as exc:
            failures[type(exc).__name__] += 1

    await asyncio.gather(*(one(i, id_) for i, id_ in enumerate(ids)))
    return replies, failures


def _wrong(replies: dict[str, Reply], ids: list[str], labels: np.ndarray) -> list[str]:
    out = []
    for i, id_ in enumerate(ids):
        r = replies.get(id_)
        if r is None:
            continue
        resp = r.response
        if (
            resp.status != "ok"
            or resp.outputs is None
            or int(resp.outputs["label"][0]) != labels[i]
        ):
            out.append(id_)
    return out


def _bad_requests(x: np.ndarray, n: int, reply_to: str) -> list[Request]:
    """Requests that can never succeed (unknown model / wrong shape) naming `reply_to`."""
    return [
        Request(id=f"bad-{i}", model="no-such-model", inputs={"pixels": x[:1]}, reply_to=reply_to)
        if i % 2 == 0
        else Request(
            id=f"bad-{i}", model="digits", inputs={"pixels": x[:1, :63]}, reply_to=reply_to
        )
        for i in range(n)
    ]


# --- an error reply that cannot be published ---------------------------------------------


async def test_error_replies_to_an_unpublishable_mqtt_topic_still_settle_their_deliveries(
    mosquitto: Server, redis: Server
) -> None:
    # limits.max_str_len (bytes) raised from 64 KiB so that the envelope can carry it.
    settings = hostile_settings(mosquitto.url, redis.url, limits={"max_str_len": 128 * 1024})
    resp = settings.broker.response_topic
    # Matches `<resp>/{app}/#` (app `_`), but 66,000 UTF-8 bytes: MQTT topics hold 65,535.
    unpublishable = f"{resp}/_/" + "é" * 33_000
    assert len(unpublishable.encode()) > 65_535
    n_bad, n_good = 300, 50  # more than the worker's Receive Maximum (256), then good ones
    assert n_bad > settings.broker.receive_maximum
    x, _ = heldout()
    labels = expected_digits(x[:n_good])
    good_ids = [f"good-{i}" for i in range(n_good)]
    async with (
        Inbox(mosquitto.url, [settings.broker.dlq_topic]) as dlq,
        worker_in_loop(settings) as worker,
        _client(settings, timeout_s=30.0) as client,
    ):
        bad = _bad_requests(x, n_bad, unpublishable)
        payloads = {r.id: client.encode(r) for r in bad}
        # Published without an MQTT Response Topic: the envelope's reply_to is the address.
        await asyncio.gather(
            *(dlq.transport.publish(settings.broker.request_topic, p) for p in payloads.values())
        )
        replies, failures = await _ask_good(client, x, good_ids)
        await dlq.wait_until(lambda: len(dlq.messages) >= n_bad, within_s=30)
        await asyncio.sleep(0.5)  # a stray second copy would arrive by now
        duplicates = client.duplicates
        crashed = worker.crashed()
    by_payload = {p: id_ for id_, p in payloads.items()}
    dead = Counter(by_payload.get(bytes(e["payload"]), "?") for e in dead_letters(dlq))
    lost = [i for i in good_ids if i not in replies]
    wrong = _wrong(replies, good_ids, labels)
    not_dead = [r.id for r in bad if dead[r.id] == 0]
    twice_dead = [r.id for r in bad if dead[r.id] > 1]
    print(
        f"mqtt unpublishable reply topic: {n_bad} bad then {n_good} good; good lost "
        f"{len(lost)}, wrong {len(wrong)}, duplicates {duplicates}, failures {dict(failures)}; "
        f"bad not dead-lettered {len(not_dead)}, twice {len(twice_dead)}; worker {crashed or 'up'}"
    )
    assert crashed is None, f"the worker stopped: {crashed}"
    assert not lost and not wrong and duplicates == 0, (lost[:5], wrong[:5], duplicates)
    assert not not_dead and not twice_dead, (not_dead[:5], twice_dead[:5])


async def _committed(url: str, group: str, topic: str) -> dict[int, int | None]:
    """{partition: committed offset of `group`} of a Kafka topic (aiokafka `committed()`).

    Compared with the ledger's count of records produced, not with the broker's end
    offsets: Tansu's ListOffsets answers do not count records (30 records: "4").
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition

    bootstrap = url.removeprefix("kafka://").partition("?")[0]
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        await consumer.topics()  # fetches the cluster's metadata
        parts = sorted(consumer.partitions_for_topic(topic) or ())
        return {p: await consumer.committed(TopicPartition(topic, p)) for p in parts}
    finally:
        await consumer.stop()


async def test_error_replies_to_an_illegal_kafka_topic_still_move_the_commit_point(
    kafka: Server, redis: Server
) -> None:
    require_module("aiokafka", "pip install -e '.[kafka]'")
    # One partition: the good requests are behind the bad ones on the same partition.
    settings = hostile_settings(kafka.url_with("partitions=1"), redis.url)
    resp = settings.broker.response_topic
    illegal = f"{resp}/_/not a topic"  # allowed by `<resp>/{app}/#`; Kafka refuses spaces
    n_bad, n_good = 20, 30
    x, _ = heldout()
    labels = expected_digits(x[:n_good])
    good_ids = [f"good-{i}" for i in range(n_good)]
    async with (
        Inbox(settings.broker.url, [settings.broker.dlq_topic]) as dlq,
        worker_in_loop(settings) as worker,
        _client(settings) as client,
    ):
        bad = _bad_requests(x, n_bad, illegal)
        payloads = {r.id: client.encode(r) for r in bad}
        for p in payloads.values():  # in order, before the good ones
            await dlq.transport.publish(settings.broker.request_topic, p)
        replies, failures = await _ask_good(client, x, good_ids)
        await dlq.wait_until(lambda: len(dlq.messages) >= n_bad, within_s=30)
        # The commit point is committed every 100 ms; wait (bounded) until it is past all
        # n_bad + n_good records (offsets 0.. of a new one-partition topic, no resends).
        produced = n_bad + n_good
        loop = asyncio.get_running_loop()
        give_up = loop.time() + 20
        while True:
            offsets = await _committed(
                settings.broker.url, settings.broker.group, settings.broker.request_topic
            )
            done = all(c is not None and c >= produced for c in offsets.values())
            if done or loop.time() > give_up:
                break
            await asyncio.sleep(0.5)
        duplicates = client.duplicates
        crashed = worker.crashed()
    by_payload = {p: id_ for id_, p in payloads.items()}
    dead = Counter(by_payload.get(bytes(e["payload"]), "?") for e in dead_letters(dlq))
    lost = [i for i in good_ids if i not in replies]
    wrong = _wrong(replies, good_ids, labels)
    not_dead = [r.id for r in bad if dead[r.id] == 0]
    twice_dead = [r.id for r in bad if dead[r.id] > 1]
    behind = {p: c for p, c in offsets.items() if c is None or c < produced}
    print(
        f"kafka illegal reply topic: {n_bad} bad then {n_good} good on one partition; good "
        f"lost {len(lost)}, wrong {len(wrong)}, duplicates {duplicates}, failures "
        f"{dict(failures)}; bad not dead-lettered {len(not_dead)}, twice {len(twice_dead)}; "
        f"committed {offsets} of "
        f"{produced} records; "
        f"worker {crashed or 'up'}"
    )
    assert crashed is None, f"the worker stopped: {crashed}"
    assert not lost and not wrong and duplicates == 0, (lost[:5], wrong[:5], duplicates)
    assert not not_dead and not twice_dead, (not_dead[:5], twice_dead[:5])
    assert offsets and not behind, f"committed offset stuck below {produced}: {behind}"


# --- error replies never go where an unauthenticated claim points -------------------------


def _landed(inbox: Inbox, request_id: str) -> list[tuple[str, str]]:
    """(topic, status or error code) of every answer to `request_id`."""
    return [
        (topic, r.error.code.value if r.error else r.status)
        for topic, r in inbox.responses()
        if r is not None and r.id == request_id
    ]


async def test_a_forged_envelope_app_on_a_topic_bound_request_never_reaches_the_victims_topic(
    mosquitto: Server, redis: Server
) -> None:
    settings = hostile_settings(mosquitto.url, redis.url, broker={"route_by_model": True})
    resp, req = settings.broker.response_topic, settings.broker.request_topic
    mallory_topic = f"{req}/digits/mallory"  # a broker ACL binds this to user mallory
    victim_reply = f"{resp}/victim/inbox"
    x, _ = heldout()
    wire = WireCodec(Limits())
    forged_envelope = Request(
        id="forged-envelope", model="digits", inputs={"pixels": x[:1]}, app="victim",
        reply_to=victim_reply, meta={"from": "mallory"},
    )  # fmt: skip
    forged_property = Request(
        id="forged-property", model="digits", inputs={"pixels": x[:1]}, app="victim"
    )
    own = Request(id="mallory-own", model="digits", inputs={"pixels": x[:1]})
    async with Inbox(mosquitto.url, [f"{resp}/#"]) as seen, worker_in_loop(settings) as worker:
        publish = seen.transport.publish
        await publish(mallory_topic, wire.encode_request(forged_envelope))
        await publish(mallory_topic, wire.encode_request(forged_property), reply_to=victim_reply)
        await publish(mallory_topic, wire.encode_request(own), reply_to=f"{resp}/mallory/inbox")
        ids = ("forged-envelope", "forged-property", "mallory-own")
        await seen.wait_until(lambda: all(_landed(seen, i) for i in ids), within_s=30)
        await asyncio.sleep(0.5)  # anything else addressed anywhere has arrived by now
        crashed = worker.crashed()
    on_victim = [
        (t, r.id if r else None) for t, r in seen.responses() if t.startswith(f"{resp}/victim")
    ]
    landed = {i: _landed(seen, i) for i in ("forged-envelope", "forged-property", "mallory-own")}
    print(f"forged envelope app: answers {landed}; on the victim's topics {on_victim}")
    assert crashed is None, f"the worker stopped: {crashed}"
    assert on_victim == [], f"messages reached the victim's reply topic: {on_victim}"
    assert landed["forged-envelope"] == [(resp, "unauthorized")]
    assert landed["forged-property"] == [(resp, "unauthorized")]
    assert landed["mallory-own"] == [(f"{resp}/mallory/inbox", "ok")]


async def test_an_invalid_key_claiming_another_app_is_answered_only_on_the_default_topic(
    mosquitto: Server, redis: Server
) -> None:
    settings = hostile_settings(
        mosquitto.url, redis.url, auth={"mode": "required", "cache_ttl_s": 0.2}
    )
    resp, req = settings.broker.response_topic, settings.broker.request_topic
    victim_reply = f"{resp}/victim/inbox"
    key = create_key(redis.url, settings.state.prefix, "victim")
    key_id = key.split("_")[1]
    x, _ = heldout()
    wire = WireCodec(Limits())

    def claim(id_: str, key_: str | None) -> bytes:
        return wire.encode_request(
            Request(id=id_, model="digits", inputs={"pixels": x[:1]}, app="victim", key=key_)
        )

    async with Inbox(mosquitto.url, [f"{resp}/#"]) as seen, worker_in_loop(settings) as worker:
        publish = seen.transport.publish
        # The victim's real key id with a wrong secret, then no key at all.
        await publish(
            req, claim("forged-badkey", f"iwk_{key_id}_not-the-secret"), reply_to=victim_reply
        )
        await publish(req, claim("forged-nokey", None), reply_to=victim_reply)
        await publish(req, claim("victim-own", key), reply_to=victim_reply)
        ids = ("forged-badkey", "forged-nokey", "victim-own")
        await seen.wait_until(lambda: all(_landed(seen, i) for i in ids), within_s=30)
        await asyncio.sleep(0.5)
        crashed = worker.crashed()
    landed = {i: _landed(seen, i) for i in ids}
    print(f"invalid key claiming app victim: answers {landed}")
    assert crashed is None, f"the worker stopped: {crashed}"
    assert landed["victim-own"] == [(victim_reply, "ok")]  # the victim's topic works
    assert landed["forged-badkey"] == [(resp, "unauthorized")]
    assert landed["forged-nokey"] == [(resp, "unauthorized")]
