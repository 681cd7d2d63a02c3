"""Transport security options, without network: secrets, repr, TLS plumbing, and the
Kafka SASL/SSL keyword arguments that reach aiokafka (the Tansu test broker has no SASL,
so this is where SASL_SSL is checked)."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest

from inference_worker.client import InferenceClient
from inference_worker.security import (
    TlsOptions,
    TransportSecurity,
    broker_security,
    read_secret,
    redis_kwargs,
    state_security,
)
from inference_worker.settings import load_settings
from inference_worker.state import open_state
from inference_worker.state.redis import RedisStateStore
from inference_worker.transports import connect
from inference_worker.transports.base import TransportOptions
from inference_worker.transports.mqtt import MqttTransport
from tests.servers import require_module


def test_password_files_are_read_stripped_and_kept_out_of_repr(tmp_path: Path) -> None:
    (tmp_path / "mqtt").write_text("s3cret-mqtt\n")
    (tmp_path / "redis").write_text("s3cret-redis\r\n")
    env = {
        "IW_BROKER__USERNAME": "worker",
        "IW_BROKER__PASSWORD_FILE": str(tmp_path / "mqtt"),
        "IW_STATE__USERNAME": "iw",
        "IW_STATE__PASSWORD": "inline-redis",
    }
    settings = load_settings(env=env)
    security = broker_security(settings.broker)
    assert (security.username, security.password) == ("worker", "s3cret-mqtt")
    assert "s3cret" not in repr(security) and "s3cret" not in repr(
        TransportOptions("c", security=security)
    )
    assert "inline-redis" not in repr(settings)
    in_url = load_settings(env={"IW_BROKER__URL": "mqtt://dev:urlpw@b:1883"})
    assert "urlpw" not in repr(in_url) and "mqtt://dev:***@b:1883" in repr(in_url)
    assert state_security(settings.state)["password"] == "inline-redis"
    file_only = load_settings(env={"IW_STATE__PASSWORD_FILE": str(tmp_path / "redis")})
    assert state_security(file_only.state)["password"] == "s3cret-redis"


def test_secret_errors_name_the_file_never_the_value(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cannot read password file .*missing"):
        read_secret("", str(tmp_path / "missing"), "broker.password_file")
    with pytest.raises(ValueError, match="not both") as info:
        read_secret("inline-pw", str(tmp_path / "x"), "state.password_file")
    assert "inline-pw" not in str(info.value)


def _mqtt(url: str, security: TransportSecurity) -> MqttTransport:
    transport = connect(url, TransportOptions("c", security=security))
    assert isinstance(transport, MqttTransport)
    return transport


def test_mqtts_uses_the_given_ca_client_cert_and_credentials() -> None:
    plain = _mqtt("mqtts://user:urlpw@broker", TransportSecurity())
    ctx = plain._ssl_context
    assert ctx is not None and ctx.check_hostname and ctx.verify_mode is ssl.CERT_REQUIRED
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert (plain._username, plain._password, plain.where) == ("user", "urlpw", "broker:8883")
    # Settings win over the URL's credentials.
    explicit = _mqtt("mqtts://user:urlpw@broker", TransportSecurity("worker", "filepw"))
    assert (explicit._username, explicit._password) == ("worker", "filepw")
    assert _mqtt("mqtt://broker", TransportSecurity())._ssl_context is None


def test_tls_misconfiguration_fails_early_with_the_file_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="use mqtts://"):
        _mqtt("mqtt://broker", TransportSecurity(tls=TlsOptions(ca_file="/x/ca.crt")))
    with pytest.raises(ValueError, match=r"nope\.crt"):
        _mqtt(
            "mqtts://broker", TransportSecurity(tls=TlsOptions(ca_file=str(tmp_path / "nope.crt")))
        )
    with pytest.raises(ValueError, match="together"):
        TlsOptions(cert_file="c.pem").context()
    with pytest.raises(ValueError, match="not rediss://"):
        RedisStateStore("redis://h:6379/0", tls=TlsOptions(ca_file="/x/ca.crt"))


def test_client_connect_accepts_tls_and_credentials() -> None:
    client = InferenceClient.connect(
        "mqtts://broker:8883", client_id="sensor-7", username="sensor-7", password="pw"
    )
    transport = client._transport
    assert isinstance(transport, MqttTransport)
    assert transport._ssl_context is not None and transport._username == "sensor-7"
    with pytest.raises(ValueError, match="either security="):
        InferenceClient.connect("mqtts://b", username="u", security=TransportSecurity())


def test_redis_kwargs_for_acl_user_and_rediss() -> None:
    tls = TlsOptions("ca.pem", "c.pem", "k.pem")
    kwargs = redis_kwargs("rediss://h:6380/0", username="iw", password="pw", tls=tls)
    assert kwargs["ssl_ca_certs"] == "ca.pem" and kwargs["ssl_certfile"] == "c.pem"
    assert kwargs["ssl_check_hostname"] is True and kwargs["ssl_cert_reqs"] == "required"
    assert kwargs["ssl_min_version"] == ssl.TLSVersion.TLSv1_2
    assert (kwargs["username"], kwargs["password"]) == ("iw", "pw")
    assert redis_kwargs("redis://h:6379/0") == {}
    store = open_state("redis://iw:pw@h:6379/0", username=None, password=None, tls=None)
    assert isinstance(store, RedisStateStore) and store.user == "iw"


# --- Kafka: what would reach aiokafka ---------------------------------------------------


def _kafka(security: TransportSecurity) -> Any:
    from inference_worker.transports.kafka import KafkaTransport

    transport = connect("kafka://k1:9093,k2:9093", TransportOptions("c", ("t",), security=security))
    assert isinstance(transport, KafkaTransport)
    return transport


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_kafka_sasl_ssl_options_reach_admin_producer_and_consumer(
    mechanism: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_module("aiokafka", "pip install -e '.[kafka]'")
    import aiokafka

    from inference_worker.transports import kafka as kafka_module

    security = TransportSecurity(
        username="worker", password="pw", kafka_protocol="SASL_SSL", sasl_mechanism=mechanism
    )
    transport = _kafka(security)
    kw = transport.security_kwargs
    assert kw["security_protocol"] == "SASL_SSL" and kw["sasl_mechanism"] == mechanism
    assert (kw["sasl_plain_username"], kw["sasl_plain_password"]) == ("worker", "pw")
    ctx = kw["ssl_context"]
    assert isinstance(ctx, ssl.SSLContext) and ctx.check_hostname
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2

    # aiokafka accepts them (constructing connects nothing).
    producer = aiokafka.AIOKafkaProducer(bootstrap_servers=transport.where, **kw)
    assert producer.client._security_protocol == "SASL_SSL"
    assert producer.client._sasl_mechanism == mechanism
    await producer.client.close()

    # And the transport passes them to all three clients it makes.
    seen: dict[str, dict[str, Any]] = {}

    class Fake:
        def __init__(self, name: str, **kwargs: Any) -> None:
            seen[name] = kwargs

        async def start(self) -> None:
            return None

        async def stop(self) -> None:
            return None

        async def close(self) -> None:
            return None

        async def list_topics(self) -> list[str]:
            return ["t", *kafka_module.DEFAULT_TOPICS]

        def subscribe(self, **_: Any) -> None:
            raise RuntimeError("stop here")

    monkeypatch.setattr(kafka_module, "AIOKafkaAdminClient", lambda **k: Fake("admin", **k))
    from inference_worker.transports import kafka_publish

    monkeypatch.setattr(kafka_publish, "AIOKafkaProducer", lambda **k: Fake("producer", **k))
    monkeypatch.setattr(kafka_module, "AIOKafkaConsumer", lambda **k: Fake("consumer", **k))
    with pytest.raises(RuntimeError, match="stop here"):
        await transport.start()
    assert set(seen) == {"admin", "producer", "consumer"}
    for kwargs in seen.values():
        assert {k: kwargs[k] for k in kw} == kw


def test_kafka_security_is_checked() -> None:
    require_module("aiokafka", "pip install -e '.[kafka]'")
    assert _kafka(TransportSecurity()).security_kwargs == {"security_protocol": "PLAINTEXT"}
    with pytest.raises(ValueError, match="PLAINTEXT"):
        _kafka(TransportSecurity(username="u", password="p"))
    with pytest.raises(ValueError, match="needs a username and a password"):
        _kafka(TransportSecurity(kafka_protocol="SASL_SSL"))
    with pytest.raises(ValueError, match="sasl_mechanism"):
        TransportSecurity(kafka_protocol="SASL_SSL", sasl_mechanism="GSSAPI")
    with pytest.raises(ValueError, match="URL credentials are not supported"):
        connect("kafka://u:p@k:9092", TransportOptions("c"))
    plain = _kafka(TransportSecurity(username="u", password="p", kafka_protocol="SASL_PLAINTEXT"))
    assert "ssl_context" not in plain.security_kwargs
