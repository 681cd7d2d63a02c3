"""The dead-letter store's twin, the filters, replay and the worker's dead-letter path,
all in process (memory transport and state)."""

from __future__ import annotations

import asyncio
import datetime
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zstandard

from inference_worker import dlq
from inference_worker.client import InferenceClient
from inference_worker.dlq_cli import parse_when
from inference_worker.journal import JournalEntry
from inference_worker.pipeline import Assembly, Worker
from inference_worker.progress import Progress
from inference_worker.serving import load_models
from inference_worker.settings import load_settings
from inference_worker.state.deadletters import (
    LetterFilter,
    MemoryDeadLetters,
    NewDeadLetter,
    Order,
    dead_letter_key,
)
from inference_worker.state.memory import MemoryStateStore
from inference_worker.transports import connect
from inference_worker.transports.base import Delivery, TransportOptions
from inference_worker.transports.memory import MemoryBroker

MODELS = Path(__file__).resolve().parents[2] / "config" / "models"


def letter(
    i: int, code: str = "invalid_input", app: str = "a", model: str = "digits"
) -> NewDeadLetter:
    source = JournalEntry(f"payload-{i}".encode(), "request_message", f"resp/{i}", b"c%d" % i)
    return NewDeadLetter(source, code, f"why {i}", app, f"id{i}", model, None, "w1", 1000 + i)


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_key_is_hash_tagged_inside_the_prefix() -> None:
    assert dead_letter_key("iw:") == "iw:{dlq}"
    assert dead_letter_key("{iw}:") == "{iw}:dlq"  # the prefix's own tag: same slot as the rest
    assert dead_letter_key("x{}:") == "x{}:{dlq}"  # `{}` is no hash tag in Redis


async def test_memory_store_caps_orders_filters_and_deletes() -> None:
    clock = Clock(1_700_000_000.0)
    store = MemoryDeadLetters(max_entries=5, clock=clock)
    for i in range(7):
        clock.t += 1.0
        code = "exhausted" if i % 2 else "invalid_input"
        assert await store.add([letter(i, code=code, app=f"app{i % 3}")]) == min(i + 1, 5)
    assert await store.length() == 5
    oldest = [s.letter.id async for s in store.scan(LetterFilter(), Order.OLDEST_FIRST)]
    assert oldest == ["id2", "id3", "id4", "id5", "id6"], "the oldest two were trimmed"
    newest = [s.letter.id async for s in store.scan(LetterFilter(), Order.NEWEST_FIRST)]
    assert newest == oldest[::-1]
    exhausted = [
        s.letter.id
        async for s in store.scan(LetterFilter(codes=("exhausted",)), Order.OLDEST_FIRST)
    ]
    assert exhausted == ["id3", "id5"]
    app0 = [s.letter.id async for s in store.scan(LetterFilter(apps=("app0",)), Order.OLDEST_FIRST)]
    assert app0 == ["id3", "id6"]
    entries = [s async for s in store.scan(LetterFilter(), Order.OLDEST_FIRST)]
    since = entries[2].entry_ms
    recent = LetterFilter(since_ms=since, until_ms=entries[3].entry_ms)
    assert [s.letter.id async for s in store.scan(recent, Order.OLDEST_FIRST)] == ["id4", "id5"]
    got = await store.get([entries[0].entry_id, "1-0"])
    assert got[0] == entries[0] and got[1] is None
    assert got[0] is not None and got[0].letter == letter(2, app="app2")
    assert await store.delete([entries[0].entry_id, entries[0].entry_id, "1-0"]) == 1
    assert await store.length() == 4


async def test_ids_stay_ordered_within_one_millisecond_and_when_the_clock_steps_back() -> None:
    clock = Clock(1_700_000_000.0)
    store = MemoryDeadLetters(max_entries=10, clock=clock)
    await store.add([letter(0), letter(1)])
    clock.t -= 5.0
    await store.add([letter(2)])
    ids = [s.entry_id async for s in store.scan(LetterFilter(), Order.OLDEST_FIRST)]
    assert ids == ["1700000000000-0", "1700000000000-1", "1700000000000-2"]


