"""A fleet across hosts with real network faults: a broker host, a Redis host, two worker
hosts (a third joins in the last scenario) and a client host, each a network namespace,
over Mosquitto (shared subscription) and Tansu (Kafka consumer group, 4 partitions).

Every scenario keeps a ledger of what the client sent and checks it with the total-queue
checker (`checker.py`). Pass everywhere: lost 0, unexpected 0, wrong 0, no id answered
with two different byte strings, no second inference outside a documented window. Each
scenario adds its own conditions below.

The hosts and their servers are built once per transport (module scope) and the
scenarios run on them in order; each one heals every link when it ends. Worker w1
computes slowly (600 ms a batch), so that a cut can land in the middle of a batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tests.fleet.checker import BROKER_TARGET, Record, Report
from tests.fleet.rig import BROKER, REDIS, Rig, rig
from tests.fleet.session import Session, run_on_client, wait_for

pytestmark = [pytest.mark.fleet, pytest.mark.timeout(240)]

RATE = 30.0  # requests per second, steady
SLOW_MS = 600  # w1's model calls: wide enough for the cut to land inside one


@pytest.fixture(scope="module", params=["mqtt", "kafka"])
def fleet_rig(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, hosts_possible: None
) -> Iterator[Rig]:
    transport = str(request.param)
    workdir = tmp_path_factory.mktemp(f"fleet-{transport}")
    with rig(transport, workdir, {"w1": SLOW_MS, "w2": 0}) as r:
        yield r


@pytest.fixture
def healed(fleet_rig: Rig) -> Iterator[Rig]:
    """The rig, with every link healed after the test (also when it failed)."""
    try:
        yield fleet_rig
    finally:
        fleet_rig.net.heal_all()


def assert_clean(report: Report, rig_: Rig) -> None:
    assert report.clean(), report
    assert report.answered == report.sent, report
    assert not rig_.fleet.deaths(), f"a worker died: {rig_.fleet.deaths()}"


def deadline(r: Rig) -> float:
    return r.timing.deadline_s


# ---------------------------------------------------------------------------- 1: cut from Redis


def test_worker_host_cut_from_redis_mid_batch(healed: Rig, record: Record) -> None:
    """w1 loses Redis while it computes a batch: its leases expire, w2 takes them over
    and answers; when the link comes back w1's completion is refused (the lease is not
    its own any more) and it publishes nothing for those ids."""
    r = healed
    cut_s = 3 * r.settings.state.lease_ms / 1000.0

    landed: list[bool] = []

    async def body(s: Session) -> tuple[Session, int, float]:
        load = asyncio.create_task(s.stream("rcut", RATE, max_n=240, deadline_s=deadline(r)))
        await asyncio.sleep(1.0)
        batch = await wait_for(lambda: r.fleet.started_batch("w1"), 20.0, "w1 mid-batch")

        def cut() -> None:
            r.net.cut("w1", REDIS)
            landed.append(r.fleet.started_batch("w1") == batch)  # still computing it

        await s.fault("cut w1|redis", {"w1"}, cut, lambda: r.net.heal("w1", REDIS), cut_s)
        await load
        await asyncio.sleep(r.settings.state.lease_ms / 1000.0 + 1.0)  # late completions
        taken = await asyncio.to_thread(r.fleet.counter, "w2", "iw_taken_over_total")
        return s, batch, taken

    s, batch, taken = run_on_client(r, body, 180.0)
    report = s.report()
    record(f"cut w1 from redis mid-batch [{r.transport}]", report)
    assert_clean(report, r)
    assert landed == [True], "the cut came after w1's batch was computed"
    inc = r.fleet.current["w1"].n
    runs = s.computations()
    cut_batch = [c for c in runs if (c.worker, c.incarnation, c.batch) == ("w1", inc, batch)]
    assert cut_batch, f"w1's batch {batch} (cut mid-compute) computed nothing"
    elsewhere = []
    for c in cut_batch:
        mine = [x for x in runs if x.id == c.id]
        history = f"runs {mine}, faults {s.faults}, answered by {s.workers_of(c.app, c.id)}"
        # Its lease expired during the cut and was taken over: it ran again.
        assert len(mine) >= 2, f"{c.id} not taken over: {history}"
        if any(x.worker != "w1" for x in mine):
            elsewhere.append(c)
            # w1's late completion was refused: every answer is the other host's.
            assert "w1" not in s.workers_of(c.app, c.id), history
    # Usually all of them; w1's own reaper may take over one of its leases first after
    # the link comes back (then its answer is still byte-identical: `dup_differing` 0).
    assert elsewhere, f"no lease of w1's batch was taken over by another host: {cut_batch}"
    assert taken >= len(elsewhere), f"w2 took over {taken} lease(s)"
    assert report.dup_inferences >= len(cut_batch), report
    assert r.net.dropped("w1") > 0


# ---------------------------------------------------------------------------- 2: cut from broker


def test_worker_host_cut_from_broker(healed: Rig, record: Record) -> None:
    """w1 loses the broker (not Redis) under load for 6 s: what it had claimed it still
    completes in Redis, and the client's resends are answered by w2 from the ledger.
    Nothing is computed twice: the claim, not the broker, owns a request."""
    r = healed

    async def body(s: Session) -> Report:
        load = asyncio.create_task(s.stream("bcut", RATE, max_n=300, deadline_s=deadline(r)))
        await asyncio.sleep(2.0)
        await s.fault(
            "cut w1|broker", {BROKER_TARGET}, lambda: r.net.cut("w1", BROKER),
            lambda: r.net.heal("w1", BROKER), 6.0,
        )  # fmt: skip
        await load
        await asyncio.sleep(1.0)
        return s.report()

    report = run_on_client(r, body, 180.0)
    record(f"cut w1 from broker [{r.transport}]", report)
    assert_clean(report, r)
    assert report.dup_inferences == 0, report
    assert r.net.dropped("w1") > 0


# ---------------------------------------------------------------------------- 3: loss everywhere


def test_two_percent_loss_on_every_link(healed: Rig, record: Record) -> None:
    """2% of the packets arriving at every host are dropped for the whole load."""
    r = healed
    hosts = list(r.net.hosts)

    async def body(s: Session) -> Report:
        before = sum(r.net.dropped(h) for h in hosts)
        fault = asyncio.create_task(
            s.fault("loss 2%", {"*"}, lambda: r.net.lossy(0.02), r.net.lossless, 9.0)
        )
        await asyncio.sleep(0.5)
        await s.stream("loss", RATE, max_n=240, deadline_s=deadline(r))
        await fault
        await asyncio.sleep(1.0)
        assert sum(r.net.dropped(h) for h in hosts) > before, "the loss rules dropped nothing"
        return s.report()

    report = run_on_client(r, body, 180.0)
    record(f"2% loss on every link [{r.transport}]", report)
    assert_clean(report, r)


# ---------------------------------------------------------------------------- 4: a host joins


def test_worker_host_added_under_load(healed: Rig, record: Record) -> None:
    """A third worker host is created and started while the client sends; it takes a
    share of the requests (a shared-subscription member / a consumer-group rebalance)."""
    r = healed

    def w3_busy() -> bool:
        if "w3" not in r.fleet.current:
            return False
        n = sum(1 for c in r.fleet.computations() if c.worker == "w3" and c.id.startswith("join"))
        return n >= 20

    async def body(s: Session) -> Report:
        load = asyncio.create_task(
            s.stream("join", RATE, max_n=1200, deadline_s=deadline(r), stop=w3_busy)
        )
        await asyncio.sleep(2.0)
        await asyncio.to_thread(r.fleet.start, "w3")
        await asyncio.to_thread(r.fleet.wait_ready, "w3")
        await load
        await asyncio.sleep(1.0)
        return s.report()

    report = run_on_client(r, body, 180.0)
    record(f"worker host added under load [{r.transport}]", report)
    assert_clean(report, r)
    assert report.dup_inferences == 0, report
    assert w3_busy(), "the new host computed fewer than 20 requests"
