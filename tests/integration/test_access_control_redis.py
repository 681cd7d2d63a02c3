"""API keys created with the CLI and quotas enforced in Redis, through a real worker."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import numpy as np
import pytest

from inference_worker.protocol import Request
from inference_worker.quota import RedisQuota
from inference_worker.state.redis import RedisStateStore
from tests.integration.harness import (
    REPO,
    client_for,
    default_topic_client,
    heldout,
    isolated_settings,
    worker_in_loop,
)
from tests.servers import Server

pytestmark = pytest.mark.integration


def _keys(redis_url: str, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inference_worker.cli", "keys", *args,
         "--state", redis_url, "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
        env={"IW_STATE__PREFIX": prefix, "PATH": "/usr/bin:/bin"},
    )  # fmt: skip


async def test_keys_from_the_cli_gate_a_worker_on_real_servers(
    mosquitto: Server, redis: Server
) -> None:
    settings = isolated_settings(
        mosquitto.url, redis.url, auth={"mode": "required", "cache_ttl_s": 0.2}
    )
    prefix = settings.state.prefix
    created = _keys(redis.url, prefix, "create", "--app", "sensor-7")
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)["key"]
    listed = json.loads(_keys(redis.url, prefix, "list").stdout)
    assert [(k["app"], k["revoked"]) for k in listed] == [("sensor-7", False)]
    assert key not in json.dumps(listed), "the key itself is never stored or listed"
    x, y = heldout()

    def req(id_: str, key_: str | None) -> Request:
        return Request(id=id_, model="digits", inputs={"pixels": x[3:4]}, key=key_)

    async with (
        worker_in_loop(settings),
        client_for(settings, resend_after_s=None) as client,
        # Errors for unauthenticated requests are answered only on the default topic.
        default_topic_client(settings, resend_after_s=None) as refused,
    ):
        ok = await client.send(req("a1", key))
        nokey = await refused.send(req("a2", None))
        revoked = _keys(redis.url, prefix, "revoke", "--key-id", listed[0]["key_id"])
        assert revoked.returncode == 0, revoked.stdout + revoked.stderr
        await asyncio.sleep(0.3)  # past auth.cache_ttl_s
        after = await refused.send(req("a3", key))
    assert ok.response.status == "ok" and ok.response.app == "sensor-7"
    assert int(ok.response.outputs["label"][0]) == int(y[3])  # type: ignore[index]
    assert nokey.response.error is not None and nokey.response.error.code.value == "unauthorized"
    assert after.response.error is not None and after.response.error.code.value == "unauthorized"


async def test_redis_token_buckets_are_per_app_and_shared_by_the_fleet(redis: Server) -> None:
    a = RedisStateStore(redis.url, prefix="iw-quota-test:")
    b = RedisStateStore(redis.url, prefix="iw-quota-test:")
    await a.start()
    await b.start()
    try:
        qa = RedisQuota(a.client, "iw-quota-test:", rate=1.0, burst=3)
        qb = RedisQuota(b.client, "iw-quota-test:", rate=1.0, burst=3)
        # Two workers draw from one bucket per app: 3 + 2 requests of app x, 1 of app y.
        first = await qa.take(["x", "x", "y"])
        second = await qb.take(["x", "x", "x"])
    finally:
        await a.close()
        await b.close()
    assert first == [0, 0, 0]
    assert second[0] == 0
    assert all(0 < ms <= 1000 for ms in second[1:]), second
    assert np.all(np.diff(second[1:]) >= 0)
