"""The worker under state and compute failures: Redis down during API-key lookups, Redis
refusing writes while requests are in flight, and a model call that never returns. Real
Mosquitto and Redis (a private Redis here: these tests stop it and change its config).

Ledgers: every id sent, its answers (count, status, value) and the worker's liveness.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis

from inference_worker.client import InferenceClient, Reply
from inference_worker.settings import Settings
from tests.integration.hostile import (
    HANG,
    captured_logs,
    create_key,
    expected_digits,
    gate,
    gated_repository,
    heldout,
    hostile_settings,
    metric_total,
    scrape,
    worker_in_loop,
)
from tests.models import require_modules
from tests.servers import Server, redis_server

pytestmark = pytest.mark.integration


def _client(settings: Settings, **kwargs: Any) -> InferenceClient:
    return InferenceClient.connect(
        settings.broker.url,
        request_topic=settings.broker.request_topic,
        response_topic=settings.broker.response_topic,
        **kwargs,
    )


async def _wait(done: Callable[[], Awaitable[bool]], within_s: float, what: str) -> None:
    """Poll `done()` (a test-side counter or a scrape) until true, bounded."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not await done():
        assert loop.time() < deadline, f"not within {within_s}s: {what}"
        await asyncio.sleep(0.05)


async def test_a_redis_outage_during_api_key_lookups_leaves_the_worker_serving(
    mosquitto: Server,
) -> None:
    with redis_server() as redis:
        settings = hostile_settings(
            mosquitto.url,
            redis.url,
            # A 10 ms key cache: nearly every group looks its keys up in Redis, also the
            # first one after Redis went down (a longer cache lets that one claim first,
            # and the claim's own retry then holds intake until Redis is back).
            auth={"mode": "required", "cache_ttl_s": 0.01},
            state={"reconnect_backoff_max_s": 0.5},
        )
        key = create_key(redis.url, settings.state.prefix, "sensor")
        x, _ = heldout()
        n = 120
        labels = expected_digits(x[:n])
        replies: dict[str, Reply] = {}
        failures: Counter[str] = Counter()
        async with (
            worker_in_loop(settings) as worker,
            # Resends (same id, same bytes) recover requests the outage swallowed.
            _client(settings, app="sensor", resend_after_s=2.0, timeout_s=60.0) as client,
        ):

            async def ask(i: int) -> None:
                request = client.make_request(
                    "digits", {"pixels": x[i : i + 1]}, id=f"k{i}", key=key
                )
                try:
                    replies[request.id] = await client.send(request)
                except (TimeoutError, ConnectionError) as exc:
                    failures[type(exc).__name__] += 1

            async def stream() -> list[asyncio.Task[None]]:
                tasks = []
                for i in range(n):  # one request every 50 ms, through the outage
                    tasks.append(asyncio.create_task(ask(i)))
                    await asyncio.sleep(0.05)
                return tasks

            streaming = asyncio.create_task(stream())
            await asyncio.sleep(1.0)
            await asyncio.to_thread(redis.stop)
            await asyncio.sleep(3.0)  # the outage
            await asyncio.to_thread(redis.start)  # same port, same data (AOF)
            await asyncio.gather(*await streaming)
            await asyncio.sleep(1.0)  # late copies of resent answers arrive by now
            crashed = worker.crashed()
            duplicates = client.duplicates
    lost = [f"k{i}" for i in range(n) if f"k{i}" not in replies]
    wrong = [
        id_
        for id_, r in replies.items()
        if r.response.status != "ok"
        or r.response.outputs is None
        or int(r.response.outputs["label"][0]) != labels[int(id_[1:])]
    ]
    resent = sum(r.sends - 1 for r in replies.values())
    print(
        f"redis outage during key lookups: sent {n}, answered {len(replies)}, lost {len(lost)}, "
        f"wrong {len(wrong)}, resends {resent}, duplicate answers {duplicates}, failures "
        f"{dict(failures)}; worker {crashed or 'up'}"
    )
    assert crashed is None, f"the worker stopped: {crashed}"
    assert not lost and not wrong, (lost[:5], wrong[:5])


def _gated_settings(mosquitto: Server, redis: Server, root: Path, **sections: Any) -> Settings:
    return hostile_settings(
        mosquitto.url, redis.url, models={"root": str(root), "names": ["gated"]}, **sections
    )


def _rows(n: int) -> np.ndarray:
    return (np.arange(n * 4, dtype=np.float32).reshape(n, 4) + 0.5) / 7.0


def _outcome(reply: Reply, row: np.ndarray) -> str:
    """'ok' (y = x + 1), an error code, or 'wrong'."""
    r = reply.response
    if r.status == "ok":
        ok = r.outputs is not None and np.allclose(r.outputs["y"][0], row + 1)
        return "ok" if ok else "wrong"
    return r.error.code.value if r.error else "wrong"


