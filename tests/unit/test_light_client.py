"""The light client distribution without servers: URLs, topic names, what it shares with
the worker, and that importing it loads nothing of the worker."""

from __future__ import annotations

import subprocess
import sys

import inference_worker_client
import inference_worker_client.protocol as client_protocol
import pytest
from inference_worker_client.kafka import KafkaClientTransport, kafka_address, kafka_name
from inference_worker_client.mqtt import MqttClientTransport
from inference_worker_client.tls import TlsOptions
from inference_worker_client.transport import Credentials, open_transport

import inference_worker.client as worker_client
import inference_worker.protocol as worker_protocol
from inference_worker.security import TlsOptions as WorkerTlsOptions
from inference_worker.transports.kafka_topics import kafka_topic


def test_the_worker_uses_the_clients_codec_and_client() -> None:
    for name in client_protocol.__all__:
        assert getattr(worker_protocol, name) is getattr(client_protocol, name), name
    assert WorkerTlsOptions is TlsOptions
    assert issubclass(worker_client.InferenceClient, inference_worker_client.InferenceClient)
    assert worker_client.SyncInferenceClient.client_class is worker_client.InferenceClient
    assert worker_client.Reply is inference_worker_client.Reply


def test_importing_the_client_loads_nothing_of_the_worker() -> None:
    code = (
        "import sys, inference_worker_client, inference_worker_client.transport;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('inference_worker', 'paho', 'aiokafka', 'onnxruntime', 'redis')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"  # paho and aiokafka load on connect(), not on import


def test_open_transport_builds_the_light_transports() -> None:
    creds = Credentials()
    mqtt = open_transport(
        "mqtt://u:p%40ss@broker:1884", client_id="c", reply_to="r/_/c", credentials=creds
    )
    assert isinstance(mqtt, MqttClientTransport)
    assert (mqtt.host, mqtt.port, mqtt.reply_to) == ("broker", 1884, "r/_/c")
    assert open_transport("mqtts://b", client_id="c", reply_to="r", credentials=creds).port == 8883  # type: ignore[attr-defined]
    kafka = open_transport(
        "kafka://k1,k2:9093?fetch_max_wait_ms=5", client_id="c", reply_to="a/_/c", credentials=creds
    )
    assert isinstance(kafka, KafkaClientTransport)
    assert kafka.address.bootstrap == "k1:9092,k2:9093" and kafka.address.fetch_max_wait_ms == 5


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("memory://", "unsupported scheme"),
        ("http://secret:pw@x", "unsupported scheme"),
        ("mqtt://", "needs a host"),
        ("mqtt://h/path", "no path"),
        ("mqtt://h:99999", "invalid port"),
        ("kafka://u:p@h", "credentials"),
        ("kafka://h?partitions=x", "non-negative integer"),
        ("kafka://h?colour=blue", "unknown query"),
    ],
)
def test_bad_urls_are_refused_without_echoing_secrets(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        open_transport(url, client_id="c", reply_to="r", credentials=Credentials())
    assert "pw" not in str(caught.value) and "secret" not in str(caught.value)


def test_tls_files_need_mqtts_and_the_password_stays_out_of_reprs() -> None:
    creds = Credentials("u", "hunter2", TlsOptions(ca_file="/nonexistent/ca.pem"))
    with pytest.raises(ValueError, match="mqtts"):
        open_transport("mqtt://h", client_id="c", reply_to="r", credentials=creds)
    assert "hunter2" not in repr(creds)


@pytest.mark.parametrize(
    "topic", ["response_message/_/iw-client-1a2b", "request_message", "a/b-c/d_e", "req-1/x"]
)
def test_kafka_names_are_the_workers(topic: str) -> None:
    assert kafka_name(topic) == kafka_topic(topic)


@pytest.mark.parametrize("topic", ["a//b", "a.b/c", "__internal", "a/+/b", ""])
def test_topics_without_a_kafka_name_are_refused(topic: str) -> None:
    with pytest.raises(ValueError):
        kafka_name(topic)


def test_kafka_address_defaults() -> None:
    address = kafka_address("kafka://h")
    assert (address.bootstrap, address.partitions, address.session_timeout_ms) == (
        "h:9092",
        1,
        10_000,
    )
