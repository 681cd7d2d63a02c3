"""The worker's Redis on a real Redis Cluster (3 primaries, 3 replicas): the URL forms, the
shards' spread over the primaries, and everything a worker keeps there besides the
ledger (the contract suite runs the ledger itself on the cluster): API keys created with
the CLI, per-app quotas whose apps hash to different slots, heartbeats read by
`inference-worker status`, and dead letters read by `inference-worker dlq`.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from redis.crc import key_slot

from inference_worker.auth import RedisKeyStore
from inference_worker.fleet import Heartbeat, read_fleet
from inference_worker.journal import JournalEntry
from inference_worker.metrics import Metrics
from inference_worker.protocol import Request
from inference_worker.quota import MemoryQuota, RedisQuota
from inference_worker.security import TlsOptions, redact_url
from inference_worker.settings import Settings
from inference_worker.state import (
    ClaimRequest,
    Completion,
    StateAccessDenied,
    StateUnavailable,
    member,
    open_state,
)
from inference_worker.state.connect import by_slot, parse_cluster_url
from inference_worker.state.deadletters import NewDeadLetter, RedisDeadLetters
from inference_worker.state.layout import SLOTS, KeyLayout, spread_tags
from inference_worker.state.redis import RedisStateStore
from tests.chaos.harness import expected_labels
from tests.integration.harness import (
    REPO,
    client_for,
    default_topic_client,
    isolated_settings,
    settings_env,
    worker_in_loop,
)
from tests.servers import ClusterServer, Server, redis_cluster_server, require_binary

pytestmark = pytest.mark.integration


def test_cluster_urls_parse_and_fail_without_showing_the_password() -> None:
    parsed = parse_cluster_url("rediss+cluster://u%40x:p%3Aw@h1:7000,[::1]:7001/?shards=64")
    assert parsed.nodes == (("h1", 7000), ("::1", 7001)) and parsed.tls
    assert (parsed.username, parsed.password, parsed.shards) == ("u@x", "p:w", 64)
    assert parse_cluster_url("redis+cluster://h:1").shards == 16
    bad = [
        "redis+cluster://s3cret@/",  # no node
        "redis+cluster://u:s3cret@h1/",  # no port
        "redis+cluster://u:s3cret@h1:1/2",  # a database
        "redis+cluster://u:s3cret@h1:1/?shards=0",
        "redis+cluster://u:s3cret@h1:1/?shards=2000",
        "redis+cluster://u:s3cret@h1:1/?db=1",
    ]
    for url in bad:
        with pytest.raises(ValueError) as err:
            open_state(url)
        assert "s3cret" not in str(err.value), url
    with pytest.raises(ValueError, match="rediss"):
        open_state("redis+cluster://h:1", tls=TlsOptions(ca_file="/ca.pem"))
    assert redact_url("redis+cluster://u:s3cret@h1:1,h2:2/") == "redis+cluster://u:***@h1:1,h2:2/"
    assert isinstance(open_state("rediss+cluster://h:1/"), RedisStateStore)


def test_shard_tags_cover_equal_slot_ranges() -> None:
    for n in (1, 3, 16, 1024):
        tags = spread_tags(n)
        ranges = [key_slot(tag.encode()) * n // SLOTS for tag in tags]
        assert ranges == list(range(n)), n  # tag i hashes into the i-th n-th of the slots
        bases = [shard.base for shard in KeyLayout.sharded("iw:", n).shards]
        assert bases == [f"iw:{{{tag}}}:" for tag in tags]
    layout = KeyLayout.sharded("iw:", 16)
    counts = np.bincount([layout.shard_of(f"3:app:{i}").index for i in range(16_000)], minlength=16)
    assert counts.min() > 800 and counts.max() < 1200  # members spread over the shards
    assert KeyLayout.plain("iw:").shards[0].leases == "iw:leases"  # the single-Redis names


async def test_shards_spread_over_the_primaries(redis_cluster: ClusterServer) -> None:
    """16 shards over 3 primaries owning equal slot ranges: 5 or 6 each."""
    store = RedisStateStore(redis_cluster.url, prefix="spread:")
    await store.start()
    try:
        owners = []
        for shard in store.layout.shards:
            slot = store.client.keyslot(shard.leases)
            owners.append(store.client.nodes_manager.get_node_from_slot(slot).name)
        per_primary = sorted(owners.count(name) for name in set(owners))
        assert per_primary == [5, 5, 6], per_primary
        assert all(
            slot < SLOTS for slot in (store.client.keyslot(s.retry) for s in store.layout.shards)
        )
    finally:
        await store.close()


async def test_quota_buckets_of_apps_in_different_slots(redis_cluster: ClusterServer) -> None:
    """One group of requests from apps in different slots: one call per slot, and the same
    answers as the in-process buckets."""
    store = RedisStateStore(redis_cluster.url, prefix=f"q{uuid.uuid4().hex[:6]}:")
    await store.start()
    try:
        quota = RedisQuota(store.client, store.prefix, rate=0.001, burst=2)
        twin = MemoryQuota(rate=0.001, burst=2)
        apps = ["a", "b", "c", "a", "b", "a", "d", "c", "c"]
        keys = [f"{store.prefix}quota:1:{app}" for app in dict.fromkeys(apps)]
        assert len(by_slot(store.client, keys)) > 1, "the apps must span slots"
        got = await quota.take(apps)
        assert [v == 0 for v in got] == [v == 0 for v in await twin.take(apps)]
        assert [v == 0 for v in got] == [True, True, True, True, True, False, True, True, False]
    finally:
        await store.close()


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inference_worker.cli", *args],
        env=settings_env(settings),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_a_worker_on_the_cluster_keys_heartbeats_and_dead_letters(
    mosquitto: Server, redis_cluster: ClusterServer
) -> None:
    settings = isolated_settings(
        mosquitto.url,
        redis_cluster.url,
        auth={"mode": "required", "cache_ttl_s": 60.0},
        quota={"enabled": True, "rate": 1000.0, "burst": 1000},
        worker={"name": f"cw-{uuid.uuid4().hex[:6]}", "heartbeat_s": 0.5},
        models={"names": ["digits"]},
    )
    created = await asyncio.to_thread(
        _cli, settings, "keys", "create", "--app", "plant-3", "--json"
    )
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)["key"]
    x, expected = expected_labels()  # what the model answers for each held-out input
    n = 40

    def req(i: int, pixels: np.ndarray) -> Request:
        return Request(id=f"c{i}", model="digits", inputs={"pixels": pixels}, key=key)

    async with (
        worker_in_loop(settings),
        client_for(settings, resend_after_s=None) as client,
        default_topic_client(settings, resend_after_s=None) as refused,
    ):
        replies = await asyncio.gather(*(client.send(req(i, x[i : i + 1])) for i in range(n)))
        again = await asyncio.gather(*(client.send(req(i, x[i : i + 1])) for i in range(n)))
        # Refused before its key is checked: answered on the default topic.
        wrong_shape = await refused.send(req(n, x[:1, :10]))
        nokey = await refused.send(Request(id="nokey", model="digits", inputs={"pixels": x[:1]}))
        status = await asyncio.to_thread(_cli, settings, "status", "--json")
        letters = await asyncio.to_thread(_cli, settings, "dlq", "list", "--json")
    labels = [int(r.response.outputs["label"][0]) for r in replies]  # type: ignore[index]
    assert labels == [int(v) for v in expected[:n]]
    assert all(r.response.app == "plant-3" for r in replies)
    # Resends are answered from the cluster's cache, byte for byte.
    assert [a.raw for a in again] == [r.raw for r in replies]
    assert wrong_shape.response.error is not None
    assert wrong_shape.response.error.code.value == "invalid_input"
    assert nokey.response.error is not None and nokey.response.error.code.value == "unauthorized"
    assert status.returncode == 0, status.stderr
    fleet = {rec["id"]: rec for rec in json.loads(status.stdout)}
    assert fleet[settings.worker.name]["stale"] is False, fleet
    assert letters.returncode == 0, letters.stderr
    kept = [json.loads(line) for line in letters.stdout.splitlines() if line.strip()]
    assert sorted((k["code"], k["id"]) for k in kept) == [
        ("invalid_input", f"c{n}"),
        ("unauthorized", "nokey"),
    ], kept


# ---------------------------------------------------------------------------- TLS + ACL

CLUSTER_PASSWORD = "iwc-" + secrets.token_hex(8)


@pytest.fixture(scope="module")
def secure_cluster() -> Iterator[tuple[ClusterServer, str]]:
    """A TLS-only cluster whose users are the shipped brokers/redis/users.acl.example
    (password filled in) plus an admin for replication and the fixture's own checks."""
    require_binary("openssl")
    with tempfile.TemporaryDirectory(prefix="iw-ccerts-") as tmp:
        out = Path(tmp)
        subprocess.run(
            [str(REPO / "scripts" / "gen_dev_certs.sh"), str(out), "localhost,127.0.0.1"],
            check=True,
            capture_output=True,
        )
        shipped = (REPO / "brokers" / "redis" / "users.acl.example").read_text()
        lines = [line for line in shipped.splitlines() if line and not line.startswith("#")]
        acl = out / "users.acl"
        users = [line.replace(">CHANGE_ME ", f">{CLUSTER_PASSWORD} ") for line in lines]
        acl.write_text("\n".join([*users, "user admin on >admin ~* &* +@all", ""]))
        tls = (str(out / "server.crt"), str(out / "server.key"), str(out / "ca.crt"))
        with redis_cluster_server(tls=tls, aclfile=str(acl), admin=("admin", "admin")) as c:
            yield c, tls[2]