async def test_redis_refusing_writes_mid_flight_never_leaves_a_request_unanswered(
    mosquitto: Server, tmp_path: Path
) -> None:
    require_modules("torch")
    control = gate()
    control.reset()
    with redis_server() as redis:
        settings = _gated_settings(
            mosquitto,
            redis,
            gated_repository(tmp_path / "models"),
            state={"lease_ms": 1000, "max_lease_ms": 4000, "reap_interval_s": 0.2},
        )
        n = 24
        rows = _rows(n)
        replies: dict[str, Reply] = {}
        failures: Counter[str] = Counter()
        admin = aioredis.Redis(port=redis.port)
        try:
            with captured_logs() as logs:
                async with (
                    worker_in_loop(settings) as worker,
                    _client(settings, resend_after_s=None, timeout_s=60.0) as client,
                ):
                    assert worker.metrics_port is not None
                    port = worker.metrics_port

                    async def ask(i: int) -> None:
                        request = client.make_request("gated", {"x": rows[i : i + 1]}, id=f"m{i}")
                        try:
                            replies[request.id] = await client.send(request)
                        except (TimeoutError, ConnectionError) as exc:
                            failures[type(exc).__name__] += 1

                    control.reset()  # forget the warm-up call made at load
                    control.open.clear()  # every model call waits: requests stay in flight
                    sends = [asyncio.create_task(ask(i)) for i in range(n)]

                    async def claimed() -> bool:
                        # /metrics is served by this event loop: read it from a thread.
                        values = await asyncio.to_thread(scrape, port)
                        return control.calls >= 1 and metric_total(values, "iw_dedup_total") >= n

                    await _wait(claimed, 30, "all claimed")
                    await admin.config_set("maxmemory-policy", "noeviction")
                    await admin.config_set("maxmemory", 1)  # every write: OOM
                    control.open.set()  # the computed batches now fail to complete
                    await asyncio.sleep(3.0)  # the fault
                    await admin.config_set("maxmemory", 0)
                    await asyncio.gather(*sends)
                    await asyncio.sleep(1.0)  # a second copy of an answer arrives by now
                    crashed = worker.crashed()
                    duplicates = client.duplicates
                    state_errors = -1.0  # not scraped: the endpoint is gone with the worker
                    if crashed is None:
                        final = await asyncio.to_thread(scrape, port)
                        state_errors = metric_total(final, "iw_state_errors_total")
        finally:
            control.release_all()
            await admin.aclose()
    outcomes = Counter(_outcome(r, rows[int(i[1:])]) for i, r in replies.items())
    lost = [f"m{i}" for i in range(n) if f"m{i}" not in replies]
    print(
        f"redis OOM mid-flight: sent {n}, outcomes {dict(outcomes)}, lost {len(lost)}, duplicate "
        f"answers {duplicates}, failures {dict(failures)}; iw_state_errors {state_errors}, "
        f"warnings logged {len(logs)}; worker {crashed or 'up'}"
    )
    assert crashed is None, f"the worker stopped: {crashed}"
    assert not lost, f"never answered: {lost[:5]} ({len(lost)})"
    assert set(outcomes) <= {"ok", "exhausted"}, outcomes
    assert duplicates == 0
    assert state_errors > 0 or logs, "the refused writes were neither logged nor counted"


async def test_a_model_call_that_never_returns_is_answered_and_others_keep_flowing(
    mosquitto: Server, redis: Server, tmp_path: Path
) -> None:
    require_modules("torch")
    control = gate()
    control.reset()
    settings = _gated_settings(
        mosquitto,
        redis,
        gated_repository(tmp_path / "models"),
        worker={"compute_timeout_s": 1},
        state={"max_attempts": 2},
    )
    n = 30
    rows = _rows(n)
    hung_row = np.full((1, 4), HANG, np.float32)
    replies: dict[str, Reply] = {}
    failures: Counter[str] = Counter()
    try:
        async with (
            worker_in_loop(settings) as worker,
            _client(settings, resend_after_s=None, timeout_s=45.0) as client,
        ):

            async def ask(id_: str, x: np.ndarray) -> None:
                try:
                    replies[id_] = await client.send(client.make_request("gated", {"x": x}, id=id_))
                except (TimeoutError, ConnectionError) as exc:
                    failures[f"{id_}: {type(exc).__name__}"] += 1

            control.reset()  # forget the warm-up call made at load
            hung = asyncio.create_task(ask("hung", hung_row))

            async def hung_started() -> bool:
                return control.hung >= 1

            await _wait(hung_started, 30, "the hung call started")
            await asyncio.gather(*(ask(f"g{i}", rows[i : i + 1]) for i in range(n)))
            await hung
            await asyncio.sleep(0.5)
            crashed = worker.crashed()
            duplicates = client.duplicates
            control.release_all()  # before shutdown: the held pool threads finish
    finally:
        control.release_all()
    good = Counter(_outcome(replies[f"g{i}"], rows[i]) for i in range(n) if f"g{i}" in replies)
    hung_answer = replies.get("hung")
    hung_outcome = _outcome(hung_answer, hung_row[0]) if hung_answer else "never answered"
    print(
        f"hung model call: hung request {hung_outcome} (calls hung {control.hung}); {n} others: "
        f"{dict(good)}, duplicates {duplicates}, failures {dict(failures)}; "
        f"worker {crashed or 'up'}"
    )
    assert crashed is None, f"the worker stopped: {crashed}"
    assert hung_outcome == "exhausted", f"the hung request: {hung_outcome}"
    assert good == {"ok": n}, good
    assert duplicates == 0
