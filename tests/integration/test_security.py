"""Transport security against real servers: Mosquitto with TLS, a password file and the
shipped ACL (brokers/mosquitto/acl); Redis over TLS with the shipped ACL users
(brokers/redis/users.acl.example). Certificates are made at test time by
scripts/gen_dev_certs.sh (openssl CLI) into a temporary directory.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from inference_worker.client import InferenceClient
from inference_worker.fleet import read_fleet
from inference_worker.journal import JournalEntry
from inference_worker.pipeline import Worker
from inference_worker.security import TlsOptions
from inference_worker.settings import Settings
from inference_worker.state import StateAccessDenied, StateUnavailable
from inference_worker.state.base import ClaimOutcome, ClaimRequest, Completion
from inference_worker.state.redis import RedisStateStore
from inference_worker.transports.base import TransportOptions
from inference_worker.transports.mqtt import MqttTransport
from tests.integration.harness import REPO, heldout, isolated_settings, worker_in_loop
from tests.servers import Server, mosquitto_server, redis_server, require_binary

pytestmark = pytest.mark.integration

MQTT_USERS = {"worker": "w-" + secrets.token_hex(8), "sensor-7": "s7-" + secrets.token_hex(8)}
REDIS_PASSWORD = "iw-" + secrets.token_hex(8)
NOEVAL_PASSWORD = "ne-" + secrets.token_hex(8)


@dataclass(frozen=True)
class Certs:
    dir: Path

    @property
    def ca(self) -> str:
        return str(self.dir / "ca.crt")

    def __getitem__(self, name: str) -> str:
        return str(self.dir / name)


@pytest.fixture(scope="module")
def certs() -> Iterator[Certs]:
    require_binary("openssl")
    # Not under pytest's 0700 tmp tree: Mosquitto started as root drops to its own user
    # before it reads the TLS, password and ACL files.
    with tempfile.TemporaryDirectory(prefix="iw-certs-") as tmp:
        out = Path(tmp)
        out.chmod(0o755)
        subprocess.run(
            [str(REPO / "scripts" / "gen_dev_certs.sh"), str(out), "localhost,127.0.0.1"],
            check=True,
            capture_output=True,
        )
        yield Certs(out)


@pytest.fixture(scope="module")
def secure_mosquitto(certs: Certs) -> Iterator[Server]:
    passwd_tool = require_binary("mosquitto_passwd")
    passwd = certs.dir / "passwd"
    for i, (user, password) in enumerate(MQTT_USERS.items()):
        create = ["-c"] if i == 0 else []
        subprocess.run([passwd_tool, *create, "-b", str(passwd), user, password], check=True)
    passwd.chmod(0o644)
    with mosquitto_server(
        listener_conf=(
            f"cafile {certs.ca}\ncertfile {certs['server.crt']}\n"
            f"keyfile {certs['server.key']}\ntls_version tlsv1.2\n"
        ),
        allow_anonymous=False,
        extra_conf=f"password_file {passwd}\nacl_file {REPO / 'brokers' / 'mosquitto' / 'acl'}\n",
        scheme="mqtts",
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def acl_redis(certs: Certs) -> Iterator[Server]:
    """Redis over TLS only, with the shipped users (password filled in) plus a user
    without EVALSHA and an admin for the test's own checks."""
    shipped = (REPO / "brokers" / "redis" / "users.acl.example").read_text()
    assert ">CHANGE_ME " in shipped
    lines = [line for line in shipped.splitlines() if line and not line.startswith("#")]
    iw = next(line for line in lines if line.startswith("user iw "))
    noeval = iw.replace("user iw ", "user noeval ").replace(" +evalsha", "")
    acl = certs.dir / "users.acl"
    acl.write_text(
        "\n".join(
            [
                *(line.replace(">CHANGE_ME ", f">{REDIS_PASSWORD} ") for line in lines),
                noeval.replace(">CHANGE_ME ", f">{NOEVAL_PASSWORD} "),
                "user admin on >admin ~* &* +@all",
                "",
            ]
        )
    )
    tls = (certs["server.crt"], certs["server.key"], certs.ca)
    with redis_server(extra_args=["--aclfile", str(acl)], tls=tls) as srv:
        yield srv


def secret_file(tmp_path: Path, name: str, value: str) -> str:
    path = tmp_path / name
    path.write_text(value + "\n")  # as `echo` writes it: the newline is stripped
    return str(path)


