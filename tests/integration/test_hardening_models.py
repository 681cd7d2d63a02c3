"""Hardening of what requests can do to a worker, on real Mosquitto and Redis: metric
label cardinality, quota after dedupe, head-of-line blocking between models, conflicts
dead-lettered, and deadlines (absolute on due retries, relative `ttl_ms`).

Black-box: the worker is `run_worker` observed through its responses, its dead letters,
Redis and `/metrics`. Every test keeps a ledger and states exact pass conditions; waits
are bounded so that a hang fails, and nothing asserts on speed.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from inference_worker.protocol import Request
from tests.integration.lifecycle_helpers import (
    Ledger,
    RunnerControl,
    client_of,
    dead_letters,
    digits_rows,
    encode_raw,
    http_get,
    labels_of,
    marked,
    model_repo,
    serving,
    tensor,
    wait_until,
    worker_settings,
)
from tests.servers import Server

pytestmark = pytest.mark.integration


def _series(text: str) -> list[tuple[str, dict[str, str]]]:
    return [
        (sample.name, dict(sample.labels))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


async def _metrics(port: int) -> str:
    status, body = await http_get(port, "/metrics")
    assert status == 200
    return body.decode()


# ---------------------------------------------------------------------------- metrics


async def test_client_chosen_model_and_app_names_do_not_create_metric_series(
    mosquitto: Server, redis: Server, tmp_path: Path
) -> None:
    """5,000 requests with distinct junk model names (answered `unknown_model`) or distinct
    junk app names (on the served model, answered `ok`): `/metrics` keeps a bounded set of
    series. Model labels come only from served models plus one bucket; no junk name
    appears in any label."""
    root = model_repo(tmp_path / "models", {"digits": {}})
    settings = worker_settings(mosquitto.url, redis.url, root)
    x, _ = digits_rows()
    ledger = Ledger()
    n = 5000
    async with serving(settings) as w, client_of(settings, timeout_s=120) as client:
        for i in range(10):  # the served model's own series exist before the junk
            await ledger.send(
                client,
                f"warm{i}",
                client.encode(Request(f"warm{i}", "digits", {"pixels": x[:1]})),
                "ok",
            )
        before = len(_series(await _metrics(w.port)))

        def junk(i: int) -> tuple[str, bytes, str]:
            id_ = f"j{i}"
            if i % 2:
                req = Request(id_, f"junk-model-{i}", {"pixels": x[:1]}, app=f"junk-app-{i}")
                return id_, client.encode(req), "unknown_model"
            req = Request(
                id_, "digits", {"pixels": x[i % len(x) : i % len(x) + 1]}, app=f"junk-app-{i}"
            )
            return id_, client.encode(req), "ok"

        for start in range(0, n, 250):
            await asyncio.gather(
                *(ledger.send(client, *junk(i)) for i in range(start, min(n, start + 250)))
            )
        text = await _metrics(w.port)
        duplicates = client.duplicates
    series = _series(text)
    models = {labels["model"] for name, labels in series if name == "iw_requests_total"}
    apps = {labels["app"] for _, labels in series if "app" in labels}
    print(ledger.summary(), f"series before {before}, after {len(series)}, models {len(models)}")
    assert ledger.lost == [] and duplicates == 0
    assert ledger.wrong() == []
    assert "junk-" not in text, "a client-chosen name became a label value"
    assert len(models) <= 1 + 1, f"iw_requests_total has {len(models)} model label values"
    assert len(apps) <= 2, f"{len(apps)} app label values for apps nobody configured"
    assert len(series) <= before + 300, f"{len(series) - before} series added by junk names"


# ---------------------------------------------------------------------------- quota


async def test_resend_of_an_answered_request_gets_its_cached_bytes_even_over_quota(
    mosquitto: Server, redis: Server, tmp_path: Path
) -> None:
    """Quota burst 1, refill once per 1000 s: the first request is answered, a second new
    one is `overloaded` (the quota is spent), and a resend of the first request's exact
    bytes is answered from the ledger with the identical cached bytes, not `overloaded`."""
    root = model_repo(tmp_path / "models", {"digits": {}})
    settings = worker_settings(
        mosquitto.url, redis.url, root, quota={"enabled": True, "rate": 0.001, "burst": 1}
    )
    x, _ = digits_rows()
    ledger = Ledger()
    async with serving(settings), client_of(settings, app="quota-app") as client:
        first = client.encode(client.make_request("digits", {"pixels": x[:1]}, id="first"))
        second = client.encode(client.make_request("digits", {"pixels": x[1:2]}, id="second"))
        answered = await ledger.send(client, "first", first, "ok")
        await ledger.send(client, "second", second, "overloaded")
        again = await client.send_raw("first", first)
        duplicates = client.duplicates
    assert ledger.lost == [] and ledger.wrong() == [], ledger.summary()
    assert answered is not None
    code = again.response.error.code.value if again.response.error else again.response.status
    assert code == "ok", f"the resend was answered {code!r} instead of from the ledger"
    assert again.raw == answered.raw, "a resend must get the same bytes"
    assert duplicates == 0


# ---------------------------------------------------------------------------- lanes


async def test_a_saturated_model_does_not_stall_requests_for_another_model(
    mosquitto: Server, redis: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Model `slow` (queue of 2, one instance) is stuck on a call while 30 requests for it
    arrive; then 20 requests for `digits` arrive on the same worker. Every `digits`
    request is answered `ok` while `slow` is still stuck (the flood has not drained);
    then `slow` is released and each of its requests is answered once (`ok`, or the honest
    `overloaded`)."""
    control = RunnerControl(monkeypatch)
    root = model_repo(
        tmp_path / "models",
        {"digits": {}, "slow": {"max_queue": 2, "max_batch_size": 1, "instances": 1}},
    )
    settings = worker_settings(mosquitto.url, redis.url, root)
    x, labels = digits_rows()
    control.close_gate("slow")
    flood, fast = Ledger(), Ledger()
    async with serving(settings, control=control), client_of(settings, timeout_s=90) as client:
        flooding = [
            asyncio.create_task(
                flood.send(
                    client,
                    f"slow{i}",
                    client.encode(Request(f"slow{i}", "slow", {"pixels": marked(200 + i)})),
                    "ok",
                )
            )
            for i in range(30)
        ]
        await control.wait_calls(1, model="slow")
        await asyncio.sleep(0.5)  # the rest of the flood reaches the worker first
        fast_sends = [
            fast.send(
                client,
                f"fast{i}",
                client.encode(Request(f"fast{i}", "digits", {"pixels": x[i : i + 1]})),
                "ok",
                timeout_s=30,
            )
            for i in range(20)
        ]
        await asyncio.gather(*fast_sends)
        slow_calls_meanwhile = control.count(model="slow")
        flood_ok_meanwhile = sum(1 for r in flood.replies.values() if r.response.status == "ok")
        control.open_all()
        await asyncio.gather(*flooding)
        duplicates = client.duplicates
    print(
        "fast:", fast.summary(), "| flood:", flood.summary(),
        f"| slow calls while fast ran {slow_calls_meanwhile}",
    )  # fmt: skip
    assert fast.lost == [], f"{len(fast.lost)} of 20 requests for another model stalled"
    assert fast.wrong() == []
    answered = [fast.replies[f"fast{i}"] for i in range(20)]
    assert labels_of(answered) == [int(v) for v in labels[:20]]
    assert slow_calls_meanwhile == 1 and flood_ok_meanwhile == 0, "the flood drained first"
    assert flood.lost == [] and duplicates == 0
    assert flood.wrong(lambda _, got: got in {"ok", "overloaded"}) == []