async def test_shipped_acl_user_over_tls_runs_the_ledger_and_the_rest(
    secure_cluster: tuple[ClusterServer, str],
) -> None:
    cluster, ca = secure_cluster
    url = cluster.url_with("", f"iw:{CLUSTER_PASSWORD}@")
    store = RedisStateStore(url, prefix="iw:", tls=TlsOptions(ca))
    await store.start()
    try:
        reqs = [
            ClaimRequest("tls", str(i), "fp", JournalEntry(b"p", "t", None, None))
            for i in range(40)
        ]
        claimed = await store.claim(reqs, nonce="n", lease_ms=60_000, max_attempts=3)
        assert len(store.layout.group([member("tls", r.id) for r in reqs])) > 1
        done = [
            Completion("tls", r.id, c.token or "", r.id.encode())
            for r, c in zip(reqs, claimed, strict=True)
        ]
        assert all(await store.complete(done, result_ttl_s=60))
        again = await store.claim(reqs, nonce="m", lease_ms=60_000, max_attempts=3)
        assert [a.response for a in again] == [r.id.encode() for r in reqs]
        assert await store.reap_expired(lease_ms=1000, max_attempts=3) == []
        # Everything else a worker keeps in Redis, as the shipped user.
        quota = RedisQuota(store.client, "iw:", rate=1.0, burst=5)
        assert await quota.take(["a", "b", "c"]) == [0, 0, 0]
        keys = RedisKeyStore(store.client, "iw:")
        key = await keys.create("tls-app")
        assert [k.app for k in (await keys.lookup([key.split("_")[1]])).values()] == ["tls-app"]
        beat = Heartbeat(
            store.client, prefix="iw:", name="w-tls", interval_s=5.0, metrics=Metrics(),
            info={}, queue_depth=lambda: 0, draining=lambda: False,
        )  # fmt: skip
        await beat.beat()
        assert [w["id"] for w in await read_fleet(store.client, "iw:")] == ["w-tls"]
        letters = RedisDeadLetters(lambda: store.client, "iw:", max_entries=100)
        letter = NewDeadLetter(
            JournalEntry(b"x", "t", None, None),
            "bad_request",
            "m",
            "a",
            "1",
            "digits",
            None,
            "w",
            1,
        )
        assert await letters.add([letter, letter]) == 2
    finally:
        await store.close()
    one = f"rediss+cluster://iw:{{}}@127.0.0.1:{cluster.nodes[0].port}/"  # one node to try
    wrong = RedisStateStore(one.format("nope"), tls=TlsOptions(ca))
    with pytest.raises(StateAccessDenied) as err:
        await wrong.start()
    assert "nope" not in str(err.value)
    unverified = RedisStateStore(one.format(CLUSTER_PASSWORD))  # system CAs: dev CA unknown
    with pytest.raises(StateUnavailable) as err2:
        await unverified.start()
    assert CLUSTER_PASSWORD not in str(err2.value)
