"""Hardening of the worker's lifecycle on real Mosquitto and Redis: hot reload under load,
a dying transport task, a crash inside the request path, and a shutdown bounded by
`worker.drain_timeout_s`.

Black-box: the worker is `run_worker` observed through its responses, Redis, `/readyz`.
Every test keeps a ledger of what it sent and states exact pass conditions (lost,
duplicated, wrong); waits are bounded so that a hang fails, and nothing asserts on speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from inference_worker.protocol import Request
from inference_worker.state.redis import RedisStateStore
from inference_worker.transports.mqtt import MqttTransport
from tests.integration.lifecycle_helpers import (
    Ledger,
    RunnerControl,
    add_version,
    client_of,
    digits_rows,
    http_get,
    labels_of,
    marked,
    member,
    model_repo,
    serving,
    wait_until,
    worker_settings,
)
from tests.servers import Server

pytestmark = pytest.mark.integration


async def _redis(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(url)


# ---------------------------------------------------------------------------- hot reload


async def test_hot_reload_under_steady_load_answers_every_request_exactly_once(
    mosquitto: Server, redis: Server, tmp_path: Path
) -> None:
    """Five version swaps (add v+1, delete v's directory, reload) while 8 senders keep
    requests flowing: the worker keeps running, every request is answered once, `ok`,
    with the model's own label; afterwards no lease is left in Redis."""
    root = model_repo(tmp_path / "models", {"digits": {}})
    settings = worker_settings(mosquitto.url, redis.url, root)
    x, labels = digits_rows()
    ledger = Ledger()
    rows: dict[str, int] = {}
    versions_seen: list[int | None] = []
    flowing = True

    async def sender(k: int, client: Any) -> None:
        i = 0
        while flowing:
            id_ = f"s{k}-{i}"
            row = (k * 1000 + i) % len(x)
            rows[id_] = row
            payload = client.encode(
                client.make_request("digits", {"pixels": x[row : row + 1]}, id=id_)
            )
            reply = await ledger.send(client, id_, payload, "ok")
            if reply is not None:
                versions_seen.append(reply.response.version)
            i += 1

    async with serving(settings) as w, client_of(settings) as client:
        senders = [asyncio.create_task(sender(k, client)) for k in range(8)]
        try:
            await wait_until(lambda: len(ledger.replies) >= 50 or w.task.done(), 60, "50 answers")
            for version in range(2, 7):
                add_version(root, "digits", version)
                shutil.rmtree(root / "digits" / str(version - 1))
                w.reload.set()
                await wait_until(
                    lambda v=version: v in versions_seen or w.task.done(),  # type: ignore[misc]
                    60,
                    f"answers from version {version}",
                )
                if w.task.done():
                    break
                mark = len(ledger.replies)
                await wait_until(
                    lambda m=mark: len(ledger.replies) >= m + 30 or w.task.done(),  # type: ignore[misc]
                    60,
                    "30 more answers after the swap",
                )
        finally:
            flowing = False
            await asyncio.gather(*senders)
        crashed = w.task.exception() if w.task.done() else None
        duplicates = client.duplicates
        leases_left = await _leases_after_traffic(redis.url, settings.state.prefix)

    print(
        ledger.summary(),
        f"duplicates {duplicates}, versions {sorted({v for v in versions_seen if v})}",
    )
    assert crashed is None and not w.task.cancelled(), (
        f"the worker died during reloads: {crashed!r}"
    )
    assert ledger.lost == [], f"{len(ledger.lost)} of {len(ledger.sent)} requests never answered"
    assert duplicates == 0
    assert ledger.wrong() == []
    answered = list(ledger.replies)
    assert labels_of(ledger.replies[i] for i in answered) == [
        int(labels[rows[i]]) for i in answered
    ]
    assert 6 in versions_seen, "the last version never served"
    assert leases_left == 0, f"{leases_left} leases still held after the traffic stopped"


async def _zcard_is_zero(client: aioredis.Redis, key: str) -> bool:
    return int(await client.zcard(key)) == 0


async def _leases_after_traffic(url: str, prefix: str, within_s: float = 30.0) -> int:
    """Leases left in Redis once they had `within_s` to be released (0 when all were)."""
    client = await _redis(url)
    key = f"{prefix}leases"
    try:
        with contextlib.suppress(AssertionError):
            await wait_until(lambda: _zcard_is_zero(client, key), within_s, f"{key} empty")
        return int(await client.zcard(key))
    finally:
        await client.aclose()


async def test_retired_version_whose_drain_times_out_leaves_no_lease_renewed(
    mosquitto: Server, redis: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Version 1 is stuck on a batch while requests queue behind it; version 2 replaces it
    and the retired lane's drain (1 s) times out. The requests queued in the retired lane
    must still be answered once (ok, or an honest error) and, once traffic stops, Redis
    holds no lease and no retry: nothing is renewed for ever."""
    control = RunnerControl(monkeypatch)
    root = model_repo(tmp_path / "models", {"digits": {"max_batch_size": 1, "max_queue": 64}})
    settings = worker_settings(
        mosquitto.url,
        redis.url,
        root,
        worker={"drain_timeout_s": 1.0},
        state={"lease_ms": 3000, "reap_interval_s": 0.2},
    )
    control.close_gate("digits", version=1)
    ledger = Ledger()
    honest = {"ok", "overloaded", "exhausted", "inference_failed"}
    async with serving(settings, control=control) as w, client_of(settings, timeout_s=60) as client:
        stuck = [
            asyncio.create_task(
                ledger.send(client, f"q{i}", client.encode(_marked(client, f"q{i}", 10 + i)), "ok")
            )
            for i in range(6)
        ]
        await control.wait_calls(1, model="digits")  # one batch holds v1's only instance
        await asyncio.sleep(0.5)  # the other five reach v1's queue
        add_version(root, "digits", 2)
        shutil.rmtree(root / "digits" / "1")
        w.reload.set()
        # Probes until one is answered by version 2 (earlier ones may still be admitted to
        # version 1 while version 2 loads: they must be answered too).
        probes: list[asyncio.Task[Any]] = []
        for i in range(60):
            payload = client.encode(_marked(client, f"p{i}", 100 + i))
            probes.append(asyncio.create_task(ledger.send(client, f"p{i}", payload, "ok")))
            await asyncio.sleep(0.5)
            if any(r.response.version == 2 for r in ledger.replies.values()):
                break
        swapped = any(r.response.version == 2 for r in ledger.replies.values())
        await asyncio.sleep(2.0)  # past the retired lane's drain timeout
        control.open_all()
        await asyncio.gather(*stuck, *probes)
        leases_left = await _leases_after_traffic(redis.url, settings.state.prefix)
        store = await _redis(redis.url)
        try:
            retries = int(await store.zcard(f"{settings.state.prefix}retry"))
        finally:
            await store.aclose()
        duplicates = client.duplicates
    print(ledger.summary())
    assert ledger.lost == [], f"never answered: {ledger.lost}"
    assert duplicates == 0
    assert swapped, "version 2 never answered"
    assert ledger.wrong(lambda _, got: got in honest) == []
    assert leases_left == 0, f"{leases_left} leases still renewed after the traffic stopped"
    assert retries == 0


def _marked(client: Any, id_: str, marker: float) -> Request:
    return client.make_request("digits", {"pixels": marked(marker)}, id=id_)  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------- supervision


async def test_transport_task_that_dies_fails_readiness_and_stops_the_worker(
    mosquitto: Server, redis: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The MQTT connection driver of the worker raises on its 4th incoming message (as a
    bug in packet handling would). `/readyz` must stop answering 200 and `run_worker`
    must end (return or raise) instead of serving nothing while looking healthy."""
    root = model_repo(tmp_path / "models", {"digits": {}})
    settings = worker_settings(mosquitto.url, redis.url, root)
    client_id = f"hw-{settings.state.prefix.strip(':')}"
    settings = dataclasses.replace(
        settings, broker=dataclasses.replace(settings.broker, client_id=client_id)
    )
    handled = {"n": 0}
    real = MqttTransport._on_message

    def on_message(self: MqttTransport, msg: Any) -> None:
        if self._options.client_id == client_id:
            handled["n"] += 1
            if handled["n"] > 3:
                raise RuntimeError("injected: the connection driver hit a bug")
        real(self, msg)

    monkeypatch.setattr(MqttTransport, "_on_message", on_message)
    x, labels = digits_rows()
    ledger = Ledger()
    async with serving(settings) as w, client_of(settings, timeout_s=20) as client:
        for i in range(3):
            payload = client.encode(
                client.make_request("digits", {"pixels": x[i : i + 1]}, id=f"t{i}")
            )
            await ledger.send(client, f"t{i}", payload, "ok")
        status, body = await http_get(w.port, "/readyz")
        assert status == 200, (ledger.summary(), body)
        fatal = client.encode(client.make_request("digits", {"pixels": x[3:4]}, id="t3"))
        last = asyncio.create_task(client.send_raw("t3", fatal, timeout_s=5))
        await wait_until(lambda: handled["n"] > 3, 20, "the 4th message reached the driver")
        readiness: list[int | None] = []

        async def not_ready() -> bool:
            status, _ = await http_get(w.port, "/readyz")
            readiness.append(status)
            return status != 200

        try:
            await wait_until(not_ready, 30, "/readyz to stop answering 200")
        finally:
            await asyncio.gather(last, return_exceptions=True)
        await w.ended(30)
    assert ledger.lost == [] and ledger.wrong() == []
    assert labels_of(ledger.replies[f"t{i}"] for i in range(3)) == [int(v) for v in labels[:3]]


class _ClaimsExplode(RedisStateStore):
    """Redis state whose claim raises an unexpected TypeError for ids starting `boom`
    (a bug in the request path, not an outage)."""

    async def claim(self, items: Any, *args: Any, **kwargs: Any) -> Any:
        if any(item.id.startswith("boom") for item in items):
            raise TypeError("injected: unexpected error inside the request path")
        return await super().claim(items, *args, **kwargs)


async def test_crash_in_the_request_path_runs_the_ordered_shutdown(
    mosquitto: Server, redis: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request is computing when another one makes the claim step raise TypeError. The
    worker must stop through its ordered shutdown: readiness drops, the in-flight request
    is still completed and its response published (once), the fleet record is removed,
    and `run_worker` ends."""
    control = RunnerControl(monkeypatch)
    root = model_repo(tmp_path / "models", {"digits": {}})
    settings = worker_settings(
        mosquitto.url, redis.url, root, worker={"drain_timeout_s": 30.0, "name": "crash-w"}
    )
    store = _ClaimsExplode(settings.state.url, prefix=settings.state.prefix)
    control.close_gate("digits")
    ledger = Ledger()
    async with (
        serving(settings, state=store, control=control) as w,
        client_of(settings, timeout_s=30) as client,
    ):
        held = asyncio.create_task(
            ledger.send(client, "held", client.encode(_marked(client, "held", 42)), "ok")
        )
        await control.wait_calls(1, model="digits")
        boom = asyncio.create_task(
            client.send_raw("boom", client.encode(_marked(client, "boom", 43)), timeout_s=5)
        )
        try:
            await wait_until(lambda: _not_ready(w.port), 30, "/readyz to stop answering 200")
        finally:
            control.open_all()  # the in-flight batch may finish now
        await held
        await asyncio.gather(boom, return_exceptions=True)
        await w.ended(60)
        duplicates = client.duplicates
    check = await _redis(redis.url)
    try:
        heartbeat = await check.exists(f"{settings.state.prefix}workers:crash-w")
        done = await check.exists(f"{settings.state.prefix}resp:{member('', 'held')}")
    finally:
        await check.aclose()
    assert ledger.lost == [], "the in-flight request was dropped: the ordered shutdown was skipped"
    assert ledger.wrong() == [] and duplicates == 0
    assert done == 1, "the in-flight request was not completed in Redis"
    assert heartbeat == 0, "the fleet record outlived the worker"


async def _not_ready(port: int) -> bool:
    status, _ = await http_get(port, "/readyz")
    return status != 200


# ---------------------------------------------------------------------------- shutdown


async def test_shutdown_is_bounded_by_drain_timeout_and_leaves_the_lease_to_expire(
    mosquitto: Server, redis: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model call that does not come back (blocked far past drain_timeout_s = 2 s):
    setting `stop` ends `run_worker` within drain + 10 s (a liveness bound, not a speed
    claim), and the unanswered request is neither completed nor answered: its record
    stays pending with its lease in Redis, to expire and be re-run elsewhere."""
    control = RunnerControl(monkeypatch, max_block_s=45.0)
    root = model_repo(tmp_path / "models", {"digits": {}})
    drain = 2.0
    settings = worker_settings(
        mosquitto.url,
        redis.url,
        root,
        worker={"drain_timeout_s": drain},
        state={"lease_ms": 60_000},
    )
    control.close_gate("digits")
    async with serving(settings, control=control) as w, client_of(settings, timeout_s=60) as client:
        pending = asyncio.create_task(
            client.send_raw("slow", client.encode(_marked(client, "slow", 7)))
        )
        await control.wait_calls(1, model="digits")
        started = time.monotonic()
        w.stop.set()
        done, _ = await asyncio.wait({w.task}, timeout=drain + 10.0)
        took = time.monotonic() - started
        control.open_all()  # let the stuck thread end; whatever it returns must not publish
        store = await _redis(redis.url)
        try:
            p, m = settings.state.prefix, member("", "slow")
            await asyncio.sleep(1.0)  # room for a wrong late completion to show up
            state = await store.hget(f"{p}req:{m}", "state")
            cached = await store.exists(f"{p}resp:{m}")
            leased = await store.zscore(f"{p}leases", m)
        finally:
            await store.aclose()
        pending.cancel()
        await asyncio.gather(pending, return_exceptions=True)
    print(f"run_worker ended {took:.1f}s after stop (drain_timeout_s {drain})")
    assert done, f"run_worker still running {drain + 10.0}s after stop (drain_timeout_s {drain})"
    assert cached == 0, "a request whose model never returned was completed"
    assert state == b"pending"
    assert leased is not None, "the lease was released instead of left to expire"
