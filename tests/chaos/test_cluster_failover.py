"""A Redis Cluster primary killed under load: its replica takes over, and the ledger
shows nothing lost and nothing answered wrongly.

Two chaos workers (real `inference-worker run` processes) on Mosquitto keep their ledger
on a private 3+3 Redis Cluster (node timeout 1 s). A client sends at a steady rate and
resends what is not answered within a second; part-way through, one primary gets
`kill -9` and the test waits until its replica has been promoted and the cluster is
whole again, while the load goes on.

What the failover may cost (docs/reliability.md, "Redis Cluster failover"): replication is
asynchronous, so writes the dead primary had acknowledged but not yet sent to its replica
are gone: a claim whose request was already acked (only the client's resend brings it
back), a completion (the resend runs it again: a duplicate inference with the same
answer), a lease renewal. And the dead primary's slots answer nothing until the
promotion: calls to them wait (the worker retries with backoff) and the broker holds
the unacked messages meanwhile.

Pass: lost = 0 and wrong = 0. Duplicate inferences are reported, not bounded: how many
writes a failover drops depends on the replication lag at the moment of the kill.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.chaos.harness import (
    CHAOS_BROKER,
    CHAOS_STATE,
    MODEL,
    TIMING,
    Fleet,
    Ledger,
    LoadClient,
    Row,
    Tap,
    expected_labels,
    tally,
)
from tests.integration.harness import isolated_settings
from tests.servers import mosquitto_server, redis_cluster_server

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(180)]

N = 400  # requests
RATE = 100.0  # per second: the kill lands ~1.5 s into a 4 s load
KILL_AFTER_S = 1.5


async def test_primary_killed_under_load_loses_nothing(
    tmp_path: Path, record_row: Callable[[Row], None]
) -> None:
    expected_labels()  # the reference model, before any clock starts
    timing = TIMING["mqtt"]
    with mosquitto_server() as broker, redis_cluster_server() as cluster:
        settings = isolated_settings(
            broker.url,
            cluster.url,
            state=dict(CHAOS_STATE),
            broker=dict(CHAOS_BROKER),
            worker={"drain_timeout_s": 10.0},
            models={"names": [MODEL]},
        )
        fleet = Fleet(settings, tmp_path)
        ledger = Ledger()
        load = LoadClient(settings, ledger, resend_after_s=timing.resend_after_s)
        dlq = Tap(broker.url, [settings.broker.dlq_topic])
        load.add("c1")
        responses = Tap(broker.url, [c.reply_to for c in load.clients.values()])
        try:
            await asyncio.gather(dlq.start(), load.start(), responses.start())
            for name in ("w1", "w2"):
                fleet.start(name)
            await fleet.wait_ready()
            fleet.supervise()
            x, labels = expected_labels()
            items = [
                load.request("c1", f"fo-{i}", x[i % len(x)], int(labels[i % len(x)]))
                for i in range(N)
            ]
            deadline = time.monotonic() + timing.deadline_s

            async def kill() -> tuple[int, float]:
                await asyncio.sleep(KILL_AFTER_S)
                started = time.monotonic()
                victim = await asyncio.to_thread(cluster.kill_primary)
                return victim.port, time.monotonic() - started

            killing = asyncio.create_task(kill())
            await load.steady(items, RATE, deadline)
            port, window_s = await killing
            await asyncio.sleep(1.0)  # late duplicates and stray take-overs show
            await fleet.stop_all()
            await asyncio.sleep(0.2)
            row = tally(
                "redis cluster primary kill -9", "mqtt", ledger, load, responses, fleet, dlq
            )
        finally:
            await fleet.stop_all()
            fleet.kill_leftovers()
            await load.close()
            for tap in (responses, dlq):
                with contextlib.suppress(Exception):
                    await tap.close()
    record_row(row)
    resent = sum(1 for s in ledger.entries if (r := ledger.reply(s)) is not None and r.sends > 1)
    print(
        f"primary :{port} killed; replica promoted and cluster ok after {window_s:.1f} s; "
        f"{resent} request(s) needed a resend; send errors {dict(ledger.send_errors)}"
    )
    assert [d.returncode for d in fleet.deaths] == [], fleet.deaths  # no worker died
    assert row.lost == 0, row
    assert row.wrong == 0, row
    assert row.dead_lettered == 0, row