# ---------------------------------------------------------------------------- conflicts


async def test_conflicting_resend_is_answered_conflict_and_dead_lettered_once(
    mosquitto: Server, redis: Server, tmp_path: Path
) -> None:
    """Same (app, id), different payload: answered `conflict` and exactly one dead letter
    with code `conflict` (docs/reliability.md); the original stays answered from the
    ledger."""
    root = model_repo(tmp_path / "models", {"digits": {}})
    settings = worker_settings(mosquitto.url, redis.url, root)
    x, _ = digits_rows()
    ledger = Ledger()
    async with dead_letters(settings) as dead, serving(settings), client_of(settings) as client:
        original = client.encode(client.make_request("digits", {"pixels": x[:1]}, id="same"))
        other = client.encode(client.make_request("digits", {"pixels": x[1:2]}, id="same"))
        first = await ledger.send(client, "same", original, "ok")
        clash = await client.send_raw("same", other)
        # A request that is dead-lettered for sure, sent after: once its dead letter is
        # in, a conflict's dead letter (published before it) has had its chance.
        await ledger.send(client, "", b"\x00\x01 not a request", "bad_request")
        await wait_until(
            lambda: any(d["error"]["code"] == "bad_request" for d in dead), 30, "sentinel"
        )
        await asyncio.sleep(0.5)
        again = await client.send_raw("same", original)
        codes = Counter(str(d["error"]["code"]) for d in dead)
    assert first is not None and first.response.status == "ok"
    assert clash.response.error is not None and clash.response.error.code.value == "conflict"
    assert codes["conflict"] == 1, f"dead letters: {dict(codes)}"
    conflict = next(d for d in dead if d["error"]["code"] == "conflict")
    assert conflict["payload"] == other, "the dead letter holds the conflicting request"
    assert again.raw == first.raw