def secure_settings(
    tmp_path: Path, mosquitto: Server, redis: Server, certs: Certs, **state: str
) -> Settings:
    return isolated_settings(
        mosquitto.url,
        redis.url,
        broker={
            # The ACL's topics (not the harness's per-test ones): the broker is ours alone.
            "request_topic": "request_message",
            "response_topic": "response_message",
            "dlq_topic": "request_message.dlq",
            "reply_to_allowed": ["response_message", "response_message/{app}/#"],  # the default
            "username": "worker",
            "password_file": secret_file(tmp_path, "mqtt.password", MQTT_USERS["worker"]),
            "tls_ca_file": certs.ca,
        },
        state={
            "prefix": "iw:",
            "username": "iw",
            "password_file": secret_file(tmp_path, "redis.password", REDIS_PASSWORD),
            "tls_ca_file": certs.ca,
            **state,
        },
    )


@asynccontextmanager
async def device(
    settings: Settings, certs: Certs, user: str = "sensor-7", **kwargs: Any
) -> AsyncIterator[InferenceClient]:
    """A device logged in as `user`, publishing on request_message/digits/<user>."""
    kwargs.setdefault("timeout_s", 30.0)
    client = InferenceClient.connect(
        settings.broker.url,
        client_id=user,
        # Reply topic response_message/<app>/<client id>: the ACL lets this user read
        # response_message/<user>/#, and reply_to_allowed admits response_message/{app}/#.
        app=user,
        username=user,
        password=MQTT_USERS[user],
        tls_ca_file=certs.ca,
        request_topic=f"request_message/digits/{user}",
        response_topic=settings.broker.response_topic,
        **kwargs,
    )
    await client.start()
    try:
        yield client
    finally:
        await client.close()


# --- MQTT ---------------------------------------------------------------------------


async def test_worker_over_mqtts_answers_a_device_on_its_own_topic(
    tmp_path: Path, secure_mosquitto: Server, acl_redis: Server, certs: Certs
) -> None:
    settings = secure_settings(tmp_path, secure_mosquitto, acl_redis, certs)
    assert MQTT_USERS["worker"] not in repr(settings) and REDIS_PASSWORD not in repr(settings)
    x, y = heldout()
    async with worker_in_loop(settings) as worker, device(settings, certs) as client:
        request = client.make_request("digits", {"pixels": x[:1]}, id="d-1")
        first = await client.send(request)
        again = await client.send(request)  # same id: answered from Redis, not recomputed
        fleet = await read_fleet(worker_state(worker).client, "iw:")
    assert first.response.status == "ok", first.response.error
    assert first.response.app == "sensor-7"  # taken from the topic the ACL binds to the user
    assert int(first.response.outputs["label"][0]) == int(y[0])  # type: ignore[index]
    assert again.raw == first.raw
    assert worker.stats.inferences == 1 and worker.stats.dedup["done"] == 1
    # The heartbeat (MULTI/HSET/PEXPIRE) works under the ACL user too.
    assert len(fleet) == 1 and not fleet[0]["stale"]


def worker_state(worker: Worker) -> RedisStateStore:
    state = worker.state
    assert isinstance(state, RedisStateStore)
    return state


async def test_device_cannot_publish_into_another_apps_topic(
    tmp_path: Path, secure_mosquitto: Server, acl_redis: Server, certs: Certs
) -> None:
    settings = secure_settings(tmp_path, secure_mosquitto, acl_redis, certs)
    x, _ = heldout()
    async with (
        worker_in_loop(settings) as worker,
        device(settings, certs, resend_after_s=None, timeout_s=3.0) as client,
    ):
        forged = client.make_request("digits", {"pixels": x[:1]}, id="forged")
        # MQTT 5, QoS 1: Mosquitto answers PUBACK 0x87 and drops the message.
        with pytest.raises(ConnectionError, match="Not authorized"):
            await client.send_raw(
                forged.id, client.encode(forged), topic="request_message/digits/sensor-8"
            )
        own = await client.send(client.make_request("digits", {"pixels": x[:1]}, id="own"))
        await asyncio.sleep(0.2)
    assert own.response.status == "ok" and own.response.app == "sensor-7"
    assert worker.stats.received == 1, "the forged request must never reach the worker"


async def _start(transport: MqttTransport) -> None:
    try:
        await transport.start()
    finally:
        await transport.close()


def _mqtt(
    srv: Server, certs: Certs | None, user: str | None, password: str | None
) -> MqttTransport:
    tls = TlsOptions(certs.ca) if certs is not None else TlsOptions()
    return MqttTransport(
        "127.0.0.1",
        srv.port,
        TransportOptions(client_id=f"t-{secrets.token_hex(4)}"),
        username=user,
        password=password,
        ssl_context=tls.context(),
        connect_timeout_s=3.0,
    )


