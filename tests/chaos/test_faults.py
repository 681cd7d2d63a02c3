"""Fault injection under load (issue 4): each scenario owns its broker and Redis, runs
chaos workers as child processes, keeps a ledger of every request and counts lost,
duplicated and wrong answers against it.

Pass everywhere: lost = 0 and wrong = 0. Duplicate inferences = 0 except where a kill
lands between compute and completion (the cut-off batch is recomputed by the take-over:
reported, and checked to be exactly that batch). The poison request is dead-lettered once,
after exactly `max_attempts` worker crashes.

Recovery comes from the Redis journal + lease reaper and from client resends: Mosquitto
does not hand a dead shared-subscription member's unacked messages to another member
(design section 11).

Kafka (Tansu) runs the same seven scenarios with the same pass conditions, with a
longer ledger deadline and a 2 s resend interval (`harness.TIMING`): a SIGKILLed group
member holds its partitions until the session timeout (6 s in the tests), and every join
waits about half of it. Scenario 3 restarts a Tansu that keeps its log in S3 (a private
moto server), as a production broker keeps its log on disk, under a lighter load (200
requests at 20/s): an S3-backed Tansu carries tens of requests per second, not hundreds.
A Kafka scenario costs 13-35 s on a 2-core machine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.chaos.harness import (
    POISON,
    POISON_VALUE,
    Row,
    Scenario,
    Sent,
    dead_letters,
    expected_labels,
    last_batch,
    scenario,
)

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(150)]

N = 400  # requests per load run
RATE = 100.0  # requests per second
# The ledger's deadline (from the start of the load) and the resend interval are per
# transport: `harness.TIMING`.
WORKERS = ("w1", "w2")

Record = Callable[[Row], None]


def good_requests(sc: Scenario, prefix: str, n: int = N, client: str = "c1") -> list[Sent]:
    x, labels = expected_labels()
    return [
        sc.load.request(client, f"{prefix}-{i}", x[i % len(x)], int(labels[i % len(x)]))
        for i in range(n)
    ]


async def start_fleet(sc: Scenario, chaos: dict[str, dict[str, str]] | None = None) -> None:
    chaos = chaos or {}
    for name in WORKERS:
        sc.fleet.start(name, chaos.get(name))
    await sc.fleet.wait_ready()
    sc.fleet.supervise()


async def run_load(sc: Scenario, items: list[Sent], rate: float = RATE) -> float:
    deadline = time.monotonic() + sc.timing.deadline_s
    await sc.load.steady(items, rate, deadline)
    return deadline


def assert_clean(row: Row) -> None:
    assert row.lost == 0, row
    assert row.wrong == 0, row


# ---------------------------------------------------------------------------- 1, 2: kill -9


@pytest.mark.parametrize(
    ("point", "label"),
    [
        ("claimed", "1a kill -9 after claim, before ack"),
        ("computed", "1b kill -9 after compute, before completion"),
        ("completed", "2 kill -9 after completion, before publish"),
    ],
)
async def test_sigkill_mid_batch(
    transport: str, tmp_path: Path, record_row: Record, point: str, label: str
) -> None:
    async with scenario(label, transport, tmp_path) as sc:
        await start_fleet(sc, {"w1": {"CHAOS_KILL_AT": f"{point}:40"}})
        await run_load(sc, good_requests(sc, point))
        row = await sc.finish()
        record_row(row)
        killed = [d for d in sc.fleet.deaths if d.name == "w1"]
        assert [d.returncode for d in killed] == [-9], sc.fleet.deaths  # the planned kill, once
        assert_clean(row)
        if point == "computed":
            # The batch computed before the kill is recomputed by the take-over, and
            # nothing else is.
            cut_off = last_batch(killed[0].chaos_log)
            print(f"batch cut off by the kill: {len(cut_off)} request(s)")
            assert row.dup_inferences == len(cut_off) >= 1, row
        else:
            assert row.dup_inferences == 0, row


# ---------------------------------------------------------------------------- 3, 4: restarts


async def test_broker_restart_mid_load(transport: str, tmp_path: Path, record_row: Record) -> None:
    # Kafka: a durable Tansu (log in S3), as a production broker keeps its log; with
    # in-memory storage a restart would delete the topics themselves.
    async with scenario("3 broker restart", transport, tmp_path, durable_broker=True) as sc:
        await start_fleet(sc)
        # An S3-backed Tansu carries tens of requests per second: a lighter load, as long.
        n, rate = (N // 2, RATE / 5) if transport == "kafka" else (N, RATE)
        items = good_requests(sc, "broker", n)
        load = asyncio.create_task(run_load(sc, items, rate))
        await asyncio.sleep(n / rate / 2)
        if transport == "kafka":
            # Tansu keeps serving for seconds after SIGTERM (the load would be over before
            # it stops), so it is killed: the harsher fault.
            await asyncio.to_thread(sc.broker.stop, kill=True)
            await asyncio.to_thread(sc.broker.start)
        else:
            await asyncio.to_thread(sc.broker.restart)
        assert not load.done(), "the load was over before the broker restarted"
        await load
        row = await sc.finish()
        record_row(row)
        assert not sc.fleet.deaths
        assert_clean(row)
        assert row.dup_inferences == 0, row


async def test_redis_restart_mid_load(transport: str, tmp_path: Path, record_row: Record) -> None:
    async with scenario("4 redis restart (AOF)", transport, tmp_path) as sc:
        await start_fleet(sc)
        items = good_requests(sc, "redis")
        load = asyncio.create_task(run_load(sc, items))
        await asyncio.sleep(N / RATE / 2)
        await asyncio.to_thread(sc.redis.restart)  # SIGTERM: a clean shutdown flushes the AOF
        await load
        row = await sc.finish()
        record_row(row)
        assert not sc.fleet.deaths
        assert_clean(row)
        assert row.dup_inferences == 0, row


# ---------------------------------------------------------------------------- 5: scale down/up


async def test_scale_down_and_up(transport: str, tmp_path: Path, record_row: Record) -> None:
    async with scenario("5 scale down, then up", transport, tmp_path) as sc:
        await start_fleet(sc)
        items = good_requests(sc, "scale")
        load = asyncio.create_task(run_load(sc, items))
        await asyncio.sleep(N / RATE / 3)
        rc = await sc.fleet.terminate("w2")  # SIGTERM: it drains, then leaves the group
        sc.fleet.start("w3")
        await load
        row = await sc.finish()
        record_row(row)
        assert rc == 0
        assert not sc.fleet.deaths
        assert_clean(row)
        assert row.dup_inferences == 0, row


# ---------------------------------------------------------------------------- 6: same id twice


async def test_same_id_from_two_clients_and_two_apps(
    transport: str, tmp_path: Path, record_row: Record
) -> None:
    clients = (("c1", ""), ("c2", ""), ("alpha", "alpha"), ("beta", "beta"))
    async with scenario("6 same id: 2 clients / 2 apps", transport, tmp_path, clients) as sc:
        await start_fleet(sc)
        x, labels = expected_labels()
        n = 100
        deadline = time.monotonic() + sc.timing.deadline_s
        # The same app: both clients send the same bytes under the same id at once.
        same: list[tuple[Sent, Sent]] = []
        for i in range(n):
            a = sc.load.request("c1", f"same-{i}", x[i], int(labels[i]))
            same.append((a, Sent("c2", a.app, a.id, a.payload, a.expected)))
        # Two apps, one id: different inputs whose model labels differ.
        apps: list[tuple[Sent, Sent]] = []
        for i in range(n):
            j = next(k for k in range(n + i, len(x)) if labels[k] != labels[i])
            apps.append(
                (
                    sc.load.request("alpha", f"both-{i}", x[i], int(labels[i])),
                    sc.load.request("beta", f"both-{i}", x[j], int(labels[j])),
                )
            )
        sends = []
        for pair in same + apps:
            sends += [sc.load.send_until(s, deadline) for s in pair]
            await asyncio.sleep(2 / RATE)
        await asyncio.gather(*sends)
        row = await sc.finish()
        record_row(row)
        assert not sc.fleet.deaths
        assert_clean(row)
        assert row.dup_inferences == 0, row
        computed = sc.fleet.computed()
        for a, b in same:
            ra, rb = sc.ledger.reply(a), sc.ledger.reply(b)
            assert ra is not None and rb is not None
            assert ra.raw == rb.raw, f"{a.id}: the two clients got different bytes"
            assert computed[("", a.id)] == 1
        for a, b in apps:
            ra, rb = sc.ledger.reply(a), sc.ledger.reply(b)
            assert ra is not None and rb is not None
            assert (ra.response.app, rb.response.app) == ("alpha", "beta")
            assert computed[("alpha", a.id)] == 1 and computed[("beta", b.id)] == 1


# ---------------------------------------------------------------------------- 7: poison


async def test_poison_request_dead_lettered_after_max_attempts(
    transport: str, tmp_path: Path, record_row: Record
) -> None:
    async with scenario("7 poison among good", transport, tmp_path) as sc:
        poison_env = {"CHAOS_POISON": str(POISON_VALUE)}
        for name in WORKERS:
            sc.fleet.start(name, poison_env, keep_fault=True)
        await sc.fleet.wait_ready()
        sc.fleet.supervise()
        x, _ = expected_labels()
        items = good_requests(sc, "good", 300)
        bad = x[7].copy()
        bad[0] = POISON_VALUE
        poison = sc.load.request("c1", "poison", bad, POISON)
        items.insert(150, poison)
        await run_load(sc, items)
        # The poison is answered once `exhausted` is cached; its dead letter may trail.
        give_up = time.monotonic() + sc.timing.dlq_wait_s
        while not sc.dlq.messages and time.monotonic() < give_up:
            await asyncio.sleep(0.1)
        row = await sc.finish(settle_s=1.5)
        record_row(row)
        max_attempts = sc.settings.state.max_attempts
        reply = sc.ledger.reply(poison)
        assert reply is not None, "the poison request was never answered"
        assert reply.response.error is not None
        assert reply.response.error.code.value == "exhausted"
        letters = dead_letters(sc.dlq)
        summary = [(e["id"], e.get("attempts"), e["error"]["message"]) for e in letters]
        print(f"dead letters: {summary}; deaths: {sc.fleet.deaths}")
        mine = [e for e in letters if e["id"] == "poison"]
        assert len(mine) == 1, summary
        assert mine[0]["attempts"] == max_attempts
        assert mine[0]["error"]["code"] == "exhausted"
        assert mine[0]["payload"] == poison.payload
        crashes = [d for d in sc.fleet.deaths if d.returncode == -9]
        others = [d for d in sc.fleet.deaths if d.returncode != -9]
        # A restarted Kafka worker whose group is still evicting dead members starts
        # anyway (it used to give up after 30 s without partitions): only the poison's
        # crashes may end a worker.
        assert not others, sc.fleet.deaths
        assert len(crashes) == max_attempts, sc.fleet.deaths
        assert row.lost == 0, row
        # Good requests in flight when the poison crashed a worker are taken over one at
        # a time, so none of them is charged into `exhausted` (no collateral dead letters).
        assert [e["id"] for e in letters] == ["poison"], summary
        assert_clean(row)