# ---------------------------------------------------------------------------- deadlines


async def test_due_retry_past_its_deadline_is_answered_deadline_exceeded(
    mosquitto: Server, redis: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model fails each request's first attempt; the retry comes ≥ 2 s later
    (retry_base_ms 4000 with ±50% jitter). A request whose deadline (1 s) has passed by
    then is answered `deadline_exceeded` without a second model call; one without a
    deadline is retried and answered `ok` (so the retry path itself works)."""
    control = RunnerControl(monkeypatch)
    # One request per batch: a failed batch of two would be split and each re-run within
    # the same attempt (poison isolation), healing a failure that happens once.
    root = model_repo(tmp_path / "models", {"digits": {"max_batch_size": 1}})
    settings = worker_settings(
        mosquitto.url,
        redis.url,
        root,
        state={"retry_base_ms": 4000, "retry_max_ms": 8000, "reap_interval_s": 0.2},
    )
    control.fail_once(31.0)
    control.fail_once(32.0)
    ledger = Ledger()
    async with serving(settings, control=control), client_of(settings, timeout_s=60) as client:
        deadline_ms = time.time_ns() // 1_000_000 + 1000
        late = client.make_request(
            "digits", {"pixels": marked(31.0)}, id="late", deadline_ms=deadline_ms
        )
        plain = client.make_request("digits", {"pixels": marked(32.0)}, id="plain")
        await asyncio.gather(
            ledger.send(client, "late", client.encode(late), "deadline_exceeded"),
            ledger.send(client, "plain", client.encode(plain), "ok"),
        )
    print(ledger.summary(), f"model calls: late {control.count(marker=31.0)}")
    assert ledger.lost == [] and ledger.wrong() == [], ledger.wrong()
    assert control.count(marker=31.0) == 1, "a request past its deadline was computed again"
    assert control.count(marker=32.0) == 2


async def test_ttl_ms_relative_deadline_expires_in_the_queue(
    mosquitto: Server, redis: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ttl_ms` (milliseconds from receipt, no client clock involved): a request with
    ttl_ms 200 that waits 1.5 s in the queue behind a stuck call is answered
    `deadline_exceeded` and never computed; one with ttl_ms 120000 is computed."""
    control = RunnerControl(monkeypatch)
    root = model_repo(tmp_path / "models", {"digits": {"max_batch_size": 1}})
    settings = worker_settings(mosquitto.url, redis.url, root)
    control.close_gate("digits")
    ledger = Ledger()

    def body(id_: str, marker: float, **extra: Any) -> bytes:
        return encode_raw(
            {"id": id_, "model": "digits", "inputs": {"pixels": tensor(marked(marker))}, **extra}
        )

    async with serving(settings, control=control), client_of(settings, timeout_s=60) as client:
        first = asyncio.create_task(ledger.send(client, "first", body("first", 51.0), "ok"))
        await control.wait_calls(1, model="digits")
        short = asyncio.create_task(
            ledger.send(client, "short", body("short", 52.0, ttl_ms=200), "deadline_exceeded")
        )
        long = asyncio.create_task(
            ledger.send(client, "long", body("long", 53.0, ttl_ms=120_000), "ok")
        )
        await asyncio.sleep(1.5)  # setup, not an assertion: both wait behind `first`
        control.open_all()
        await asyncio.gather(first, short, long)
    print(ledger.summary())
    assert ledger.lost == [] and ledger.wrong() == [], ledger.wrong()
    assert control.count(marker=52.0) == 0, "an expired request was computed"
    assert control.count(marker=53.0) == 1