async def test_anonymous_wrong_password_and_unverified_server_are_refused(
    secure_mosquitto: Server, certs: Certs
) -> None:
    with pytest.raises(ConnectionError, match="refused connection: Not authorized"):
        await _start(_mqtt(secure_mosquitto, certs, None, None))
    with pytest.raises(ConnectionError, match="refused connection") as info:
        await _start(_mqtt(secure_mosquitto, certs, "worker", "wrong"))
    assert "wrong" not in str(info.value).replace("refused", "")
    # Right credentials, but the dev CA is not among the system CAs: no connection.
    with pytest.raises(ConnectionError, match="not ready"):
        await _start(_mqtt(secure_mosquitto, None, "worker", MQTT_USERS["worker"]))
    # Right credentials and CA: connects.
    await _start(_mqtt(secure_mosquitto, certs, "worker", MQTT_USERS["worker"]))


# --- Redis --------------------------------------------------------------------------


def _store(
    redis: Server, certs: Certs, user: str, password: str, prefix: str = "iw:"
) -> RedisStateStore:
    return RedisStateStore(
        redis.url, prefix=prefix, username=user, password=password, tls=TlsOptions(certs.ca)
    )


async def test_redis_acl_user_claims_and_completes(acl_redis: Server, certs: Certs) -> None:
    store = _store(acl_redis, certs, "iw", REDIS_PASSWORD)
    await store.start()
    try:
        item = ClaimRequest(
            "app", f"id-{secrets.token_hex(4)}", "fp", JournalEntry(b"payload", "t", None, None)
        )
        [claimed] = await store.claim([item], nonce="n1", lease_ms=10_000, max_attempts=3)
        assert claimed.outcome is ClaimOutcome.NEW and claimed.token
        done = Completion(item.app, item.id, claimed.token, b"response")
        assert await store.complete([done], result_ttl_s=60) == [True]
        [again] = await store.claim([item], nonce="n2", lease_ms=10_000, max_attempts=3)
        assert again.outcome is ClaimOutcome.DONE and again.response == b"response"
        assert await store.reap_expired(lease_ms=10_000, max_attempts=3) == []
        assert await store.due_retries(lease_ms=10_000, max_attempts=3) == []
    finally:
        await store.close()


async def test_redis_user_without_evalsha_fails_start_clearly(
    acl_redis: Server, certs: Certs
) -> None:
    store = _store(acl_redis, certs, "noeval", NOEVAL_PASSWORD)
    with pytest.raises(StateAccessDenied) as info:
        await store.start()
    message = str(info.value)
    assert "Redis user 'noeval'" in message and "lacks permission" in message
    assert "EVALSHA" in message and f"127.0.0.1:{acl_redis.port}" in message
    assert NOEVAL_PASSWORD not in message


async def test_redis_keys_outside_the_users_pattern_fail_start_clearly(
    acl_redis: Server, certs: Certs
) -> None:
    store = _store(acl_redis, certs, "iw", REDIS_PASSWORD, prefix="other:")
    with pytest.raises(StateAccessDenied, match=r"Redis user 'iw' .* keys ~other:\*"):
        await store.start()


async def test_redis_refuses_wrong_password_anonymous_and_unverified_tls(
    acl_redis: Server, certs: Certs
) -> None:
    with pytest.raises(StateAccessDenied, match="refused the credentials of user 'iw'") as info:
        await _store(acl_redis, certs, "iw", "not-the-password").start()
    assert "not-the-password" not in str(info.value)
    anonymous = RedisStateStore(acl_redis.url, tls=TlsOptions(certs.ca))
    with pytest.raises(StateAccessDenied, match="user 'default'"):
        await anonymous.start()
    # Without the dev CA the server certificate does not verify.
    unverified = RedisStateStore(acl_redis.url, username="iw", password=REDIS_PASSWORD)
    with pytest.raises(StateUnavailable, match="unreachable"):
        await unverified.start()


async def test_worker_start_fails_clearly_without_redis_permission(
    tmp_path: Path, secure_mosquitto: Server, acl_redis: Server, certs: Certs
) -> None:
    settings = secure_settings(
        tmp_path,
        secure_mosquitto,
        acl_redis,
        certs,
        username="noeval",
        password_file=secret_file(tmp_path, "noeval.password", NOEVAL_PASSWORD),
    )
    with pytest.raises(StateAccessDenied, match=r"Redis user 'noeval' .* lacks permission"):
        async with worker_in_loop(settings):
            pass