def test_parse_when() -> None:
    now = 1_700_000_000_000
    assert parse_when(None, now) is None
    assert parse_when("30m", now) == now - 30 * 60_000
    assert parse_when("2h", now) == now - 2 * 3_600_000
    assert parse_when("1.5d", now) == now - int(1.5 * 86_400_000)
    assert parse_when("1699999999000", now) == 1_699_999_999_000
    iso = datetime.datetime(2026, 12, 2, 10, 0, tzinfo=datetime.UTC)
    assert parse_when("2026-12-02T10:00", now) == int(iso.timestamp() * 1000)
    assert parse_when("2026-12-02T11:00+01:00", now) == int(iso.timestamp() * 1000)
    with pytest.raises(ValueError, match="not a time"):
        parse_when("yesterday", now)


class RecordingResets:
    def __init__(self, outcomes: dict[str, dlq.ResetOutcome]) -> None:
        self.outcomes = outcomes
        self.asked: list[tuple[str, str]] = []

    async def reset(self, keys: list[tuple[str, str]]) -> list[dlq.ResetOutcome]:  # type: ignore[override]
        self.asked += keys
        return [self.outcomes.get(id, dlq.ResetOutcome.ABSENT) for _, id in keys]


async def _observer(broker: MemoryBroker) -> tuple[object, list[Delivery]]:
    seen: list[Delivery] = []
    t = connect("memory://", TransportOptions(client_id="obs", subscriptions=("#",)), memory=broker)
    await t.start()

    async def pull() -> None:
        async for d in t.deliveries():
            seen.append(d)
            d.ack()

    task = asyncio.create_task(pull())
    return (t, task), seen


async def test_replay_republishes_raw_requests_and_handles_exhausted_explicitly() -> None:
    store = MemoryDeadLetters(max_entries=100)
    await store.add(
        [letter(0), letter(1, code="exhausted"), letter(2, code="exhausted"), letter(3)]
    )
    broker = MemoryBroker()
    (observer, task), seen = await _observer(broker)
    sender = connect("memory://", TransportOptions(client_id="replay"), memory=broker)
    await sender.start()
    try:
        chosen = await dlq.select(store, LetterFilter(), (), None)
        assert [c.id for c in chosen] == ["id0", "id1", "id2", "id3"]
        quiet = Progress(len(chosen), "replay", enabled=False)
        # Without resets the exhausted ones stay (the ledger would answer them `exhausted`).
        first = await dlq.replay(store, sender, chosen, resets=None, keep=False, progress=quiet)
        await asyncio.sleep(0)
        assert sorted(first.replayed) == sorted([chosen[0].entry_id, chosen[3].entry_id])
        assert {e for e, _ in first.skipped} == {chosen[1].entry_id, chosen[2].entry_id}
        assert first.removed == 2 and await store.length() == 2
        assert [(d.topic, d.payload, d.reply_to, d.correlation) for d in seen] == [
            ("request_message", b"payload-0", "resp/0", b"c0"),
            ("request_message", b"payload-3", "resp/3", b"c3"),
        ]
        # With resets: a pending record is left alone, the others go.
        resets = RecordingResets({"id2": dlq.ResetOutcome.PENDING, "id1": dlq.ResetOutcome.RESET})
        rest = await dlq.select(store, LetterFilter(codes=("exhausted",)), (), None)
        bar = Progress(len(rest), "replay", enabled=False)
        second = await dlq.replay(store, sender, rest, resets=resets, keep=True, progress=bar)
        await asyncio.sleep(0)
        assert resets.asked == [("a", "id1"), ("a", "id2")]
        assert second.replayed == [rest[0].entry_id] and second.reset == [rest[0].entry_id]
        assert [e for e, _ in second.skipped] == [rest[1].entry_id]
        assert second.removed == 0 and await store.length() == 2, "--keep keeps them"
        assert [d.payload for d in seen] == [b"payload-0", b"payload-3", b"payload-1"]
        assert quiet.done == len(chosen) and bar.done == len(rest)
    finally:
        await sender.close()
        await observer.close()  # type: ignore[attr-defined]
        task.cancel()


