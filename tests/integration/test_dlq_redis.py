"""The dead-letter queue against real Redis and Mosquitto: the capped stream itself, the
ledger reset, and the operator's story end to end — a poison request is dead-lettered,
the model is fixed by a hot reload, and `inference-worker dlq replay` answers it.

Every response is counted against a ledger of what was sent.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import msgpack
import numpy as np
import pytest
import redis.asyncio as aioredis

from inference_worker.dlq import RedisResets, ResetOutcome
from inference_worker.journal import JournalEntry
from inference_worker.models import ModelRepository
from inference_worker.protocol import Limits, WireCodec
from inference_worker.settings import Settings
from inference_worker.state.base import ClaimRequest, Completion
from inference_worker.state.deadletters import (
    LetterFilter,
    NewDeadLetter,
    Order,
    RedisDeadLetters,
)
from inference_worker.state.redis import RedisStateStore
from inference_worker.transports import connect
from inference_worker.transports.base import Delivery, Transport, TransportOptions
from tests.integration.harness import (
    REPO,
    client_for,
    isolated_settings,
    settings_env,
    worker_in_loop,
)
from tests.poison_models import POISON, write_config, write_version
from tests.servers import Server

pytestmark = pytest.mark.integration


def _letter(i: int, code: str) -> NewDeadLetter:
    source = JournalEntry(b"raw-%d" % i, "req", None if i % 2 else f"resp/{i}", None)
    app = f"app{i % 5}"
    return NewDeadLetter(source, code, f"m{i}", app, f"id{i}", "digits", i % 4 or None, "w", i)


async def test_stream_pages_filters_caps_and_deletes(redis: Server) -> None:
    client = aioredis.Redis.from_url(redis.url)
    prefix = f"{{t{uuid.uuid4().hex[:6]}}}:"
    try:
        store = RedisDeadLetters(lambda: client, prefix, max_entries=10_000)
        assert store.key == f"{prefix}dlq"
        codes = ["exhausted", "invalid_input", "conflict"]
        letters = [_letter(i, codes[i % 3]) for i in range(450)]  # > 2 pages of 200
        assert await store.add(letters[:300]) == 300
        assert await store.add(letters[300:]) == 450
        every = [s async for s in store.scan(LetterFilter(), Order.OLDEST_FIRST)]
        assert [s.letter for s in every] == letters, "fields round-trip, order kept"
        newest = [s.entry_id async for s in store.scan(LetterFilter(), Order.NEWEST_FIRST)]
        assert newest == [s.entry_id for s in reversed(every)]
        only = LetterFilter(codes=("conflict",), apps=("app1",))
        picked = [s.letter.id async for s in store.scan(only, Order.OLDEST_FIRST)]
        assert picked == [f"id{i}" for i in range(450) if i % 3 == 2 and i % 5 == 1]
        assert len(picked) == 30
        window = LetterFilter(since_ms=every[0].entry_ms, until_ms=every[-1].entry_ms)
        assert len([s async for s in store.scan(window, Order.NEWEST_FIRST)]) == 450
        later = LetterFilter(since_ms=every[-1].entry_ms + 1)
        assert [s async for s in store.scan(later, Order.OLDEST_FIRST)] == []
        got = await store.get([every[7].entry_id, "1-1"])
        assert got == [every[7], None]
        assert await store.delete([every[7].entry_id, every[8].entry_id, "1-1"]) == 2
        assert await store.length() == 448

        capped = RedisDeadLetters(lambda: client, f"{prefix}c:", max_entries=100)
        for start in range(0, 1000, 100):
            length = await capped.add(letters[start % 400 : start % 400 + 100])
        # MAXLEN ~ trims whole stream nodes: a little over the cap, never unbounded.
        assert 100 <= length <= 300
        assert length == await capped.length()
    finally:
        await client.aclose()


async def test_reset_deletes_done_records_only(redis: Server) -> None:
    state = RedisStateStore(redis.url, prefix=f"{{r{uuid.uuid4().hex[:6]}}}:")
    await state.start()
    try:
        src = JournalEntry(b"p", "req", None, None)
        claimed = await state.claim(
            [ClaimRequest("a", "done-one", "fp", src), ClaimRequest("a", "pending-one", "fp", src)],
            nonce="n",
            lease_ms=60_000,
            max_attempts=3,
        )
        await state.complete([Completion("a", "done-one", claimed[0].token or "", b"answer")],
                             result_ttl_s=60)  # fmt: skip
        resets = RedisResets(state)
        outcomes = await resets.reset([("a", "done-one"), ("a", "pending-one"), ("a", "never")])
        assert outcomes == [ResetOutcome.RESET, ResetOutcome.PENDING, ResetOutcome.ABSENT]
        again = await state.claim(
            [
                ClaimRequest("a", "done-one", "fp2", src),
                ClaimRequest("a", "pending-one", "fp", src),
            ],
            nonce="m",
            lease_ms=60_000,
            max_attempts=3,
        )
        assert [r.outcome.value for r in again] == ["new", "in_progress"]
        assert again[0].attempts == 1, "a reset record starts counting afresh"
    finally:
        await state.close()


# ---- end to end ---------------------------------------------------------------------


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inference_worker.cli", "dlq", *args],
        env=settings_env(settings),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@asynccontextmanager
async def _watch(url: str, filters: tuple[str, ...]) -> AsyncIterator[list[Delivery]]:
    seen: list[Delivery] = []
    options = TransportOptions(client_id=f"obs-{uuid.uuid4().hex[:8]}", subscriptions=filters)
    transport: Transport = connect(url, options)
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


async def _until(condition: Callable[[], bool], what: str) -> None:
    try:
        async with asyncio.timeout(60):
            while not condition():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"never happened: {what}") from None


async def test_poison_is_dead_lettered_fixed_by_hot_reload_and_answered_by_replay(
    mosquitto: Server, redis: Server, tmp_path: Path
) -> None:
    root = tmp_path / "models"
    model = write_config(root, "poisoned")
    write_version(model, 1, fixed=False)
    settings = isolated_settings(
        mosquitto.url,
        redis.url,
        models={"root": str(root), "device": "cpu", "poll_interval_s": 0},
        state={"max_attempts": 2, "retry_base_ms": 20, "retry_max_ms": 50},
    )
    b = settings.broker
    wire = WireCodec(Limits())
    good = np.zeros((1, 64), np.float32)
    poison = good.copy()
    poison[0, 5] = POISON
    responses: Counter[tuple[str, str]] = Counter()  # (id, status or error code)
    async with (
        _watch(settings.broker.url, (b.dlq_topic, f"{b.response_topic}/#")) as seen,
        worker_in_loop(settings) as worker,
        client_for(settings, resend_after_s=None) as client,
    ):
        sent = [
            client.make_request("poisoned", {"pixels": good}, id=f"good-{i}") for i in range(20)
        ]
        bad = client.make_request("poisoned", {"pixels": poison}, id="poison-1")
        replies = await asyncio.gather(*(client.send(r) for r in [*sent, bad]))
        assert [r.response.status for r in replies[:-1]] == ["ok"] * 20
        gave_up = replies[-1].response
        assert gave_up.error is not None and gave_up.error.code.value == "exhausted"

        # Kept in Redis (and published for live observers).
        store = RedisDeadLetters(
            lambda: worker.state.client,  # type: ignore[attr-defined]
            settings.state.prefix,
            max_entries=100,
        )
        kept = [s async for s in store.scan(LetterFilter(), Order.OLDEST_FIRST)]
        assert [(s.letter.id, s.letter.code, s.letter.attempts) for s in kept] == [
            ("poison-1", "exhausted", 2)
        ]
        assert kept[0].letter.source.reply_to == client.reply_to
        await _until(lambda: any(d.topic == b.dlq_topic for d in seen), "dead letter on topic")
        live = [msgpack.unpackb(d.payload) for d in seen if d.topic == b.dlq_topic]
        assert [(m["id"], m["error"]["code"]) for m in live] == [("poison-1", "exhausted")]

        listed = _cli(settings, "list", "--json", "--code", "exhausted", "--model", "poisoned")
        assert listed.returncode == 0, listed.stderr
        rows = [json.loads(line) for line in listed.stdout.splitlines()]
        assert [(r["id"], r["entry"]) for r in rows] == [("poison-1", kept[0].entry_id)]
        assert _cli(settings, "list", "--app", "someone-else", "--json").stdout == ""

        # Without --reset-attempts the ledger would answer `exhausted` again: skipped.
        plain = _cli(settings, "replay", "--code", "exhausted")
        assert plain.returncode == 0, plain.stderr
        assert "skipped" in plain.stdout and "replayed 0" in plain.stdout
        dry = _cli(settings, "replay", "--reset-attempts", "--dry-run")
        assert "would reset and replay" in dry.stdout and "nothing sent" in dry.stdout
        assert await store.length() == 1

        # The fix: version 2, hot-reloaded.
        write_version(model, 2, fixed=True)
        await worker.reload_models(ModelRepository(root))
        assert worker.served_versions == {"poisoned": [2]}

        replay = _cli(settings, "replay", "--code", "exhausted", "--reset-attempts")
        assert replay.returncode == 0, replay.stdout + replay.stderr
        assert "replayed 1 (reset 1, removed 1)" in replay.stdout

        def answered() -> list[object]:
            out = []
            for d in seen:
                if d.topic.startswith(f"{b.response_topic}/"):
                    r = wire.decode_response(d.payload)
                    if r.id == "poison-1" and r.status == "ok":
                        out.append(r)
            return out

        await _until(lambda: len(answered()) == 1, "the replayed request answered")
        (fixed,) = answered()
        assert fixed.version == 2  # type: ignore[attr-defined]
        assert int(fixed.outputs["label"][0]) == 16  # type: ignore[attr-defined]  # clipped
        assert await store.length() == 0, "replayed letters leave the store"
        for d in seen:
            if d.topic.startswith(f"{b.response_topic}/"):
                r = wire.decode_response(d.payload)
                responses[(r.id, r.status if r.error is None else r.error.code.value)] += 1
        exposition = worker.metrics.exposition().decode()
    expected = {(f"good-{i}", "ok"): 1 for i in range(20)}
    expected |= {("poison-1", "exhausted"): 1, ("poison-1", "ok"): 1}
    assert dict(responses) == expected, "nothing lost, duplicated or wrong"
    assert "iw_dead_letters_total 1.0" in exposition
