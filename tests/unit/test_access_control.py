"""API keys, per-app quotas and key hygiene, through the whole worker (in-memory)."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest

from inference_worker.auth import Authenticator, AuthMode, MemoryKeyStore, split_key
from inference_worker.client import InferenceClient
from inference_worker.protocol import Request, WireCodec
from inference_worker.quota import MemoryQuota, parse_weights
from inference_worker.settings import Settings
from inference_worker.transports import connect
from inference_worker.transports.base import TransportOptions
from tests.unit.test_worker_memory import _digits, _settings, pipeline


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# Errors for requests whose app is not authenticated go only to the default topic, so
# these clients listen there (docs/security.md).
DEFAULT = "response_message"


def _any_reply() -> Settings:
    """These tests are about keys and quotas, not reply scoping: any response_message/…"""
    return _settings(broker={"reply_to_allowed": ["response_message", "response_message/#"]})


def _req(x: np.ndarray, id_: str, key: str | None, app: str = "") -> Request:
    return Request(id=id_, model="digits", inputs={"pixels": x[0:1]}, key=key, app=app)


async def test_required_keys_identify_the_app_and_refuse_everything_else() -> None:
    x, _ = _digits()
    store = MemoryKeyStore()
    key = store.create("sensor-7")
    other = MemoryKeyStore().create("sensor-7")  # well-formed, but not in this store
    auth = Authenticator(store, AuthMode.REQUIRED)
    async with pipeline(_any_reply(), auth=auth, client_reply_to=DEFAULT) as (
        worker,
        client,
        runner,
        _,
    ):
        ok = await client.send(_req(x, "k1", key))
        missing = await client.send(_req(x, "k2", None))
        wrong = await client.send(_req(x, "k3", other))
        garbage = await client.send(_req(x, "k4", "not-a-key"))
        claimed_other_app = await client.send(_req(x, "k5", key, app="sensor-8"))
    assert ok.response.status == "ok" and ok.response.app == "sensor-7"
    for reply in (missing, wrong, garbage, claimed_other_app):
        assert reply.response.error is not None
        assert reply.response.error.code.value == "unauthorized"
    assert runner.calls == 1, "no compute for unauthorized requests"
    assert worker.stats.errors["unauthorized"] == 4


async def test_revocation_takes_effect_within_the_cache_ttl() -> None:
    x, _ = _digits()
    store = MemoryKeyStore()
    key = store.create("app-a")
    clock = Clock()
    auth = Authenticator(store, AuthMode.REQUIRED, cache_ttl_s=30.0, clock=clock)
    async with pipeline(_any_reply(), auth=auth, client_reply_to=DEFAULT) as (_, client, _, _):
        before = await client.send(_req(x, "r1", key))
        parts = split_key(key)
        assert parts is not None
        store.revoke(parts[0])
        cached = await client.send(_req(x, "r2", key))  # within the TTL: still cached
        clock.now = 30.0
        after = await client.send(_req(x, "r3", key))
    assert before.response.status == "ok" and cached.response.status == "ok"
    assert after.response.error is not None and after.response.error.code.value == "unauthorized"
    assert "revoked" in after.response.error.message


async def test_optional_mode_accepts_keyless_requests_but_checks_sent_keys() -> None:
    x, _ = _digits()
    auth = Authenticator(MemoryKeyStore(), AuthMode.OPTIONAL)
    async with pipeline(_any_reply(), auth=auth, client_reply_to=DEFAULT) as (_, client, _, _):
        keyless = await client.send(_req(x, "o1", None, app="free"))
        bad = await client.send(_req(x, "o2", "iwk_0123456789abcdef_nope"))
    assert keyless.response.status == "ok" and keyless.response.app == "free"
    assert bad.response.error is not None and bad.response.error.code.value == "unauthorized"


async def test_over_quota_is_overloaded_with_retry_after_and_costs_no_compute() -> None:
    x, _ = _digits()
    clock = Clock()
    quota = MemoryQuota(rate=2.0, burst=3, clock=clock)
    async with pipeline(_any_reply(), quota=quota) as (worker, client, runner, _):
        replies = [await client.send(_req(x, f"q{i}", None, app="chatty")) for i in range(5)]
        other = await client.send(_req(x, "q-other", None, app="quiet"))
        clock.now = 1.0  # two tokens back
        later = await client.send(_req(x, "q-later", None, app="chatty"))
    statuses = [r.response.status for r in replies]
    assert statuses == ["ok", "ok", "ok", "error", "error"]
    err = replies[3].response.error
    assert err is not None and err.code.value == "overloaded" and err.retryable
    assert err.retry_after_ms == 500  # one token at 2/s
    assert other.response.status == "ok", "one app's quota does not touch another's"
    assert later.response.status == "ok"
    assert runner.calls == 5 and worker.stats.errors["overloaded"] == 2


async def test_keys_never_reach_logs_or_reprs(caplog: pytest.LogCaptureFixture) -> None:
    x, _ = _digits()
    store = MemoryKeyStore()
    key = store.create("app-a")
    forged = key[:-4] + "XXXX"
    caplog.set_level(logging.DEBUG)
    async with pipeline(
        _any_reply(), auth=Authenticator(store, AuthMode.REQUIRED), client_reply_to=DEFAULT
    ) as (
        _,
        client,
        _,
        _,
    ):
        await client.send(_req(x, "l1", key))
        await client.send(_req(x, "l2", forged))
    text = caplog.text + repr(_req(x, "l3", key))
    assert key not in text and forged not in text
    # The secret itself is url-safe base64 and may contain "_": split off the prefix and
    # the hex key id only, never on every "_" (a one-character tail matches anything).
    secret = key.split("_", 2)[2]
    assert len(secret) >= 24 and secret not in text


def test_weights_parse() -> None:
    assert parse_weights(["gold=3", "a=b=1"]) == {"gold": 3, "a=b": 1}
    with pytest.raises(ValueError):
        parse_weights(["gold"])


async def test_reply_topics_are_scoped_to_the_app_named_by_the_key() -> None:
    """Default reply_to_allowed: response_message or response_message/{app}/#, where the
    app is the final one (here named by the API key, not by the envelope). A refused
    reply topic gets nothing: the error goes to the plain response_message topic."""
    x, _ = _digits()
    store = MemoryKeyStore()
    key = store.create("sensor-7")
    auth = Authenticator(store, AuthMode.REQUIRED)
    async with pipeline(_settings(), auth=auth) as (worker, _client, _, broker):
        plain = connect(
            "memory://", TransportOptions(client_id="ops", subscriptions=("response_message",)),
            memory=broker,
        )  # fmt: skip
        await plain.start()
        own = InferenceClient.connect(
            "memory://", memory=broker, app="sensor-7", resend_after_s=None
        )
        other = InferenceClient.connect(
            "memory://", memory=broker, app="sensor-8", resend_after_s=None
        )
        await own.start()
        await other.start()
        try:
            ok = await own.send(_req(x, "s1", key))  # reply under response_message/sensor-7/
            # The same key, replies asked for under another app's topic: refused.
            with pytest.raises(TimeoutError):
                await other.send(_req(x, "s2", key), timeout_s=1.0)
            refused = await asyncio.wait_for(plain.deliveries().__anext__(), 5)
        finally:
            await own.close()
            await other.close()
            await plain.close()
    assert own.reply_to.startswith("response_message/sensor-7/")
    assert ok.response.status == "ok" and ok.response.app == "sensor-7"
    error = WireCodec().decode_response(refused.payload)
    assert error.id == "s2" and error.error is not None
    assert error.error.code.value == "bad_request" and "reply topic" in error.error.message
    assert worker.stats.dead_letters == 1


async def test_a_key_named_app_survives_a_take_over() -> None:
    """The journal holds the envelope as sent (no app: the key named it); a take-over must
    address the ledger's record, i.e. the key's app, or it could never complete."""
    x, y = _digits()
    store = MemoryKeyStore()
    key = store.create("sensor-7")
    fast = {
        "state": {"lease_ms": 100, "reap_interval_s": 0.02},
        "broker": {"reply_to_allowed": ["response_message/#"]},
    }
    async with pipeline(_settings(**fast), auth=Authenticator(store, AuthMode.REQUIRED)) as (
        worker,
        client,
        runner,
        _,
    ):
        runner.gate.clear()  # the first attempt stalls past its lease...
        send = asyncio.create_task(client.send(_req(x, "t1", key)))
        while worker.stats.dedup["new"] < 1:
            await asyncio.sleep(0.01)
        worker.leases._held.clear()  # ...and is not renewed, as if its worker had stalled
        await asyncio.sleep(0.3)
        runner.gate.set()
        reply = await send
        await asyncio.sleep(0.1)
    assert reply.response.status == "ok" and reply.response.app == "sensor-7"
    assert int(reply.response.outputs["label"][0]) == int(y[0])  # type: ignore[index]
    assert worker.stats.taken_over == 1