async def test_select_by_ids_and_purge() -> None:
    store = MemoryDeadLetters(max_entries=100)
    await store.add([letter(i, model="digits" if i < 3 else "minilm") for i in range(6)])
    entries = [s async for s in store.scan(LetterFilter(), Order.OLDEST_FIRST)]
    by_id = await dlq.select(store, LetterFilter(), [entries[4].entry_id, "9-9"], None)
    assert [c.id for c in by_id] == ["id4"]
    minilm = await dlq.select(store, LetterFilter(models=("minilm",)), (), 2)
    assert [c.id for c in minilm] == ["id3", "id4"]
    assert await dlq.purge(store, minilm) == 2
    left = [s.letter.id async for s in store.scan(LetterFilter(), Order.OLDEST_FIRST)]
    assert left == ["id0", "id1", "id2", "id5"]


async def test_worker_keeps_and_publishes_every_dead_letter() -> None:
    """Refusals before claim and give-ups after max_attempts reach the store and the topic."""
    settings = load_settings(
        overrides={
            "models": {"root": str(MODELS), "names": ["digits"], "device": "cpu"},
            "state": {"max_attempts": 1},
        }
    )
    broker = MemoryBroker()
    (observer, task), seen = await _observer(broker)
    transport = connect(
        "memory://",
        TransportOptions(client_id="w", subscriptions=("request_message/#",), shared_group="g"),
        memory=broker,
    )
    await transport.start()
    worker = Worker(
        Assembly(settings, transport, MemoryStateStore(), load_models(settings.models), "w")
    )
    stop = asyncio.Event()
    serving = asyncio.create_task(worker.serve(stop))
    client = InferenceClient.connect("memory://", memory=broker, resend_after_s=None, timeout_s=10)
    await client.start()
    try:
        good = np.zeros((1, 64), np.float32)
        ok = await client.send(client.make_request("digits", {"pixels": good}, id="fine"))
        wrong = await client.send(
            client.make_request("digits", {"pixels": good.astype(np.float64)}, id="wrong-dtype")
        )
        unknown = await client.send(client.make_request("nope", {"pixels": good}, id="no-model"))
    finally:
        await client.close()
        stop.set()
        await serving
        await transport.close()
        await observer.close()  # type: ignore[attr-defined]
        task.cancel()
    assert ok.response.status == "ok"
    assert wrong.response.error is not None and unknown.response.error is not None
    stored = [s async for s in worker.outbox.letters.scan(LetterFilter(), Order.OLDEST_FIRST)]
    assert sorted((s.letter.id, s.letter.code) for s in stored) == [
        ("no-model", "unknown_model"),
        ("wrong-dtype", "invalid_input"),
    ]
    for s in stored:
        assert s.letter.worker == "w"
        assert s.letter.source.topic == "request_message"
        assert s.letter.source.reply_to == client.reply_to
        request = msgpack.unpackb(zstandard.decompress(s.letter.source.payload))
        assert request["id"] == s.letter.id, "the raw request bytes, as sent"
    on_topic = [msgpack.unpackb(d.payload) for d in seen if d.topic == "request_message.dlq"]
    assert sorted(m["id"] for m in on_topic) == ["no-model", "wrong-dtype"]
    assert worker.stats.dead_letters == 2
    assert "iw_dead_letter_entries 2.0" in worker.metrics.exposition().decode()


def test_dlq_command_needs_redis(capsys: pytest.CaptureFixture[str]) -> None:
    from inference_worker.cli import main

    assert main(["dlq", "list", "--state", "memory://"]) == 2
    assert "kept in Redis" in capsys.readouterr().err
